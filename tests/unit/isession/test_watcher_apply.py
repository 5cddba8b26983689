"""The watcher writing real state.json/service.json files, tearing down, and holding its lock."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from isession import watcher as w
from isession import watchfiles as wf
from isession.commands import NOTE_AFTER_END, watcher_cancelled
from ansible_collections.hpc.interactive.plugins.module_utils import (
    _dirwatch,
    _listeners,
    _ports,
    _service_file,
    _state,
)


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
    for _attempt in range(n):
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


class FakeServer:
    """Stands for a resource's RemoteServer: records each request, answers from a function."""

    def __init__(self, answer, conn=None) -> None:
        self.requests: list = []
        self.answer = answer
        self.conn = dict(conn or {"host": "controller"})

    def ask(self, request, timeout):
        self.requests.append(dict(request))
        return self.answer(request)


class FastCancel(Scripted):
    def __init__(self, root: Path, answers: list, server: FakeServer, **kw) -> None:
        super().__init__(root, answers, **kw)
        self.server = server
        self.lines: list = []
        self.log = self.lines.append
        self.reservation_dir = str(root.parent / "ports")  # the workspace side's releases stay in the test

    def server_for(self, resource, inventory):
        assert resource == "controller"
        return self.server


JOB_RUNNING = {"state": "running", "raw_state": "RUNNING", "found": True}


def undid(*pairs: tuple) -> dict:
    """A resource's answer to a teardown request: (kind, [undone]) pairs."""
    return {"outcomes": [{"kind": k, "side": "resource", "undone": u, "error": ""} for k, u in pairs], "error": ""}


def holding(sid: str, **fields) -> dict:
    return {"session_id": sid, "target": "compute", "scheduler": "slurm", "remote_dir": None,
            "workspace_port": None, **fields}


RUNNING = {"jobs": {"42": JOB_RUNNING, "43": JOB_RUNNING}, "reachable": True, "error": ""}
CANCELLED = {"jobs": {"42": {"state": "cancelled", "raw_state": "CANCELLED", "found": True}, "43": JOB_RUNNING},
             "reachable": True, "error": ""}


def test_a_tombstone_makes_the_watcher_cancel_the_job_once_and_record_cancelled_when_all_is_undone(tmp_path):
    """The end is recorded as soon as the cancel's one teardown has undone everything (as the cancel playbook records
    it after the same teardown), not at the next poll that sees the job gone."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    make_session(root, "b", job_id="43")  # another live session of the resource: left alone
    _state.run_op("cancel", str(root), "a", {})
    srv = FakeServer(lambda req: undid(("job", ["job 42"])))
    watch = FastCancel(root, [RUNNING, CANCELLED, CANCELLED], srv)  # at the first tick, the job still runs
    run_ticks(watch, 1)
    assert srv.requests == [{"op": "teardown", "holding": holding("a", workspace_port=21999), "skip": [],
                             "timeout": w.QUERY_TIMEOUT}]
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "cancelled"
    note = wf.read_teardown(root / "a")
    assert note["complete"] is True and wf.UNDER_WAY not in note, note
    assert "a" not in watch.cancel_sent and "a" not in watch.undone  # an end's bookkeeping, as after a poll's end
    # a tick or the listener that read the session live just before its end was recorded (the tombstone set, the
    # step not yet ended) must not send its cancel again: seen on the bed as "stopped job" twice, 58 ms apart
    stale = _state.read_record(str(root / "a" / "state.json"))
    stale["step"] = "running"
    watch.send_cancels(w.group_key(stale), {"a": stale})
    assert watch.claim_cancels({"a": stale}) == {}
    run_ticks(watch, 2)
    assert len(srv.requests) == 1  # once: the ended session is neither cancelled nor torn down again
    assert service(root, "b")["JOB_STATUS"] == "Running"
    assert any("a: cancel requested: stopped job 42" in line for line in watch.lines), watch.lines
    assert any("a: Running -> Cancelled (its teardown is complete)" in line for line in watch.lines), watch.lines
    watch.close()


def test_a_cancel_the_playbook_recorded_first_is_not_written_again(tmp_path):
    """The cancel playbook's own teardown found the watcher's work done and recorded Cancelled first: the watcher's
    record_cancelled then leaves state.json and service.json as they are (no rewrite, no new mtime for a platform to
    take as a change: both writers compare before they write), and still ends its bookkeeping."""
    root = tmp_path / "s"
    make_session(root, "a")
    _state.run_op("cancel", str(root), "a", {})
    _state.update_state(str(root), "a", step=w.STEP_OF["Cancelled"], error=None)  # as the cancel playbook does
    _service_file.update_service_file(str(root / "a" / "service.json"), job_status="Cancelled", error_message="")
    files = [root / "a" / "state.json", root / "a" / "service.json"]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    watch = FastCancel(root, [], FakeServer(lambda req: undid()))
    watch.cancel_sent["a"] = time.monotonic()
    watch.record_cancelled("a")
    assert [(f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before
    assert "a" in watch.ended and "a" not in watch.cancel_sent
    assert wf.read_teardown(root / "a")["complete"] is True
    assert any("a: Cancelled already (its teardown is complete)" in line for line in watch.lines), watch.lines
    watch.close()


def test_the_ends_a_watcher_recorded_are_forgotten_after_an_hour(tmp_path):
    """A watcher that lives for weeks must not keep one id per session it ever ended; an end stays remembered long
    after any poll that read the session live before it could still send a cancel."""
    root = tmp_path / "s"
    root.mkdir()
    watch = Scripted(root, [])
    now = time.monotonic()
    watch.forget_ended("a", undone=True)
    watch.forget_old_ends(now + w.QUERY_TIMEOUT * 10)
    assert "a" in watch.ended
    assert watch.claim_cancels({"a": {"job_id": "42"}}) == {}  # still never cancelled again
    watch.forget_ended("b", undone=True)
    watch.ended["a"] = now - w.ENDED_KEEP - 1
    watch.tick()  # each tick forgets the old ends
    assert "a" not in watch.ended and "b" in watch.ended
    watch.close()


def test_a_cancel_whose_teardown_left_something_is_ended_by_the_poll(tmp_path):
    """Not everything undone (here the agent's stop request could not be written): the end waits for the scheduler,
    and the teardown after it tries again what is left."""
    root = tmp_path / "s"
    make_session(root, "a", remote_dir="/tmp/x")
    _state.run_op("cancel", str(root), "a", {})

    def answer(req):
        if req["skip"]:
            return undid(("agent", ["agent stop request"]))
        return {"outcomes": [{"kind": "job", "side": "resource", "undone": ["job 42"], "error": ""},
                             {"kind": "agent", "side": "resource", "undone": [], "error": "agent.stop: EIO"}],
                "error": ""}

    srv = FakeServer(answer)
    watch = FastCancel(root, [RUNNING, RUNNING, CANCELLED], srv)
    run_ticks(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Running"  # the job was cancelled, the agent not asked: not yet
    assert wf.read_teardown(root / "a") is None
    _cancelled_by(watch, 2)
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    assert len(srv.requests) == 2 and srv.requests[0]["skip"] == []
    assert "job" in srv.requests[1]["skip"] and "agent" not in srv.requests[1]["skip"]  # what is left is tried again
    assert wf.read_teardown(root / "a")["complete"] is True


def test_cancels_that_arrive_together_go_to_the_resource_in_one_request(tmp_path):
    """Twenty `isession cancel` at once wake the watcher once: their resource sides leave in one `teardowns`
    request (carried out side by side there), their workspace ports are released, each reads Cancelled."""
    root = tmp_path / "s"
    rdir = _ports.ReservationDir(str(tmp_path / "ports"))
    sids = ["a", "b", "c"]
    ports = {}
    for n, sid in enumerate(sids):
        ports[sid] = rdir.reserve(sid, 1, list(range(22000 + 10 * n, 22010 + 10 * n)))[0][0]
        make_session(root, sid, job_id=str(42 + n), ports={"workspace": ports[sid]})
        _state.run_op("cancel", str(root), sid, {})

    def answer(req):
        assert req["op"] == "teardowns"
        return {"answers": [undid(("job", [f"job of {item['holding']['session_id']}"])) for item in req["items"]]}

    srv = FakeServer(answer)
    ended = {"jobs": {str(42 + n): {"state": "cancelled", "raw_state": "CANCELLED", "found": True}
                      for n in range(len(sids))}, "reachable": True, "error": ""}
    watch = FastCancel(root, [ended], srv)
    run_ticks(watch, 1)
    assert len(srv.requests) == 1
    assert sorted(i["holding"]["session_id"] for i in srv.requests[0]["items"]) == sids
    assert srv.requests[0]["timeout"] == w.QUERY_TIMEOUT
    for sid in sids:
        assert service(root, sid)["JOB_STATUS"] == "Cancelled"
        assert rdir.held(sid) == []  # the workspace port, released on the workspace side
        assert json.loads((root / sid / wf.TEARDOWN_FILE).read_text())["complete"] is True
        assert any(f"{sid}: cancel requested: stopped job of {sid}" in ln and "3 together" in ln
                   for ln in watch.lines), watch.lines
    watch.close()


def test_a_cancel_asked_while_its_resource_is_busy_is_sent_beside_that_poll(tmp_path, wait_for):
    """A cancel asked while the resource's poll is still under way (an earlier teardown, a slow query) is sent at
    once beside it, not after it; that poll leaves the session alone while its teardown runs, and a later poll
    records its end, once."""
    root = tmp_path / "s"
    for n, sid in enumerate(("a", "b")):
        make_session(root, sid, job_id=str(42 + n))
    _state.run_op("cancel", str(root), "a", {})
    release = {"a": threading.Event(), "b": threading.Event()}

    def answer(req):
        sid = req["holding"]["session_id"]
        assert release[sid].wait(10)  # each teardown hangs until the test lets it go
        return undid(("job", [f"job of {sid}"]))

    srv = FakeServer(answer)
    gone = {"jobs": {"42": {"state": "cancelled", "raw_state": "CANCELLED", "found": True},
                     "43": {"state": "cancelled", "raw_state": "CANCELLED", "found": True}},
            "reachable": True, "error": ""}
    watch = FastCancel(root, [gone, gone], srv)
    try:
        watch.tick()  # a's cancel, inside the resource's poll, which now hangs
        assert wait_for(lambda: len(srv.requests) == 1, 10)
        _state.run_op("cancel", str(root), "b", {})
        watch.tick()
        assert wait_for(lambda: len(srv.requests) == 2, 10)  # b's went while a's poll is still busy
        assert srv.requests[1]["holding"]["session_id"] == "b"
        watch.tick()  # still busy: nothing is sent twice
        release["a"].set()
        for fut in list(watch.busy.values()):  # a's poll: its query says both jobs ended
            fut.result(timeout=10)
        assert service(root, "a")["JOB_STATUS"] == "Cancelled"
        assert service(root, "b")["JOB_STATUS"] == "Running"  # its teardown still runs: left to the next poll
    finally:
        release["a"].set()
        release["b"].set()
    # b's teardown is done once its final note is written (record_cancelled, on the watcher's pool, writes the note
    # just after the record: waiting for in_flight alone read the note a moment too early)
    assert wait_for(lambda: "b" not in watch.in_flight and (root / "b" / wf.TEARDOWN_FILE).exists(), 10)
    run_ticks(watch, 1)
    assert len(srv.requests) == 2  # each cancel once
    for sid in ("a", "b"):
        assert service(root, sid)["JOB_STATUS"] == "Cancelled"
        assert json.loads((root / sid / wf.TEARDOWN_FILE).read_text())["complete"] is True
    assert sum("b: cancel requested: stopped job of b" in ln for ln in watch.lines) == 1, watch.lines
    watch.close()


def test_a_teardowns_answer_that_does_not_fit_leaves_each_cancel_to_its_playbook(tmp_path):
    root = tmp_path / "s"
    for n, sid in enumerate(("a", "b")):
        make_session(root, sid, job_id=str(42 + n))
        _state.run_op("cancel", str(root), sid, {})
    srv = FakeServer(lambda req: {"answers": [undid(("job", ["job 42"]))]})  # one answer for two sessions
    watch = FastCancel(root, [RUNNING, RUNNING], srv)
    run_ticks(watch, 1)
    assert sum("cancel request not carried out (1 answers to 2 teardowns); the cancel playbook does it" in ln
               for ln in watch.lines) == 2, watch.lines
    watch.close()


def test_controller_cancel_request_names_the_tunnel_and_the_node_ports(tmp_path):
    root = tmp_path / "s"
    make_session(root, "c", target="controller", scheduler="local", job_id="4242", remote_dir="/home/u/.isession/c")
    _state.run_op("cancel", str(root), "c", {})
    srv = FakeServer(lambda req: undid(("job", ["job 4242"]), ("tunnel", ["tunnel isession-c"]),
                                       ("node_ports", ["node port 30001"])))
    done = {"jobs": {"4242": {"state": "cancelled", "raw_state": "CANCELLED", "found": True}}, "reachable": True,
            "error": ""}
    watch = FastCancel(root, [done], srv)
    run_ticks(watch, 1)
    # one request: the end that follows does not ask again for what the cancel already undid
    assert srv.requests == [{"op": "teardown", "timeout": w.QUERY_TIMEOUT, "skip": [],
                             "holding": holding("c", target="controller", scheduler="local",
                                                remote_dir="/home/u/.isession/c")}]
    assert service(root, "c")["JOB_STATUS"] == "Cancelled"
    assert any("stopped job 4242, tunnel isession-c, node port 30001" in line for line in watch.lines), watch.lines
    watch.close()


def test_a_controller_session_that_ended_by_itself_loses_its_tunnel_and_node_ports(tmp_path):
    # the agent died on the controller: the scheduler (local) says failed; the tunnel supervisor and the node port
    # there outlive it unless the end's clean-up undoes them (the job itself is not asked about again)
    root = tmp_path / "s"
    make_session(root, "c", target="controller", scheduler="local", job_id="4242", remote_dir="/home/u/.isession/c")
    srv = FakeServer(lambda req: undid(("tunnel", ["tunnel isession-c"]), ("node_ports", ["node port 30001"])))
    died = {"jobs": {"4242": {"state": "failed", "raw_state": "DIED", "found": True}}, "reachable": True, "error": ""}
    watch = FastCancel(root, [died], srv)
    run_ticks(watch, 1)
    assert service(root, "c")["JOB_STATUS"] == "Failed"
    # first the agent's own words for the failure (agent.error, none here), then the end's clean-up
    assert srv.requests == [
        {"op": "tail", "dir": "/home/u/.isession/c", "lines": 5},
        {"op": "teardown", "timeout": w.QUERY_TIMEOUT, "skip": ["job"],
         "holding": holding("c", target="controller", scheduler="local", remote_dir="/home/u/.isession/c")}]
    assert any("c: cleaned up after the end: tunnel isession-c, node port 30001" in line for line in watch.lines)
    watch.close()


def test_requests_carry_the_resources_scheduler_path_and_env(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", scheduler="sge")
    _state.run_op("cancel", str(root), "a", {})
    conn = {"host": "controller", "scheduler_path": ["/opt/sge/bin/lx-amd64"],
            "scheduler_env": {"SGE_ROOT": "/opt/sge", "SGE_CELL": "default"}}
    srv = FakeServer(lambda req: undid(("job", ["job 42"])) if req["op"] == "teardown" else
                     {"jobs": {"42": {"state": "cancelled", "found": True}}, "reachable": True, "error": ""}, conn)
    watch = FastCancel(root, [], srv)
    watch.query = w.Watcher.query.__get__(watch)  # the real query, through the fake server
    run_ticks(watch, 1)
    assert [r["op"] for r in srv.requests] == ["teardown", "query"]
    for req in srv.requests:
        scheduler = req["holding"]["scheduler"] if req["op"] == "teardown" else req["scheduler"]
        assert scheduler == "sge" and req["path"] == ["/opt/sge/bin/lx-amd64"], req
        assert req["env"] == {"SGE_ROOT": "/opt/sge", "SGE_CELL": "default"}, req
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    watch.close()


def test_a_cancel_the_resource_could_not_carry_out_changes_nothing(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    _state.run_op("cancel", str(root), "a", {})

    def refuse(req):
        raise w.RemoteError("connection to controller closed")

    watch = FastCancel(root, [RUNNING, RUNNING], FakeServer(refuse))
    run_ticks(watch, 2)
    assert service(root, "a")["JOB_STATUS"] == "Running"  # the cancel playbook does it and records it
    assert any("cancel request not carried out (connection to controller closed)" in line for line in watch.lines)
    watch.close()


def test_fast_polling_stops_when_a_sent_cancel_never_ends(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a")
    _state.run_op("cancel", str(root), "a", {})
    # the job's cancel went out, but the teardown left something: the end waits for the scheduler, which never says it
    srv = FakeServer(lambda req: {"outcomes": [
        {"kind": "job", "side": "resource", "undone": ["job 42"], "error": ""},
        {"kind": "agent", "side": "resource", "undone": [], "error": "agent.stop: EIO"}], "error": ""})
    watch = FastCancel(root, [RUNNING, RUNNING], srv)
    run_ticks(watch, 1)
    assert watch.cancelling and service(root, "a")["JOB_STATUS"] == "Running"
    watch.cancel_sent["a"] -= w.CANCEL_FAST_FOR + 1  # the job still runs long after the cancel was sent
    run_ticks(watch, 1)
    assert not watch.cancelling and len(srv.requests) == 1
    watch.close()


def test_nudge_wakes_the_loop_at_once(tmp_path, wait_for):
    root = tmp_path / "s"
    make_session(root, "a")
    watch = Scripted(root, [RUNNING] * 50, interval=30.0)
    thread = threading.Thread(target=watch.run)
    thread.start()
    try:
        # the first poll done, not only begun: a tick never starts a resource's poll while its last one still runs
        assert wait_for(lambda: len(watch.calls) == 1 and all(f.done() for f in list(watch.busy.values())), 5)
        watch.nudge()
        assert wait_for(lambda: len(watch.calls) == 2, 5), "a nudge did not bring the next tick forward"
    finally:
        watch.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive(), "shutdown did not end a watcher waiting out a 30 s interval"


def test_a_tick_that_raises_is_logged_and_the_watcher_goes_on(tmp_path, wait_for):
    """Every waiting start and every fast cancel relies on the user's one watcher: one bad tick must not end it."""
    root = tmp_path / "s"
    make_session(root, "a")
    watch = Scripted(root, [RUNNING] * 50, interval=0.05)
    lines = []
    watch.log = lines.append
    real, failures = watch.live_sessions, [PermissionError(13, "Permission denied")]

    def live_sessions():
        if failures:
            raise failures.pop()
        return real()

    watch.live_sessions = live_sessions
    thread = threading.Thread(target=watch.run)
    thread.start()
    try:
        assert wait_for(lambda: len(watch.calls) >= 2, 5), lines  # it went on ticking (and asking) after the failure
        assert thread.is_alive()
        assert any(line.startswith("tick failed: PermissionError") for line in lines), lines
    finally:
        watch.shutdown()
        thread.join(timeout=10)


def test_one_watcher_per_root(tmp_path):
    root = tmp_path / "s"
    fd = wf.lock_pidfile(root)
    assert fd is not None
    wf.write_pid(fd)
    assert wf.lock_pidfile(root) is None
    assert wf.running_pid(root) == os.getpid()
    os.close(fd)
    assert wf.running_pid(root) is None
    assert oct((root / wf.PIDFILE).stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- the workspace port's listener
RUNNING = {"jobs": {"42": {"state": "running", "found": True}}, "reachable": True, "error": ""}


class Listening(Scripted):
    """A scripted watcher that records the cancels it would send instead of reaching a resource.

    Its teardowns run the workspace side for real; the resource side (the job) is only recorded.
    """

    def __init__(self, root: Path, answers: list, **kw) -> None:
        super().__init__(root, answers, **kw)
        self.cancels: list = []

    def teardown_many(self, key, batch, listener_wait=1.0):
        self.cancels += [(key, sid) for sid, _rec, skip in batch if "job" not in skip]
        return super().teardown_many(key, [(sid, rec, tuple(skip) + ("job",)) for sid, rec, skip in batch],
                                     listener_wait)


def owner(state: str, port: int = 20000, message: str = "") -> object:
    return _listeners.PortOwner(port, state, (), message)


@pytest.mark.parametrize("record, current, state, status, words", [
    ({"step": "running"}, "Running", "own", None, None),
    ({"step": "running"}, "Starting", "own", "Running", ""),                   # back after a drop
    ({"step": "running", "target": "compute"}, "Running", "none", "Starting", "tunnel to the session is down"),
    ({"step": "running", "target": "workspace"}, "Running", "none", "Starting", "no longer listens"),
    ({"step": "running"}, "Starting", "none", None, None),                    # said once
    ({"step": "running"}, "Running", "foreign", "Failed", "another user took the session's workspace port: held"),
    ({"step": "running"}, "Starting", "foreign", "Failed", "cannot reach that user"),
    ({"step": "running"}, "Running", "unknown", None, None),                  # /proc unreadable: undetermined
    ({"step": "starting"}, "Starting", "foreign", None, None),                # session_ready judges before Running
    ({"step": "running", "cancel_requested": True}, "Running", "none", None, None),
    ({"step": "running"}, "Failed", "foreign", None, None),                   # already ended
])
def test_decide_listener(record, current, state, status, words):
    d = w.decide_listener(record, current, owner(state, message="held by u9"))
    if status is None:
        assert d is None
    else:
        assert d.status == status and words in d.message
        assert d.terminal == (status == "Failed")


def listen_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_dropped_listener_stops_saying_running_until_it_is_back(tmp_path):
    root = tmp_path / "s"
    sock = listen_on(0)
    port = sock.getsockname()[1]
    make_session(root, "a", ports={"workspace": port})
    watch = Listening(root, [RUNNING] * 4)
    try:
        run_ticks(watch, 1)
        assert service(root, "a")["JOB_STATUS"] == "Running"
        sock.close()  # the tunnel's listening end is gone
        run_ticks(watch, 1)
        doc = service(root, "a")
        assert doc["JOB_STATUS"] == "Starting" and f"nothing listens on workspace port {port}" in doc["ERROR_MESSAGE"]
        assert _state.read_record(str(root / "a" / "state.json"))["step"] == "running"
        sock = listen_on(port)  # restored
        run_ticks(watch, 1)
        assert service(root, "a") == dict(doc, JOB_STATUS="Running", ERROR_MESSAGE="")
        assert watch.cancels == []
    finally:
        sock.close()
        watch.close()


def test_a_job_that_ends_with_its_tunnel_reads_completed_never_starting(tmp_path):
    """At walltime the agent drops the tunnel, then the scheduler says the job ended: one move, Running -> Completed."""
    root = tmp_path / "s"
    sock = listen_on(0)
    port = sock.getsockname()[1]
    make_session(root, "a", ports={"workspace": port})
    timeout = {"jobs": {"42": {"state": "timeout", "raw_state": "TIMEOUT", "found": True}}, "reachable": True,
               "error": ""}
    watch = Listening(root, [RUNNING, timeout])
    seen = []
    real_update = watch.sf.update_service_file

    def update(path, **fields):
        seen.append(fields.get("job_status"))
        return real_update(path, **fields)

    watch.sf = types.SimpleNamespace(update_service_file=update, read_service_file=_service_file.read_service_file)
    try:
        run_ticks(watch, 1)
        sock.close()  # the tunnel went down in the same moment the job ended
        run_ticks(watch, 1)
        assert service(root, "a")["JOB_STATUS"] == "Completed"
        assert seen == ["Completed"], seen
        run_ticks(watch, 1)  # ended: neither asked of the scheduler again nor judged by its port
        assert seen == ["Completed"] and len(watch.calls) == 2
    finally:
        sock.close()
        watch.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as a second user")
def test_another_users_listener_ends_the_session_and_cancels_its_job(tmp_path, wait_for):
    root = tmp_path / "s"
    rdir = tmp_path / "ports"
    res = _ports.ReservationDir(str(rdir))
    port = res.reserve("a", 1, list(range(21000, 21100)))[0][0]
    make_session(root, "a", ports={"workspace": port})
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                              "-c", "import socket,time; s=socket.socket(); "
                              f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"])
    watch = Listening(root, [RUNNING] * 2)
    watch.reservation_dir = str(rdir)
    try:
        assert wait_for(lambda: _listeners.check_port_owner(port, os.getuid()).state == "foreign", 10)
        run_ticks(watch, 1)
        watch.pool.shutdown(wait=True)
        doc = service(root, "a")
        assert doc["JOB_STATUS"] == "Failed"
        assert f"127.0.0.1 port {port} is held by another user (uid 65534 (nobody))" in doc["ERROR_MESSAGE"]
        rec = _state.read_record(str(root / "a" / "state.json"))
        assert rec["step"] == "failed" and "cannot reach that user" in rec["error"]
        assert watch.cancels == [(("controller", "slurm"), "a")]
        assert res.held("a") == []  # the workspace reservation is released
        assert other.poll() is None  # another user's process is never signalled
    finally:
        other.kill()
        other.wait()
        watch.close()


def test_a_connect_session_is_watched_for_its_tunnel_and_never_asked_of_a_scheduler(tmp_path):
    root = tmp_path / "s"
    sock = listen_on(0)
    port = sock.getsockname()[1]
    # connect mode: no job, the tunnel's directory on the controller
    make_session(root, "c", job_id=None, remote_dir="/home/u/.isession/sessions/c", ports={"workspace": port})
    watch = Listening(root, [])  # any scheduler query would pop from an empty list and fail the poll
    try:
        assert list(watch.live_sessions()) == ["c"]
        run_ticks(watch, 1)
        assert service(root, "c")["JOB_STATUS"] == "Running" and watch.calls == []
        sock.close()  # the tunnel's listening end is gone
        run_ticks(watch, 1)
        doc = service(root, "c")
        assert doc["JOB_STATUS"] == "Starting" and f"nothing listens on workspace port {port}" in doc["ERROR_MESSAGE"]
        sock = listen_on(port)  # the tunnel reconnected
        run_ticks(watch, 1)
        assert service(root, "c")["JOB_STATUS"] == "Running"
        assert watch.calls == [] and watch.cancels == []
    finally:
        sock.close()
        watch.close()


def test_a_record_with_neither_job_nor_tunnel_is_not_watched(tmp_path):
    root = tmp_path / "s"
    make_session(root, "n", job_id=None)
    watch = Listening(root, [])
    try:
        assert watch.live_sessions() == {}
    finally:
        watch.close()


# -- the watcher's note on a teardown, and `isession cancel` finishing on it
def _cancelled_by(watch: w.Watcher, ticks: int = 3) -> None:
    run_ticks(watch, ticks)
    watch.close()


COMPLETED = {"jobs": {"42": {"state": "completed", "raw_state": "COMPLETED", "found": True}, "43": JOB_RUNNING},
             "reachable": True, "error": ""}


def test_the_watcher_notes_a_complete_teardown_after_the_end_it_recorded(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    srv = FakeServer(lambda req: undid())
    watch = FastCancel(root, [RUNNING, COMPLETED], srv)  # the job ends by itself
    run_ticks(watch, 1)
    assert wf.read_teardown(root / "a") is None  # running: nothing to say
    _cancelled_by(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Completed"
    note = wf.read_teardown(root / "a")
    assert note["complete"] is True and note["problems"] == [] and note["pending"] is False
    assert oct((root / "a" / wf.TEARDOWN_FILE).stat().st_mode & 0o777) == "0o600"


def test_a_teardown_that_left_something_is_noted_incomplete(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", remote_dir="/tmp/x")  # the agent on the node is a kind of its own then
    _state.run_op("cancel", str(root), "a", {})

    def answer(req):
        if req["skip"]:  # the clean-up after the end: the controller went away meanwhile
            raise w.RemoteError("connection to controller closed")
        return {"outcomes": [{"kind": "job", "side": "resource", "undone": ["job 42"], "error": ""},
                             {"kind": "agent", "side": "resource", "undone": [], "error": "agent.stop: EIO"}],
                "error": ""}

    _cancelled_by(FastCancel(root, [RUNNING, CANCELLED], FakeServer(answer)))
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    note = wf.read_teardown(root / "a")
    assert note["complete"] is False and note["problems"], note


def _cancel_cli(root, sid, watch_ticks=None, timeout=20.0):
    """watcher_cancelled with a watcher holding its lock (and ticking in a thread when given)."""
    fd = wf.lock_pidfile(root)
    wf.write_pid(fd)
    try:
        worker = threading.Thread(target=watch_ticks) if watch_ticks else None
        if worker:
            worker.start()
        answer = watcher_cancelled(root, sid, timeout=timeout)
        if worker:
            worker.join(timeout=30)
        return answer
    finally:
        os.close(fd)


def test_a_cancel_finishes_on_the_watchers_complete_teardown(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    _state.run_op("cancel", str(root), "a", {})
    srv = FakeServer(lambda req: undid(("job", ["job 42"])) if not req["skip"] else undid())
    watch = FastCancel(root, [RUNNING, RUNNING, CANCELLED], srv)

    def ticks():
        time.sleep(0.3)  # the cancel is already waiting when the watcher ends the session
        _cancelled_by(watch)

    assert _cancel_cli(root, "a", ticks) is True
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "cancelled"


def test_a_cancel_the_watcher_finished_before_the_wait_began_needs_no_playbook(tmp_path):
    """The watcher acts on the tombstone at once; the cancel may still be stopping the start when it is all done."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    _state.run_op("cancel", str(root), "a", {})
    srv = FakeServer(lambda req: undid(("job", ["job 42"])) if not req["skip"] else undid())
    _cancelled_by(FastCancel(root, [RUNNING, RUNNING, CANCELLED], srv))
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "cancelled"
    started = time.monotonic()
    assert _cancel_cli(root, "a") is True
    assert time.monotonic() - started < 10  # at once, from the note already written
    # cancelled, but the watcher's note says its teardown left something: the playbook
    (root / "a" / wf.TEARDOWN_FILE).write_text(json.dumps({"complete": False, "problems": ["x"], "pending": False}))
    assert _cancel_cli(root, "a") is False
    # cancelled by a cancel playbook long ago (no note of the watcher): the playbook, at once
    (root / "a" / wf.TEARDOWN_FILE).unlink()
    started = time.monotonic()
    assert _cancel_cli(root, "a") is False
    assert time.monotonic() - started < 10


def test_a_cancel_that_reads_the_end_before_the_watchers_note_waits_for_the_note(tmp_path):
    """The watcher records the end, then writes its note: a cancel reading the record in between gets the note."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    _state.run_op("cancel", str(root), "a", {"step": "cancelled"})  # ended just now, no note yet

    def note_after_a_moment():
        time.sleep(0.3)
        (root / "a" / wf.TEARDOWN_FILE).write_text(json.dumps({"complete": True, "problems": [], "pending": False}))

    assert _cancel_cli(root, "a", note_after_a_moment) is True
    # ended long ago, no note: not the watcher's cancel, so the playbook at once
    (root / "a" / wf.TEARDOWN_FILE).unlink()
    record = _state.read_record(str(root / "a" / "state.json"))
    (root / "a" / "state.json").write_text(json.dumps(dict(record, ended=record["ended"] - 60)))
    started = time.monotonic()
    assert _cancel_cli(root, "a") is False
    assert time.monotonic() - started < NOTE_AFTER_END  # not the moment a fresh end gets


def test_the_watcher_says_its_teardown_is_under_way_from_the_moment_it_records_the_end(tmp_path):
    """A burst of ends is torn down side by side: a note can come seconds after its end, so the end says first
    that the note is to come (and from which watcher)."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    seen = []
    watch = FastCancel(root, [RUNNING, COMPLETED], FakeServer(lambda req: undid()))  # the job ends by itself
    run_ticks(watch, 1)
    assert wf.read_teardown(root / "a") is None  # running: nothing to say yet
    teardown = watch.teardown

    def looked_at(*args, **kw):  # the teardown after the end: the end is recorded, the final note not written yet
        seen.append((_state.read_record(str(root / "a" / "state.json"))["step"], wf.read_teardown(root / "a")))
        return teardown(*args, **kw)

    watch.teardown = looked_at
    _cancelled_by(watch, 1)
    assert [(step, note[wf.UNDER_WAY], note["complete"]) for step, note in seen] == [("completed", os.getpid(), False)]
    final = wf.read_teardown(root / "a")
    assert final["complete"] is True and wf.UNDER_WAY not in final, final


def test_a_teardown_that_raises_still_gets_a_final_note(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    watch = FastCancel(root, [RUNNING, COMPLETED], FakeServer(lambda req: undid()))  # the job ends by itself
    run_ticks(watch, 1)

    def broken(*_args, **_kw):
        raise RuntimeError("boom")

    watch.teardown = broken
    _cancelled_by(watch, 1)
    note = wf.read_teardown(root / "a")
    assert note["complete"] is False and wf.UNDER_WAY not in note and "boom" in note["problems"][0], note


@pytest.mark.parametrize(("note", "watcher", "pending"), [
    (None, 7, None),  # no note
    ({"complete": True, "problems": []}, 7, None),  # final
    ({"complete": False, "problems": ["x"]}, None, None),  # final, incomplete
    ({"complete": False, wf.UNDER_WAY: 7}, 7, True),  # the running watcher's teardown
    ({"complete": False, wf.UNDER_WAY: 7}, 8, False),  # another watcher runs now
    ({"complete": False, wf.UNDER_WAY: 7}, None, False),  # no watcher runs
])
def test_note_pending_tells_a_final_note_from_one_under_way(note, watcher, pending):
    assert wf.note_pending(note, watcher) is pending


def test_a_cancel_waits_for_a_note_under_way_longer_than_the_moment_after_the_end(tmp_path):
    """Twenty cancels at once on two cores: the watcher recorded each end at once, its notes came seconds later.
    The cancel that read "under way" waits for the final note instead of running the playbook."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    _state.run_op("cancel", str(root), "a", {"step": "cancelled"})
    note = root / "a" / wf.TEARDOWN_FILE
    fd = wf.lock_pidfile(root)
    wf.write_pid(fd)
    try:
        note.write_text(json.dumps({"complete": False, "problems": [], "pending": False, wf.UNDER_WAY: os.getpid()}))

        def final_note_late():
            time.sleep(NOTE_AFTER_END + 0.5)
            note.write_text(json.dumps({"complete": True, "problems": [], "pending": False}))

        worker = threading.Thread(target=final_note_late)
        worker.start()
        started = time.monotonic()
        assert watcher_cancelled(root, "a", timeout=20.0) is True
        assert time.monotonic() - started >= NOTE_AFTER_END
        worker.join()
        # under way for a watcher that is gone (another pid holds the lock now): nobody will finish it
        note.write_text(json.dumps({"complete": False, "problems": [], "pending": False, wf.UNDER_WAY: 1}))
        started = time.monotonic()
        assert watcher_cancelled(root, "a", timeout=20.0) is False
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)


def test_an_under_way_note_that_comes_within_the_moment_after_the_end_extends_the_wait(tmp_path):
    """Read between the end and the first note: the moment after the end would end the wait, the "under way" note
    that comes within it makes the cancel wait for the final note, later than that moment."""
    root = tmp_path / "s"
    make_session(root, "a", ports={"workspace": 21999})
    _state.run_op("cancel", str(root), "a", {"step": "cancelled"})  # ended just now, no note yet
    note = root / "a" / wf.TEARDOWN_FILE

    def notes():
        time.sleep(0.2)
        note.write_text(json.dumps({"complete": False, "problems": [], "pending": False, wf.UNDER_WAY: os.getpid()}))
        time.sleep(NOTE_AFTER_END + 0.3)
        note.write_text(json.dumps({"complete": True, "problems": [], "pending": False}))

    started = time.monotonic()
    assert _cancel_cli(root, "a", notes) is True
    assert time.monotonic() - started >= NOTE_AFTER_END


def test_a_cancel_runs_the_playbook_when_the_watcher_cannot_vouch_for_everything(tmp_path):
    root = tmp_path / "s"
    # a teardown that left something
    make_session(root, "a", remote_dir="/tmp/x")
    _state.run_op("cancel", str(root), "a", {})

    def refuse_cleanup(req):
        if req["skip"]:
            raise w.RemoteError("connection to controller closed")
        return {"outcomes": [{"kind": "agent", "side": "resource", "undone": [], "error": "agent.stop: EIO"}],
                "error": ""}

    watch = FastCancel(root, [RUNNING, CANCELLED], FakeServer(refuse_cleanup))
    assert _cancel_cli(root, "a", lambda: _cancelled_by(watch)) is False
    # no job recorded yet (the start is still submitting), a session that had ended, a connect-mode session
    make_session(root, "b", step="submitted", status="Submitting", job_id=None)
    make_session(root, "c", step="completed", status="Completed")
    make_session(root, "d", job_id=None, remote_dir="/tmp/x")
    started = time.monotonic()
    assert [_cancel_cli(root, sid) for sid in ("b", "c", "d")] == [False, False, False]
    assert time.monotonic() - started < 10  # at once, not after the wait's 20 s
    # no watcher running: at once too
    make_session(root, "e")
    assert watcher_cancelled(root, "e", timeout=20.0) is False


def test_records_are_parsed_again_only_when_they_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(_dirwatch, "RECENT_NS", 0)  # the files here are all seconds old, as between a cluster's events
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    make_session(root, "old", step="cancelled", status="Cancelled")
    watch = w.Watcher(root, None, log=print)
    parsed = []
    real = _state.read_record

    def counting(path):
        parsed.append(Path(path).parent.name)
        return real(path)

    watch.st = types.SimpleNamespace(read_record=counting)  # the watcher's reads only, not _state's own
    for _round in range(5):
        assert list(watch.live_sessions()) == ["a"]
    assert sorted(parsed) == ["a", "old"]  # once each, though five ticks looked at both
    watch.live_sessions()["a"]["step"] = "mangled"  # what a caller does to its copy stays with it
    assert watch.live_sessions()["a"]["step"] == "queued"
    _state.run_op("cancel", str(root), "a", {})  # a rewrite (by rename) is seen at the next look
    assert watch.live_sessions()["a"]["cancel_requested"] is True
    assert sorted(parsed) == ["a", "a", "old"]
    _state.update_state(str(root), "a", step="cancelled")
    assert watch.live_sessions() == {}
    shutil.rmtree(root / "old")
    watch.live_sessions()
    assert not [k for k in watch._parsed if "/old/" in k]  # a directory that went away leaves no entry behind
    watch.close()


class _NoTree(_dirwatch.Tree):
    """A session root's watch where inotify is not available: the watcher looks at every session by stat."""

    def __init__(self, root, files, libc=None):
        super().__init__(root, files, libc=types.SimpleNamespace(inotify_init1=lambda _flags: -1))


@pytest.fixture(params=["inotify", "stat"])
def watch_mode(request, monkeypatch):
    """The watcher with inotify (what Linux gives) and without it (``_dirwatch.Tree`` inactive)."""
    if request.param == "stat":
        monkeypatch.setattr(_dirwatch, "Tree", _NoTree)
    return request.param


def test_a_waiting_session_is_decided_again_only_when_its_files_or_its_jobs_answer_change(tmp_path, monkeypatch,
                                                                                          watch_mode):
    """Polls that find the same record, the same service.json and the same answer as a poll that changed nothing
    decide nothing again; a new reason, a tombstone or an end is still seen at the next poll."""
    monkeypatch.setattr(_dirwatch, "RECENT_NS", 0)  # the files here are all seconds old, as in a long wait
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    _service_file.update_service_file(str(root / "a" / "service.json"), job_status="Queued",
                                      error_message="Priority")
    decided = []
    real = w.decide

    def counting(rec, *args, **kwargs):
        decided.append(rec["id"])
        return real(rec, *args, **kwargs)

    monkeypatch.setattr(w, "decide", counting)

    def queued(reason):
        return {"jobs": {"42": {"state": "queued", "raw_state": "PENDING", "reason": reason, "found": True}},
                "reachable": True, "error": ""}

    watch = Scripted(root, [queued("Priority")] * 5 + [queued("Resources")] * 5 + [CANCELLED])
    run_ticks(watch, 5)
    assert decided == ["a"]  # once; the four polls after it found nothing new
    run_ticks(watch, 2)  # a new reason: decided and written; that write is a new stamp, decided once more
    assert service(root, "a")["ERROR_MESSAGE"] == "Resources"
    assert len(decided) == 3
    run_ticks(watch, 1)
    assert len(decided) == 3
    _state.run_op("cancel", str(root), "a", {})  # the record changed: decided again at the next poll
    run_ticks(watch, 2)
    assert len(decided) == 4 and service(root, "a")["JOB_STATUS"] == "Queued"
    run_ticks(watch, 1)  # the scheduler says it ended: the end is recorded
    assert service(root, "a")["JOB_STATUS"] == "Cancelled"
    assert (watch._tree is not None) == (watch_mode == "inotify")
    watch.close()


def _stats_of(monkeypatch, root):
    """Count os.stat calls on files under ``root`` from now on."""
    seen = []
    real = os.stat

    def counting(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    return seen


def test_with_inotify_a_session_whose_files_do_not_change_costs_no_system_call(tmp_path, monkeypatch):
    """Waiting, running or long ended: a session whose files do not change is not even stat'ed at a tick; a change,
    a new session and a session that goes are all seen at the next tick."""
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    make_session(root, "old", step="completed", status="Completed")
    queued = {"jobs": {"42": {"state": "queued", "raw_state": "PENDING", "reason": "Priority", "found": True},
                       "43": {"state": "queued", "raw_state": "PENDING", "reason": "Priority", "found": True}},
              "reachable": True, "error": ""}
    _service_file.update_service_file(str(root / "a" / "service.json"), job_status="Queued",
                                      error_message="Priority")
    watch = Scripted(root, [queued] * 12)
    run_ticks(watch, 3)  # the first look at everything, then the first polls' memos
    assert watch._tree is not None and watch._tree.active
    seen = _stats_of(monkeypatch, root)
    run_ticks(watch, 4)
    assert seen == []  # four ticks, four polls: not one stat of a session file
    assert len(watch.calls) == 7  # and still one scheduler question per tick
    make_session(root, "b", job_id="43", step="queued", status="Queued")  # a new session: read at the next tick
    run_ticks(watch, 1)
    assert watch.calls[-1] == (("controller", "slurm"), ["42", "43"])
    _state.run_op("cancel", str(root), "a", {})  # a change: that session alone is looked at again
    seen.clear()
    run_ticks(watch, 1)
    assert seen and {Path(p).parent.name for p in seen} <= {"a", "b"}
    shutil.rmtree(root / "b")  # a session directory that goes: gone at the next tick
    assert "b" not in watch.live_sessions()
    watch.close()


def test_with_inotify_every_session_is_still_stat_ed_every_full_scan_period(tmp_path, monkeypatch):
    """A change inotify cannot report (a write to a shared home from another host) is found by the periodic look at
    every session's record."""
    monkeypatch.setattr(w, "FULL_SCAN_EVERY", 0.0)
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    watch = w.Watcher(root, None, log=print)
    watch.live_sessions()
    seen = _stats_of(monkeypatch, root)
    watch.live_sessions()
    assert seen == [str(root / "a" / "state.json")]
    watch.close()


def test_a_record_rewritten_moments_ago_is_read_again_even_with_the_same_stamp(tmp_path):
    """Coarse mtimes and reused inode numbers can give two rewrites in one clock tick the same stat stamp: a file
    modified less than _dirwatch.RECENT_NS ago is parsed again whatever its stamp says."""
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    path = root / "a" / "state.json"
    watch = w.Watcher(root, None, log=print)
    assert watch.live_sessions()["a"].get("cancel_requested") is not True
    before = os.stat(path)
    doc = json.loads(path.read_text())
    doc["cancel_requested"] = True
    text = json.dumps(doc)
    with open(path, "r+", encoding="utf-8") as handle:  # same inode, same size, then the same mtime: the same stamp
        handle.write(text[:before.st_size].ljust(before.st_size))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)
    assert watch.live_sessions()["a"]["cancel_requested"] is True
    watch.close()


def test_a_record_the_readiness_check_marked_running_is_never_moved_back_to_starting(tmp_path):
    # session_ready writes step running, then JOB_STATUS Running: a tick between the two read Queued beside
    # step running, and wrote step starting over running (CI: state.json 'starting' under service.json 'Running')
    root = tmp_path / "s"
    make_session(root, "a", step="queued", status="Queued")
    _state.run_op("update", str(root), "a", {"step": "running"})
    watch = Scripted(root, [{"jobs": {"42": {"state": "running", "found": True}}, "reachable": True}])
    run_ticks(watch, 1)
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "running"
    _service_file.update_service_file(str(root / "a" / "service.json"), job_status="Running")
    assert service(root, "a")["JOB_STATUS"] == "Running"
    watch.close()


class MarkedDuringTheQuery(Scripted):
    """The readiness check marks the session running while the scheduler's answer (asked before) is on its way."""

    def query(self, key, job_ids, inventory):
        answer = super().query(key, job_ids, inventory)
        _state.run_op("update", str(self.root), "a", {"step": "running"})
        _service_file.update_service_file(str(self.root / "a" / "service.json"), job_status="Running")
        return answer


def test_an_answer_asked_before_the_session_ran_never_moves_it_back(tmp_path):
    root = tmp_path / "s"
    make_session(root, "a", step="starting", status="Starting")
    pending = {"jobs": {"42": {"state": "queued", "reason": "Priority", "found": True}}, "reachable": True}
    watch = MarkedDuringTheQuery(root, [pending])
    run_ticks(watch, 1)
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "running"
    assert service(root, "a")["JOB_STATUS"] == "Running"
    watch.close()
    # a requeue the scheduler reports after the session reached running still shows (Slurm --requeue by a site)
    watch = Scripted(root, [pending])
    run_ticks(watch, 1)
    assert service(root, "a")["JOB_STATUS"] == "Queued"
    assert _state.read_record(str(root / "a" / "state.json"))["step"] == "queued"
    watch.close()


@pytest.mark.parametrize(("step", "status", "asked", "held_back"), [
    ("running", "Queued", -1.0, True),     # asked before the step was entered: older than it
    ("running", "Queued", +1.0, False),    # asked after: a requeue
    ("running", "Starting", -1.0, True),
    ("starting", "Queued", -1.0, True),
    ("queued", "Starting", -1.0, False),   # forward: whenever it was asked
    ("running", "Failed", -1.0, False),    # an end is an end
    ("running", None, -1.0, False),        # nothing to record
])
def test_predates_holds_back_only_an_older_answer_that_moves_the_step_back(step, status, asked, held_back):
    rec = {"step": step, "updated": 1000.0, "history": [{"step": "created", "at": 990.0}, {"step": step, "at": 1000.0}]}
    assert w.predates(rec, status, 1000.0 + asked) is held_back
    assert w.predates(rec, status, None) is False  # no time of asking (a direct call): as before
