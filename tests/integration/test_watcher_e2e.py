"""The watcher end to end, on real sessions started by ``isession start`` (and by the playbook alone) on Slurm.

Issue 3: a job's end by walltime, a hand ``scancel`` or node loss is in service.json within 5 s of the scheduler's
own end time (Slurm's ``EndTime``; the watcher's write is service.json's mtime), and the workspace-side tunnel end
(the forwarded listener on PORT) is gone by then; the controller's sshd stopped for 10 s changes nothing; a session
started by ``ansible-playbook hpc.interactive.start_nginx`` without the CLI gets the user's watcher.

Each session is an nginx session on the compute target through real Slurm; every test cancels what it started in
``finally`` (isession cancel, then scancel of its own job id as a safety net) and stops its own watcher.
The tests at the end of the file (no ``bed`` fixture) are unit tests of the watcher helpers these fixes added.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))
from isession import watcher as w  # noqa: E402  (this checkout's src/, not an installed copy)
from isession import watchfiles as wf  # noqa: E402
from cli_support import Cli  # noqa: E402

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state  # noqa: E402
from sessions_common import (  # noqa: E402
    WS_USER,
    cluster_inventory,
    failure_text,
    http_get,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)

BUDGET = 5.0  # seconds from the scheduler's end of the job to service.json (issue 3)
CLUSTER_USER = "cluser"
TERMINAL = ("Cancelled", "Completed", "Failed")
# the watcher is ensured by its own task of the start play, while the app starts
WATCH_TASK = "hpc.interactive.session : Ensure the user's watcher runs"
NODE = "compute1"  # the node-loss test pins its session here (debug partition: compute1, compute2)


# ---------------------------------------------------------------------------- helpers

def new_id(kind: str) -> str:
    return f"wte2e-{kind}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


def listening(bed, port: int) -> bool:
    """Whether anything LISTENs on ``port`` in the workspace namespace (the tunnel's workspace end)."""
    return bool(bed.run("workspace", ["ss", "-Hltn", f"sport = :{port}"], check=True).stdout.strip())


def slurm_job(bed, job: str) -> Dict[str, str]:
    """``JobState`` and ``EndTime`` of ``job`` from slurmctld, else from the bed's jobcomp file (job purged)."""
    out = bed.slurm(["scontrol", "show", "job", "-o", job], check=False).stdout
    if f"JobId={job} " not in out:
        path = bed.slurm_dir / "jobcomp.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        out = next((ln for ln in reversed(lines) if ln.startswith(f"JobId={job} ")), "")
    return dict(re.findall(r"\b(JobState|EndTime|Requeue|NodeList|Reason)=(\S*)", out))


def end_epoch(text: str) -> float:
    """Slurm's local ``YYYY-MM-DDTHH:MM:SS`` as epoch seconds (whole seconds, rounded down by Slurm)."""
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def queue(bed, job: str) -> str:
    return bed.slurm(["squeue", "-h", "-j", job, "-o", "%T"], check=False).stdout.strip()


class Watch:
    """Poll one session's service.json and the workspace listener together, remembering when each changed."""

    def __init__(self, bed, sdir: Path, port: int) -> None:
        self.bed, self.sdir, self.port = bed, sdir, port
        self.statuses: List[Tuple[float, str]] = []
        self.last_listening: Optional[float] = None

    def poll(self) -> dict:
        svc = read_json(self.sdir / "service.json")
        now = time.time()
        if not self.statuses or self.statuses[-1][1] != svc["JOB_STATUS"]:
            self.statuses.append((now, svc["JOB_STATUS"]))
        if listening(self.bed, self.port):
            self.last_listening = time.time()
        return svc

    def until_terminal(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            svc = self.poll()
            if svc["JOB_STATUS"] in TERMINAL:
                return svc
            time.sleep(0.1)
        raise AssertionError(f"{self.sdir.name}: not ended after {timeout:.0f} s: {self.statuses}")

    def written_at(self) -> float:
        """When the watcher wrote the terminal status (service.json is replaced atomically: its mtime)."""
        return (self.sdir / "service.json").stat().st_mtime


def assert_ended_in_budget(bed, watch: Watch, job: str, slurm_state: str) -> Tuple[dict, float]:
    """The scheduler's end -> service.json within BUDGET, and the tunnel's workspace end gone within BUDGET."""
    svc = watch.until_terminal(240)
    # the final state: Slurm shows COMPLETING (final state hidden) until the job's processes are gone
    assert wait_until(lambda: slurm_job(bed, job).get("JobState") not in (None, "RUNNING", "COMPLETING"), 60), \
        slurm_job(bed, job)
    info = slurm_job(bed, job)
    assert info["JobState"] == slurm_state, info
    ended = end_epoch(info["EndTime"])
    lag = watch.written_at() - ended
    print(f"{watch.sdir.name}: job {job} {slurm_state} at {info['EndTime']} -> service.json "
          f"{svc['JOB_STATUS']} {lag:.2f} s later")
    assert lag <= BUDGET, f"service.json written {lag:.2f} s after Slurm ended job {job} ({info})"
    # the tunnel's workspace end: never seen listening later than BUDGET after the end, and gone now
    assert wait_until(lambda: not listening(bed, watch.port), max(0.5, ended + BUDGET - time.time())), \
        f"workspace port {watch.port} still listening {time.time() - ended:.1f} s after the job ended"
    if watch.last_listening is not None:
        assert watch.last_listening - ended <= BUDGET, \
            f"workspace port {watch.port} listened {watch.last_listening - ended:.2f} s after the job ended"
    return svc, lag


def start_compute(cli: Cli, sid: str, *extra: str) -> Tuple[dict, dict]:
    cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                 "-e", "session_start_timeout=90", "-e", "session_queue_timeout=90", *extra, timeout=300)
    assert cp.returncode == 0, f"isession start -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    svc, state = cli.service(sid), cli.state(sid)
    assert svc["JOB_STATUS"] == "Running" and state["job_id"], (svc, state)
    return svc, state


def watcher_pid(root: Path) -> Optional[int]:
    pid = wf.running_pid(root)
    return pid if pid and pid > 0 else None


def cleanup(bed, cli: Optional[Cli], sids: List[str], jobs: List[str]) -> None:
    """Cancel what a test started (idempotent), scancel its own job ids, stop its watcher."""
    for sid in sids:
        if cli is not None and (cli.root / sid / "state.json").exists():
            cli.run("cancel", sid, timeout=120)
    if jobs:
        bed.slurm(["scancel", *jobs], user=CLUSTER_USER, check=False)
    if cli is not None:
        pid = watcher_pid(cli.root)
        cli.stop_watcher()
        if pid:
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)


def start_by_playbook(bed, extra_vars: dict, inventory: Path, env: Dict[str, str]):
    """``ansible-playbook hpc.interactive.start_nginx`` as wsuser on the workspace (run_playbook, plus ``env``)."""
    text = "---\n- name: Start nginx\n  ansible.builtin.import_playbook: hpc.interactive.start_nginx\n"
    return bed.playbook_json(text, user=WS_USER, extra_vars=extra_vars, inventory=inventory, env=env)


@pytest.fixture
def cli(bed):
    return Cli(bed, inventory=cluster_inventory(bed))


# ---------------------------------------------------------------------------- 1. walltime
def test_walltime_ends_completed_with_the_reason(bed, cli):
    sid, jobs = new_id("wall"), []
    try:
        svc, state = start_compute(cli, sid, "-e", "session_walltime=1")
        jobs.append(state["job_id"])
        pid = watcher_pid(cli.root)
        assert pid, "isession start did not leave a watcher running"
        assert os.readlink(f"/proc/{pid}/cwd") == "/", "the watcher runs inside a directory of the start"
        watch = Watch(bed, cli.root / sid, int(svc["PORT"]))
        assert watch.poll()["JOB_STATUS"] == "Running" and listening(bed, watch.port)
        # Slurm checks time limits every 30 s: the job ends 60-90 s after it started
        svc, _lag = assert_ended_in_budget(bed, watch, state["job_id"], "TIMEOUT")
        assert svc["JOB_STATUS"] == "Completed", (svc, cli.watcher_log())
        assert svc["ERROR_MESSAGE"].startswith("walltime 00:01:00 reached"), svc
        assert state["job_id"] in svc["ERROR_MESSAGE"] and "TIMEOUT" in svc["ERROR_MESSAGE"]
        after = cli.state(sid)
        assert after["step"] == "completed" and after["ended"]
        assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)
        assert wait_until(lambda: not session_processes(after["remote_dir"]), 15), \
            session_processes(after["remote_dir"])
        assert [s for _t, s in watch.statuses] == ["Running", "Completed"], watch.statuses
    finally:
        cleanup(bed, cli, [sid], jobs)


# ---------------------------------------------------------------------------- 2. hand scancel
def test_hand_scancel_is_failed_in_words(bed, cli):
    sid, jobs = new_id("scancel"), []
    try:
        svc, state = start_compute(cli, sid)
        job = state["job_id"]
        jobs.append(job)
        watch = Watch(bed, cli.root / sid, int(svc["PORT"]))
        assert watch.poll()["JOB_STATUS"] == "Running"
        time.sleep(2)  # a few polls of a RUNNING job change nothing
        assert watch.poll()["JOB_STATUS"] == "Running"
        bed.run("controller", ["scancel", job], user=CLUSTER_USER, check=True)
        svc, _lag = assert_ended_in_budget(bed, watch, job, "CANCELLED")
        assert svc["JOB_STATUS"] == "Failed", (svc, cli.watcher_log())
        assert f"the job was cancelled outside isession (job {job}: CANCELLED" in svc["ERROR_MESSAGE"], svc
        assert cli.state(sid)["step"] == "failed"
        assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)
        assert wait_until(lambda: queue(bed, job) in ("", "CANCELLED"), 15)
        status = cli.json("status", sid)
        assert status["status"] == "Failed" and "cancelled outside isession" in json.dumps(status)
    finally:
        cleanup(bed, cli, [sid], jobs)


# ---------------------------------------------------------------------------- 3. node loss
def test_node_down_is_failed_node_fail_and_never_requeued(bed, cli):
    sid, jobs, downed = new_id("nodefail"), [], False
    try:
        svc, state = start_compute(cli, sid, "-e", f'session_directives=["--nodelist={NODE}"]')
        job = state["job_id"]
        jobs.append(job)
        rdir = Path(state["remote_dir"])
        # the role submits Slurm sessions with --no-requeue (the bed also has JobRequeue=0)
        assert "#SBATCH --no-requeue" in (rdir / "agent.sh").read_text()
        info = slurm_job(bed, job)
        assert info.get("Requeue") == "0" and info.get("NodeList") == NODE, info
        assert read_json(rdir / "agent.json")["host"] == NODE
        watch = Watch(bed, cli.root / sid, int(svc["PORT"]))
        assert watch.poll()["JOB_STATUS"] == "Running" and listening(bed, watch.port)

        # other people's jobs on the node would die too: give them a minute to end (best effort)
        def others():
            return [j for j in bed.slurm(["squeue", "-h", "-w", NODE, "-t", "R,CG", "-o", "%i"],
                                         check=False).stdout.split() if j != job]

        if not wait_until(lambda: not others(), 60, step=1):
            print(f"node loss: jobs {others()} of other tests also run on {NODE}")
        downed = True
        bed.node_down(NODE, reason="isession watcher e2e node loss")
        svc, _lag = assert_ended_in_budget(bed, watch, job, "NODE_FAIL")
        assert svc["JOB_STATUS"] == "Failed", (svc, cli.watcher_log())
        assert svc["ERROR_MESSAGE"].startswith(f"node failure on {NODE} (job {job}: NODE_FAIL"), svc
        assert cli.state(sid)["step"] == "failed"
        # not requeued: the job stays ended, and nothing of the session survives on the node
        time.sleep(2)
        assert slurm_job(bed, job).get("JobState") == "NODE_FAIL"
        assert cli.service(sid)["JOB_STATUS"] == "Failed"
        assert wait_until(lambda: not session_processes(str(rdir)), 20), session_processes(str(rdir))
        assert not listening(bed, watch.port)
    finally:
        try:
            if downed:
                bed.node_resume(NODE)
        finally:
            cleanup(bed, cli, [sid], jobs)


# ---------------------------------------------------------------------------- 4. controller sshd outage
def _sshd_pid(bed) -> Optional[int]:
    try:
        pid = int((bed.host_dir("controller") / "sshd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _sshd_sessions(user: str) -> List[int]:
    """sshd processes serving ``user``'s connections (``sshd: USER@notty``, ``sshd: USER [priv]``) on any bed host."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith((f"sshd: {user}@", f"sshd: {user} [")):
                out.append(int(entry))
    return out


def _isession_masters(uid: int) -> List[int]:
    """wsuser's ssh ControlMaster processes of the isession watcher (``ssh: /tmp/isession-cm-UID/cm-... [mux]``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ssh: /tmp/isession-cm-{uid}/"):
            out.append(int(entry))
    return out


def test_controller_sshd_stopped_10s_changes_nothing(bed, cli):
    uid = pwd.getpwnam(WS_USER).pw_uid
    sid, jobs, stopped = new_id("sshd"), [], False
    try:
        svc, state = start_compute(cli, sid)
        job = state["job_id"]
        jobs.append(job)
        port = int(svc["PORT"])
        secret = (cli.root / sid / "secret").read_text().strip()
        url = f"http://127.0.0.1:{port}/me/{port}/"
        tmp = bed.user_tmpdir(WS_USER)
        assert http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)[0] == 200
        watch = Watch(bed, cli.root / sid, port)
        assert wait_until(lambda: watcher_pid(cli.root) is not None, 10)
        log_before = len(cli.watcher_log())

        # the watcher's connection must be up before the outage (it is made at its first poll, which may come just
        # as the start returns; one still being made when sshd stops would ride out the outage unnoticed)
        assert wait_until(lambda: _isession_masters(uid) and _sshd_sessions(CLUSTER_USER), 15), "no watcher connection"
        time.sleep(0.5)
        pid = _sshd_pid(bed)
        assert pid, "the controller's sshd is not running"
        stopped = True
        os.kill(pid, signal.SIGTERM)  # the listener: no new connection to the controller
        masters = _isession_masters(uid)
        for master in masters:  # and the watcher's established connection goes too
            os.kill(master, signal.SIGTERM)
        for session in _sshd_sessions(CLUSTER_USER):  # also one made without a master (a stopped sshd keeps those)
            os.kill(session, signal.SIGTERM)
        outage_start = time.monotonic()
        assert wait_until(lambda: not bed._listening("controller", 22), 5), "sshd still listening"
        refused = bed.run("workspace", ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o",
                                        "ControlMaster=no", "-o", "ControlPath=none", f"{CLUSTER_USER}@controller",
                                        "true"], user=WS_USER, timeout=30)
        assert refused.returncode == 255, refused
        while time.monotonic() - outage_start < 10:
            assert watch.poll()["JOB_STATUS"] == "Running", watch.statuses
            assert cli.state(sid)["step"] == "running"
            time.sleep(0.2)
        # the direct tunnel (compute -> workspace) never needed the controller's sshd
        assert http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)[0] == 200
        bed._start_sshd("controller")
        stopped = False
        assert wait_until(lambda: bed._listening("controller", 22), 10)

        during = cli.watcher_log()[log_before:]
        wpid = watcher_pid(cli.root)
        tree = bed.run("workspace", ["ps", "-o", "pid,lstart,args", "--ppid", str(wpid), "-p", str(wpid)],
                       check=False).stdout if wpid else ""
        assert "undetermined" in during, (f"the watcher never noticed the outage (masters killed: {masters}, "
                                          f"watcher:\n{tree}):\n{cli.watcher_log()[-3000:]}")
        assert sid not in during, f"the watcher touched {sid} during the outage:\n{during}"
        # back to normal: the watcher reconnects (the log shows no new 'undetermined' after a few polls)
        time.sleep(3)
        settled = len(cli.watcher_log())
        time.sleep(3)
        assert "undetermined" not in cli.watcher_log()[settled:], cli.watcher_log()[settled:]
        assert [s for _t, s in watch.statuses] == ["Running"], watch.statuses
        assert queue(bed, job) == "RUNNING"
        assert http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)[0] == 200
        # and it still ends as it should: isession cancel reaches the controller again
        cc = cli.run("cancel", sid, timeout=120)
        assert cc.returncode == 0, cc.stdout + cc.stderr
        assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
        assert wait_until(lambda: queue(bed, job) in ("", "CANCELLED"), 15)
        assert wait_until(lambda: not listening(bed, port), 10)
    finally:
        try:
            if stopped or _sshd_pid(bed) is None:
                bed._start_sshd("controller")
                wait_until(lambda: bed._listening("controller", 22), 10)
        finally:
            cleanup(bed, cli, [sid], jobs)


# ---------------------------------------------------------------------------- 5. playbook only
def test_playbook_started_session_gets_the_watcher(bed):
    """``ansible-playbook hpc.interactive.start_nginx`` (no CLI) ends by starting the user's watcher, once."""
    inv = cluster_inventory(bed)
    watcher_cli = Cli(bed, inventory=inv)  # only for its copy of src/isession and its session root
    root = watcher_cli.root
    # the isession found next to ansible-playbook's python runs this checkout's code (not a stale install)
    env = {"PYTHONPATH": watcher_cli.env["PYTHONPATH"]}
    sids = [new_id("play1"), new_id("play2")]
    jobs: List[str] = []
    try:
        common = dict(session_root=str(root), session_target="compute", session_resource="controller",
                      session_walltime="00:05:00", session_start_timeout=90, session_queue_timeout=90)
        res = start_by_playbook(bed, dict(common, session_id=sids[0]), inv, env)
        assert res.rc == 0, failure_text(res)
        state = read_json(root / sids[0] / "state.json")
        jobs.append(state["job_id"])
        assert read_json(root / sids[0] / "service.json")["JOB_STATUS"] == "Running"
        started = res.task(WATCH_TASK, "localhost")
        assert started.get("rc") == 0 and "watcher started" in started.get("stdout", ""), started
        assert not (root / sids[0] / "logs" / "runner" / "cli.json").exists()  # really without the CLI
        note = read_json(root / sids[0] / "watch.json")
        assert note == {"inventory": str(inv), "resource": "controller", "walltime": "00:05:00"}, note
        assert oct((root / sids[0] / "watch.json").stat().st_mode & 0o777) == "0o600"
        pid = watcher_pid(root)
        assert pid, "no watcher holds the lock of the session root"
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(WS_USER).pw_uid
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"watch" in cmd and b"--daemon" in cmd, cmd
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"ISESSION_ROOT={root}".encode() in environ
        assert os.readlink(f"/proc/{pid}/cwd") == "/"  # never inside a session dir (session_processes)

        # a second start: the same watcher, the task reports no change
        res2 = start_by_playbook(bed, dict(common, session_id=sids[1]), inv, env)
        assert res2.rc == 0, failure_text(res2)
        jobs.append(read_json(root / sids[1] / "state.json")["job_id"])
        again = res2.task(WATCH_TASK, "localhost")
        assert again.get("rc") == 0 and "already runs" in again.get("stdout", ""), again
        assert watcher_pid(root) == pid

        # the watcher really watches playbook-started sessions: a hand scancel is Failed within the budget
        watch = Watch(bed, root / sids[0], int(read_json(root / sids[0] / "service.json")["PORT"]))
        bed.run("controller", ["scancel", jobs[0]], user=CLUSTER_USER, check=True)
        svc, _lag = assert_ended_in_budget(bed, watch, jobs[0], "CANCELLED")
        assert svc["JOB_STATUS"] == "Failed" and "cancelled outside isession" in svc["ERROR_MESSAGE"], svc
        assert read_json(root / sids[1] / "service.json")["JOB_STATUS"] == "Running"
    finally:
        for sid in sids:
            if (root / sid / "state.json").exists():
                run_playbook(bed, "hpc.interactive.cancel", {"session_id": sid, "session_root": str(root)},
                             inventory=inv)
        if jobs:
            bed.slurm(["scancel", *jobs], user=CLUSTER_USER, check=False)
        pid = watcher_pid(root)
        watcher_cli.stop_watcher()
        if pid:
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)


# ---------------------------------------------------------------------------- unit tests of the helpers (no bed)
@pytest.mark.parametrize("value,text", [
    ("1", "00:01:00"), (1, "00:01:00"), ("00:01:00", "00:01:00"), ("90", "01:30:00"), ("2-03:04:05", "2-03:04:05"),
    ("1-2", "1-02:00:00"), ("", ""), (None, ""), ("01:00", "01:00"), ("soon", "soon"),
])
def test_walltime_text_reads_inputs_like_scheduler_submit(value, text):
    assert w.walltime_text(value) == text


def _session(root: Path, sid: str, job: str = "77") -> None:
    _state.run_op("create", str(root), sid, {"service": "nginx", "target": "compute", "resource": "controller",
                                             "scheduler": "slurm", "step": "running", "job_id": job})
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20999, job_status="Running")


def test_playbook_note_gives_the_inventory_and_walltime(tmp_path):
    """A session without cli.json: watch.json (written by the start play) names its inventory and walltime."""
    root = tmp_path / "sessions"
    _session(root, "s1")
    inv = tmp_path / "inv.ini"
    inv.write_text("[cluster]\ncontroller\n")
    watch = w.Watcher(root, None, log=lambda _m: None)
    try:
        assert watch.inventory_for("s1") is None and watch.walltime_for("s1") == ""
        (root / "s1" / "watch.json").write_text(json.dumps({"inventory": str(inv), "walltime": "2"}))
        assert watch.inventory_for("s1") == inv and watch.walltime_for("s1") == "00:02:00"
        (root / "s1" / "watch.json").write_text(json.dumps({"inventory": str(tmp_path / "gone.ini")}))
        assert watch.inventory_for("s1") is None  # a vanished inventory falls back to the watcher's own
        # the CLI's record wins over the play's note
        runner = root / "s1" / "logs" / "runner"
        runner.mkdir(parents=True)
        (runner / "cli.json").write_text(json.dumps({"inventory": str(inv), "inputs": {"session_walltime": "3"}}))
        (root / "s1" / "watch.json").write_text(json.dumps({"inventory": str(tmp_path / "x"), "walltime": "9"}))
        assert watch.inventory_for("s1") == inv and watch.walltime_for("s1") == "00:03:00"
    finally:
        watch.close()


def test_timeout_message_uses_the_played_walltime(tmp_path):
    root = tmp_path / "sessions"
    _session(root, "s2", job="88")
    (root / "s2" / "watch.json").write_text(json.dumps({"walltime": "1"}))
    watch = w.Watcher(root, None, log=lambda _m: None)
    watch.reservation_dir = str(tmp_path / "ports")
    try:
        watch.apply("s2", watch.live_sessions()["s2"], {"state": "timeout", "raw_state": "TIMEOUT",
                                                        "nodes": ["compute1"]}, True)
    finally:
        watch.close()
    svc = json.loads((root / "s2" / "service.json").read_text())
    assert svc["JOB_STATUS"] == "Completed"
    assert svc["ERROR_MESSAGE"] == "walltime 00:01:00 reached (job 88: TIMEOUT)"


RUNNING_REC = {"id": "s", "step": "running", "job_id": "5", "walltime": "00:01:00"}


@pytest.mark.parametrize("info,status,message", [
    # Slurm hides TIMEOUT behind COMPLETING until the job's processes are gone; the reason already says it
    ({"state": "running", "raw_state": "COMPLETING", "reason": "TimeLimit", "nodes": ["compute1"]},
     "Completed", "walltime 00:01:00 reached (job 5: TIMEOUT, TimeLimit)"),
    ({"state": "timeout", "raw_state": "TIMEOUT", "reason": "TimeLimit", "exit_code": 0},
     "Completed", "walltime 00:01:00 reached (job 5: TIMEOUT, TimeLimit)"),
    # a COMPLETING job without that reason (a hand scancel, an exit) waits for its final state
    ({"state": "running", "raw_state": "COMPLETING", "reason": ""}, None, ""),
    ({"state": "running", "raw_state": "RUNNING", "reason": "TimeLimit"}, None, ""),
])
def test_completing_after_the_time_limit_is_already_completed(info, status, message):
    d = w.decide(RUNNING_REC, "Running", info, True)
    assert (d.status, d.message) == (status, message)
    assert w.timed_out(info) is (status == "Completed")


@pytest.mark.parametrize("state,raw", [("completed", "C"), ("cancelled", "CANCELLED"), ("timeout", "TIMEOUT"),
                                       ("failed", "NODE_FAIL")])
def test_a_cancel_under_way_ends_as_cancelled_whatever_the_scheduler_says(state, raw):
    """The tombstone wins: PBS reports a qdel'ed job as C (completed); the cancel's own step must not be refused."""
    rec = dict(RUNNING_REC, cancel_requested=True)
    assert w.decide(rec, "Running", {"state": state, "raw_state": raw}, True) == w.Decision("Cancelled", "", 0)


def test_apply_reads_the_tombstone_set_after_the_poll_began(tmp_path):
    root = tmp_path / "sessions"
    _session(root, "s3", job="99")
    watch = w.Watcher(root, None, log=lambda _m: None)
    watch.reservation_dir = str(tmp_path / "ports")
    try:
        stale = watch.live_sessions()["s3"]  # read before the cancel set its tombstone
        _state.run_op("cancel", str(root), "s3", {})
        watch.apply("s3", stale, {"state": "cancelled", "raw_state": "CANCELLED"}, True)
    finally:
        watch.close()
    assert json.loads((root / "s3" / "service.json").read_text())["JOB_STATUS"] == "Cancelled"
    assert json.loads((root / "s3" / "state.json").read_text())["step"] == "cancelled"
