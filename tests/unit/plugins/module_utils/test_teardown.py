"""The one teardown, table-driven, against real things: every kind a start holds is undone in every state.

Each row of ``CASES`` is a moment a session can be cancelled in (or end in), for each target: what the start has
recorded by then (the record the cancel playbook reads, or the play's own variables the rescue uses) and which kinds
it holds. The test makes those things for real - a detached local agent (the local scheduler backend), a Slurm job
behind a stand-in ``squeue``/``scancel`` pair, the real tunnel supervisor (``_tunnel.py``) with a stand-in ``ssh``,
real port reservations (``_ports``) and a real process listening on the workspace port - then runs the teardown of
both sides and checks that each held thing is gone, that it was undone by its own kind, and that a second teardown
finds nothing and fails nothing. The integration tests do the same against the bed's Slurm, sshd and hosts.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _ports, _teardown, _tunnel
from ansible_collections.hpc.interactive.plugins.module_utils._proc import alive, socket_holders
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import make_runner
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.local import Local, group_members

REPO = Path(__file__).resolve().parents[4]
SQUEUE_JSON = REPO / "tests" / "unit" / "fixtures" / "schedulers" / "slurm" / "squeue_22.05_mixed.json"
TUNNEL = Path(_tunnel.__file__).resolve()
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
ME = pwd.getpwuid(os.getuid()).pw_name

FAKE_SSH = """#!/bin/sh
echo "debug1: remote forward success for: listen 127.0.0.1:1, connect 127.0.0.1:2" >&2
exec sleep 300
"""

# (target, moment, what the start has recorded, the kinds it holds then)
#   recorded: "tombstone" = only the cancel's minimal record; "record" = state.json at that step;
#             "play" = the start play's variables (the rescue's view, ahead of the record)
CASES = [
    (None, "cancel before the record", "tombstone", {"workspace_port"}),
    ("workspace", "ports_reserved", "record", {"workspace_port"}),
    ("workspace", "starting", "record", {"job", "workspace_port"}),
    ("workspace", "running", "record", {"job", "workspace_port"}),  # the server is inside the agent's group
    ("workspace", "ended, server left", "record", {"listeners", "workspace_port"}),
    ("controller", "ports_reserved", "record", {"workspace_port"}),
    ("controller", "agent started, tunnel opening", "play", {"job", "node_ports", "workspace_port"}),
    ("controller", "running", "record", {"job", "tunnel", "node_ports", "listeners", "workspace_port"}),
    ("controller", "ended, tunnel left", "record", {"tunnel", "node_ports", "listeners", "workspace_port"}),
    ("compute", "ports_reserved", "record", {"workspace_port"}),
    ("compute", "queued", "record", {"job", "agent", "workspace_port"}),
    ("compute", "running", "record", {"job", "agent", "listeners", "workspace_port"}),
    ("compute", "ended, tunnel end left", "record", {"listeners", "workspace_port"}),
    ("compute", "ended, the node lost", "record", {"agent", "listeners", "workspace_port"}),
]


def test_the_cases_cover_every_kind_that_has_an_undo():
    undoable = {k.name for k in _teardown.KINDS if k.undo is not None}
    assert set().union(*(held for *_rest, held in CASES)) == undoable


def test_the_order_is_job_tunnel_ports_listeners_workspace_port():
    # what serves or forwards traffic goes before the ports it uses are given back
    assert [k.name for k in _teardown.KINDS] == ["job", "agent", "tunnel", "node_ports", "listeners",
                                                 "workspace_port", "files"]


class Bed:
    """The real things one case holds, on a 'controller' and a 'workspace' that are directories of this host."""

    def __init__(self, tmp: Path, sid: str) -> None:
        self.tmp, self.sid = tmp, sid
        self.remote_dir = tmp / "remote" / sid
        self.remote_dir.mkdir(parents=True, mode=0o700)
        self.dirs = {side: tmp / side for side in _teardown.SIDES}
        for path in self.dirs.values():
            path.mkdir()
        self.ports = {side: _ports.ReservationDir(str(tmp / side / "ports")) for side in _teardown.SIDES}
        for rdir in self.ports.values():
            rdir.ensure()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.procs: List[subprocess.Popen] = []
        self.job_ids: Dict[str, str] = {}
        self.ws_port = self.reserve(_teardown.WORKSPACE)

    def ctx(self, side: str, scheduler: str) -> _teardown.Context:
        runner = make_runner(shutil.which) if scheduler == "slurm" else None
        return _teardown.Context(runner=runner, local_state_dir=str(self.dirs[side] / "jobs"),
                                 reservation_dir=str(self.dirs[side] / "ports"), timeout=10, query_timeout=10)

    def reserve(self, side: str) -> int:
        ports, _unused = self.ports[side].reserve(self.sid, 1, _ports.build_candidates())
        return ports[0]

    # -- the things
    def local_job(self, side: str) -> None:
        script = self.tmp / f"agent-{side}.sh"
        script.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
        script.chmod(0o700)
        self.job_ids[side] = Local(state_dir=str(self.dirs[side] / "jobs")).submit(
            str(script), f"isession-{self.sid}", ME)

    def slurm(self, submitted: bool) -> None:
        """A Slurm that answers: with ``submitted``, job 1 of a recorded squeue answer, named after the session;
        scancel takes it out of the answer."""
        doc = json.loads(SQUEUE_JSON.read_text())
        job = next(j for j in doc["jobs"] if str(j["job_id"]) == "1")  # RUNNING
        job.update(name=f"isession-{self.sid}", user_name=ME)
        (self.tmp / "squeue.json").write_text(json.dumps(dict(doc, jobs=[job] if submitted else [])))
        (self.tmp / "gone.json").write_text(json.dumps(dict(doc, jobs=[])))
        self.script("squeue", f'cat "{self.tmp}/squeue.json"\n')
        self.script("scancel", f'echo "$@" >> "{self.tmp}/scancel.calls"\ncp "{self.tmp}/gone.json" '
                               f'"{self.tmp}/squeue.json"\n')
        self.job_ids["slurm"] = "1"

    def tunnel(self) -> None:
        """The real supervisor, as reverse_tunnel starts it, keeping a stand-in ssh up."""
        ssh = self.script("ssh", FAKE_SSH)
        spec = _tunnel.spec_document(f"isession-{self.sid}", _tunnel.validate_spec(
            {"remote_port": self.ws_port, "local_port": 1, "dest_host": "workspace", "dest_user": ME,
             "ssh_bin": str(ssh)}), _tunnel.validate_policy({}))
        state = self.remote_dir / "tunnel"
        state.mkdir(mode=0o700)
        (self.tmp / "spec.json").write_text(spec)
        out = subprocess.run([SYSTEM_PYTHON, str(TUNNEL), "start", "--state-dir", str(state), "--name",
                              f"isession-{self.sid}", "--spec", str(self.tmp / "spec.json"), "--timeout", "30"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        self.tunnel_status = json.loads(out.stdout)

    def listener(self) -> None:
        """A process of this user listening on the workspace port (the loopback end of a tunnel, a left server)."""
        proc = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                                 f"s.bind(('127.0.0.1', {self.ws_port})); s.listen(); print(1, flush=True); "
                                 "time.sleep(300)"], stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"1"
        self.procs.append(proc)
        self.listener_pid = proc.pid

    def script(self, name: str, body: str) -> Path:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    # -- is it there?
    def present(self, kind: str, target: str) -> bool:
        side = _teardown.WORKSPACE if target == "workspace" else _teardown.RESOURCE
        if kind == "job":
            if target == "compute":
                return bool(json.loads((self.tmp / "squeue.json").read_text())["jobs"])
            return bool(group_members(int(self.job_ids[side])))
        if kind == "tunnel":
            st = self.tunnel_status
            return _tunnel.probe(str(self.remote_dir / "tunnel"), f"isession-{self.sid}")["running"] \
                or _tunnel.is_alive(st["ssh_pid"], st["ssh_token"])
        if kind == "node_ports":
            return bool(self.ports[_teardown.RESOURCE].held(self.sid))
        if kind == "listeners":
            return alive(self.listener_pid) and bool(socket_holders(
                _teardown.listening_inodes(self.ws_port, os.getuid())))
        if kind == "workspace_port":
            return bool(self.ports[_teardown.WORKSPACE].held(self.sid))
        if kind == "agent":  # not asked to stop yet
            return not (self.remote_dir / _teardown.AGENT_STOP).exists()
        raise AssertionError(kind)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for job in [j for k, j in self.job_ids.items() if k != "slurm"]:
            try:
                os.killpg(int(job), signal.SIGKILL)
            except OSError:
                pass
        _tunnel.stop_tunnel(str(self.remote_dir / "tunnel"), f"isession-{self.sid}", 1.0)


@pytest.fixture
def bed(tmp_path, monkeypatch):
    made = []

    def make(sid: str) -> Bed:
        b = Bed(tmp_path, sid)
        monkeypatch.setenv("PATH", f"{b.bin}:{os.environ['PATH']}")
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def make_holding(b: Bed, target, recorded: str, held: set) -> _teardown.Holding:
    """What the cancel playbook (the record) or the rescue (the play's variables) knows at that moment."""
    if recorded == "tombstone":
        return _teardown.Holding.from_record({"id": b.sid, "step": "created", "ports": {}}, b.sid)
    scheduler = "slurm" if target == "compute" else "local"
    record = {"id": b.sid, "target": target, "scheduler": scheduler, "ports": {"workspace": b.ws_port}}
    if recorded == "play" or "tunnel" in held or "agent" in held:
        record["remote_dir"] = str(b.remote_dir)
    return _teardown.Holding.from_record(record, b.sid)


@pytest.mark.parametrize("target, moment, recorded, held", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_kind_held_is_undone_by_its_own_undo_and_only_once(bed, target, moment, recorded, held):
    b = bed("td-" + str(os.getpid()))
    scheduler = "slurm" if target == "compute" else "local"
    job_side = _teardown.WORKSPACE if target in (None, "workspace") else _teardown.RESOURCE
    if target == "compute":
        b.slurm(submitted="job" in held)
    elif "job" in held:
        b.local_job(job_side)
    if "tunnel" in held:
        b.tunnel()
    if "node_ports" in held:
        b.reserve(_teardown.RESOURCE)
    if "listeners" in held:
        b.listener()
    if "workspace_port" not in held:
        b.ports[_teardown.WORKSPACE].release(b.sid)
    for kind in held:
        assert b.present(kind, target or "workspace"), kind

    h = make_holding(b, target, recorded, held)
    outcomes = []
    for side in _teardown.SIDES:  # the cancel playbook's order: the controller, then the workspace
        outcomes += _teardown.teardown(h, side, b.ctx(side, scheduler))
    assert _teardown.errors(outcomes) == []
    for kind in held:
        assert not b.present(kind, target or "workspace"), f"{kind} left after the teardown"
    undone_by = {o.kind for o in outcomes if o.undone}
    assert undone_by == held, "each held kind is undone by its own entry, nothing else reports work"
    if target == "compute" and "job" in held:
        assert (b.tmp / "scancel.calls").read_text().split() == ["1"]

    again = []
    for side in _teardown.SIDES:
        again += _teardown.teardown(h, side, b.ctx(side, scheduler))
    assert [o.undone for o in again if o.undone] == [] and _teardown.errors(again) == []


def test_check_mode_names_what_would_go_and_touches_nothing(bed):
    b = bed("td-check")
    b.local_job(_teardown.WORKSPACE)
    b.listener()
    h = _teardown.Holding("td-check", target="workspace", scheduler="local", workspace_port=b.ws_port)
    ctx = b.ctx(_teardown.WORKSPACE, "local")
    ctx.check = True
    ctx.spare_pids = (os.getpid(),)
    got = _teardown.teardown(h, _teardown.WORKSPACE, ctx)
    job = b.job_ids[_teardown.WORKSPACE]
    assert [(o.kind, o.undone) for o in got] == [
        ("job", [f"job {job}"]), ("listeners", [f"listener pid {b.listener_pid}"]),
        ("workspace_port", [f"workspace port {b.ws_port}"])]
    for kind in ("job", "listeners", "workspace_port"):
        assert b.present(kind, "workspace"), kind


def test_a_failed_undo_does_not_stop_the_next_ones(bed, monkeypatch):
    b = bed("td-fail")
    b.script("squeue", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
    b.listener()
    h = _teardown.Holding("td-fail", target="compute", scheduler="slurm", workspace_port=b.ws_port)
    res = _teardown.teardown(h, _teardown.RESOURCE, b.ctx(_teardown.RESOURCE, "slurm"))
    assert [o.kind for o in res] == ["job"] and "scheduler did not answer" in res[0].error
    ws = _teardown.teardown(h, _teardown.WORKSPACE, b.ctx(_teardown.WORKSPACE, "slurm"))
    assert _teardown.errors(ws) == [] and not b.present("listeners", "compute")


def test_the_process_doing_the_teardown_is_never_signalled(bed):
    b = bed("td-self")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", b.ws_port))
        s.listen()
        h = _teardown.Holding("td-self", target="compute", scheduler="slurm", workspace_port=b.ws_port)
        got = _teardown.teardown(h, _teardown.WORKSPACE, b.ctx(_teardown.WORKSPACE, "slurm"), skip=("job",))
        assert got[0].kind == "listeners" and got[0].undone == []
        assert os.getpid() in socket_holders(_teardown.listening_inodes(b.ws_port, os.getuid()))


def test_listening_inodes_ignore_other_ports_and_users():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert os.getpid() in socket_holders(_teardown.listening_inodes(port, os.getuid()))
        assert _teardown.listening_inodes(port, os.getuid() + 12345) == []
        other = port + 1 if port < 65535 else port - 1
        assert os.getpid() not in socket_holders(_teardown.listening_inodes(other, os.getuid()))


def test_a_new_kind_is_one_entry(bed):
    """What a resource such as a display reservation adds: one Kind; plan and teardown take it in its place."""
    b = bed("td-new")
    seen = []
    display = _teardown.Kind("display", lambda h: _teardown.RESOURCE if h.target == "controller" else None,
                             lambda h, ctx: seen.append(h.session_id) or ["display :7"], "an X display")
    kinds = _teardown.KINDS[:3] + (display,) + _teardown.KINDS[3:]
    h = _teardown.Holding("td-new", target="controller", scheduler="local", remote_dir=str(b.remote_dir))
    assert [k.name for k in _teardown.plan(h, _teardown.RESOURCE, kinds=kinds)] == [
        "job", "tunnel", "display", "node_ports"]
    got = _teardown.teardown(h, _teardown.RESOURCE, b.ctx(_teardown.RESOURCE, "local"), kinds=kinds)
    assert seen == ["td-new"] and [u for o in got for u in o.undone] == ["display :7"]


def test_unknown_side_or_kind_is_refused():
    h = _teardown.Holding("x")
    with pytest.raises(ValueError, match="side"):
        _teardown.plan(h, "moon")
    with pytest.raises(ValueError, match="skip: unknown resource kinds nope"):
        _teardown.plan(h, _teardown.WORKSPACE, skip=("nope",))


def test_the_agent_stop_request_goes_only_into_the_users_own_directory(tmp_path):
    ctx = _teardown.Context()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    h = _teardown.Holding("td-stop", target="compute", scheduler="slurm", remote_dir=str(mine))
    ctx.check = True
    assert _teardown.undo_agent(h, ctx) == ["agent stop request"] and not (mine / _teardown.AGENT_STOP).exists()
    ctx.check = False
    assert _teardown.undo_agent(h, ctx) == ["agent stop request"]
    assert (mine / _teardown.AGENT_STOP).stat().st_mode & 0o777 == 0o600
    assert _teardown.undo_agent(h, ctx) == []  # asked once
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(_teardown.TeardownError, match="is not a directory of"):
        _teardown.undo_agent(_teardown.Holding("td-stop", target="compute", remote_dir=str(link)), ctx)
    assert _teardown.undo_agent(_teardown.Holding("td-stop", target="compute", remote_dir=str(tmp_path / "no")),
                                ctx) == []  # cancelled before the submit made the directory
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 65534, 65534)
        with pytest.raises(_teardown.TeardownError):
            _teardown.undo_agent(_teardown.Holding("td-stop", target="compute", remote_dir=str(other)), ctx)
        assert not (other / _teardown.AGENT_STOP).exists()


def test_the_workspace_port_stays_reserved_while_the_users_listener_is_on_it(bed):
    b = bed("td-pending")
    h = _teardown.Holding("td-pending", target="compute", scheduler="slurm", workspace_port=b.ws_port)
    ctx = b.ctx(_teardown.WORKSPACE, "slurm")
    ctx.listener_wait = 0.2
    with socket.socket() as s:  # held by this process, which the teardown never signals
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", b.ws_port))
        s.listen()
        got = _teardown.teardown(h, _teardown.WORKSPACE, ctx, skip=("job",))
        assert [(o.kind, o.undone) for o in got] == [("listeners", []), ("workspace_port", [])]
        assert _teardown.errors(got) == [] and "still on workspace port %d" % b.ws_port in got[1].pending
        assert b.present("workspace_port", "compute")
    got = _teardown.teardown(h, _teardown.WORKSPACE, ctx, skip=("job", "listeners"))
    assert got[0].undone == ["workspace port %d" % b.ws_port] and not got[0].pending
    assert not b.present("workspace_port", "compute")
