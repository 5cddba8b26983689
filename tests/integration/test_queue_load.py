"""Twenty-one sessions started at once on the bed's ``small`` partition (two 1-CPU jobs fill it): two run, the rest
queue; the queued starts learn their job's state from the user's one watcher, so the controller answers about the
same number of job queries per second whatever the number queued; then one queued session is cancelled alone and the
other twenty at once, and nothing is left on any host (jobs, processes, listeners, port reservations).
Timings (how fast a queued job reaches Running, CPU per queued session) are bench/queue_load.py's, not this test's.

The query rate is slurmctld's own count (``sdiag``: REQUEST_JOB_INFO and REQUEST_JOB_INFO_SINGLE RPCs) over a window
while the queued starts wait.
"""
from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_support import Cli  # noqa: E402
from sessions_common import cluster_inventory, listening, reservations, session_processes, wait_until  # noqa: E402

pytestmark = pytest.mark.bed
N = 21  # one is cancelled alone, then twenty at once
TERMINAL = ("Cancelled", "Completed", "Failed")


def job_info_rpcs(bed) -> int:
    out = bed.slurm(["sdiag"], check=True).stdout
    return sum(int(n) for n in re.findall(r"REQUEST_JOB_INFO(?:_SINGLE)?\s+\(\s*\d+\)\s+count:(\d+)", out))


def status(cli: Cli, sid: str) -> str:
    try:
        return cli.service(sid)["JOB_STATUS"]
    except (OSError, ValueError, KeyError):
        return "-"


def diagnosis(cli: Cli, outputs: dict) -> str:
    """What a failed assertion shows: the commands' output, each session's teardown note and the watcher's log."""
    notes = {}
    for sid in outputs:
        try:
            notes[sid] = (cli.root / sid / "teardown.json").read_text().strip()
        except OSError as exc:
            notes[sid] = str(exc)
    try:
        log = (cli.root / ".watcher.log").read_text().splitlines()[-60:]
    except OSError as exc:
        log = [str(exc)]
    return "\n".join([json.dumps(outputs, indent=1), json.dumps(notes, indent=1), "watcher log:", *log])


def test_twenty_at_once_most_queued_then_cancelled_at_once(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed))
    tag = f"{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
    sids = [f"ql-{tag}-{i:02d}" for i in range(N)]
    argv = [str(bed.venv / "bin" / "python"), "-m", "isession"]
    starts = []
    try:
        for sid in sids:
            starts.append(bed.popen("workspace", argv + [
                "start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                "-e", "session_partition=small", "-e", "session_queue_timeout=900", "-e", "session_start_timeout=120"],
                user="wsuser", env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def counts():
            return [status(cli, s) for s in sids]

        assert wait_until(lambda: counts().count("Running") == 2 and counts().count("Queued") == N - 2, 600,
                          step=1), counts()
        # the queued starts wait on the workspace: the controller's job queries do not grow with them
        time.sleep(3)
        before, t0 = job_info_rpcs(bed), time.monotonic()
        time.sleep(10)
        rate = (job_info_rpcs(bed) - before) / (time.monotonic() - t0)
        print(f"{N - 2} queued: {rate:.2f} job-info RPCs/s at slurmctld")
        # one watcher, one query per tick (every 0.5 s while sessions wait), not one per queued start
        assert rate <= 6.0, f"{rate:.2f} job queries/s for {N - 2} queued starts"
        # each waiting start's progress view reads where its job waits from the watcher's queue.json
        queued = [s for s in sids if status(cli, s) == "Queued"]
        assert queued and all(json.loads((cli.root / s / "queue.json").read_text())["job_id"] == cli.state(s)["job_id"]
                              for s in queued), queued
        # one queued session alone: the watcher undoes it while the command still stops its start, and the command
        # ends on the watcher's note (it used to run the cancel playbook when the watcher was done first)
        alone, rest = queued[0], [s for s in sids if s != queued[0]]
        by_sid = {alone: cli.run("cancel", alone, timeout=300)}
        assert by_sid[alone].returncode == 0 and status(cli, alone) == "Cancelled", by_sid[alone].stdout
        # twenty cancels at once
        t1 = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(rest)) as pool:
            done = list(pool.map(lambda s: cli.run("cancel", s, timeout=300), rest))
        took = time.monotonic() - t1
        assert all(cp.returncode == 0 for cp in done), [cp.stdout + cp.stderr for cp in done if cp.returncode]
        assert all(status(cli, s) == "Cancelled" for s in sids), counts()
        print(f"{len(rest)} cancels at once: {took:.1f} s")
        # the watcher undid each queued session (one request for the burst) and said so: no cancel playbook ran
        by_sid.update(zip(rest, done, strict=True))
        ran_playbook = [s for s in queued if "the user's watcher ended the session" not in by_sid[s].stdout
                        or list((cli.root / s / "logs" / "runner" / "artifacts").glob("cancel-*"))]
        assert not ran_playbook, diagnosis(cli, {s: by_sid[s].stdout[-400:] for s in ran_playbook})
        # every start ended (interrupted by its cancel: 130)
        codes = [p.wait(timeout=120) for p in starts]
        assert all(c in (0, 130) for c in codes), codes

        def left():
            jobs = bed.slurm(["squeue", "-h", "-u", "cluser", "-t", "PD,R,CG", "-o", "%j"], check=False).stdout.split()
            out = {"jobs": [j for j in jobs if j.startswith(f"isession-ql-{tag}")],
                   "reservations": {s: reservations(s) for s in sids if reservations(s)},
                   "processes": {s: session_processes(s) for s in sids if session_processes(s)}}
            ports = [cli.state(s).get("ports", {}).get("workspace") for s in sids]
            out["workspace listeners"] = [p for p in ports if p and listening(bed, "workspace", int(p))]
            return out

        assert wait_until(lambda: not any(left().values()), 30, step=0.5), left()
    finally:
        for sid in sids:
            if status(cli, sid) not in TERMINAL and (cli.root / sid / "state.json").exists():
                cli.run("cancel", sid, timeout=120)
        for proc in starts:
            if proc.poll() is None:
                proc.wait(timeout=120)
        cli.stop_watcher()
