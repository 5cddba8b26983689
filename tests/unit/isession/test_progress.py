"""Runner events -> one progress line per task, and the state the live view draws."""
from __future__ import annotations

import pytest

from isession.progress import Progress, QueueInfo, duration


def ev(kind, created, pid=4242, **data):
    return {"event": kind, "created": created, "pid": pid, "event_data": data}


def test_one_line_per_finished_task_with_duration():
    p = Progress()
    assert p.line(ev("playbook_on_start", "2026-01-01T00:00:00.000000")) is None
    assert p.playbook_pid == 4242
    assert p.line(ev("playbook_on_task_start", "2026-01-01T00:00:01.000000", task_uuid="t1",
                     task="session : Reserve the workspace port", role="session")) is None
    line = p.line(ev("runner_on_ok", "2026-01-01T00:00:01.500000", task_uuid="t1", host="localhost",
                     task="session : Reserve the workspace port", role="session", res={"changed": True}))
    assert line == "  changed session: Reserve the workspace port (0.5s)"
    line = p.line(ev("runner_on_ok", "2026-01-01T00:00:09", task_uuid="t1", task="Wait", duration=2.25, res={}))
    assert line == "  ok      Wait (2.2s)"
    line = p.line(ev("runner_on_ok", "2026-01-01T00:00:02", task_uuid="t2", host="controller", task="Check",
                     res={"changed": False}))
    assert line == "  ok      Check [controller]"


def test_failures_carry_the_message_and_are_collected():
    p = Progress()
    line = p.line(ev("runner_on_failed", "2026-01-01T00:00:02", task_uuid="t3", host="controller",
                     task="Submit", role="session", res={"msg": "sbatch: error: invalid partition\nspecified"}))
    assert line == "  failed  session: Submit [controller]: sbatch: error: invalid partition specified"
    assert p.failed == ["session: Submit: sbatch: error: invalid partition specified"]
    line = p.line(ev("runner_on_unreachable", "2026-01-01T00:00:02", task="Ping", host="controller",
                     res={"msg": "ssh: connect to host 10.199.77.20 port 22: Connection refused"}))
    assert line.startswith("  unreachable") and "Connection refused" in line


def test_censored_results_stay_censored():
    p = Progress()
    line = p.line(ev("runner_on_failed", "x", task="Copy the secret",
                     res={"censored": "the output has been hidden due to the fact that 'no_log: true' was specified"}))
    assert "no_log" in line


def test_skipped_and_ignored_are_quiet_unless_verbose():
    quiet, loud = Progress(), Progress(verbose=True)
    skipped = ev("runner_on_skipped", "x", task="Only on compute")
    ignored = ev("runner_on_failed", "x", task="Probe", ignore_errors=True, res={"msg": "no"})
    assert quiet.line(skipped) is None and quiet.line(ignored) is None
    assert quiet.failed == []
    assert "skipped" in loud.line(skipped)
    assert loud.line(ignored).startswith("  failed")
    assert loud.failed == []


def test_other_events_print_nothing():
    p = Progress()
    for kind in ("playbook_on_play_start", "runner_on_start", "verbose", "playbook_on_stats"):
        assert p.line(ev(kind, "x")) is None


# ---------------------------------------------------------------- what the live view draws
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_current_step_skips_bookkeeping_tasks_and_keeps_its_start():
    clock = Clock()
    p = Progress(clock=clock)
    p.line(ev("playbook_on_task_start", "x", task="session : Reserve the workspace port", role="session",
              task_action="hpc.interactive.free_port"))
    assert p.step == "Reserve the workspace port" and p.step_elapsed() == 0
    clock.now += 2.5
    for action in ("ansible.builtin.validate_argument_spec", "ansible.builtin.set_fact", "ansible.builtin.assert"):
        p.line(ev("playbook_on_task_start", "x", task=f"session : {action}", role="session", task_action=action))
    assert p.step == "Reserve the workspace port" and p.step_elapsed() == 2.5
    assert p.elapsed() == 2.5
    # a bookkeeping task is no plain line either, unless it fails
    ok = ev("runner_on_ok", "x", task="Validating arguments against arg spec main",
            task_action="ansible.builtin.validate_argument_spec", res={})
    assert p.line(ok) is None
    bad = ev("runner_on_failed", "x", task="Check the inputs", task_action="ansible.builtin.assert",
             res={"msg": "Bad session inputs: session_id"})
    assert p.line(bad).endswith("Bad session inputs: session_id")
    assert p.failed == ["Check the inputs: Bad session inputs: session_id"]


def test_queue_wait_retries_carry_the_reason_position_and_estimated_start():
    p = Progress()
    queued = {"jobs": {"42": {"state": "queued", "reason": "Resources", "queue_position": 2, "queue_pending": 3,
                              "start_time": 1_900_000_000}}}
    p.line(ev("runner_retry", "x", task="Wait until the job runs", res=queued))
    assert p.queue == QueueInfo("42", "Resources", 2, 3, 1_900_000_000.0)
    text = p.queue.describe(now=1_900_000_000 - 190)
    assert text.startswith("queued (job 42): Resources, position 2 of 3, estimated start ")
    assert text.endswith("(in 3m 10s)")
    # the scheduler gives no estimate and no position: only the reason
    p.line(ev("runner_retry", "x", res={"jobs": {"42": {"state": "queued", "reason": "Priority",
                                                        "queue_position": None, "start_time": 0}}}))
    assert p.queue.describe() == "queued (job 42): Priority"
    # the job runs: the queue line goes
    p.line(ev("runner_on_ok", "x", task="Wait until the job runs", res={"jobs": {"42": {"state": "running"}}}))
    assert p.queue is None


def test_results_without_jobs_leave_the_queue_alone():
    p = Progress()
    p.line(ev("runner_retry", "x", res={"jobs": {"7": {"state": "queued", "reason": "Resources"}}}))
    p.line(ev("runner_on_ok", "x", task="Write service.json", res={"changed": True}))
    assert p.queue is not None and p.queue.reason == "Resources"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.9, "59s"), (60, "1m 00s"), (3725, "1h 02m"),
                                               (-5, "0s")])
def test_duration(seconds, text):
    assert duration(seconds) == text
