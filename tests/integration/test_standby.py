"""`isession start` with a standby (ISESSION_STANDBY) on the bed's Slurm compute nodes, as wsuser.

The first start runs its own play and leaves the next one waiting; the second start's play is that standby's, with
the second start's inputs: nginx runs on a node, answers through the tunnel, and the cancel leaves nothing behind on
any host. A start under another inventory runs its own play. At the end, no standby process of the user is left.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import Cli  # noqa: E402
from sessions_common import (  # noqa: E402
    WS_USER,
    cluster_inventory,
    http_get,
    listening,
    queue,
    reservations,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed


def waiting(root: Path) -> list:
    return [d for d in (root / ".standby").glob("*") if (d / "sock").exists() and not (d / "taken").exists()]


def standby_processes(root: Path) -> dict:
    return session_processes(str(root / ".standby"))


def test_a_compute_start_taken_by_the_standby_runs_serves_and_cancels_like_any_other(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed))
    cli.env["ISESSION_STANDBY"] = "300"
    sids = [f"sb-{int(time.time())}-{n}" for n in range(3)]
    try:
        first = cli.run("start", "nginx", "--target", "compute", "--resource", "controller", "--id", sids[0])
        assert first.returncode == 0, first.stdout + first.stderr
        assert not (cli.root / sids[0] / "logs" / "runner" / "artifacts").is_symlink()
        cli.run("cancel", sids[0], check_rc=0)
        assert wait_until(lambda: len(waiting(cli.root)) == 1, 60), list((cli.root / ".standby").glob("*/*"))
        standby = waiting(cli.root)[0]

        second = cli.run("start", "nginx", "--target", "compute", "--resource", "controller", "--id", sids[1],
                         "-e", "session_walltime=00:10:00")
        assert second.returncode == 0, second.stdout + second.stderr
        sdir = cli.root / sids[1]
        artifacts = sdir / "logs" / "runner" / "artifacts"
        assert artifacts.is_symlink() and artifacts.resolve() == (standby / "runner" / "artifacts").resolve()
        assert (standby / "taken").read_text() == f"{sids[1]}\n"
        service, state = cli.service(sids[1]), cli.state(sids[1])
        assert service["JOB_STATUS"] == "Running" and state["step"] == "running"
        # the second start's own inputs reached the play: its id, its walltime on the job
        limit = bed.slurm(["squeue", "-h", "-j", str(state["job_id"]), "-o", "%l"]).stdout.strip()
        assert limit == "10:00", limit
        port = int(service["PORT"])
        secret = (sdir / "secret").read_text().strip()
        url = f"http://127.0.0.1:{port}/me/{port}/"
        code, body = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", bed.user_tmpdir(WS_USER))
        assert code == 200 and f"hpc.interactive nginx session {sids[1]}" in body
        events = sorted((artifacts / "start" / "job_events").glob("*.json"))
        assert any(json.loads(e.read_text()).get("event") == "playbook_on_stats" for e in events)
        assert "artifacts/start/stdout" in cli.run("logs", sids[1], "-n", "3", check_rc=0).stdout

        rdir = Path(state["remote_dir"])
        agent = json.loads((rdir / "agent.json").read_text())
        cli.run("cancel", sids[1], check_rc=0)
        assert cli.service(sids[1])["JOB_STATUS"] == "Cancelled"
        assert wait_until(lambda: queue(bed, f"isession-{sids[1]}") == "", 15)
        assert wait_until(lambda: not listening(bed, "workspace", port), 15)
        assert wait_until(lambda: not listening(bed, agent["host"], agent["node_port"]), 15)
        for marker in (str(sdir), str(rdir), sids[1]):
            assert wait_until(lambda m=marker: not session_processes(m), 15), session_processes(marker)
        assert wait_until(lambda: reservations(sids[1]) == [], 5), reservations(sids[1])

        # another inventory: the waiting standby does not fit, the start runs its own play (and leaves its own)
        assert wait_until(lambda: len(waiting(cli.root)) == 1, 60)
        other = cli.tmp / "other-inventory.ini"
        other.write_text(Path(cli.env["ISESSION_INVENTORY"]).read_text())
        cli.env["ISESSION_INVENTORY"] = str(other)
        third = cli.run("start", "nginx", "--target", "compute", "--resource", "controller", "--id", sids[2])
        assert third.returncode == 0, third.stdout + third.stderr
        assert not (cli.root / sids[2] / "logs" / "runner" / "artifacts").is_symlink()
        cli.run("cancel", sids[2], check_rc=0)
    finally:
        for sid in sids:
            if (cli.root / sid / "state.json").exists():
                cli.run("cancel", sid)
        code = "import sys; from pathlib import Path; from isession import standby; standby.retire(Path(sys.argv[1]))"
        bed.run("workspace", [str(bed.venv / "bin" / "python"), "-c", code, str(cli.root)], user=WS_USER,
                env=cli.env, timeout=60)
    # an untaken standby that was asked to end leaves no process and no directory
    assert wait_until(lambda: not waiting(cli.root) and not standby_processes(cli.root), 30), \
        standby_processes(cli.root)
    assert [d.name for d in (cli.root / ".standby").iterdir()] == [standby.name], "only the taken one stays"
