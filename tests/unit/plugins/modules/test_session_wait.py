"""session_wait, run for real as Ansible runs it, while another process writes the record as the watcher does."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state

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
