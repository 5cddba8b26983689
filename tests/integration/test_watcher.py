"""The watcher on the bed: a real Slurm job on compute, polled over one persistent ssh session to the
controller; a hand ``scancel`` must be in service.json (Failed) within 5 s, and a live job is left alone.

Each session's workspace port has a listener of wsuser, as a live session's tunnel end would: the watcher also
checks who listens there (docs/design/security.md), and a running session with nothing there is not Running."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from cli_support import Cli

pytestmark = pytest.mark.bed

MAKE_SESSION = """
import sys
from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state
root, sid, job, port = sys.argv[1:5]
_state.run_op("create", root, sid, {"service": "nginx", "target": "compute", "resource": "controller",
              "scheduler": "slurm", "step": "running", "job_id": job, "ports": {"workspace": int(port)}})
_service_file.update_service_file(root + "/" + sid + "/service.json", url="/me", port=int(port), job_status="Running")
"""


def submit(bed, seconds: int = 300) -> str:
    cp = bed.run("controller", ["sbatch", "--parsable", "-p", "debug", "-J", "isession-watch-test",
                                "-o", "/dev/null", "--wrap", f"sleep {seconds}"], user="cluser", check=True)
    return cp.stdout.strip().split(";")[0]


def wait_running(bed, jobs, timeout: float = 60.0) -> None:
    """The records below say "running": make that true first (a fresh job can be PENDING/CONFIGURING
    for a moment, and the watcher would rightly report it as Queued, then Starting)."""
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        cp = bed.run("controller", ["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T"], user="cluser")
        states = dict(line.split(None, 1) for line in cp.stdout.splitlines() if line.strip())
        if all(states.get(j) == "RUNNING" for j in jobs):
            return
        time.sleep(0.2)
    raise AssertionError(f"jobs not RUNNING after {timeout} s: {states}")


def tunnel_end(bed, servers: list) -> int:
    """A listener of wsuser on a free workspace port (what a live session's tunnel end is) -> its port."""
    proc = bed.popen("workspace", ["/usr/bin/python3", "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                                   "--directory", "/nonexistent"], user="wsuser", stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, text=True)
    servers.append(proc)
    return int(proc.stdout.readline().split(" port ")[1].split()[0])


def make_session(bed, cli: Cli, sid: str, job: str, port: int) -> None:
    cli.root.mkdir(mode=0o700, exist_ok=True)
    bed.run("workspace", ["chown", "wsuser:", str(cli.root)], check=True)
    bed.run("workspace", [str(bed.venv / "bin" / "python"), "-c", MAKE_SESSION, str(cli.root), sid, job, str(port)],
            user="wsuser", env={"PYTHONPATH": str(bed.collections_path)}, check=True)


def wait_status(cli: Cli, sid: str, wanted: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if json.loads((cli.root / sid / "service.json").read_text())["JOB_STATUS"] == wanted:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{sid}: not {wanted} after {timeout} s: {(cli.root / sid / 'service.json').read_text()}")


def test_hand_scancel_is_failed_within_5s_and_live_jobs_stay(bed):
    cli = Cli(bed)
    live_job, victim_job = submit(bed), submit(bed)
    wait_running(bed, [live_job, victim_job])
    servers: list = []
    make_session(bed, cli, "watch-live", live_job, tunnel_end(bed, servers))
    make_session(bed, cli, "watch-victim", victim_job, tunnel_end(bed, servers))
    watcher = bed.popen("workspace", [str(bed.venv / "bin" / "python"), "-m", "isession", "watch"],
                        user="wsuser", env=cli.env, stdout=open(cli.tmp / "watch.log", "w"), stderr=-2)
    try:
        time.sleep(3)  # a few polls with both jobs RUNNING: nothing changes
        assert cli.service("watch-live")["JOB_STATUS"] == "Running"
        assert cli.service("watch-victim")["JOB_STATUS"] == "Running"
        bed.run("controller", ["scancel", victim_job], user="cluser", check=True)
        took = wait_status(cli, "watch-victim", "Failed", 5.0)
        print(f"hand scancel -> Failed in {took:.2f} s")
        svc = cli.service("watch-victim")
        assert "cancelled outside isession" in svc["ERROR_MESSAGE"] and victim_job in svc["ERROR_MESSAGE"]
        assert cli.state("watch-victim")["step"] == "failed"
        assert cli.service("watch-live")["JOB_STATUS"] == "Running"
        # one watcher per user: a second one refuses to run
        second = cli.run("watch", "--daemon", check_rc=0)
        assert "already runs" in second.stdout
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
        bed.run("controller", ["scancel", live_job, victim_job], user="cluser")
    log = (cli.tmp / "watch.log").read_text()
    assert "watch-victim: Running -> Failed" in log, log
    # one persistent connection: the polls did not open an ssh session each
    assert "undetermined" not in log, log
