"""warm_connection: the command is the one ansible-core's ssh connection builds, and it runs detached.

The connection objects are ansible-core's own ssh plugin with its options set as a task would set them; the
command that runs is a stand-in for ssh that records its argv and waits for the test's word, so the tests can
see that the action returned while "ssh" was still running, in a session of its own.
"""
from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest

from ansible.errors import AnsibleActionFail
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import connection_loader
from ansible.utils.display import Display
from ansible_collections.hpc.interactive.plugins.action import warm_connection
from ansible_collections.hpc.interactive.plugins.action.warm_connection import (
    ActionModule,
    build_in_background,
    build_payloads,
    check_modules,
    skip_reason,
    warm_command,
)

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
    with pytest.raises(AnsibleActionFail, match="Invalid options for hpc.interactive.warm_connection: host"):
        _action(ssh_connection(), args={"host": "x", "modules": []}).run(task_vars={})


@pytest.mark.parametrize("modules", ["hpc.interactive.scheduler_submit", ["scheduler_submit"], [3], {"a": 1},
                                     ["hpc.interactive.x; rm -rf /"]])
def test_modules_must_be_a_list_of_fqcns(modules):
    res = _action(ssh_connection(), args={"modules": modules}).run(task_vars={})
    assert res["failed"] and res["msg"].startswith("modules must be") and res["started"] is False, res
    assert res["prepared"] == []


def test_modules_are_deduplicated_in_order():
    assert check_modules(["a.b.c", "a.b.d", "a.b.c"]) == ["a.b.c", "a.b.d"] and check_modules(None) == []


def test_a_command_that_cannot_be_built_skips(monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no ssh here")
    conn = ssh_connection()
    monkeypatch.setattr(conn, "_build_command", broken)
    res = _action(conn).run(task_vars={})
    assert res["started"] is False and "no ssh here" in res["msg"] and not res.get("failed")
    assert warm_connection.SSH_TRANSPORTS >= {"ssh", "ansible.builtin.ssh"}


class _Builder:
    """A stand-in for the action: ``_configure_module`` is ansible-core's build; this one records each call."""

    def __init__(self, out, *, delegate_to=None, broken=(), wait_for=None):
        self._task = SimpleNamespace(delegate_to=delegate_to)
        self.out, self.broken, self.wait_for = out, set(broken), wait_for

    def _configure_module(self, module_name, module_args, task_vars):
        if self.wait_for is not None:  # until the test's word: the task must not have waited for the build
            deadline = time.monotonic() + 30
            while not self.wait_for.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        if module_name in self.broken:
            raise RuntimeError("cannot build")
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))  # (listdir's own descriptor among them)
        host = task_vars["ansible_delegated_vars"][self._task.delegate_to] if self._task.delegate_to else task_vars
        line = json.dumps({"module": module_name, "args": module_args, "python": host.get("ansible_python_interpreter"),
                           "sid": os.getsid(0), "pid": os.getpid(), "stdout": os.readlink("/proc/self/fd/1"),
                           "final_q": Display()._final_q is None, "fds": fds})
        with open(self.out, "a") as fh:
            fh.write(line + "\n")
        print("the build's output goes nowhere")  # noqa: T201 - checks that stdout is /dev/null


def _builds(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_payloads_are_built_for_the_delegated_host_without_interpreter_discovery(tmp_path):
    out = tmp_path / "built"
    task_vars = {"ansible_delegated_vars": {"controller": {"ansible_host": "10.1.2.3"}}}
    built = build_payloads(_Builder(out, delegate_to="controller", broken={"a.b.broken"}),
                           ["a.b.one", "a.b.broken", "a.b.two"], task_vars)
    assert built == ["a.b.one", "a.b.two"]  # a build that fails is skipped, the others still happen
    assert [b["module"] for b in _builds(out)] == ["a.b.one", "a.b.two"]
    assert all(b["python"] == "/usr/bin/python3" and b["args"] == {} for b in _builds(out))
    kept = {"ansible_python_interpreter": "/opt/py/bin/python3"}
    out.unlink()
    build_payloads(_Builder(out), ["a.b.one"], kept)
    assert _builds(out)[0]["python"] == "/opt/py/bin/python3"  # the host's own interpreter wins


def test_the_build_runs_in_a_process_of_its_own_and_the_task_does_not_wait(tmp_path):
    out, go = tmp_path / "built", tmp_path / "go"
    pid = build_in_background(_Builder(out, wait_for=go), ["a.b.one", "a.b.two"], {})
    try:
        assert pid > 0 and not out.exists()  # returned while the build waits for the word
    finally:
        go.touch()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_builds(out)) < 2:
        time.sleep(0.02)
    os.waitpid(pid, 0)
    builds = _builds(out)
    assert [b["module"] for b in builds] == ["a.b.one", "a.b.two"]
    assert {b["pid"] for b in builds} == {pid} and builds[0]["sid"] == pid != os.getsid(0)  # its own session
    assert builds[0]["stdout"] == os.devnull and builds[0]["final_q"] is True  # silent, never on the play's queue
    # none of the worker's descriptors (its sentinel, the play's terminal): only 0-2 and the one listing them
    assert len(builds[0]["fds"]) == 4 and builds[0]["fds"][:3] == [0, 1, 2], builds[0]["fds"]


def test_the_action_starts_the_build_and_says_so(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(warm_connection, "build_in_background", lambda action, mods, tv: started.append(mods) or 4242)
    res = _action(SimpleNamespace(transport="local"), args={"modules": ["a.b.c"]}).run(task_vars={})
    assert res["prepared"] == ["a.b.c"] and started == [["a.b.c"]] and res["started"] is False, res
    assert _action(SimpleNamespace(transport="local"), check=True, args={"modules": ["a.b.c"]}).run(
        task_vars={})["prepared"] == [] and started == [["a.b.c"]]  # check mode builds nothing
    monkeypatch.setattr(warm_connection, "build_in_background", lambda action, mods, tv: 0)
    assert _action(SimpleNamespace(transport="local"), args={"modules": ["a.b.c"]}).run(task_vars={})["prepared"] == []
