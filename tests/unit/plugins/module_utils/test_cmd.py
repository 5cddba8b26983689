from __future__ import annotations

import os
import time

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _cmd


def test_runs_argv_with_c_locale():
    res = _cmd.run(["/bin/sh", "-c", 'printf "%s|%s" "$LC_ALL" "$1"', "sh", "a b;$(x)"])
    assert res.ok
    assert res.stdout == "C|a b;$(x)"  # the argument reached the program verbatim, no shell expansion


def test_string_argv_is_refused():
    with pytest.raises(TypeError):
        _cmd.run("echo hi")


def test_missing_binary_is_rc_127():
    res = _cmd.run(["/nonexistent/binary"])
    assert res.rc == 127 and not res.ok and "nonexistent" in res.stderr


def test_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    res = _cmd.run(["/bin/sh", "-c", 'sleep 30 & echo $! > "$0"; wait', str(pidfile)], timeout=0.5)
    assert res.timed_out and not res.ok
    assert time.monotonic() - start < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a killed child may linger as a zombie of init; check its state
        try:
            with open("/proc/%d/stat" % child) as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild survived the timeout")


def test_runner_binds_timeout_and_env():
    run = _cmd.runner(timeout=5, env={"HPCI_X": "1"})
    res = run(["/bin/sh", "-c", 'echo "$HPCI_X"'], None)
    assert res.stdout.strip() == "1"
