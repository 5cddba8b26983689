"""The session's software environment, proved from inside real jobs: session_modules, session_venv,
session_conda_env and session_setup_commands on the Slurm compute target and on the workspace target.

As wsuser through hpc.interactive.start_nginx. A venv (``/usr/bin/python3 -m venv``), a modulefile (Environment
Modules, installed by the bed) and a tool the modulefile puts on PATH are made as the session's user: for the compute
target in cluser's home, which the controller and the compute nodes share. Setup commands write what they see (host,
Slurm job id, $VIRTUAL_ENV, ``command -v python3``, the module's variable and tool, whether the server has started)
to a file in the session directory; the test reads it and the environment of the running nginx master in /proc.
Failures - a setup command, ``module load`` of a missing module, a conda env without conda - end Failed with the
agent's own words and leave no job, process or reservation. Hostile values are refused before anything is written
or submitted, with an error naming the field.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    failure_text,
    listening,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)
from sessions_common import cluster_inventory, queue  # noqa: E402

pytestmark = pytest.mark.bed
CLUSTER_USER = "cluser"
COMPUTE_NODES = ("compute1", "compute2")
TOOL = "isession-envtest-tool"
ENV_FIELDS = ("session_modules", "session_venv", "session_conda_env", "session_setup_commands")
# setup commands record into this file of the session directory on the host where the agent runs
RECORD = '"$ISESSION_DIR/setup.txt"'
FAILING_TIMEOUT = 10  # a failed compute agent is seen when the readiness wait gives up (it reads agent.error then)


@dataclass
class SoftEnv:
    """A venv and a modulefile (putting TOOL on PATH) made by ``user`` on ``host``."""

    base: Path
    venv: Path
    modbin: Path
    modulefile: Path


def make_soft_env(bed, host: str, user: str, base: Path) -> SoftEnv:
    env = SoftEnv(base=base, venv=base / "venv", modbin=base / "modbin",
                  modulefile=base / "modulefiles" / "isession-envtest" / "1.0")
    bed.run(host, ["mkdir", "-p", str(env.modbin), str(env.modulefile.parent)], user=user, check=True)
    bed.run(host, ["/usr/bin/python3", "-m", "venv", "--without-pip", str(env.venv)], user=user, check=True)
    bed.write_user_file(user, env.modbin / TOOL, "#!/bin/sh\necho from-module\n", mode=0o755)
    bed.write_user_file(user, env.modulefile, "#%Module1.0\nsetenv ISESSION_ENVTEST_MODULE loaded\n"
                        f"prepend-path PATH {env.modbin}\n", mode=0o644)
    return env


@dataclass
class Place:
    """Where the agent runs: the target's inputs, the inventory and the session's software environment there."""

    target: str
    inputs: dict
    inventory: Optional[Path]
    env: SoftEnv
    venv_input: str  # session_venv as given (compute: ~/..., the way a user names a venv in their cluster home)
    hosts: tuple


@pytest.fixture(scope="module")
def compute_env(bed):
    home = Path(pwd.getpwnam(CLUSTER_USER).pw_dir)
    base = home / f".isession-envtest-{os.getpid()}-{int(time.time())}"
    env = make_soft_env(bed, "controller", CLUSTER_USER, base)
    yield env
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace_env(bed):
    return make_soft_env(bed, "workspace", WS_USER, bed.user_tmpdir(WS_USER) / "softenv")


@pytest.fixture(params=["compute", "workspace"])
def place(request, bed, compute_env, workspace_env) -> Place:
    if request.param == "compute":
        home = Path(pwd.getpwnam(CLUSTER_USER).pw_dir)
        return Place("compute", dict(session_target="compute", session_resource="controller",
                                     session_queue_timeout=60),
                     cluster_inventory(bed, "slurm"), compute_env,
                     "~/" + str(compute_env.venv.relative_to(home)), COMPUTE_NODES)
    return Place("workspace", {}, None, workspace_env, str(workspace_env.venv), ("workspace",))


@pytest.fixture
def root(bed):
    return bed.user_tmpdir(WS_USER) / "sessions"


def start(bed, place: Place, root: Path, sid: str, timeout: int, **inputs):
    return run_playbook(bed, "hpc.interactive.start_nginx",
                        dict(place.inputs, session_id=sid, session_root=str(root), session_start_timeout=timeout,
                             **inputs), inventory=place.inventory)


def agent_dir(place: Place, root: Path, sid: str) -> Path:
    """The session directory the agent runs in (compute: under the default remote root in the cluster home)."""
    if place.target == "compute":  # a job that fails at once fails the submit: no remote_dir in state.json then
        return Path(pwd.getpwnam(CLUSTER_USER).pw_dir) / ".isession" / "sessions" / sid
    return root / sid


def child_environ(parent: int) -> Optional[Dict[str, str]]:
    """The environment of a ``sleep`` the agent runs in its wait loop (nginx overwrites its own /proc environ)."""
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
            if entry.isdigit() and ppid == parent and comm == "sleep":
                raw = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
        except (OSError, ValueError):
            continue
    return None


@contextlib.contextmanager
def no_session_left_running(bed, root: Path, sid: str, inventory: Optional[Path]):
    """Whatever the test asserts, it leaves no session of its own running (a regression may let one start)."""
    try:
        yield
    finally:
        sfile = root / sid / "service.json"
        if sfile.exists() and read_json(sfile)["JOB_STATUS"] not in ("Cancelled", "Failed", "Completed"):
            run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)),
                         inventory=inventory)


def assert_nothing_left(bed, place: Place, root: Path, sid: str, adir: Path) -> None:
    if place.target == "compute":
        assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 10), queue(bed, f"isession-{sid}")
    for marker in (sid, str(adir)):
        assert wait_until(lambda m=marker: not session_processes(m), 10), session_processes(marker)
    assert reservations(sid) == []
    port = int(read_json(root / sid / "service.json")["PORT"])
    assert not listening(bed, "workspace", port)


def test_modules_venv_and_setup_commands_in_the_job(bed, place, root):
    """module load, then the venv, then the setup commands in order, in the job on its host, before the server."""
    sid = f"nginx-env-{place.target}-{int(time.time())}"
    setup = [
        f'echo "1 host=$(hostname) job=${{SLURM_JOB_ID:-none}}" >>{RECORD}',
        f'echo "2 venv=${{VIRTUAL_ENV:-}} python3=$(command -v python3) module=${{ISESSION_ENVTEST_MODULE:-}}'
        f' tool=$({TOOL}) path=$(printf %s "$PATH" | cut -d: -f1-2)" >>{RECORD}',
        f'echo "3 server_log=$(test -e logs/server.log && echo yes || echo no)'
        f' agent_json=$(test -e agent.json && echo yes || echo no)" >>{RECORD}',
        "export ISESSION_ENVTEST_SETUP=exported  # setup commands run in the agent's shell, comments allowed",
        f'echo "4 unset=[$ISESSION_ENVTEST_UNSET]" >>{RECORD}',  # no nounset for setup commands
    ]
    with no_session_left_running(bed, root, sid, place.inventory):
        res = start(bed, place, root, sid, 60, session_modules=[str(place.env.modulefile)],
                    session_venv=place.venv_input, session_setup_commands=setup)
        assert res.rc == 0, failure_text(res)
        service = read_json(root / sid / "service.json")
        assert service["JOB_STATUS"] == "Running" and service["ERROR_MESSAGE"] == "", service
        state = read_json(root / sid / "state.json")
        adir = agent_dir(place, root, sid)
        assert place.target == "workspace" or state["remote_dir"] == str(adir)
        agent = read_json(adir / "agent.json")
        host = agent["host"]
        assert host in place.hosts
        job = state["job_id"] if place.target == "compute" else "none"
        venv = place.env.venv
        assert (adir / "setup.txt").read_text().splitlines() == [
            f"1 host={host} job={job}",
            # the venv first on PATH: activated after the module
            f"2 venv={venv} python3={venv}/bin/python3 module=loaded tool=from-module"
            f" path={venv}/bin:{place.env.modbin}",
            "3 server_log=no agent_json=no",
            "4 unset=[]",
        ]
        # what the agent starts after the setup commands (the server, then its wait loop's sleeps) inherits all of it
        box = {}
        assert wait_until(lambda: box.update(env=child_environ(agent["pids"]["agent"])) or box["env"], 10)
        assert box["env"].get("VIRTUAL_ENV") == str(venv)
        assert box["env"]["PATH"].startswith(f"{venv}/bin:{place.env.modbin}:"), box["env"]["PATH"]
        assert box["env"].get("ISESSION_ENVTEST_MODULE") == "loaded"
        assert box["env"].get("ISESSION_ENVTEST_SETUP") == "exported"

        res = run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)),
                           inventory=place.inventory)
        assert res.rc == 0, failure_text(res)
        assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
        assert_nothing_left(bed, place, root, sid, adir)


FAILURES = {
    # case: (inputs, ERROR_MESSAGE with {host} for the host the agent ran on)
    "setup": (dict(session_setup_commands=[
        f'echo "first $(hostname)" >>{RECORD}',
        "test -e /nonexistent/isession-envtest  # a comment must not hide the failure",
        f"echo third >>{RECORD}"]),
        "setup command 2 (test -e /nonexistent/isession-envtest  # a comment must not hide the failure)"
        " failed with status 1 on {host}"),
    "venv": (dict(session_venv="/nonexistent/isession-envtest-venv",
                  session_setup_commands=[f"echo setup ran >>{RECORD}"]),
             "/nonexistent/isession-envtest-venv/bin/activate not found on {host} (session_venv)"),
    "module": (dict(session_modules=["isession-envtest-nosuch/1.0"],
                    session_setup_commands=[f"echo setup ran >>{RECORD}"]),
               "module load isession-envtest-nosuch/1.0 failed on {host}: "
               "ERROR: Unable to locate a modulefile for 'isession-envtest-nosuch/1.0'"),
    "conda": (dict(session_conda_env="isession-envtest", session_setup_commands=[f"echo setup ran >>{RECORD}"]),
              "conda not found on {host} (session_conda_env isession-envtest needs it)"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_environment_failure_is_failed_in_words_and_undone(bed, place, root, case):
    inputs, expected = FAILURES[case]
    sid = f"nginx-envfail-{case}-{place.target}-{int(time.time())}"
    with no_session_left_running(bed, root, sid, place.inventory):
        res = start(bed, place, root, sid, FAILING_TIMEOUT if place.target == "compute" else 60, **inputs)
        assert res.rc != 0
        service = read_json(root / sid / "service.json")
        assert service["JOB_STATUS"] == "Failed"
        assert service["ERROR_MESSAGE"] in {expected.format(host=h) for h in place.hosts}, service
        state = read_json(root / sid / "state.json")
        assert state["step"] == "failed" and state["error"] == service["ERROR_MESSAGE"]
        adir = agent_dir(place, root, sid)
        if case == "setup":  # the first command ran, on the host named in the message; the third never did
            words = (adir / "setup.txt").read_text().split()
            assert len(words) == 2 and words[0] == "first", words
            assert service["ERROR_MESSAGE"] == expected.format(host=words[1])
        else:  # the environment failed before any setup command
            assert not (adir / "setup.txt").exists()
        assert not (adir / "logs" / "server.log").exists() and not (adir / "agent.json").exists()
        assert_nothing_left(bed, place, root, sid, adir)


CANARY = f"/tmp/isession-envtest-canary-{os.getpid()}"
HOSTILE = {
    "setup-newline": ("session_setup_commands", ["echo one\necho two"]),
    "setup-cr": ("session_setup_commands", ["echo one\recho two"]),
    "venv-semicolon": ("session_venv", f"/home/cluser/venv; touch {CANARY}"),
    "venv-substitution": ("session_venv", f"/home/cluser/venv$(touch {CANARY})"),
    "venv-relative": ("session_venv", "venv"),
    "module-semicolon": ("session_modules", ["gcc", f"gcc; touch {CANARY}"]),
    "module-backticks": ("session_modules", [f"gcc`touch {CANARY}`"]),
    "module-option": ("session_modules", ["--force"]),
    "conda-substitution": ("session_conda_env", f"base$(touch {CANARY})"),
    "conda-option": ("session_conda_env", "-n"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_environment_inputs_are_refused_before_anything_is_submitted(bed, root, case):
    field, value = HOSTILE[case]
    inv = cluster_inventory(bed, "slurm")
    sid = f"nginx-envbad-{case}-{int(time.time())}"
    canary = Path(CANARY)
    canary.unlink(missing_ok=True)
    try:
        with no_session_left_running(bed, root, sid, inv):
            res = run_playbook(bed, "hpc.interactive.start_nginx",
                               {"session_id": sid, "session_root": str(root), "session_target": "compute",
                                "session_resource": "controller", "session_start_timeout": FAILING_TIMEOUT,
                                field: value}, inventory=inv)
            assert res.rc != 0
            failed = [r.get("msg", "") for t in res.tasks() for r in t["hosts"].values() if r.get("failed")]
            assert len(failed) == 1 and field in failed[0], failure_text(res)
            assert not any(other in failed[0] for other in ENV_FIELDS if other != field), failed[0]
            assert not (root / sid).exists()  # no session record, no port reserved, nothing submitted
            assert queue(bed, f"isession-{sid}") == "" and reservations(sid) == []
            assert not (Path(pwd.getpwnam(CLUSTER_USER).pw_dir) / ".isession" / "sessions" / sid).exists()
            assert not canary.exists()
    finally:
        canary.unlink(missing_ok=True)
