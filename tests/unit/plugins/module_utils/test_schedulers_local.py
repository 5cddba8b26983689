"""The ``local`` backend with real processes: detached submit, states, exit codes, group-wide cancel."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import local
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
    assert argv[:3] == ["/bin/sh", "-c", local.WRAPPER] and argv[-4:] == ["/tmp/s", "/tmp/$(id).out", "/tmp/e",
                                                                         "/tmp/x;id.sh"]
    assert "$(id)" not in local.WRAPPER and "x;id" not in local.WRAPPER
