"""session_wait, run for real as Ansible runs it, while another process writes the record as the watcher does."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state
from ansible_collections.hpc.interactive.plugins.modules.session_wait import WATCHER_CHECK, WATCHER_RESTARTS

COLLECTIONS = Path(os.path.abspath(_state.__file__)).parents[5]
# the watcher's writes (state.json first, then service.json), from another process after a delay
WRITER = r"""
import sys, time
from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state
root, sid, delay, step = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
time.sleep(delay)
fields = {"step": step}
if step == "failed":
    fields["error"] = "job 9 ended before it ran (failed): BadConstraints"
_state.update_state(root, sid, **fields)
"""


def queued(root: Path, sid: str) -> None:
    _state.run_op("create", str(root), sid, {"service": "nginx", "target": "compute", "resource": "c",
                                             "scheduler": "slurm", "job_id": "9", "step": "queued"})
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20000, slug="",
                                      job_status="Queued", error_message="Resources")


def writer(root: Path, sid: str, delay: float, step: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), sid, str(delay), step],
                            env=dict(os.environ, PYTHONPATH=str(COLLECTIONS)))


def test_returns_within_its_interval_of_the_watchers_write(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "a")
    proc = writer(root, "a", 1.0, "starting")
    started = time.monotonic()
    res = run_module("session_wait", {"id": "a", "root": str(root), "timeout": 30})
    took = time.monotonic() - started
    proc.wait(timeout=10)
    written = (root / "a" / "state.json").stat().st_mtime
    assert res.get("failed") is not True and res["step"] == "starting" and res["reason"] == "Resources", res
    assert 0.9 <= res["waited"] <= 1.6 and took < 5, (res, took)
    assert time.time() - written < 5


def test_an_end_while_queued_fails_with_the_records_words(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "b")
    proc = writer(root, "b", 0.3, "failed")
    res = run_module("session_wait", {"id": "b", "root": str(root), "timeout": 30})
    proc.wait(timeout=10)
    assert res["failed"] is True and res["step"] == "failed", res
    assert res["msg"] == "job 9 ended before it ran (failed): BadConstraints"


def test_timeout_says_the_job_waited_in_the_queue_with_the_reason(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "c")
    res = run_module("session_wait", {"id": "c", "root": str(root), "timeout": 0.5})
    assert res["failed"] is True and res["msg"] == "the job waited in the queue longer than 0.5 s: Resources", res
    check = run_module("session_wait", {"id": "c", "root": str(root), "timeout": 30}, check=True)
    assert check.get("failed") is not True and check["step"] == "queued" and check["waited"] < 1, check


# A stand-in for `isession watch --daemon`: unless a watcher holds the lock on <root>/.watcher.pid, it starts one in
# its own session that takes the lock, writes its pid and lives LIFE seconds (forever when 0), and says so as isession
# does; the wait's watcher_argv runs it
STARTER = r"""
import fcntl, os, subprocess, sys, time
root, life, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
DAEMON = '''
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".watcher.pid"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, str(os.getpid()).encode(), 0)
time.sleep(float(sys.argv[2]) or 3600)
'''
path = os.path.join(root, ".watcher.pid")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("a watcher already runs")
    sys.exit(0)
fcntl.flock(fd, fcntl.LOCK_UN)
proc = subprocess.Popen([sys.executable, "-c", DAEMON, root, str(life)], start_new_session=True,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(0.01)
    except BlockingIOError:
        if os.pread(fd, 32, 0).decode().strip() == str(proc.pid):
            break
with open(log, "a") as out:
    out.write("%d %f\n" % (proc.pid, time.time()))
print("watcher started (pid %d)" % proc.pid)
"""


def starter(tmp_path: Path, root: Path, life: float = 0) -> tuple:
    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    log = tmp_path / "starts.log"
    return [sys.executable, str(script), str(root), str(life), str(log)], log


def starts_of(log: Path) -> list:
    return [(int(pid), float(at)) for pid, at in (line.split() for line in log.read_text().splitlines())]


def test_the_wait_starts_the_watcher_again_when_it_exits_and_still_sees_its_job_run(tmp_path, run_module, wait_for):
    root = tmp_path / "s"
    queued(root, "w")
    argv, log = starter(tmp_path, root)
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_module(
        "session_wait", {"id": "w", "root": str(root), "timeout": 60, "watcher_argv": argv,
                         "watcher_env": {"ISESSION_ROOT": str(root)}})))
    thread.start()
    try:
        assert wait_for(lambda: log.exists() and len(starts_of(log)) == 1, 15)
        first, _at = starts_of(log)[0]
        killed_at = time.time()
        os.kill(first, signal.SIGKILL)  # the watcher dies while the job waits
        assert wait_for(lambda: len(starts_of(log)) == 2, 15), "the wait did not start the watcher again"
        second, again_at = starts_of(log)[1]
        assert second != first
        # told at once by a pidfd, not at the next look at the lock
        assert again_at - killed_at < WATCHER_CHECK, again_at - killed_at
        writer(root, "w", 0.2, "starting").wait(timeout=10)  # the new watcher writes what the scheduler said
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert result.get("failed") is not True and result["step"] == "starting", result
        assert result["watcher"] is True and result["watcher_starts"] == 2 and result["changed"] is True, result
    finally:
        for pid, _at in starts_of(log) if log.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        thread.join(timeout=70)


def test_a_watcher_that_cannot_start_leaves_the_wait_to_the_caller_with_the_reason(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "x")
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('isession: no inventory\\n'); sys.exit(3)"]
    res = run_module("session_wait", {"id": "x", "root": str(root), "timeout": 30, "watcher_argv": argv})
    assert res.get("failed") is not True and res["watcher"] is False and res["watcher_starts"] == 0, res
    assert res["step"] == "queued" and res["waited"] < 5, res
    assert res["msg"].endswith("exited with status 3: isession: no inventory"), res


def test_a_watcher_that_keeps_exiting_leaves_the_wait_to_the_caller(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "y")
    argv, log = starter(tmp_path, root, life=0.2)
    res = run_module("session_wait", {"id": "y", "root": str(root), "timeout": 60, "watcher_argv": argv})
    assert res.get("failed") is not True and res["watcher"] is False and res["step"] == "queued", res
    assert res["watcher_starts"] == WATCHER_RESTARTS + 1 == len(starts_of(log)), res
    assert res["msg"] == ("not followed through the user's watcher: the user's watcher exited %d times during the "
                          "wait" % (WATCHER_RESTARTS + 1)), res


def test_watcher_env_needs_watcher_argv(tmp_path, run_module):
    root = tmp_path / "s"
    queued(root, "z")
    res = run_module("session_wait", {"id": "z", "root": str(root), "watcher_env": {"A": "1"}})
    assert res["failed"] is True and "watcher_argv" in res["msg"], res
