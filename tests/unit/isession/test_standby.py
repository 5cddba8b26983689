"""The standby's CLI side: when it is used, taking one (a real unix socket), following its events."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from isession import standby
from isession.config import UsageError


def test_seconds_come_from_the_environment_and_bad_values_are_refused_by_name():
    assert standby.seconds_from({}) == 0
    assert standby.seconds_from({"ISESSION_STANDBY": "600"}) == 600
    # a strategy of the user's own cannot wait for a request: no standby then
    assert standby.seconds_from({"ISESSION_STANDBY": "600", "ANSIBLE_STRATEGY": "free"}) == 0
    for bad in ("ten", "-1", "100000"):
        with pytest.raises(UsageError, match=r"\$ISESSION_STANDBY must be"):
            standby.seconds_from({"ISESSION_STANDBY": bad})


def test_the_fingerprint_changes_with_the_inventory_the_collection_and_the_environment(tmp_path):
    col, playbook, inv = tmp_path / "col", tmp_path / "col" / "start_x.yml", tmp_path / "inv.ini"
    col.mkdir()
    playbook.write_text("- hosts: localhost\n")
    inv.write_text("[a]\nb\n")
    env = {"PATH": "/usr/bin", "ANSIBLE_FOO": "1", "ISESSION_ROOT": "/r", "UNRELATED": "x"}
    first = standby.fingerprint(col, playbook, inv, env)
    assert standby.fingerprint(col, playbook, inv, dict(env, UNRELATED="y")) == first
    assert standby.fingerprint(col, playbook, inv, dict(env, ISESSION_STANDBY="5")) == first
    assert standby.fingerprint(col, playbook, inv, dict(env, ANSIBLE_FOO="2")) != first
    assert standby.fingerprint(col, playbook, inv, dict(env, SSH_AUTH_SOCK="/s")) != first
    assert standby.fingerprint(col, playbook, None, env) != first
    time.sleep(0.01)
    inv.write_text("[a]\nc\n")
    assert standby.fingerprint(col, playbook, inv, env) != first
    assert json.loads(json.dumps(first)) == first  # stored in standby.json and compared after a round trip


class FakeStandby:
    """A waiting standby's socket: answers requests as linear_idle's wait does, and records them."""

    def __init__(self, directory: Path, answer: dict) -> None:
        self.requests: list = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(directory / standby.SOCKET))
        self.listener.listen(4)
        self.answer = answer
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            with conn:
                self.requests.append(json.loads(conn.makefile().readline()))
                conn.sendall(json.dumps(self.answer).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


def make_standby(root: Path, service: str, fp: dict) -> Path:
    directory = root / standby.DIRNAME / f"sb-{service}"
    (directory / "runner" / "artifacts").mkdir(parents=True)
    (directory / standby.RECORD).write_text(json.dumps({"service": service, "fingerprint": fp}))
    return directory


def session(root: Path, sid: str) -> Path:
    (root / sid / "logs" / "runner").mkdir(parents=True)
    return root / sid


def test_a_start_takes_the_standby_made_for_it_and_links_its_artifacts(tmp_path):
    fp = {"env": "e1"}
    other = make_standby(tmp_path, "jupyterlab", fp)
    mine = make_standby(tmp_path, "vnc", fp)
    fake_other, fake = FakeStandby(other, {"taken": True, "pid": 1}), FakeStandby(mine, {"taken": True, "pid": 4242})
    try:
        sdir = session(tmp_path, "vnc-1")
        taken = standby.take(tmp_path, "vnc", fp, {"session_id": "vnc-1"}, sdir)
        assert taken == standby.Taken(mine, 4242)
        assert fake.requests == [{"extravars": {"session_id": "vnc-1"}}] and fake_other.requests == []
        assert os.readlink(sdir / "logs" / "runner" / "artifacts") == str(mine / "runner" / "artifacts")
        assert (mine / standby.TAKEN).read_text() == "vnc-1\n"
        # taken once: the next start finds none
        assert standby.take(tmp_path, "vnc", fp, {"session_id": "vnc-2"}, session(tmp_path, "vnc-2")) is None
        assert len(fake.requests) == 1
    finally:
        fake.close()
        fake_other.close()


def test_no_standby_is_taken_for_another_fingerprint_or_when_it_refuses(tmp_path):
    make_standby(tmp_path, "vnc", {"env": "old"})  # no socket needed: never asked
    assert standby.take(tmp_path, "vnc", {"env": "new"}, {}, session(tmp_path, "a")) is None
    refusing = make_standby(tmp_path, "nginx", {"env": "new"})
    fake = FakeStandby(refusing, {"taken": False, "error": "bad"})
    try:
        sdir = session(tmp_path, "b")
        assert standby.take(tmp_path, "nginx", {"env": "new"}, {}, sdir) is None
        assert len(fake.requests) == 1
        assert not (refusing / standby.TAKEN).exists()  # free for the next start
        assert not (sdir / "logs" / "runner" / "artifacts").exists()  # the start runs its own play there
    finally:
        fake.close()


def test_a_standby_without_a_socket_yet_is_not_taken_and_retire_marks_it_to_end(tmp_path):
    starting = make_standby(tmp_path, "vnc", {"env": "e"})
    assert standby.take(tmp_path, "vnc", {"env": "e"}, {}, session(tmp_path, "a")) is None
    assert standby.retire(tmp_path) == 0  # none waiting to ask ...
    assert (starting / standby.END).exists()  # ... and the one starting ends once it listens (linear_idle)
    # a standby marked to end is never taken, even when it listens already
    fake = FakeStandby(starting, {"taken": True, "pid": 1})
    try:
        assert standby.take(tmp_path, "vnc", {"env": "e"}, {}, session(tmp_path, "b")) is None
        assert fake.requests == []
    finally:
        fake.close()


def test_a_standby_whose_directory_goes_as_it_is_claimed_is_not_taken(tmp_path, monkeypatch):
    ending = make_standby(tmp_path, "vnc", {"env": "e"})
    fake = FakeStandby(ending, {"taken": True, "pid": 1})
    real_open = os.open

    def open_after_its_end(path, *args, **kwargs):
        if Path(path).name == standby.TAKEN:  # its untaken end removes the directory between the checks and claim
            shutil.rmtree(ending)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(standby.os, "open", open_after_its_end)
    try:
        sdir = session(tmp_path, "a")
        assert standby.take(tmp_path, "vnc", {"env": "e"}, {}, sdir) is None  # the start runs its own play
        assert fake.requests == [] and not (sdir / "logs" / "runner" / "artifacts").exists()
    finally:
        fake.close()


def starting_standby(root: Path, fp: dict, *, age: float = 0.0, pid: object = None) -> Path:
    """A standby made for a vnc start ``age`` seconds ago that does not listen yet (``pid``: its pid file)."""
    directory = make_standby(root, "vnc", fp)
    record = {"service": "vnc", "fingerprint": fp, "created": time.time() - age}
    (directory / standby.RECORD).write_text(json.dumps(record))
    if pid is not None:
        (directory / standby.PID).write_text(f"{pid}\n")
    return directory


@pytest.mark.parametrize("pid", ["own", None])
def test_a_start_waits_for_the_standby_made_for_it_that_is_still_starting(tmp_path, pid):
    """Found before its play listens (it was spawned as the last start ended): waited for, not run beside."""
    fp = {"env": "e"}
    directory = starting_standby(tmp_path, fp, pid=os.getpid() if pid == "own" else None)
    fakes = []
    later = threading.Timer(0.4, lambda: fakes.append(FakeStandby(directory, {"taken": True, "pid": 77})))
    later.start()
    try:
        t0 = time.monotonic()
        taken = standby.take(tmp_path, "vnc", fp, {"session_id": "a"}, session(tmp_path, "a"))
        waited = time.monotonic() - t0
    finally:
        later.join()
        for fake in fakes:
            fake.close()
    assert taken == standby.Taken(directory, 77)
    assert 0.35 < waited < standby.STARTING_WAIT
    assert fakes[0].requests == [{"extravars": {"session_id": "a"}}]


@pytest.mark.parametrize("case", ["its process is gone", "made long ago", "no pid after the first seconds",
                                  "made for another start"])
def test_a_standby_that_will_not_listen_is_not_waited_for(tmp_path, case):
    fp = {"env": "e"}
    dead = subprocess.Popen(["true"])
    dead.wait()
    if case == "its process is gone":
        starting_standby(tmp_path, fp, pid=dead.pid)
    elif case == "made long ago":
        starting_standby(tmp_path, fp, age=standby.STARTING_AT_MOST + 1, pid=os.getpid())
    elif case == "no pid after the first seconds":
        starting_standby(tmp_path, fp, age=standby.STARTING_WAIT + 1)
    else:
        starting_standby(tmp_path, {"env": "other"}, pid=os.getpid())
    t0 = time.monotonic()
    assert standby.take(tmp_path, "vnc", fp, {}, session(tmp_path, "a")) is None
    assert time.monotonic() - t0 < 0.3  # the start runs its own play at once


def test_the_wait_for_a_starting_standby_ends_after_starting_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(standby, "STARTING_WAIT", 0.3)
    starting_standby(tmp_path, {"env": "e"}, pid=os.getpid())  # alive, but never listens
    t0 = time.monotonic()
    assert standby.take(tmp_path, "vnc", {"env": "e"}, {}, session(tmp_path, "a")) is None
    assert 0.25 < time.monotonic() - t0 < 1.5


def test_spawn_writes_the_standbys_pid(tmp_path, monkeypatch):
    spawned = []
    monkeypatch.setattr(standby.os, "posix_spawn", lambda *args, **kwargs: spawned.append(args) or 4321)
    playbook = tmp_path / "start_vnc.yml"
    playbook.write_text("- hosts: localhost\n")
    directory = standby.spawn(tmp_path / "root", tmp_path, "vnc", playbook, inventory=None, seconds=60, env={})
    assert (directory / standby.PID).read_text() == "4321\n"
    assert oct((directory / standby.PID).stat().st_mode & 0o777) == "0o600"
    assert spawned[0][1][-2:] == ["_standby", str(directory)]


def test_retire_asks_each_waiting_standby_to_end(tmp_path):
    waiting = make_standby(tmp_path, "vnc", {})
    fake = FakeStandby(waiting, {"taken": False, "ended": True})
    taken = make_standby(tmp_path, "nginx", {})
    (taken / standby.TAKEN).write_text("s-1\n")
    try:
        assert standby.retire(tmp_path) == 1
        assert fake.requests == [{"end": True}]
        assert not (taken / standby.END).exists()  # a taken one holds a session's artifacts: left alone
    finally:
        fake.close()


def write_event(events: Path, counter: int, kind: str) -> None:
    (events / f"{counter}-uuid{counter}.json").write_text(json.dumps({"counter": counter, "event": kind}))


def test_follow_feeds_the_events_in_order_and_ends_with_the_runs_status(tmp_path):
    directory = tmp_path / "sb"
    events = directory / "runner" / "artifacts" / "start" / "job_events"
    events.mkdir(parents=True)
    for n, kind in [(2, "playbook_on_play_start"), (1, "playbook_on_start"), (10, "playbook_on_task_start")]:
        write_event(events, n, kind)
    (events / "11-uuid11.json.tmp").write_text("{")  # being written: not an event yet
    (events / "uuid12-partial.json").write_text("{}")
    seen: list = []

    def finish() -> None:
        time.sleep(0.2)
        write_event(events, 11, "runner_on_ok")
        (events.parent / "status").write_text("successful")
        (events.parent / "rc").write_text("0")

    threading.Thread(target=finish).start()
    result = standby.follow(standby.Taken(directory, os.getpid()), lambda e: seen.append(e["counter"]),
                            threading.Event(), stop=lambda pid: pytest.fail("stopped"))
    assert result == ("successful", 0)
    assert seen == [1, 2, 10, 11]


def test_follow_stops_the_play_once_on_cancel_and_still_waits_for_its_end(tmp_path):
    directory = tmp_path / "sb"
    events = directory / "runner" / "artifacts" / "start" / "job_events"
    events.mkdir(parents=True)
    cancel = threading.Event()
    stopped: list = []

    def stop(pid: int) -> None:
        stopped.append(pid)
        (events.parent / "status").write_text("failed")
        (events.parent / "rc").write_text("130")

    threading.Timer(0.1, cancel.set).start()
    me = os.getpid()
    assert standby.follow(standby.Taken(directory, me), lambda e: None, cancel, stop=stop) == ("failed", 130)
    assert stopped == [me]


def test_follow_gives_up_when_the_play_is_gone_and_its_end_never_comes(tmp_path, monkeypatch):
    monkeypatch.setattr(standby, "RUNNER_GONE_AFTER", 0.2)
    directory = tmp_path / "sb"
    (directory / "runner" / "artifacts" / "start" / "job_events").mkdir(parents=True)
    gone = os.fork()
    if gone == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(gone, 0)
    assert standby.follow(standby.Taken(directory, gone), lambda e: None, threading.Event(),
                          stop=lambda pid: None) == ("failed", None)
