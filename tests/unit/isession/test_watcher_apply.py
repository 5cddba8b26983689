"""The watcher writing real state.json/service.json files, tearing down, and holding its lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from isession import watcher as w
from ansible_collections.hpc.interactive.plugins.module_utils import _ports, _service_file, _state


def make_session(root: Path, sid: str, step: str = "running", status: str = "Running", **fields) -> Path:
    rec = {"service": "nginx", "target": "compute", "resource": "controller", "scheduler": "slurm",
           "job_id": "42", "step": step}
    rec.update(fields)
    _state.run_op("create", str(root), sid, rec)
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20000, slug="",
                                      job_status=status)
    return root / sid


class Scripted(w.Watcher):
    """A watcher whose scheduler answers come from a list (one per poll)."""

    def __init__(self, root: Path, answers: list, **kw) -> None:
        super().__init__(root, None, log=print, **kw)
        self.answers = answers
        self.calls: list = []

    def query(self, key, job_ids, inventory):
        self.calls.append((key, sorted(job_ids)))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def run_ticks(watch: w.Watcher, n: int) -> None:
    for _ in range(n):
        watch.tick()
        for fut in list(watch.busy.values()):
            fut.result(timeout=10)


def service(root: Path, sid: str) -> dict:
    return json.loads((root / sid / "service.json").read_text())


def test_hand_scancel_marks_failed_and_state_ends(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    watch = Scripted(root, [{"jobs": {"42": {"state": "cancelled", "raw_state": "CANCELLED", "found": True}},
                             "reachable": True, "error": ""}])
    run_ticks(watch, 1)
    doc = service(root, "a")
    assert doc["JOB_STATUS"] == "Failed"
    assert "cancelled outside isession" in doc["ERROR_MESSAGE"]
    rec = _state.read_record(str(root / "a" / "state.json"))
    assert rec["step"] == "failed" and rec["ended"] and "outside isession" in rec["error"]
    # an ended session is no longer polled
    run_ticks(watch, 1)
    assert len(watch.calls) == 1
    watch.close()


def test_one_query_per_resource_for_all_jobs(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", job_id="1")
    make_session(root, "b", job_id="2")
    make_session(root, "c", job_id="3", resource="other")
    make_session(root, "d", job_id="4", step="cancelled", status="Cancelled")  # ended: not asked about
    running = {"state": "running", "found": True}
    answer = {"jobs": {"1": running, "2": running, "3": running}, "reachable": True, "error": ""}
    watch = Scripted(root, [answer, answer])
    run_ticks(watch, 1)
    assert sorted(watch.calls) == [(("controller", "slurm"), ["1", "2"]), (("other", "slurm"), ["3"])]
    watch.close()


def test_unreachable_scheduler_changes_nothing(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    before = ((root / "a" / "state.json").read_text(), (root / "a" / "service.json").read_text())
    watch = Scripted(root, [{"jobs": {}, "reachable": False, "error": "squeue timed out"}] * 5
                     + [w.RemoteError("connection closed")] * 5)
    run_ticks(watch, 10)
    assert ((root / "a" / "state.json").read_text(), (root / "a" / "service.json").read_text()) == before
    watch.close()


def test_absence_ends_only_after_three_confirmations(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    gone = {"jobs": {"42": {"state": "undetermined", "found": False}}, "reachable": True, "error": ""}
    watch = Scripted(root, [gone, gone, gone])
    run_ticks(watch, 2)
    assert service(root, "a")["JOB_STATUS"] == "Running"
    run_ticks(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Failed"
    watch.close()


def test_queued_then_starting_updates_step(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", step="submitted", status="Submitting")
    watch = Scripted(root, [
        {"jobs": {"42": {"state": "queued", "reason": "Resources", "found": True}}, "reachable": True},
        {"jobs": {"42": {"state": "running", "found": True}}, "reachable": True},
    ])
    run_ticks(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Queued"
    assert service(root, "a")["ERROR_MESSAGE"] == "Resources"
    run_ticks(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Starting"
    rec = _state.read_record(str(root / "a" / "state.json"))
    assert [h["step"] for h in rec["history"]][-2:] == ["queued", "starting"]
    watch.close()


def test_cancel_that_already_ended_the_session_wins(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    _state.run_op("cancel", str(root), "a", {"step": "cancelled"})
    _service_file.update_service_file(str(root / "a" / "service.json"), job_status="Cancelled")
    # the watcher read the record while it was still live, then the cancel landed
    watch = Scripted(root, [])
    stale = dict(_state.read_record(str(root / "a" / "state.json")), step="running", cancel_requested=False)
    watch.apply("a", stale, {"state": "cancelled", "raw_state": "CANCELLED", "found": True}, True)
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    watch.close()


def test_teardown_stops_the_workspace_listener_and_releases_ports(tmp_path):
    rdir = tmp_path / "ports"
    res = _ports.ReservationDir(str(rdir))
    res.ensure()
    ports, _ = res.reserve("sess-a", 1, list(range(21000, 21100)))
    port = ports[0]
    server = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"])
    try:
        for _ in range(50):
            if w.listeners(port, os.getuid()):
                break
            time.sleep(0.05)
        assert w.listeners(port, os.getuid()) == [server.pid]
        logs: list = []
        w.teardown_workspace({"ports": {"workspace": port}}, "sess-a", logs.append, str(rdir))
        assert server.wait(timeout=5) != 0
        assert res.held("sess-a") == []
        assert any(str(port) in line for line in logs)
    finally:
        server.kill()


def test_listeners_ignores_other_ports_and_connections():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert os.getpid() in w.listeners(port, os.getuid())
        assert w.listeners(port, os.getuid() + 12345) == []
        assert os.getpid() not in w.listeners(port + 1 if port < 65535 else port - 1, os.getuid())


def test_one_watcher_per_root(tmp_path):
    root = tmp_path / "s"
    fd = w.lock_pidfile(root)
    assert fd is not None
    w.write_pid(fd)
    assert w.lock_pidfile(root) is None
    assert w.running_pid(root) == os.getpid()
    os.close(fd)
    assert w.running_pid(root) is None
    assert oct((root / w.PIDFILE).stat().st_mode & 0o777) == "0o600"
