"""scheduler_job_info run for real (args file, module entry point) against fake scheduler commands on PATH.

The key property: a scheduler that does not answer (timeout, error list, connection message) makes every
asked job ``undetermined`` with ``reachable: false`` and the module does not fail.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest
import yaml


FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "schedulers"
_spec = importlib.util.spec_from_file_location("fake_scheduler", FIXTURES / "fake_scheduler.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)
CASES = yaml.safe_load((FIXTURES / "modules" / "scheduler_job_info.yml").read_text())
USER = __import__("pwd").getpwuid(os.getuid()).pw_name


@pytest.fixture
def harness(tmp_path, run_module):
    return fake.Harness(tmp_path, run_module, names={"name": "t-%s" % uuid.uuid4().hex[:8], "user": USER})


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_conversation(harness, case, check):
    harness.plan(case["plan"])
    res = harness.run_module("scheduler_job_info", case["args"], check=check)
    assert not res.get("failed") and res["changed"] is False, res
    calls = harness.calls()
    assert [c["cmd"] for c in calls] == case["calls"], (calls, res)
    for key, value in case.get("expect", {}).items():
        assert res[key] == value, (key, res)
    if case.get("error_contains"):
        assert case["error_contains"] in res["error"]
    for cmd, expected in case.get("argv", {}).items():
        argvs = expected if isinstance(expected[0], list) else [expected]
        assert [c["argv"] for c in calls if c["cmd"] == cmd] == argvs
    jobs = fake._subst(case["jobs"], harness.names)
    for job_id, fields in jobs.items():
        assert job_id in res["jobs"], sorted(res["jobs"])
        for key, value in fields.items():
            assert res["jobs"][job_id][key] == value, (job_id, key, res["jobs"][job_id])
    if "only_jobs" in case:
        assert sorted(res["jobs"]) == case["only_jobs"]
    if "job_ids" in case["args"]:  # every asked id is answered, however the scheduler behaved
        asked = {str(j).split(".", maxsplit=1)[0] for j in case["args"]["job_ids"]}
        assert set(res["jobs"]) == asked
    if res["reachable"] is False:
        assert {j["state"] for j in res["jobs"].values()} == {"undetermined"}
        assert res["error"]


@pytest.mark.parametrize("args,field", [
    ({"job_ids": ["1;id"]}, "job_ids"),
    ({"job_ids": ["-1"]}, "job_ids"),
    ({"job_ids": ["1", "$(id)"]}, "job_ids"),
    ({"job_name": "a b"}, "job_name"),
    ({"job_name": "-x"}, "job_name"),
    ({"job_name": "ok", "user": "root;id"}, "user"),
])
def test_hostile_input_fails_naming_the_field_and_runs_nothing(harness, args, field):
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_job_info", dict(args, scheduler="slurm"))
    assert res.get("failed") is True and res["msg"].startswith(field + ":"), res
    assert harness.calls() == []


def test_argument_spec(harness):
    res = harness.run_module("scheduler_job_info", {"scheduler": "slurm"})
    assert res.get("failed") and "job_ids" in res["msg"] and "job_name" in res["msg"]
    res = harness.run_module("scheduler_job_info", {"scheduler": "slurm", "job_ids": ["1"], "job_name": "x"})
    assert res.get("failed") and "mutually exclusive" in res["msg"]
    assert harness.calls() == []


def test_scheduler_path_and_env_reach_a_scheduler_off_the_path(harness, tmp_path):
    """Grid Engine under its own bin dir with SGE_ROOT: found there first (not the qstat on PATH), with the cell."""
    site = tmp_path / "sge" / "bin"
    site.mkdir(parents=True)
    qstat = site / "qstat"
    xml = FIXTURES / "sge" / "qstat_xml.xml"
    qstat.write_text('#!/bin/sh\n[ "$SGE_ROOT" = /opt/sge ] && [ "$SGE_CELL" = lab ] || { echo "no cell" >&2; exit 1; }'
                     f'\ncat "{xml}"\n')
    qstat.chmod(0o755)
    res = harness.run_module("scheduler_job_info", {"scheduler": "sge", "job_ids": ["3535"],
                                                    "scheduler_path": [str(site)],
                                                    "scheduler_env": {"SGE_ROOT": "/opt/sge", "SGE_CELL": "lab"}})
    assert not res.get("failed") and res["reachable"] is True, res
    assert res["jobs"]["3535"]["found"] is True, res["jobs"]
    assert harness.calls() == []  # the fake qstat on PATH was never run


@pytest.mark.parametrize("args, words", [
    ({"scheduler_path": ["opt/sge/bin"]}, "scheduler_path: 'opt/sge/bin' must be an absolute directory"),
    ({"scheduler_env": {"PATH": "/opt/sge/bin"}}, "scheduler_env: PATH cannot be set here"),
])
def test_bad_scheduler_path_or_env_fails_naming_the_field_and_runs_nothing(harness, args, words):
    res = harness.run_module("scheduler_job_info", dict({"scheduler": "sge", "job_ids": ["1"]}, **args))
    assert res.get("failed") and words in res["msg"], res
    assert harness.calls() == []
