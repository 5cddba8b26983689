"""Runner events -> one progress line per task."""
from __future__ import annotations

from isession.progress import Progress


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
