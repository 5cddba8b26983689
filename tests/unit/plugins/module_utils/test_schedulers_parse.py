"""Job-state parsing from recorded real (Slurm, torque wrapper) and public-sample (PBS Pro, Torque, SGE) output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import CommandResult
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import pbs, sge, slurm
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import JobInfo, JobOptions
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._hostlist import exec_hosts, expand

HERE = Path(__file__).parent
RECORDED = HERE.parents[1] / "fixtures" / "schedulers"
CASES = yaml.safe_load((HERE / "fixtures" / "scheduler_parse.yml").read_text())
PARSERS = {"slurm": slurm.Slurm(), "pbs": pbs.Pbs(), "sge": sge}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_parse_recorded(case):
    text = (RECORDED / case["file"]).read_text()
    jobs = getattr(PARSERS[case["backend"]], case["parser"])(text)
    for job_id, expected in case["expect"].items():
        assert job_id in jobs, sorted(jobs)
        got = jobs[job_id].as_dict()
        for key, value in expected.items():
            assert got[key] == value, (job_id, key, got)


@pytest.mark.parametrize("raw,state", [
    ("PENDING", "queued"), ("CONFIGURING", "queued"), ("REQUEUED", "queued"), ("RUNNING", "running"),
    ("COMPLETING", "running"), ("COMPLETED", "completed"), ("TIMEOUT", "timeout"), ("CANCELLED by 1002", "cancelled"),
    ("CANCELLED+", "cancelled"), ("FAILED", "failed"), ("NODE_FAIL", "failed"), ("OUT_OF_MEMORY", "failed"),
    ("BOOT_FAIL", "failed"), ("PREEMPTED", "failed"), ("DEADLINE", "failed"), ("WHATEVER", "undetermined"),
    ("", "undetermined"),
])
def test_slurm_state_table(raw, state):
    assert slurm.map_state(raw) == state


@pytest.mark.parametrize("raw,exit_status,state", [
    ("Q", None, "queued"), ("H", None, "queued"), ("W", None, "queued"), ("T", None, "queued"),
    ("R", None, "running"), ("E", None, "running"), ("F", 0, "completed"), ("F", 1, "failed"),
    ("F", -29, "timeout"), ("F", 271, "cancelled"), ("C", None, "completed"), ("?", None, "undetermined"),
])
def test_pbs_state_table(raw, exit_status, state):
    assert pbs.map_state(raw, exit_status) == state


@pytest.mark.parametrize("raw,state", [("r", "running"), ("t", "running"), ("qw", "queued"), ("hqw", "queued"),
                                       ("Eqw", "failed"), ("dr", "running"), ("", "undetermined")])
def test_sge_state_table(raw, state):
    assert sge.map_state(raw) == state


def test_newer_slurm_json_shapes():
    """Slurm >= 23.02: job_state is a list, numbers are {set, infinite, number}, exit_code is a dict."""
    doc = {"jobs": [
        {"job_id": 7, "name": "n", "user_name": "u", "job_state": ["RUNNING"], "nodes": "c[1-2]",
         "state_reason": "None", "time_limit": {"set": False, "infinite": True, "number": 0}},
        {"job_id": 8, "name": "n", "user_name": "u", "job_state": ["PENDING", "REQUEUED"], "nodes": "",
         "state_reason": "BeginTime"},
        {"job_id": 9, "name": "n", "user_name": "u", "job_state": ["FAILED"], "nodes": "c1",
         "exit_code": {"status": ["EXITED"], "return_code": {"set": True, "infinite": False, "number": 2}}},
    ]}
    jobs = slurm.Slurm().parse_query(json.dumps(doc))
    assert jobs["7"].state == "running" and jobs["7"].nodes == ["c1", "c2"] and jobs["7"].reason == ""
    assert jobs["8"].state == "queued" and jobs["8"].reason == "BeginTime"
    assert jobs["9"].state == "failed" and jobs["9"].exit_code == 2


def test_slurm_text_survives_headers_and_odd_lines():
    text = "CLUSTER: hpcbed\nJOBID|STATE|USER|NODES|REASON|NAME\n12|RUNNING|u|c1|None|a|b|c\ngarbage\n"
    jobs = slurm.Slurm().parse_text(text)
    assert list(jobs) == ["12"] and jobs["12"].name == "a|b|c" and jobs["12"].state == "running"


def test_pbs_text_unlimited_and_continuation_lines():
    text = ("Job Id: 55.srv\n    Job_Name = long\n    job_state = R\n    exec_host = n1/0+n2/0\n"
            "    Resource_List.walltime = UNLIMITED\n    comment = first part\n\tsecond part\n")
    jobs = pbs.parse_text(text)
    assert jobs["55"].nodes == ["n1", "n2"] and jobs["55"].reason == "first partsecond part"


@pytest.mark.parametrize("text,hosts", [("c[1-3]", ["c1", "c2", "c3"]), ("gpu[01-02],login", ["gpu01", "gpu02",
                                        "login"]), ("", []), ("(null)", []), ("a[1,3]", ["a1", "a3"])])
def test_hostlist(text, hosts):
    assert expand(text) == hosts


def test_exec_hosts():
    assert exec_hosts("n1/0*2+n1/1+n2/0-3") == ["n1", "n2"]


def test_registry():
    assert get_backend("slurm").name == "slurm" and get_backend("pbs", pbs_flavor="pro").flavor == "pro"
    with pytest.raises(ValueError, match="scheduler"):
        get_backend("lsf")


def test_slurm_json_errors_mean_unreachable():
    """Recorded: squeue --json exits 0 with empty jobs and an errors list when slurmctld is unreachable."""
    text = (RECORDED / "slurm" / "squeue_22.05_unreachable.json").read_text()

    def runner(argv, timeout=None):
        return CommandResult(tuple(argv), 0, text, "")

    res = slurm.Slurm().query(runner, job_ids=["1", "2"])
    assert res.reachable is False and set(res.jobs) == {"1", "2"}
    assert {j.state for j in res.jobs.values()} == {"undetermined"} and "slurm_load_jobs" in res.error


def test_sge_header_for_a_one_slot_session():
    header = sge.Sge().render_header(JobOptions(job_name="isession-a", workdir="/home/u/s", output="/home/u/s/job.out",
                                                queue="all.q", walltime_seconds=3600, nodes=1, cpus_per_task=1))
    assert header == ["-S /bin/bash", "-N isession-a", "-wd /home/u/s", "-o /home/u/s/job.out", "-q all.q", "-j y",
                      "-l h_rt=01:00:00"]
    assert "-j y" not in sge.Sge().render_header(JobOptions(output="/o", error="/e"))


@pytest.mark.parametrize("opts, named", [
    ({"nodes": 2}, "nodes"), ({"cpus_per_task": 4}, "cpus_per_task"), ({"ntasks": 2}, "ntasks"),
    ({"gpus": 1}, "gpus"), ({"qos": "high", "constraint": "avx"}, "qos, constraint"),
])
def test_sge_refuses_what_needs_a_parallel_environment_naming_it(opts, named):
    with pytest.raises(ValueError) as exc:
        sge.Sge().render_header(JobOptions(**opts))
    assert str(exc.value).startswith(named + ": depend on") and "-pe smp 4" in str(exc.value)


@pytest.mark.parametrize("backend, raw, state, ending", [
    (slurm.Slurm(), "COMPLETING", "running", True), (slurm.Slurm(), "RUNNING", "running", False),
    (slurm.Slurm(), "CANCELLED", "cancelled", True), (pbs.Pbs(), "E", "running", True),
    (pbs.Pbs(), "R", "running", False), (pbs.Pbs(), "Q", "queued", False), (sge.Sge(), "dr", "running", True),
    (sge.Sge(), "r", "running", False), (sge.Sge(), "qw", "queued", False),
])
def test_ending_tells_a_job_on_its_way_out(backend, raw, state, ending):
    """A refused cancel of such a job needs no retry (another cancel got there first)."""
    assert backend.ending(JobInfo(job_id="1", state=state, raw_state=raw)) is ending


# ---------------------------------------------------------------- where queued jobs wait (Slurm)
def _local_epoch(text):
    import time  # noqa: PLC0415

    return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


def test_slurm_pending_position_count_and_expected_start_recorded():
    text = (RECORDED / "slurm" / "squeue_pending_start.txt").read_text()
    got = slurm.Slurm.parse_pending(text, ["25", "26", "404"])
    assert got == {"25": {"queue_position": 1, "queue_pending": 2, "start_time": _local_epoch("2026-12-05T07:39:36")},
                   "26": {"queue_position": 2, "queue_pending": 2, "start_time": _local_epoch("2026-12-05T07:42:00")}}


def test_slurm_pending_without_an_estimate_recorded():
    text = (RECORDED / "slurm" / "squeue_pending_na.txt").read_text()
    got = slurm.Slurm.parse_pending(text, ["19"])
    assert got == {"19": {"queue_position": 2, "queue_pending": 2, "start_time": None}}


def test_slurm_pending_order_is_priority_then_submit_time_per_partition():
    text = ("10|gpu|50|2026-01-01T10:00:00|N/A\n11|gpu|90|2026-01-01T11:00:00|N/A\n"
            "12|debug|99|2026-01-01T09:00:00|N/A\n13|gpu|50|2026-01-01T09:30:00|N/A\nnoise line\n")
    got = slurm.Slurm.parse_pending(text, ["10", "11", "12", "13"])
    assert {k: v["queue_position"] for k, v in got.items()} == {"11": 1, "13": 2, "10": 3, "12": 1}
    assert got["10"]["queue_pending"] == 3 and got["12"]["queue_pending"] == 1


def test_other_schedulers_give_no_queue_details():
    assert pbs.Pbs().queue_details(lambda argv, timeout: None, ["1"]) == {}


class Replies:
    """A runner answering squeue by format (fixed or JSON) and sacct, recording every argv it was given."""

    def __init__(self, text: str, json_text: str = "", sacct: CommandResult = None) -> None:
        self.text, self.json_text, self.sacct, self.calls = text, json_text, sacct, []

    def __call__(self, argv, timeout=None):
        self.calls.append(list(argv))
        if argv[0] == "sacct":
            return self.sacct or CommandResult(tuple(argv), 1, "", "Slurm accounting storage is disabled\n")
        if "--json" in argv:
            return CommandResult(tuple(argv), 0, self.json_text, "")
        return CommandResult(tuple(argv), 0, self.text, "")


def test_slurm_poll_of_waiting_and_running_jobs_is_one_fixed_format_squeue_for_those_jobs():
    runner = Replies("7|PENDING|alice||Resources|isession-a\n8|RUNNING|alice|cn[1-2]|None|isession-b\n")
    res = slurm.Slurm().poll(runner, ["7", "8"])
    assert runner.calls == [["squeue", "-h", "-o", slurm.SQUEUE_FORMAT, "--states=all", "--jobs=7,8"]]
    assert res.reachable and res.jobs["7"].state == "queued" and res.jobs["7"].reason == "Resources"
    assert res.jobs["8"].state == "running" and res.jobs["8"].nodes == ["cn1", "cn2"] and res.jobs["8"].reason == ""


@pytest.mark.parametrize("raw", ["COMPLETING", "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "CONFIGURING"])
def test_slurm_poll_asks_the_full_query_for_a_job_that_is_not_plainly_waiting_or_running(raw):
    """An ending job's text state hides how it ended and carries no exit code: the JSON answer (query) decides."""
    recorded = (RECORDED / "slurm" / "squeue_22.05_mixed.json").read_text()
    runner = Replies(f"1|RUNNING|u|compute1|None|rec-run\n4|{raw}|u|compute1|None|x\n", recorded)
    res = slurm.Slurm().poll(runner, ["1", "4"])
    assert [c[1] for c in runner.calls] == ["-h", "--json"]
    assert res.jobs["4"].state == "failed" and res.jobs["4"].exit_code == 3  # what the JSON answer says
    assert res.jobs["1"].state == "running"


def test_slurm_poll_of_a_job_squeue_no_longer_lists_ends_in_sacct():
    recorded = (RECORDED / "slurm" / "squeue_22.05_unknown_job.json").read_text()
    runner = Replies("", recorded, CommandResult(("sacct",), 0, "77|isession-x|TIMEOUT|0:0|compute2|u\n", ""))
    res = slurm.Slurm().poll(runner, ["77"])
    assert [c[0] for c in runner.calls] == ["squeue", "squeue", "sacct"]
    assert res.jobs["77"].state == "timeout" and res.reachable


def test_slurm_poll_that_cannot_reach_slurmctld_is_undetermined_at_once():
    def runner(argv, timeout=None):
        runner.calls += 1
        return CommandResult(tuple(argv), 1, "", "slurm_load_jobs error: Unable to contact slurm controller "
                                                 "(connect failure)\n")
    runner.calls = 0
    res = slurm.Slurm().poll(runner, ["1"])
    assert runner.calls == 1 and res.reachable is False and res.jobs["1"].state == "undetermined"
    assert "Unable to contact" in res.error
