"""scheduler_submit / scheduler_job_info through the PBS commands (Slurm's torque wrappers) on the bed."""
from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.bed


def test_pbs_lifecycle(bed):
    name = "it-pbs-%s" % uuid.uuid4().hex[:8]
    args = {"scheduler": "pbs", "job_name": name, "script": "hostname\nsleep 300\n", "walltime": "00:05:00",
            "workdir": "/home/cluser/it-sched", "wait_for": "running", "wait_timeout": 60}
    res = bed.ansible_module("hpc.interactive.scheduler_submit", args, target="controller")
    assert res.get("changed") is True and res["state"] == "running", res
    job_id = res["job_id"]
    assert "#PBS -N %s" % name in res["script"] and "#PBS -l walltime=00:05:00" in res["script"]
    assert res["nodes"] and set(res["nodes"]) <= {"compute1", "compute2"}
    # sbatch honoured the #PBS walltime
    assert "TimeLimit=00:05:00" in bed.slurm(["scontrol", "show", "job", "-o", job_id]).stdout
    again = bed.ansible_module("hpc.interactive.scheduler_submit", args, target="controller")
    assert again.get("changed") is False and again["job_id"] == job_id, again
    info = bed.ansible_module("hpc.interactive.scheduler_job_info", {"scheduler": "pbs", "job_ids": [job_id]},
                              target="controller")
    assert info["reachable"] and info["jobs"][job_id]["state"] == "running" and info["jobs"][job_id]["name"] == name
    gone = bed.ansible_module("hpc.interactive.scheduler_submit",
                              {"scheduler": "pbs", "state": "absent", "job_id": job_id}, target="controller")
    assert gone.get("changed") is True, gone
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        state = bed.slurm(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], check=False).stdout.strip()
        if state in ("CANCELLED", ""):
            break
        time.sleep(0.5)
    assert state in ("CANCELLED", ""), state
    again = bed.ansible_module("hpc.interactive.scheduler_submit",
                               {"scheduler": "pbs", "state": "absent", "job_id": job_id}, target="controller")
    assert again.get("changed") is False and not again.get("failed"), again
