"""warm_connection: the command is the one ansible-core's ssh connection builds, and it runs detached.

The connection objects are ansible-core's own ssh plugin with its options set as a task would set them; the
command that runs is a stand-in for ssh that records its argv and waits for the test's word, so the tests can
see that the action returned while "ssh" was still running, in a session of its own.
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest

from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import connection_loader
from ansible_collections.hpc.interactive.plugins.action import warm_connection
from ansible_collections.hpc.interactive.plugins.action.warm_connection import ActionModule, skip_reason, warm_command

FAKE_SSH = """#!{python}
import os, sys, time
from pathlib import Path
out = Path({out!r})
out.joinpath("argv").write_text("\\0".join(sys.argv))
out.joinpath("sid.part").write_text("%d %d" % (os.getsid(0), os.getppid()))
os.replace(out / "sid.part", out / "sid")  # whole, or not there: the test polls for it
# until the test's word, or its directory is gone, or a minute: a stand-in must never outlive its test
started = time.monotonic()
while not out.joinpath("go").exists() and out.is_dir() and time.monotonic() - started < 60:
    time.sleep(0.02)
"""


def ssh_connection(**options):
    conn = connection_loader.get("ssh", PlayContext(), None)
    conn.set_options(var_options={"ansible_host": "10.1.2.3", "ansible_user": "cluser", "ansible_port": 2222,
                                  **options})
    return conn


def test_the_command_is_the_ssh_plugins_own_with_its_master():
    argv = [a.decode() for a in warm_command(ssh_connection(ansible_ssh_private_key_file="/k/id"))]
    assert argv[0] == "ssh" and argv[-2:] == ["10.1.2.3", "true"]
    assert "ControlMaster=auto" in argv and "ControlPersist=60s" in argv
    assert any(a.startswith("ControlPath=") for a in argv)  # the path later tasks use, built by the plugin
    assert 'User="cluser"' in argv and "Port=2222" in argv and 'IdentityFile="/k/id"' in argv


def test_no_master_no_command():
    assert warm_command(ssh_connection(ansible_ssh_args="-o ServerAliveInterval=5")) == []
    assert warm_command(ssh_connection(ansible_ssh_args="-o ControlPersist=60s -o ControlPath=none")) == []


@pytest.mark.parametrize(("conn", "why"), [
    (SimpleNamespace(transport="local"), "not ssh"),
    (SimpleNamespace(transport="community.docker.docker"), "not ssh"),
])
def test_other_connections_are_skipped(conn, why):
    assert why in skip_reason(conn)


def test_a_password_is_never_handed_to_a_detached_command():
    assert "password" in skip_reason(ssh_connection(ansible_password="s3cret"))
    assert skip_reason(ssh_connection()) == ""


def _action(conn, *, check=False, args=None):
    task = SimpleNamespace(args=args or {}, check_mode=check, async_val=0, action="hpc.interactive.warm_connection")
    conn._shell = SimpleNamespace(tmpdir=None)
    return ActionModule(task, conn, PlayContext(), loader=None, templar=None, shared_loader_obj=None)


def test_the_command_runs_detached_and_the_task_does_not_wait(tmp_path):
    fake = tmp_path / "ssh"
    fake.write_text(FAKE_SSH.format(python=sys.executable, out=str(tmp_path)))
    fake.chmod(0o755)
    result = _action(ssh_connection(ansible_ssh_executable=str(fake))).run(task_vars={})
    assert result["started"] is True and result["changed"] is False, result
    try:
        deadline = time.monotonic() + 10  # the stand-in is still waiting for "go": the task did not wait for it
        while time.monotonic() < deadline and not (tmp_path / "sid").exists():
            time.sleep(0.02)
        argv = (tmp_path / "argv").read_text().split("\0")
        assert argv[0] == str(fake) and argv[-2:] == ["10.1.2.3", "true"] and "ControlMaster=auto" in argv
        sid, _parent = map(int, (tmp_path / "sid").read_text().split())
        assert sid != os.getsid(0)  # a session of its own: no terminal, no signal of the play's group reaches it
    finally:
        (tmp_path / "go").touch()


def test_check_mode_and_skips_run_nothing(tmp_path):
    fake = tmp_path / "ssh"
    fake.write_text(FAKE_SSH.format(python=sys.executable, out=str(tmp_path)))
    fake.chmod(0o755)
    conn = ssh_connection(ansible_ssh_executable=str(fake))
    assert _action(conn, check=True).run(task_vars={})["started"] is False
    res = _action(ssh_connection(ansible_ssh_executable=str(fake), ansible_password="x")).run(task_vars={})
    assert res["started"] is False and "password" in res["msg"]
    res = _action(ssh_connection(ansible_ssh_executable=str(fake), ansible_ssh_args="-o BatchMode=yes")).run(
        task_vars={})
    assert res["started"] is False and "ControlPersist" in res["msg"]
    time.sleep(0.3)
    assert not (tmp_path / "argv").exists()


def test_options_are_refused_by_name():
    res = _action(ssh_connection(), args={"host": "x"}).run(task_vars={})
    assert res["failed"] and "host" in res["msg"] and res["started"] is False


def test_a_command_that_cannot_be_built_skips(monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no ssh here")
    conn = ssh_connection()
    monkeypatch.setattr(conn, "_build_command", broken)
    res = _action(conn).run(task_vars={})
    assert res["started"] is False and "no ssh here" in res["msg"] and not res.get("failed")
    assert warm_connection.SSH_TRANSPORTS >= {"ssh", "ansible.builtin.ssh"}
