"""A taken session id is refused before anything runs; a start stopped by ``isession cancel`` exits 130, never 137."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state
from isession.play import RUNNER_DIR, stop_runs_in_progress


def test_start_with_a_taken_id_says_so_and_touches_nothing(cli_env):
    root = Path(cli_env["ISESSION_ROOT"])
    _state.run_op("create", str(root), "old1", {"service": "nginx", "target": "workspace", "step": "running"})
    _state.run_op("update", str(root), "old1", {"step": "cancelled"})
    _service_file.update_service_file(str(root / "old1" / "service.json"), url="/me", port=20000, slug="",
                                      job_status="Cancelled")
    before = {p.name: p.read_bytes() for p in (root / "old1").iterdir() if p.is_file()}
    cp = subprocess.run([sys.executable, "-m", "isession", "start", "fake", "--id", "old1"], capture_output=True,
                        text=True, env={**os.environ, **cli_env}, timeout=120, check=False)
    assert cp.returncode == 2, cp
    assert "--id old1: the id is taken (that session is Cancelled)" in cp.stderr, cp.stderr
    assert "was cancelled" not in cp.stdout + cp.stderr
    assert {p.name: p.read_bytes() for p in (root / "old1").iterdir() if p.is_file()} == before
    assert not (root / "old1" / RUNNER_DIR / "cli.json").exists()


SLOW_CLI = r"""
import signal, sys, time
# stands in for `isession start` (the word isession is in its command line): on SIGTERM it needs a moment to stop
# its playbook, then exits 130 like the real one
def on_term(*_):
    time.sleep(1.5)
    sys.exit(130)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.1)
"""


def test_cancel_never_kills_the_start_cli(tmp_path):
    session_dir = tmp_path / "s1"
    pdd = session_dir / RUNNER_DIR
    pdd.mkdir(parents=True)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(ready), "isession"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (pdd / "start.pid").write_text(json.dumps({"cli_pid": proc.pid, "playbook_pid": None}))
    assert stop_runs_in_progress(session_dir, grace=0.3) == [proc.pid]
    assert proc.wait(timeout=10) == 130
