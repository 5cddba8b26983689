"""The watcher's persistent query server: the shipped module_utils run under /usr/bin/python3.

The server runs locally here (``local=True``: the same argv minus ssh); a fake ``squeue`` on PATH
replays a recorded Slurm 22.05 answer, so the whole chain (payload, in-memory importer, the Slurm
backend, JSON lines) is exercised without a cluster. The bed test covers the ssh hop.
"""
from __future__ import annotations

import json
import os
import pwd
import subprocess
import threading
from pathlib import Path

import pytest

from isession.remote import RemoteError, RemoteServer, control_dir, payload, ssh_argv

from ansible_collections.hpc.interactive.plugins.module_utils import _ports
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.local import Local, group_members

REPO = Path(__file__).resolve().parents[3]
MU = REPO / "plugins" / "module_utils"
SQUEUE_JSON = REPO / "tests" / "unit" / "fixtures" / "schedulers" / "slurm" / "squeue_22.05_mixed.json"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return bindir


def script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def server(tmp_path) -> RemoteServer:
    return RemoteServer({"host": "localhost", "python": SYSTEM_PYTHON}, MU, local=True)


def test_query_many_jobs_in_one_call(tmp_path, fake_bin):
    calls = tmp_path / "calls"
    # the fixed format answers for the jobs asked (a running 1, a pending 2, an ended 4); --json for all of them
    script(fake_bin / "squeue", f'echo "$@" >> {calls}\ncase "$*" in *--json*) cat {SQUEUE_JSON};; *)\n'
           'printf "1|RUNNING|u|compute1|None|rec-run\\n2|PENDING|u||PartitionConfig|rec-q\\n'
           '4|FAILED|u|compute1|None|x\\n";; esac\n')
    script(fake_bin / "sacct", "echo 'accounting storage is disabled' >&2; exit 1\n")
    srv = server(tmp_path)
    try:
        ans = srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1", "2", "4", "5", "999"]}, 10)
        assert ans["reachable"] is True
        jobs = ans["jobs"]
        assert jobs["1"]["state"] == "running" and jobs["1"]["nodes"] == ["compute1"]
        assert jobs["2"]["state"] == "queued"
        assert jobs["4"]["state"] == "failed"
        assert jobs["5"]["state"] == "completed"
        assert jobs["999"]["found"] is False  # absent: the scheduler answered and does not know it
        pid = srv.proc.pid
        # the same process answers the next poll: one connection, one python, many polls
        for _attempt in range(5):
            assert srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1"]}, 10)["jobs"]["1"]["state"] \
                == "running"
        assert srv.proc.pid == pid
        # ended and unknown jobs need the full answer (fixed format, then JSON); a running job alone the fixed
        # format of just that job, never the JSON list of the whole cluster
        lines = calls.read_text().splitlines()
        assert ["--json" in ln for ln in lines] == [False, True] + [False] * 5, lines
        assert lines[-1].endswith("--states=all --jobs=1"), lines
    finally:
        srv.close()


def test_threads_sharing_one_connection_each_get_their_own_answer(tmp_path, fake_bin):
    # the watcher polls (controller, slurm) and (controller, local) from two threads over one server
    script(fake_bin / "squeue", f"cat {SQUEUE_JSON}\n")
    script(fake_bin / "sacct", "echo 'accounting storage is disabled' >&2; exit 1\n")
    srv = server(tmp_path)
    mixups = []

    def poll(job_id: str) -> None:
        for _attempt in range(25):
            jobs = srv.ask({"op": "query", "scheduler": "slurm", "job_ids": [job_id]}, 20)["jobs"]
            if set(jobs) != {job_id}:
                mixups.append((job_id, sorted(jobs)))

    threads = [threading.Thread(target=poll, args=(j,)) for j in ("1", "2", "4")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert mixups == []
    finally:
        srv.close()


def test_scheduler_timeout_is_undetermined_not_an_end(tmp_path, fake_bin):
    script(fake_bin / "squeue", "sleep 5\n")
    srv = server(tmp_path)
    try:
        ans = srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1"], "timeout": 0.5}, 10)
        assert ans["reachable"] is False
        assert ans["jobs"]["1"]["state"] == "undetermined"
    finally:
        srv.close()


def test_no_answer_in_time_closes_the_connection(tmp_path, fake_bin):
    script(fake_bin / "squeue", "sleep 5\n")
    srv = server(tmp_path)
    with pytest.raises(RemoteError, match="no answer"):
        srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1"], "timeout": 30}, 0.5)
    assert srv.proc is None


def test_broken_server_reconnects(tmp_path, fake_bin):
    script(fake_bin / "squeue", f"cat {SQUEUE_JSON}\n")
    srv = server(tmp_path)
    try:
        srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1"]}, 10)
        os.killpg(srv.proc.pid, 9)
        srv.proc.wait()
        assert srv.ask({"op": "query", "scheduler": "slurm", "job_ids": ["1"]}, 10)["reachable"] is True
    finally:
        srv.close()


def test_tail_shows_logs_and_never_the_secret(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "job.out").write_text("line1\nline2\nline3\n")
    (d / "server.log").write_text("started\n")
    (d / "secret").write_text("s3cr3t-value\n")
    (d / "secret.log").write_text("s3cr3t-value\n")
    (d / "agent.sh").write_text("#!/bin/sh\n")
    srv = server(tmp_path)
    try:
        files = srv.ask({"op": "tail", "dir": str(d), "lines": 2}, 10)["files"]
    finally:
        srv.close()
    assert files == {"job.out": "line2\nline3", "server.log": "started"}


def test_payload_ships_the_scheduler_tunnel_and_port_code_only():
    head, body = payload(MU).split(b"\n", 1)
    assert int(head) == len(body)
    names = {n.rsplit(".", 1)[-1] for n in json.loads(body)}
    assert {"slurm", "pbs", "sge", "local", "_cmd", "_base", "_ports", "_tunnel", "_proc", "_teardown"} <= names
    assert not names & {"_service_file", "_state", "_directives"}


def local_job(state_dir: Path, workdir: Path, name: str) -> str:
    """A real detached local job (the controller target's agent) that ignores nothing and sleeps."""
    script_path = workdir / "agent.sh"
    script_path.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
    script_path.chmod(0o700)
    return Local(state_dir=str(state_dir)).submit(str(script_path), name, "root")


def group_alive(pgid: str) -> bool:
    """Whether a process of the group still runs (zombies not counted: this test process may be their parent)."""
    return bool(group_members(int(pgid)))


def test_teardown_stops_a_local_job_and_releases_the_owners_ports(tmp_path):
    """The resource side of a controller session over the server: the detached agent, the tunnel, the node ports."""
    state_dir = tmp_path / "jobs"
    sid = f"unit-cancel-{os.getpid()}"
    job = local_job(state_dir, tmp_path, f"isession-{sid}")
    rdir = _ports.ReservationDir()
    rdir.ensure()
    ports, _ignored = rdir.reserve(sid, 1, _ports.build_candidates())
    srv = server(tmp_path)
    try:
        assert group_alive(job)
        req = {"op": "teardown", "state_dir": str(state_dir),
               "holding": {"session_id": sid, "target": "controller", "scheduler": "local",
                           "remote_dir": str(tmp_path)}}
        ans = srv.ask(req, 30)
        assert ans["error"] == "", ans
        assert [(o["kind"], o["undone"]) for o in ans["outcomes"]] == [
            ("job", [f"job {job}"]), ("tunnel", []), ("node_ports", [f"node port {ports[0]}"])]
        assert not group_alive(job)
        assert rdir.release(sid) == []  # nothing of the owner is left
        # twice: nothing to do, no error
        again = srv.ask(req, 30)
        assert again["error"] == "" and all(o["undone"] == [] for o in again["outcomes"]), again
    finally:
        srv.close()
        rdir.release(sid)
        if group_alive(job):
            os.killpg(int(job), 9)


def squeue_of_mine(tmp_path: Path, name: str) -> Path:
    """The recorded Slurm answer with job 1 (RUNNING) named ``name`` and every job this user's."""
    doc = json.loads(SQUEUE_JSON.read_text())
    for job in doc["jobs"]:
        job["user_name"] = pwd.getpwuid(os.getuid()).pw_name
        if str(job["job_id"]) == "1":
            job["name"] = name
    out = tmp_path / "squeue.json"
    out.write_text(json.dumps(doc))
    return out


def test_teardown_runs_scancel_for_the_sessions_live_job_only(tmp_path, fake_bin):
    calls = tmp_path / "calls"
    answer = squeue_of_mine(tmp_path, "isession-s1")
    script(fake_bin / "squeue", f'cat "{answer}"\n')
    script(fake_bin / "scancel", f'echo "$@" >> "{calls}"\n')
    srv = server(tmp_path)
    try:
        ans = srv.ask({"op": "teardown", "holding": {"session_id": "s1", "target": "compute", "scheduler": "slurm"}},
                      10)
        assert ans["error"] == "" and ans["outcomes"] == [
            {"kind": "job", "side": "resource", "undone": ["job 1"], "error": "", "pending": ""}], ans
        assert calls.read_text().split() == ["1"]
        # another session's name: no job of it is listed, nothing is cancelled
        ans = srv.ask({"op": "teardown", "holding": {"session_id": "s2", "target": "compute", "scheduler": "slurm"}},
                      10)
        assert ans["outcomes"][0]["undone"] == [] and ans["error"] == ""
        assert calls.read_text().split() == ["1"]
        # the end of a job: the job is not looked at (skip), and a compute session holds nothing else there
        ans = srv.ask({"op": "teardown", "skip": ["job"],
                       "holding": {"session_id": "s1", "target": "compute", "scheduler": "slurm"}}, 10)
        assert ans == {"outcomes": [], "error": ""}
        assert calls.read_text().split() == ["1"]
    finally:
        srv.close()


def test_teardown_refused_by_the_scheduler_says_so(tmp_path, fake_bin):
    answer = squeue_of_mine(tmp_path, "isession-s1")
    script(fake_bin / "squeue", f'cat "{answer}"\n')
    script(fake_bin / "scancel", 'echo "scancel: error: Kill job error on job id 1: Access/permission denied" >&2\n'
                                 'exit 1\n')
    srv = server(tmp_path)
    try:
        ans = srv.ask({"op": "teardown", "holding": {"session_id": "s1", "target": "compute", "scheduler": "slurm"}},
                      10)
    finally:
        srv.close()
    assert ans["outcomes"][0]["undone"] == []
    assert "Access/permission denied" in ans["error"] and "job 1" in ans["error"], ans


def test_teardown_with_an_unanswering_scheduler_is_an_error_not_a_success(tmp_path, fake_bin):
    script(fake_bin / "squeue", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
    srv = server(tmp_path)
    try:
        ans = srv.ask({"op": "teardown", "holding": {"session_id": "s1", "target": "compute", "scheduler": "slurm"},
                       "timeout": 2}, 10)
    finally:
        srv.close()
    assert "scheduler did not answer" in ans["error"], ans


def test_ssh_argv_reuses_a_master_connection(tmp_path):
    argv = ssh_argv({"host": "10.0.0.1", "user": "u", "port": "2222", "key": "/k"}, tmp_path, ["python3", "-c", "x"])
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and "ControlMaster=auto" in argv
    assert f"ControlPath={tmp_path}/cm-%C" in argv
    assert "ControlPath=none" in ssh_argv({"host": "h"}, None, ["true"])
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "u"
    assert argv[-3:] == ["--", "10.0.0.1", "python3 -c x"]


def test_remote_command_survives_the_remote_shell(tmp_path):
    # what the remote login shell does with ssh's one command string: sh -c STRING
    argv = ssh_argv({"host": "h"}, None, ["python3", "-c", "print('a b'); print(\"$HOME `x`\")\nprint(1)"])
    cp = subprocess.run(["/bin/sh", "-c", argv[-1].replace("python3", SYSTEM_PYTHON, 1)], capture_output=True,
                        text=True, check=True)
    assert cp.stdout == "a b\n$HOME `x`\n1\n"


def test_control_dir_is_private_and_short(tmp_path):
    d = control_dir(str(tmp_path))
    assert d is not None and oct(d.stat().st_mode & 0o777) == "0o700"
    assert len(f"{d}/cm-{'0' * 40}.{'x' * 16}") < 104 or len(str(tmp_path)) > 40
    d.chmod(0o755)
    assert control_dir(str(tmp_path)) is None


def test_scheduler_path_and_env_of_the_resource_are_used(tmp_path):
    """A scheduler off the non-login PATH: the request's path is searched first and its env reaches the command."""
    site = tmp_path / "site" / "bin"
    site.mkdir(parents=True)
    script(site / "squeue", f'[ "$SITE_CLUSTER" = lab ] || exit 7\ncat "{SQUEUE_JSON}"\n')
    srv = server(tmp_path)
    try:
        req = {"op": "query", "scheduler": "slurm", "job_ids": ["1"], "path": [str(site)],
               "env": {"SITE_CLUSTER": "lab"}}
        ans = srv.ask(req, 10)
        assert ans["reachable"] is True and ans["jobs"]["1"]["state"] == "running", ans
        bad = srv.ask(dict(req, env={"PATH": "/x"}), 10)  # checked like the modules check it
        assert bad["reachable"] is False and "scheduler_env: PATH cannot be set here" in bad["error"], bad
    finally:
        srv.close()


def test_a_far_side_that_never_reads_its_input_cannot_hang_the_asker(tmp_path):
    """An ssh stuck before it reads its stdin (a connection that never completes): the ~190 KB payload is more than a
    pipe holds, and a blocking write waited for it forever, which stopped the watcher's polls for that resource."""
    stuck = tmp_path / "python"
    script(stuck, "exec sleep 120\n")  # takes the place of the remote python and never reads a byte
    srv = RemoteServer({"host": "stuck", "python": str(stuck)}, MU, local=True)
    outcome = {}

    def ask():
        try:
            srv.ask({"op": "ping"}, 1.0)
        except RemoteError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the ask hung on a far side that does not read"
    assert outcome["error"] == "stuck did not take the request in time"
    assert srv.proc is None  # the stuck session was closed (killed), the next ask starts a new one


def test_teardowns_of_many_sessions_run_side_by_side_and_answer_in_order(tmp_path, fake_bin):
    """Twenty cancels in one tick: one request, carried out together on the resource; a bad item is its own error."""
    doc = json.loads(squeue_of_mine(tmp_path, "isession-s1").read_text())
    for job in doc["jobs"]:
        if str(job["job_id"]) == "2":
            job["name"] = "isession-s2"
    answer = tmp_path / "squeue2.json"
    answer.write_text(json.dumps(doc))
    calls = tmp_path / "calls"
    script(fake_bin / "squeue", f'cat "{answer}"\n')
    script(fake_bin / "scancel", f'echo "start $1" >> "{calls}"; sleep 0.5; echo "end $1" >> "{calls}"\n')
    srv = server(tmp_path)
    items = [{"holding": {"session_id": sid, "target": "compute", "scheduler": "slurm"}} for sid in ("s1", "s2", "s3")]
    items.insert(2, {"holding": {"target": "compute"}})  # no session id: that item fails alone
    try:
        ans = srv.ask({"op": "teardowns", "items": items}, 20)
    finally:
        srv.close()
    got = ans["answers"]
    assert [a["outcomes"][0]["undone"] if a["outcomes"] else a["error"][:9] for a in got] == [
        ["job 1"], ["job 2"], "TypeError", []]
    assert got[0]["error"] == got[1]["error"] == got[3]["error"] == ""
    # the two scancels overlapped: the second began before the first ended
    lines = calls.read_text().split("\n")
    assert [ln.split(" ")[0] for ln in lines if ln] == ["start", "start", "end", "end"], lines
