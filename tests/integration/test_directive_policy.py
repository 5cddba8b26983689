"""The directive policy on the bed: hostile ``session_directives`` are refused by real starts on Slurm, PBS (torque
on Slurm) and Grid Engine, in the user's words, with nothing submitted and nothing left; an allowed one still runs.

Each refused start is ``isession start nginx --target compute`` with the directive in ``-e session_directives=``;
afterwards the scheduler is asked for a job of the session's name (none may exist, in any state), the session's
cluster directory must hold no job script, and the workspace port's reservation must be gone.
"""
from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_support import Cli  # noqa: E402
from sessions_common import cluster_inventory, reservations  # noqa: E402

pytestmark = pytest.mark.bed
CLUSTER_HOME = Path("/home/cluser")


def sge_inventory(bed) -> Path:
    env = f"{{'SGE_ROOT':'{bed.sge_root}','SGE_CELL':'{bed.sge_cell}'}}"
    return cluster_inventory(bed, "sge", extra=f"isession_scheduler_path=\"['{bed.sge_bin}']\" "
                                               f"isession_scheduler_env=\"{env}\"")


def jobs_named(bed, scheduler: str, name: str) -> str:
    """Every job of that name the scheduler knows, in any state (Slurm keeps ended ones for MinJobAge)."""
    if scheduler == "sge":
        out = bed.sge(["qstat", "-u", "*", "-r"], check=False).stdout
        acct = bed.sge(["qacct", "-j", name], check=False).stdout
        return "\n".join(line for line in (out + acct).splitlines() if name in line)
    # torque's qsub is sbatch underneath: Slurm's own view covers both
    return bed.slurm(["squeue", "-h", "--states=all", "-n", name, "-o", "%i %T"], check=False).stdout.strip()


def new_id(tag: str) -> str:
    return f"dirpol-{tag}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def clis(bed):
    return {"slurm": Cli(bed, inventory=cluster_inventory(bed)),
            "pbs": Cli(bed, inventory=cluster_inventory(bed, "pbs")),
            "sge": Cli(bed, inventory=sge_inventory(bed))}


REFUSED = [
    ("slurm", "-A root", "session_directives: '-A root' sets the account; use session_account"),
    ("slurm", "--export=ALL,LD_PRELOAD=/tmp/x.so",
     "session_directives: '--export=ALL,LD_PRELOAD=/tmp/x.so' exports LD_PRELOAD, which changes how programs load"),
    ("slurm", "--export=ALL,PYTHONPATH=/tmp", "exports PYTHONPATH, which changes how programs load"),
    ("slurm", "--comment=x --uid=0", "session_directives: '--comment=x --uid=0' must be one option"),
    ("slurm", "--uid=0", "would change the user or group the job runs as"),
    ("slurm", "-p debug", "session_directives: '-p debug' sets the partition or queue; use session_partition"),
    ("slurm", "--time=99:00:00", "sets the walltime; use session_walltime"),
    ("slurm", "-J other", "sets the job's name; the session sets it itself"),
    ("slurm", "--wrap=id", "is not an option the site allows"),
    ("pbs", "-A root", "session_directives: '-A root' sets the account; use session_account"),
    ("pbs", "-v LD_PRELOAD=/tmp/x.so", "exports LD_PRELOAD, which changes how programs load"),
    ("pbs", "-l walltime=99:00:00", "sets the walltime; use session_walltime"),
    ("pbs", "-W group_list=root", "would change the user or group the job runs as"),
    ("sge", "-A root", "session_directives: '-A root' sets the account; use session_account"),
    ("sge", "-V", "imports an environment that cannot be checked"),
    ("sge", "-v LD_LIBRARY_PATH=/tmp", "exports LD_LIBRARY_PATH, which changes how programs load"),
    ("sge", "-l h_rt=99:00:00", "sets the walltime; use session_walltime"),
]


@pytest.mark.parametrize("scheduler,directive,message", REFUSED)
def test_hostile_directive_refused_nothing_submitted_or_left(bed, clis, scheduler, directive, message):
    cli, sid = clis[scheduler], new_id(scheduler)
    cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                 "-e", "session_directives=" + json.dumps([directive]), timeout=300)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    assert message in out, out
    svc = cli.service(sid)
    assert svc["JOB_STATUS"] == "Failed" and message in svc["ERROR_MESSAGE"], svc
    assert cli.state(sid)["step"] == "failed"
    assert jobs_named(bed, scheduler, f"isession-{sid}") == ""
    remote = CLUSTER_HOME / ".isession" / "sessions" / sid
    assert not (remote / "agent.sh").exists() and not (remote / "secret").exists(), list(remote.glob("*"))
    assert reservations(sid) == []


def test_a_refused_partition_names_session_partition(bed, clis):
    cli, sid = clis["slurm"], new_id("part")
    cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                 "-e", "session_partition=bad;x", timeout=300)
    assert cp.returncode != 0 and "session_partition: 'bad;x' is not allowed" in cp.stdout + cp.stderr, cp
    assert jobs_named(bed, "slurm", f"isession-{sid}") == ""


def test_an_allowed_directive_still_runs(bed, clis):
    cli, sid, job = clis["slurm"], new_id("ok"), ""
    try:
        cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                     "-e", 'session_directives=["--comment=dirpol-ok", "--export=ALL,OMP_NUM_THREADS=3"]',
                     "-e", "session_start_timeout=90", timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        state = cli.state(sid)
        job = state["job_id"]
        assert cli.service(sid)["JOB_STATUS"] == "Running"
        shown = bed.slurm(["scontrol", "show", "job", "-o", job], check=True).stdout
        assert "Comment=dirpol-ok" in shown, shown
        env = Path(f"/proc/{_agent_pid(state)}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=3" in env
    finally:
        cli.run("cancel", sid, timeout=120)
        if job:
            bed.slurm(["scancel", job], user="cluser", check=False)
        cli.stop_watcher()


def _agent_pid(state: dict) -> int:
    agent = json.loads((Path(state["remote_dir"]) / "agent.json").read_text())
    pids = agent.get("pids") or {}
    return int(pids.get("agent") or agent.get("pid") or next(iter(pids.values())))
