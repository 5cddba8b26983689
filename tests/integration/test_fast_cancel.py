"""Fast cancel: the user's watcher alone undoes a session once ``isession cancel`` has asked it to.

``isession cancel`` sets the tombstone and wakes the watcher (SIGUSR1) before it runs the cancel playbook; the watcher
then cancels the job (or stops the detached agent), stops the controller-side tunnel and releases the node ports over
the connection it already holds, and records Cancelled once the scheduler confirms the end. Here only that first step
of the CLI runs (``request_fast_cancel``), no playbook: everything must still be gone, on the real bed (nginx on the
workspace, on the controller and on a Slurm compute node, as wsuser). Then ``isession cancel`` confirms: it succeeds,
the session stays Cancelled and nothing changes on the cluster.
"""
from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))
from isession import watchfiles as wf  # noqa: E402
from cli_support import Cli  # noqa: E402
from sessions_common import (  # noqa: E402
    WS_USER,
    cluster_inventory,
    listening,
    queue,
    reservations,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed

FAST_CANCEL = ("import sys; from pathlib import Path; from isession.collection import activate; activate(); "
               "from isession.commands import request_fast_cancel; "
               "sys.exit(0 if request_fast_cancel(Path(sys.argv[1]), sys.argv[2]) else 3)")


def node_of(state: dict) -> Optional[str]:
    """The host whose port ``ports.node`` is (None on the workspace target: the server's port is PORT itself)."""
    if state["target"] == "controller":
        return "controller"
    if state["target"] == "compute":
        return json.loads((Path(state["remote_dir"]) / "agent.json").read_text())["host"]
    return None


@pytest.mark.parametrize("target", ["workspace", "controller", "compute"])
def test_the_watcher_alone_undoes_the_session_a_cancel_asks_it_to(bed, target):
    cli = Cli(bed, inventory=cluster_inventory(bed))
    sid = f"fastcx-{target}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
    where = ["--target", target] + (["--resource", "controller"] if target != "workspace" else [])
    job = None
    try:
        cp = cli.run("start", "nginx", "--id", sid, *where, "-e", "session_start_timeout=90",
                     "-e", "session_queue_timeout=90", timeout=300)
        assert cp.returncode == 0, f"isession start -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        state, port = cli.state(sid), int(cli.service(sid)["PORT"])
        job, node, node_port = str(state["job_id"]), node_of(state), (state.get("ports") or {}).get("node")
        if target == "compute":
            node_port = json.loads((Path(state["remote_dir"]) / "agent.json").read_text())["node_port"]
            assert queue(bed, f"isession-{sid}"), "the job is not in the queue"
        assert wf.running_pid(cli.root), "the start did not leave the user's watcher running"
        assert listening(bed, "workspace", port)
        assert node is None or listening(bed, node, node_port)
        runs_before = sorted((cli.root / sid / "logs" / "runner" / "artifacts").glob("cancel-*"))

        # the CLI's first step only: tombstone + wake the watcher; no playbook runs
        cp = bed.run("workspace", [str(bed.venv / "bin" / "python"), "-c", FAST_CANCEL, str(cli.root), sid],
                     user=WS_USER, env=cli.env, check=False)
        assert cp.returncode == 0, f"no running watcher was woken\n{cp.stdout}\n{cp.stderr}"
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] == "Cancelled", 20), \
            f"{cli.service(sid)}\n{cli.watcher_log()}"
        assert cli.state(sid)["step"] == "cancelled" and cli.state(sid)["cancel_requested"] is True
        assert f"{sid}: cancel requested: stopped job {job}" in cli.watcher_log(), cli.watcher_log()

        if target == "compute":
            assert wait_until(lambda: not queue(bed, f"isession-{sid}"), 30), queue(bed, f"isession-{sid}")
        assert wait_until(lambda: not listening(bed, "workspace", port), 10), f"workspace:{port} still listens"
        if node is not None:
            assert wait_until(lambda: not listening(bed, node, node_port), 10), f"{node}:{node_port} still listens"
        assert wait_until(lambda: not session_processes(sid), 10), session_processes(sid)
        # the watcher releases the workspace port right after it writes Cancelled
        assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)
        if target == "controller":
            status = json.loads((Path(state["remote_dir"]) / "tunnel" / f"isession-{sid}.status.json").read_text())
            assert status["state"] == "stopped", status
        assert sorted((cli.root / sid / "logs" / "runner" / "artifacts").glob("cancel-*")) == runs_before

        # the cancel command then confirms every step: it succeeds and the session stays as the watcher left it
        cp = cli.run("cancel", sid, timeout=120)
        assert cp.returncode == 0, f"isession cancel -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        assert cli.service(sid)["JOB_STATUS"] == "Cancelled" and cli.service(sid)["ERROR_MESSAGE"] == ""
        assert not session_processes(sid) and reservations(sid) == []
    finally:
        if (cli.root / sid / "state.json").exists():
            cli.run("cancel", sid, timeout=120)
        if target == "compute" and job:
            bed.slurm(["scancel", job], user="cluser", check=False)
        cli.stop_watcher()
