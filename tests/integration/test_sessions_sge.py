"""Sessions on a real Grid Engine (Son of Grid Engine 8.1.9 on the bed: qmaster on the controller, execds on the
compute nodes) - the scheduler a site reaches only with its own PATH and cell variables.

The bed's SGE is not on any system PATH (/usr/bin/qsub is Slurm's torque wrapper, which the PBS tests use), as on
sites where a login profile sets it up and a non-login SSH session does not: the resource names its bin dir and cell
in the inventory (``isession_scheduler_path``, ``isession_scheduler_env``). Checks: start -> Running -> the app
answers with the secret and 401 without -> cancel (the watcher's fast cancel and the playbook) -> no job in qstat,
no listener, no session process, no reservation; a hand ``qdel`` ends as Failed in words; a queue SGE refuses gives
Failed with SGE's own message; a bad ``isession_scheduler_env`` fails naming the field, before anything is submitted.
"""
from __future__ import annotations

import re
import secrets
import sys
import time
import xml.etree.ElementTree as ET  # noqa: S405 - output of the bed's own qstat
from pathlib import Path
from typing import Dict

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))
from cli_support import Cli  # noqa: E402
from sessions_common import (  # noqa: E402
    WS_USER,
    assert_no_secret_in_argv,
    cluster_inventory,
    failure_text,
    http_get,
    listening,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed
CLUSTER_USER = "cluser"


def sge_inventory(bed, env: str = "") -> Path:
    """The resource as a Grid Engine cluster whose commands live outside the non-login PATH."""
    env = env or f"{{'SGE_ROOT':'{bed.sge_root}','SGE_CELL':'{bed.sge_cell}'}}"
    # INI host vars: the line is split like a shell line, so each Python literal is quoted as a whole
    return cluster_inventory(bed, "sge", extra=f"isession_scheduler_path=\"['{bed.sge_bin}']\" "
                                               f"isession_scheduler_env=\"{env}\"")


def sge_jobs(bed) -> Dict[str, Dict[str, str]]:
    """Every job qstat lists (pending and running): id -> name, state, queue."""
    cp = bed.sge(["qstat", "-xml", "-u", "*"], user=CLUSTER_USER, check=True)
    out = {}
    for job in ET.fromstring(cp.stdout).iter("job_list"):  # noqa: S314
        fields = {child.tag: (child.text or "").strip() for child in job}
        out[fields["JB_job_number"]] = {"name": fields.get("JB_name", ""), "state": fields.get("state", ""),
                                        "queue": fields.get("queue_name", "")}
    return out


def jobs_named(bed, name: str) -> Dict[str, Dict[str, str]]:
    return {k: v for k, v in sge_jobs(bed).items() if v["name"] == name}


def new_id(kind: str) -> str:
    return f"sge-{kind}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


def start_nginx(cli: Cli, sid: str) -> None:
    cp = cli.run("start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                 "-e", "session_start_timeout=90", "-e", "session_queue_timeout=90", timeout=300)
    assert cp.returncode == 0, f"isession start -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"


def cleanup(bed, cli: Cli, sid: str) -> None:
    if (cli.root / sid / "state.json").exists():
        cli.run("cancel", sid, timeout=120)
    for job in jobs_named(bed, f"isession-{sid}"):
        bed.sge(["qdel", job], user=CLUSTER_USER, check=False)
    cli.stop_watcher()


def test_nginx_on_sge_start_serve_cancel(bed):
    cli = Cli(bed, inventory=sge_inventory(bed))
    sid = new_id("nginx")
    try:
        start_nginx(cli, sid)
        sdir = cli.root / sid
        svc, state = cli.service(sid), cli.state(sid)
        assert svc["JOB_STATUS"] == "Running" and svc["ERROR_MESSAGE"] == "", svc
        assert state["scheduler"] == "sge" and state["step"] == "running"
        job, port = str(state["job_id"]), int(svc["PORT"])
        rdir = Path(state["remote_dir"])
        agent = read_json(rdir / "agent.json")
        node, node_port = agent["host"], agent["node_port"]
        listed = jobs_named(bed, f"isession-{sid}")
        assert list(listed) == [job], listed
        # SGE placed it on the agent's node; "t" while SGE still reports the transfer of a job that already runs
        assert listed[job]["state"] in ("r", "t") and listed[job]["queue"] == f"all.q@{node}", listed
        secret = (sdir / "secret").read_text().strip()
        assert secret not in (rdir / "agent.sh").read_text()
        assert_no_secret_in_argv(secret)
        assert listening(bed, node, node_port) and listening(bed, "workspace", port)
        tmp = bed.user_tmpdir(WS_USER)
        url = f"http://127.0.0.1:{port}/me/{port}/"
        code, body = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)
        assert code == 200 and f"hpc.interactive nginx session {sid}" in body
        assert http_get(bed, "workspace", url, None, tmp)[0] == 401

        cp = cli.run("cancel", sid, timeout=120)
        assert cp.returncode == 0, f"isession cancel -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
        # the watcher reached SGE with the resource's path and cell (its fast cancel, or its poll, said so)
        assert f"{sid}: cancel requested: stopped job {job}" in cli.watcher_log() or "-> Cancelled" in \
            cli.watcher_log(), cli.watcher_log()
        assert wait_until(lambda: not jobs_named(bed, f"isession-{sid}"), 15), jobs_named(bed, f"isession-{sid}")
        assert wait_until(lambda: not listening(bed, "workspace", port), 10)
        assert wait_until(lambda: not listening(bed, node, node_port), 10)
        for marker in (str(sdir), str(rdir), sid):
            assert wait_until(lambda m=marker: not session_processes(m), 10), session_processes(marker)
        assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)
        again = cli.run("cancel", sid, timeout=120)
        assert again.returncode == 0 and cli.service(sid)["JOB_STATUS"] == "Cancelled", again.stdout + again.stderr
    finally:
        cleanup(bed, cli, sid)


def test_hand_qdel_is_failed_in_words(bed):
    cli = Cli(bed, inventory=sge_inventory(bed))
    sid = new_id("qdel")
    try:
        start_nginx(cli, sid)
        job, port = str(cli.state(sid)["job_id"]), int(cli.service(sid)["PORT"])
        bed.sge(["qdel", job], user=CLUSTER_USER, check=True)
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] in ("Failed", "Completed", "Cancelled"), 60), \
            (cli.service(sid), cli.watcher_log())
        svc = cli.service(sid)
        assert svc["JOB_STATUS"] == "Failed", (svc, cli.watcher_log())
        assert job in svc["ERROR_MESSAGE"] and "ended outside isession" in svc["ERROR_MESSAGE"], svc
        assert wait_until(lambda: not listening(bed, "workspace", port), 10)
        assert wait_until(lambda: reservations(sid) == [], 5), \
            [Path(f"/tmp/isession-ports/port-{p}").read_text() for p in reservations(sid)]
    finally:
        cleanup(bed, cli, sid)


def test_a_queue_sge_refuses_is_failed_with_its_words(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = new_id("badq")
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(session_id=sid, session_root=str(root), session_target="compute",
                            session_resource="controller", session_partition="nosuchq"), inventory=sge_inventory(bed))
    assert res.rc != 0
    svc = read_json(root / sid / "service.json")
    assert svc["JOB_STATUS"] == "Failed" and "nosuchq" in svc["ERROR_MESSAGE"], svc
    assert re.search(r"unknown queue|rejected", svc["ERROR_MESSAGE"]), svc
    assert reservations(sid) == [] and not jobs_named(bed, f"isession-{sid}")


def test_a_bad_scheduler_env_fails_naming_it_and_submits_nothing(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = new_id("badenv")
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(session_id=sid, session_root=str(root), session_target="compute",
                            session_resource="controller"),
                       inventory=sge_inventory(bed, env=f"{{'SGE_ROOT':'{bed.sge_root}','PATH':'/tmp'}}"))
    assert res.rc != 0, failure_text(res)
    svc = read_json(root / sid / "service.json")
    assert svc["JOB_STATUS"] == "Failed" and "scheduler_env: PATH cannot be set here" in svc["ERROR_MESSAGE"], svc
    assert reservations(sid) == [] and not jobs_named(bed, f"isession-{sid}")
    assert not (Path(read_json(root / sid / "state.json").get("remote_dir") or "/nonexistent") / "agent.sh").exists()
