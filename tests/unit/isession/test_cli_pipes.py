"""The CLI and pipes: a reader that leaves ends a command quietly, and a connection's ssh that dies never kills it.

Regression: ``main()`` once gave SIGPIPE its default action for the whole process (so ``isession list | head`` ended
quietly). The watcher runs through ``main()`` too; when a controller was unreachable, writing the query server's
payload (larger than a pipe buffer) to an ssh that had already exited killed the watcher with SIGPIPE instead of
raising, and with it every later poll. Both commands run for real here (``python -m isession``, a real ``ssh`` to a
closed loopback port).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_a_reader_that_leaves_ends_the_command_quietly(cli_env):
    proc = subprocess.Popen([sys.executable, "-m", "isession", "describe", "fake"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **cli_env})
    proc.stdout.close()  # like `| head -0`: nobody reads
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert rc == 141, (rc, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_watcher_survives_an_unreachable_controller(cli_env, tmp_path):
    root = Path(cli_env["ISESSION_ROOT"])
    _state.run_op("create", str(root), "s1", {"service": "nginx", "target": "compute", "resource": "deadhost",
                                              "scheduler": "slurm", "job_id": "42", "step": "running"})
    _service_file.update_service_file(str(root / "s1" / "service.json"), url="/me", port=20000, slug="",
                                      job_status="Running")
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"deadhost ansible_host=127.0.0.1 ansible_port={closed_port()} ansible_user=nobody\n")
    cp = subprocess.run([sys.executable, "-m", "isession", "watch", "--once", "--inventory", str(inventory)],
                        capture_output=True, text=True, env={**os.environ, **cli_env}, timeout=120, check=False)
    assert cp.returncode == 0, (f"watcher ended with {cp.returncode}"
                                f"{' (SIGPIPE)' if cp.returncode == -signal.SIGPIPE else ''}\n{cp.stdout}{cp.stderr}")
    assert "deadhost: undetermined" in cp.stdout, cp.stdout + cp.stderr
    assert _service_file.read_service_file(str(root / "s1" / "service.json"))["JOB_STATUS"] == "Running"
