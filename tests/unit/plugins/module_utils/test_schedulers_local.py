"""The ``local`` backend with real processes: detached submit, states, exit codes, group-wide cancel."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import CommandResult
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import local
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import wait_for_state
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.local import Local, group_members


def stat_fields(pid):
    """(state, ppid, pgrp, session) of a live process, None when gone or a zombie."""
    try:
        data = Path("/proc/%s/stat" % pid).read_text()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture
def backend(tmp_path):
    return Local(state_dir=str(tmp_path / "state"), hostname="testhost")


@pytest.fixture
def submit(backend, tmp_path):
    started = []

    def _submit(body: str, name: str = "job") -> str:
        script = tmp_path / ("%s.sh" % name)
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o700)
        job_id = backend.submit(str(script), name, "tester", str(tmp_path / ("%s.out" % name)))
        started.append(int(job_id))
        return job_id

    yield _submit
    for pgid in started:  # never leave a process behind, whatever the test did
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def test_submit_is_detached_in_its_own_session_and_running(backend, submit, tmp_path):
    job_id = submit("echo hello; exec sleep 60\n", name="detached")
    fields = stat_fields(job_id)
    assert fields is not None
    _state, _ppid, pgrp, session = fields
    assert pgrp == int(job_id) and session == int(job_id)  # setsid: leader of its own session and group
    assert session != os.getsid(0)
    info = backend.query(job_ids=[job_id]).jobs[job_id]
    assert info.state == "running" and info.found and info.name == "detached" and info.user == "tester"
    assert info.nodes == ["testhost"]
    assert wait_until(lambda: (tmp_path / "detached.out").exists()
                      and "hello" in (tmp_path / "detached.out").read_text())
    assert group_members(int(job_id))  # the sleep replaced the script in the job's group
    # records are private
    assert oct(os.stat(backend.state_dir).st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("body,state,code", [("exit 3\n", "failed", 3), ("true\n", "completed", 0),
                                             ("kill -9 $$\n", "failed", 137)])
def test_exit_status(backend, submit, body, state, code):
    job_id = submit(body)
    assert wait_until(lambda: backend.query(job_ids=[job_id]).jobs[job_id].state != "running")
    info = backend.query(job_ids=[job_id]).jobs[job_id]
    assert info.state == state and info.exit_code == code and info.nodes == []


def test_cancel_kills_the_whole_group_including_a_grandchild_that_ignores_term(backend, submit, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    body = ("sh -c 'trap \"\" TERM; echo $$ > %s; while :; do sleep 0.1; done' &\n"
            "exec sleep 60\n" % pidfile)
    job_id = submit(body)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    assert stat_fields(grandchild)[2] == int(job_id)  # it is in the job's process group
    start = time.monotonic()
    assert backend.cancel(job_id=job_id, timeout=1.0) is True
    assert time.monotonic() - start < 8
    assert group_members(int(job_id)) == []
    assert stat_fields(grandchild) is None  # TERM was ignored: KILL got it
    info = backend.query(job_ids=[job_id]).jobs[job_id]
    assert info.state == "cancelled" and info.raw_state == "CANCELLED"
    # twice: nothing to do, no error, still cancelled
    assert backend.cancel(job_id=job_id) is False
    assert backend.query(job_ids=[job_id]).jobs[job_id].state == "cancelled"


def test_cancel_with_term_is_quick_when_the_job_obeys(backend, submit):
    job_id = submit("sleep 60 &\nsleep 60 &\nwait\n")
    assert wait_until(lambda: len(group_members(int(job_id))) >= 3)
    start = time.monotonic()
    assert backend.cancel(job_id=job_id) is True
    assert time.monotonic() - start < 5 and group_members(int(job_id)) == []


def test_unknown_job_is_absent_and_cancel_is_a_noop(backend):
    info = backend.query(job_ids=["4194000"]).jobs["4194000"]
    assert info.state == "undetermined" and info.found is False
    assert backend.cancel(job_id="4194000") is False


def test_a_reused_pid_is_never_signalled(backend, tmp_path):
    """A record whose start time does not match the live process with that pid is not ours."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        os.makedirs(backend.state_dir, exist_ok=True)
        Path(backend.state_dir, "%d.json" % other.pid).write_text(
            '{"job_id": "%d", "name": "old", "user": "tester", "start_time": "1", "status_file": "%s"}'
            % (other.pid, tmp_path / "none.status"))
        info = backend.query(job_ids=[str(other.pid)]).jobs[str(other.pid)]
        assert info.state != "running"
        assert backend.cancel(job_id=str(other.pid)) is False
        assert other.poll() is None  # still alive: not killed
    finally:
        other.kill()
        other.wait()


def test_a_cancel_marker_left_by_an_earlier_job_with_the_same_pid_is_not_this_jobs(tmp_path):
    """pid_max is small, so a job id comes back: the earlier job's cancel must not make the new one "cancelled"."""
    state = tmp_path / "state"

    def spawn_over_a_stale_marker(argv):
        pid = local._spawn_detached(argv)
        os.makedirs(state, exist_ok=True)
        (state / ("%d.cancelled" % pid)).write_text("1")  # what a cancel of an earlier job with this pid left
        return pid

    backend = Local(state_dir=str(state), hostname="testhost", spawn=spawn_over_a_stale_marker)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o700)
    job_id = backend.submit(str(script), "job", "tester", str(tmp_path / "job.out"))
    assert wait_until(lambda: backend.query(job_ids=[job_id]).jobs[job_id].state != "running")
    info = backend.query(job_ids=[job_id]).jobs[job_id]
    assert (info.state, info.exit_code) == ("failed", 3)


def test_a_marker_for_another_start_time_does_not_count(backend, submit):
    job_id = submit("exit 3\n")
    Path(backend.state_dir, "%s.cancelled" % job_id).write_text("1")  # written for another process with this pid
    assert wait_until(lambda: backend.query(job_ids=[job_id]).jobs[job_id].state != "running")
    info = backend.query(job_ids=[job_id]).jobs[job_id]
    assert (info.state, info.exit_code) == ("failed", 3)


def test_query_all_and_by_name(backend, submit):
    first = submit("exec sleep 60\n", name="alpha")
    second = submit("exec sleep 60\n", name="beta")
    everything = backend.query().jobs
    assert {first, second} <= set(everything)
    by_name = backend.query(name="beta").jobs
    assert list(by_name) == [second]
    alive = backend.find_by_name(None, "alpha", "tester").jobs
    assert list(alive) == [first]


def test_wrapper_takes_data_as_arguments_only(backend):
    argv = backend.submit_argv("/tmp/x;id.sh", "/tmp/$(id).out", "/tmp/e", "/tmp/s")
    assert argv[:3] == ["/bin/sh", "-c", local.WRAPPER]
    assert argv[-4:] == ["/tmp/s", "/tmp/$(id).out", "/tmp/e", "/tmp/x;id.sh"]
    assert "$(id)" not in local.WRAPPER and "x;id" not in local.WRAPPER


# ----------------------------------------------------------------------------- wait_for_state's pacing
# The Slurm backend parses the answers of a stand-in squeue: the fixed format for ``squeue --jobs -o`` (the poll) and
# recorded ``squeue --json`` answers (fake_scheduler.squeue_json) for the full query; only the clock, the sleep and
# the command are stand-ins, so each case can assert every pause and every query exactly.
_fake_spec = importlib.util.spec_from_file_location(
    "fake_scheduler", Path(__file__).resolve().parents[2] / "fixtures" / "schedulers" / "fake_scheduler.py")
fake_scheduler = importlib.util.module_from_spec(_fake_spec)
_fake_spec.loader.exec_module(fake_scheduler)
HOLD = [0.1] * 20  # 0.1 s apart for the first 2 s after the submit
PAUSES = HOLD + [0.15, 0.225, 0.3375, 0.50625, 0.759375]  # then x1.5, then 1.0 each


class FakeTime:
    """A clock that moves only when something sleeps or a query costs time."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def squeue_runner(clock, answers, cost=0.0):
    """A runner answering the Nth squeue with answers[N] (the last repeats); None = slurmctld unreachable."""
    calls = []

    def run(argv, timeout=None):
        json_call = "--json" in argv
        if not json_call:  # each look (one poll) counts once, whether or not the poll goes on to the JSON query
            calls.append({"argv": list(argv), "timeout": timeout, "at": clock.now})
            clock.now += cost
        jobs = answers[min(len(calls), len(answers)) - 1]
        if jobs is None:
            return CommandResult(tuple(argv), 1, "", "slurm_load_jobs error: Unable to contact slurm controller")
        answer = fake_scheduler.squeue_json if json_call else fake_scheduler.squeue_text
        return CommandResult(tuple(argv), 0, answer(jobs, {"name": "job", "user": "tester"}), "")

    return run, calls


def pending(n):
    return [[{"job_id": 7, "state": "PENDING", "reason": "Resources"}]] * n


def test_wait_first_query_is_immediate_and_pauses_grow_to_one_second():
    clock = FakeTime()
    run, calls = squeue_runner(clock, pending(28) + [[{"job_id": 7, "state": "RUNNING", "nodes": "compute1"}]])
    every = []

    def recording(argv, timeout=None):
        every.append(list(argv))
        return run(argv, timeout)

    info, ok, why = wait_for_state(get_backend("slurm"), recording, "7", "running", 60, query_timeout=4,
                                   clock=clock.clock, sleep=clock.sleep)
    assert ok is True and why == "" and info.state == "running" and info.nodes == ["compute1"]
    assert clock.sleeps == pytest.approx(PAUSES + [1.0, 1.0, 1.0])
    assert len(calls) == 29 and calls[0]["at"] == 1000.0  # no pause before the first query
    # every look is the cheap fixed-format question about this job alone, never the JSON list of every job
    assert len(every) == 29 and not any("--json" in argv for argv in every)
    assert all(c["timeout"] == 4 and "--jobs=7" in c["argv"] for c in calls)


def test_wait_a_job_that_starts_after_a_second_is_seen_within_a_tenth():
    clock = FakeTime()
    run, calls = squeue_runner(clock, pending(10) + [[{"job_id": 7, "state": "RUNNING"}]])
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "running", 5, clock=clock.clock,
                                     sleep=clock.sleep)
    assert ok is True and clock.sleeps == pytest.approx([0.1] * 10) and len(calls) == 11


def test_wait_an_ending_job_is_asked_again_in_full():
    # the fixed format shows an ending job as COMPLETING whatever its end: the poll asks the JSON list for the rest
    clock = FakeTime()
    answers = [[{"job_id": 7, "state": "COMPLETING"}]]
    run, calls = squeue_runner(clock, answers)
    seen = []

    def recording(argv, timeout=None):
        seen.append("--json" in argv)
        if "--json" in argv:  # the full answer: the job failed
            return CommandResult(tuple(argv), 0, fake_scheduler.squeue_json(
                [{"job_id": 7, "state": "FAILED", "exit_code": 256}], {"name": "job", "user": "tester"}), "")
        return run(argv, timeout)

    info, ok, why = wait_for_state(get_backend("slurm"), recording, "7", "running", 5, clock=clock.clock,
                                   sleep=clock.sleep)
    assert ok is False and info.state == "failed" and why == "job 7 ended (failed) before it was running"
    assert seen == [False, True] and clock.sleeps == []


@pytest.mark.parametrize("wanted,answer", [
    ("running", {"job_id": 7, "state": "RUNNING"}),
    ("queued", {"job_id": 7, "state": "PENDING"}),
    ("queued", {"job_id": 7, "state": "COMPLETED"}),  # already over: it was queued
])
def test_wait_returns_at_the_first_query_without_sleeping(wanted, answer):
    clock = FakeTime()
    run, calls = squeue_runner(clock, [[answer]])
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", wanted, 60, clock=clock.clock, sleep=clock.sleep)
    assert ok is True and clock.sleeps == [] and len(calls) == 1


def test_wait_timeout_last_pause_ends_exactly_at_the_deadline():
    clock = FakeTime()
    run, calls = squeue_runner(clock, pending(1))
    info, ok, why = wait_for_state(get_backend("slurm"), run, "7", "running", 3, clock=clock.clock, sleep=clock.sleep)
    assert ok is False and info.state == "queued" and why == "job 7 not running after 3s (state queued)"
    # 20 x 0.1, then 0.15 .. 0.3375 add up to 2.7125; the next pause (0.50625) is cut to what is left of the 3 s
    assert clock.sleeps == pytest.approx(PAUSES[:23] + [3 - sum(PAUSES[:23])])
    assert sum(clock.sleeps) == pytest.approx(3.0) and clock.now == pytest.approx(1003.0)
    assert len(calls) == len(clock.sleeps) + 1  # one last look at the deadline, then no more


@pytest.mark.parametrize("cost", [0.0, 0.05, 0.4, 0.95])
def test_wait_never_sleeps_past_the_deadline_when_queries_take_time(cost):
    clock = FakeTime()
    deadline = clock.now + 3
    sleeps_at = []
    real_sleep = clock.sleep

    def sleep(seconds):
        sleeps_at.append(clock.now)
        real_sleep(seconds)

    run, calls = squeue_runner(clock, pending(1), cost=cost)
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "running", 3, clock=clock.clock, sleep=sleep)
    assert ok is False
    steps = sorted(set(PAUSES + [1.0]))
    for i, (start, pause) in enumerate(zip(sleeps_at, clock.sleeps, strict=True)):
        assert start + pause <= deadline + 1e-9, (i, start, pause)
        if i < len(clock.sleeps) - 1:  # every pause but the last is a step of the schedule, never a shorter one
            assert any(pause == pytest.approx(step) for step in steps), (i, pause)
            assert i == 0 or pause >= clock.sleeps[i - 1] - 1e-9, (i, pause)
        else:  # the last is the schedule's next step, cut to what is left
            assert pause == pytest.approx(deadline - start) or any(pause == pytest.approx(x) for x in steps)
    assert calls[-1]["at"] + cost >= deadline - 1e-9  # the last look ends at the deadline, not a pause earlier
    assert len(calls) == len(clock.sleeps) + 1


def test_a_long_wait_polls_about_once_a_second():
    clock = FakeTime()
    run, calls = squeue_runner(clock, pending(1))
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "running", 30, clock=clock.clock,
                                     sleep=clock.sleep)
    assert ok is False and max(clock.sleeps) == 1.0
    # 20 of 0.1 s and 5 growing pauses (3.978125 s), 26 of 1 s, one of 0.021875 s to the deadline: 52 pauses, 53
    # queries, about one a second after the first seconds
    assert clock.sleeps == pytest.approx(PAUSES + [1.0] * 26 + [30 - sum(PAUSES) - 26])
    assert len(calls) == 53


def test_wait_custom_interval_and_cap():
    clock = FakeTime()
    run, _calls = squeue_runner(clock, pending(4) + [[{"job_id": 7, "state": "RUNNING"}]])
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "running", 60, interval=0.5, max_interval=0.6,
                                     hold=0, clock=clock.clock, sleep=clock.sleep)
    assert ok is True and clock.sleeps == pytest.approx([0.5, 0.6, 0.6, 0.6])
    clock = FakeTime()
    run, _calls = squeue_runner(clock, pending(4) + [[{"job_id": 7, "state": "RUNNING"}]])
    _info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "running", 60, interval=0.5, max_interval=0.6,
                                     hold=1.0, clock=clock.clock, sleep=clock.sleep)
    assert ok is True and clock.sleeps == pytest.approx([0.5, 0.5, 0.6, 0.6])


def test_wait_stops_when_the_job_ends_before_running():
    clock = FakeTime()
    run, calls = squeue_runner(clock, pending(2) + [[{"job_id": 7, "state": "FAILED", "exit_code": 256}]])
    info, ok, why = wait_for_state(get_backend("slurm"), run, "7", "running", 60, clock=clock.clock,
                                   sleep=clock.sleep)
    assert ok is False and info.state == "failed" and why == "job 7 ended (failed) before it was running"
    assert clock.sleeps == pytest.approx(PAUSES[:2]) and len(calls) == 3


def test_wait_keeps_polling_an_unreachable_scheduler_until_the_deadline():
    clock = FakeTime()
    run, calls = squeue_runner(clock, [None, None, [{"job_id": 7, "state": "PENDING"}]])
    info, ok, _why = wait_for_state(get_backend("slurm"), run, "7", "queued", 60, clock=clock.clock,
                                    sleep=clock.sleep)
    assert ok is True and info.state == "queued" and clock.sleeps == pytest.approx(PAUSES[:2]) and len(calls) == 3
    clock = FakeTime()
    run, calls = squeue_runner(clock, [None])
    info, ok, why = wait_for_state(get_backend("slurm"), run, "7", "queued", 1, clock=clock.clock, sleep=clock.sleep)
    assert ok is False and info.state == "undetermined" and why.endswith("(state undetermined)")
    assert sum(clock.sleeps) == pytest.approx(1.0) and len(calls) == len(clock.sleeps) + 1


def test_wait_for_a_real_local_job_needs_no_pause(backend, submit):
    job_id = submit("exec sleep 60\n", name="waited")
    slept = []
    info, ok, why = wait_for_state(backend, None, job_id, "running", 10, sleep=slept.append)
    assert ok is True and why == "" and info.state == "running" and slept == []
