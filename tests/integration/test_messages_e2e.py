"""Messages in the user's words, end to end on the bed's Slurm: a server killed on its compute node ends the session
Failed with the agent's own explanation (agent.error), not the scheduler's generic "the job failed"; and a start
with the id of an ended session says the id is taken.
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
from sessions_common import cluster_inventory, reservations, wait_until  # noqa: E402

pytestmark = pytest.mark.bed


def test_killed_server_is_failed_in_the_agents_words_and_its_id_is_taken(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed))
    sid, job = f"msg-kill-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}", ""
    try:
        cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                     "-e", "session_start_timeout=90", timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        state = cli.state(sid)
        job = state["job_id"]
        agent = json.loads((Path(state["remote_dir"]) / "agent.json").read_text())
        os.killpg(int(agent["pids"]["server"]), signal.SIGKILL)
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] == "Failed", 60), cli.watcher_log()
        message = cli.service(sid)["ERROR_MESSAGE"]
        assert message.startswith(f"the nginx server exited with status 137 on {agent['host']}; see "
                                  f"logs/server.log (job {job}: FAILED"), message
        assert cli.state(sid)["error"] == message
        assert wait_until(lambda: reservations(sid) == [], 5)
        # the id of an ended session is taken: nothing is started, the old record stays as it was
        again = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller")
        assert again.returncode == 2 and f"--id {sid}: the id is taken (that session is Failed)" in again.stderr, again
        assert cli.service(sid)["ERROR_MESSAGE"] == message
    finally:
        cli.run("cancel", sid, timeout=120)
        if job:
            bed.slurm(["scancel", job], user="cluser", check=False)
        cli.stop_watcher()
