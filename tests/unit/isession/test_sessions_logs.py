"""``isession logs`` on the workspace: which files of a session directory ``sessions.local_logs`` shows."""
from __future__ import annotations

import os

from isession import sessions


def test_local_logs_shows_the_logs_and_the_runners_stdout_never_its_events_a_link_or_the_secret(tmp_path):
    sdir = tmp_path / "s-1"
    logs = sdir / "logs"
    (logs / "desktop").mkdir(parents=True)
    (logs / "server.log").write_text("up\n")
    (logs / "desktop" / "xvnc.log").write_text("x\n")
    (logs / "secret").write_text("never\n")
    os.symlink(tmp_path / "elsewhere.log", logs / "linked.log")
    (tmp_path / "elsewhere.log").write_text("not the session's\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.log").write_text("o\n")
    os.symlink(outside, logs / "linked-dir")  # a link to a directory is not followed
    # a standby's artifacts, linked as the start's: only each run's stdout is shown
    standby_runner = tmp_path / "standby" / "runner" / "artifacts" / "start"
    (standby_runner / "job_events").mkdir(parents=True)
    (standby_runner / "stdout").write_text("PLAY\n")
    (standby_runner / "job_events" / "1-a.json").write_text("{}\n")
    (logs / "runner").mkdir()
    os.symlink(standby_runner.parent, logs / "runner" / "artifacts")
    (logs / "runner" / "env").mkdir()
    (logs / "runner" / "env" / "extravars").write_text("{}\n")
    (sdir / "job.out").write_text("job\n")
    (sdir / "state.json").write_text("{}\n")

    shown = [p.relative_to(sdir).as_posix() for p in sessions.local_logs(sdir)]

    assert shown == ["logs/desktop/xvnc.log", "logs/runner/artifacts/start/stdout", "logs/server.log", "job.out"]


def test_local_logs_of_a_session_without_logs_is_its_log_files_only(tmp_path):
    (tmp_path / "agent.err").write_text("e\n")
    assert sessions.local_logs(tmp_path) == [tmp_path / "agent.err"]
    assert sessions.local_logs(tmp_path / "missing") == []
