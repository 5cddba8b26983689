"""Clean ends after a lost node (issue 11): slurmd killed on a compute host during a session, then restarted.

With slurmd gone, Slurm declares the node down and the job NODE_FAIL while the job's processes (the agent, the
server, the tunnel) keep running on the host. The session must end ``Failed`` in words, and then nothing may be left:
checked per host - the workspace (no listener on the session's port, no reservation), the compute host (no process of
the session, no listener on its node port, no node-port reservation) and the controller (the job is not running) -
once after the end and again after slurmd is back.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_support import Cli  # noqa: E402
from sessions_common import cluster_inventory, listening, reservations, session_processes, wait_until  # noqa: E402

pytestmark = pytest.mark.bed
NODE = "compute1"


def slurmd_pid(bed):
    try:
        pid = int((bed.slurm_dir / f"slurmd-{NODE}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def leftovers(bed, sid: str, rdir: Path, wsport: int, node_port: int, *, stepd: bool = True) -> dict:
    """What is left of the session, per host (empty lists/False everywhere when nothing is).

    ``stepd=False``: Slurm's own slurmstepd of the job is not counted (with slurmd gone it waits to report the
    job's end; slurmd cleans it up when it is back).
    """
    procs = [cmd for cmd in session_processes(str(rdir)).values() if stepd or "slurmstepd" not in cmd]
    return {
        "workspace listener": listening(bed, "workspace", wsport),
        "reservations (any host)": reservations(sid),
        "processes": sorted(procs),
        f"{NODE} listener": listening(bed, NODE, node_port),
        "job": bed.slurm(["squeue", "-h", "-n", f"isession-{sid}", "-t", "R,CG,PD", "-o", "%i %T"],
                         check=False).stdout.strip(),
    }


def nothing_left(found: dict) -> bool:
    return not any(found.values())


def test_slurmd_killed_then_back_leaves_nothing(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed))
    sid, job, killed = f"lost-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}", "", False
    try:
        cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                     "-e", f'session_directives=["--nodelist={NODE}"]', "-e", "session_start_timeout=90",
                     timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        state = cli.state(sid)
        job, rdir, wsport = state["job_id"], Path(state["remote_dir"]), int(state["ports"]["workspace"])
        agent = json.loads((rdir / "agent.json").read_text())
        node_port = int(agent["node_port"])
        assert agent["host"] == NODE and listening(bed, "workspace", wsport) and listening(bed, NODE, node_port)
        pid = slurmd_pid(bed)
        assert pid, "slurmd is not running on " + NODE
        killed = True
        os.kill(pid, signal.SIGKILL)
        # the job's processes outlive slurmd: the session is still served until the scheduler gives up on the node
        time.sleep(2)
        assert session_processes(str(rdir)) and listening(bed, "workspace", wsport)
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] in ("Failed", "Completed", "Cancelled"), 240,
                          step=0.5), (cli.service(sid), cli.watcher_log()[-3000:])
        svc = cli.service(sid)
        assert svc["JOB_STATUS"] == "Failed" and svc["ERROR_MESSAGE"].startswith(f"node failure on {NODE}"), svc
        ended = time.monotonic()
        # the agent on the lost host hears of the end through its directory and stops: its server, its tunnel (and
        # with it the workspace's forwarded listener) and its node port go; the workspace port's reservation is
        # released only after its listener went
        assert wait_until(lambda: nothing_left(leftovers(bed, sid, rdir, wsport, node_port, stepd=False)), 15), \
            (leftovers(bed, sid, rdir, wsport, node_port), cli.watcher_log()[-3000:])
        print(f"{sid}: nothing left {time.monotonic() - ended:.1f} s after Failed was written")
        assert (rdir / "agent.stop").exists()
        # slurmd back: the node returns, the ended job stays ended, nothing comes back
        bed._start_slurmd(NODE)  # noqa: SLF001 - the bed's own way to start it
        killed = False
        assert wait_until(lambda: bed.node_state(NODE).lower() in ("idle", "mixed", "allocated"), 120, step=1), \
            bed.node_state(NODE)
        assert wait_until(lambda: nothing_left(leftovers(bed, sid, rdir, wsport, node_port)), 30), \
            leftovers(bed, sid, rdir, wsport, node_port)
        assert cli.service(sid)["JOB_STATUS"] == "Failed"
    finally:
        if killed and not slurmd_pid(bed):
            bed._start_slurmd(NODE)  # noqa: SLF001
            wait_until(lambda: bed.node_state(NODE).lower() in ("idle", "mixed", "allocated"), 120, step=1)
        cli.run("cancel", sid, timeout=120)
        if job:
            bed.slurm(["scancel", job], user="cluser", check=False)
        cli.stop_watcher()
