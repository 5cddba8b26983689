"""A start that waits in the queue shows it while it waits: the scheduler's reason, the queue position and
Slurm's estimated start, in isession's live view on a terminal; and it still learns that its job runs when the
user's watcher, which tells it, is killed meanwhile.

The bed's ``small`` partition fills with two 1-CPU jobs; a session asked there waits (Resources) until one ends.
The blockers have a time limit, so Slurm's backfill scheduler can estimate when the session's job will start. The
CLI runs on a pseudo-terminal (``script``), as a user at a terminal sees it.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils._watcher_pid import watcher_pid
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from cli_support import Cli  # noqa: E402
from sessions_common import cluster_inventory, queue, wait_until  # noqa: E402

pytestmark = pytest.mark.bed
CLUSTER_USER = "cluser2"


class Terminal:
    """``isession ...`` on a pseudo-terminal in the workspace, its output collected as it comes."""

    def __init__(self, cli: Cli, *args: str) -> None:
        command = shlex.join([str(cli.bed.venv / "bin" / "python"), "-m", "isession", *args])
        env = dict(cli.env, TERM="xterm", COLUMNS="160", LINES="40")
        self.proc = cli.bed.popen("workspace", ["script", "-qefc", command, "/dev/null"], user=cli.user, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.chunks: list = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(5)
        return rc


def test_a_queued_start_shows_the_reason_position_and_estimated_start_and_outlives_its_watcher(bed):
    blockers = []
    for _attempt in range(2):  # MaxCPUsPerNode=2: two 1-CPU jobs fill it; a time limit lets backfill estimate
        out = bed.slurm(["sbatch", "--parsable", "-p", "small", "-c", "1", "-t", "10", "-J", "isession-test-blocker",
                         "-o", "/dev/null", "--wrap", "sleep 600"], user=CLUSTER_USER).stdout.strip()
        blockers.append(out.split(";")[0])
    cli = Cli(bed, inventory=cluster_inventory(bed))
    sid = f"queued-view-{time.strftime('%H%M%S')}"
    term = None
    try:
        assert wait_until(lambda: all("RUNNING" in bed.slurm(["squeue", "-h", "-j", b, "-o", "%T"]).stdout
                                      for b in blockers), 30)
        term = Terminal(cli, "start", "nginx", "--id", sid, "-t", "compute", "-r", "controller",
                        "-e", "session_partition=small", "-e", "session_queue_timeout=240",
                        "-e", "session_start_timeout=60")
        queued = re.compile(r"queued \(job (\d+)\): (Resources|Priority), position 1 of 1")
        assert wait_until(lambda: queued.search(term.text), 90, step=0.5), term.text[-3000:]
        job = queued.search(term.text).group(1)
        assert "PENDING" in queue(bed, f"isession-{sid}") and job in queue(bed, f"isession-{sid}")
        assert term.proc.poll() is None  # still waiting, and saying so
        # the backfill scheduler (every 30 s by default) then estimates the start; the view shows it
        estimate = re.compile(r"position 1 of 1, estimated start \d\d:\d\d:\d\d \(in ")
        assert wait_until(lambda: estimate.search(term.text), 90, step=0.5), term.text[-3000:]
        # the watcher, which tells the waiting start that its job runs, is killed: the start's wait starts it again
        # (told by a pidfd at once), and the new one sees the job run
        first = watcher_pid(str(cli.root))
        assert first and first > 0
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: (watcher_pid(str(cli.root)) or first) not in (first, -1), 30), \
            "no new watcher after the first was killed"
        assert term.proc.poll() is None
        bed.slurm(["scancel", blockers[0]], check=False)
        assert term.wait(180) == 0, term.text[-3000:]
        assert "status    Running" in term.text and f"cancel    isession cancel {sid}" in term.text
        assert cli.service(sid)["JOB_STATUS"] == "Running"
    finally:
        if term is not None and term.proc.poll() is None:
            term.proc.terminate()
        cli.run("cancel", sid, timeout=300)
        bed.slurm(["scancel", *blockers], check=False)
        cli.stop_watcher()
    assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
