"""scheduler: local on workspace as wsuser: detached submit, info, rerun, cancel (process group gone)."""
from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.bed


def test_local_lifecycle(bed):
    name = "it-local-%s" % uuid.uuid4().hex[:8]
    work = str(bed.user_tmpdir("wsuser"))
    args = {"scheduler": "local", "job_name": name, "workdir": work, "script": "echo started; exec sleep 300\n",
            "wait_for": "running", "wait_timeout": 20}
    res = bed.ansible_module("hpc.interactive.scheduler_submit", args)
    assert res.get("changed") is True and res["state"] == "running", res
    pgid = res["job_id"]
    ps = bed.run("workspace", ["ps", "-o", "pid=,pgid=,sid=,args=", "-g", pgid], user="wsuser").stdout
    assert "sleep 300" in ps, ps
    again = bed.ansible_module("hpc.interactive.scheduler_submit", args)
    assert again.get("changed") is False and again["job_id"] == pgid, again
    info = bed.ansible_module("hpc.interactive.scheduler_job_info", {"scheduler": "local", "job_ids": [pgid]})
    assert info["jobs"][pgid]["state"] == "running" and info["jobs"][pgid]["name"] == name
    gone = bed.ansible_module("hpc.interactive.scheduler_submit",
                              {"scheduler": "local", "state": "absent", "job_name": name})
    assert gone.get("changed") is True, gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "sleep" in bed.run("workspace", ["ps", "-o", "args=", "-g", pgid]).stdout:
        time.sleep(0.2)
    assert "sleep" not in bed.run("workspace", ["ps", "-o", "args=", "-g", pgid]).stdout
    info = bed.ansible_module("hpc.interactive.scheduler_job_info", {"scheduler": "local", "job_ids": [pgid]})
    assert info["jobs"][pgid]["state"] == "cancelled"
    again = bed.ansible_module("hpc.interactive.scheduler_submit",
                               {"scheduler": "local", "state": "absent", "job_name": name})
    assert again.get("changed") is False, again


def test_local_exit_status(bed):
    name = "it-local-exit-%s" % uuid.uuid4().hex[:8]
    work = str(bed.user_tmpdir("wsuser"))
    res = bed.ansible_module("hpc.interactive.scheduler_submit",
                             {"scheduler": "local", "job_name": name, "workdir": work, "script": "exit 3\n"})
    assert res.get("changed") is True, res
    deadline = time.monotonic() + 10
    state = ""
    while time.monotonic() < deadline:
        info = bed.ansible_module("hpc.interactive.scheduler_job_info",
                                  {"scheduler": "local", "job_ids": [res["job_id"]]})
        state = info["jobs"][res["job_id"]]["state"]
        if state != "running":
            break
    assert state == "failed" and info["jobs"][res["job_id"]]["exit_code"] == 3, info
