# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Open the task host's SSH master connection in the background (see the warm_connection module's documentation).

A start's first task on the cluster (the submit) would otherwise wait for a whole SSH handshake (key exchange and
authentication, about 0.25 s on an idle LAN). The master that ansible-core's ssh connection keeps open between tasks
(``ControlMaster=auto`` with ``ControlPersist``) can be opened earlier, while the play still does its local steps.
The command is the one the task's own ssh connection builds (``_build_command``: the same options, user, port, key
and ``ControlPath``), so the later tasks find exactly this master. Best effort: anything that makes the command
unsafe or pointless to run detached (a password or a key to hand over, no ``ControlPersist``, another connection
plugin) skips it, and a warm-up that fails costs nothing, since the next task connects by itself.

With ``modules``, it also builds those modules' payloads ahead, in a process of its own: ansible-core builds a
module's AnsiballZ payload (its module_utils found, zipped and encoded) the first time a run ships it to a host, about
0.15-0.2 s for the submit, and keeps it in the run's cache (``ansiballz_cache`` in its local temporary directory) for
every later task. The background process fills that cache with ansible-core's own build (``_configure_module``, the
call a task makes), so the submit finds its payload built. Best effort too: a build that fails leaves the cache as it
was, and the task that ships the module builds it as it always does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import typing as t

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

SSH_TRANSPORTS = frozenset({"ssh", "ansible.builtin.ssh"})
FQCN = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+\Z")
BUILD_LIMIT = 60  # seconds the payload builder may take before its alarm ends it: it must never linger


def skip_reason(connection: t.Any) -> str:
    """Why ``connection`` gets no warm-up, or "" when it can have one."""
    if getattr(connection, "transport", None) not in SSH_TRANSPORTS:
        return f"the connection is {getattr(connection, 'transport', None)!r}, not ssh"
    try:
        if connection.get_option("password") or connection._play_context.password:
            return "the connection uses a password, which only a task can hand over"
        # ansible-core 2.19: key content, added to an ssh-agent by the task itself
        if "private_key" in connection._options and connection.get_option("private_key"):
            return "the connection hands a private key to an ssh-agent"
    except (AttributeError, KeyError):
        return "the ssh connection's options cannot be read"
    return ""


def warm_command(connection: t.Any, remote_command: str = "true") -> list[bytes]:
    """The argv that runs ``remote_command`` over ``connection`` and opens its master; [] when it would open none."""
    host = connection.get_option("host") or connection._play_context.remote_addr
    argv = connection._build_command(connection.get_option("ssh_executable"), "ssh", host, remote_command)
    if not any(b"ControlPersist" in a for a in argv) or any(b"ControlPath=none" in a for a in argv):
        return []
    return argv


def check_modules(value: t.Any) -> list[str]:
    """The ``modules`` option as a list of module names; ValueError naming the option for anything else."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError("modules must be a list of fully qualified module names")
    bad = [m for m in value if not isinstance(m, str) or not FQCN.match(m)]
    if bad:
        raise ValueError(f"modules must be fully qualified module names (namespace.collection.module), got {bad!r}")
    return list(dict.fromkeys(value))


def build_payloads(action: t.Any, modules: t.Sequence[str], task_vars: dict[str, t.Any]) -> list[str]:
    """Build each module's payload for the task's host with ansible-core's own call; the names built.

    The payload goes to the run's cache, where the task that ships the module finds it. No interpreter discovery: that
    would run a command on the host, and the cache is filled before the interpreter is looked at, so the build names
    one (the variable is set only in this copy of the host's variables).
    """
    host_vars = task_vars
    if action._task.delegate_to:
        host_vars = task_vars.setdefault("ansible_delegated_vars", {}).setdefault(action._task.delegate_to, {})
    host_vars.setdefault("ansible_python_interpreter", "/usr/bin/python3")
    built = []
    for name in modules:
        try:
            action._configure_module(module_name=name, module_args={}, task_vars=task_vars)
        except Exception:  # noqa: BLE001, S112 - best effort: the shipping task builds it as usual
            continue
        built.append(name)
    return built


def build_in_background(action: t.Any, modules: t.Sequence[str], task_vars: dict[str, t.Any]) -> int:
    """Fork a process that runs :func:`build_payloads` and exits; its pid, or 0 when none could be forked.

    The process never talks to the play: its output goes to /dev/null and its display no longer goes through the
    worker's queue to the play (a message cut off by its exit could leave the queue's lock taken). It keeps none of the
    worker's other descriptors either, so the worker's exit is seen when the worker exits (its multiprocessing
    sentinel, the play's terminal), not when the build ends. It is not waited for: the worker returns at once and the
    process, in a session of its own, ends by itself (``BUILD_LIMIT`` at most).
    """
    try:
        pid = os.fork()
    except OSError:
        return 0
    if pid:
        return pid
    code = 1
    try:  # pragma: no cover - runs in the forked process, which ends with os._exit (its coverage is never written)
        os.setsid()
        signal.alarm(BUILD_LIMIT)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        Display()._final_q = None
        code = 0 if len(build_payloads(action, modules, task_vars)) == len(modules) else 1
    finally:
        os._exit(code)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset({"modules"})

    def run(self, tmp: t.Any = None, task_vars: t.Optional[dict[str, t.Any]] = None) -> dict[str, t.Any]:
        result = super().run(tmp, task_vars)  # refuses an unknown option by name (_VALID_ARGS)
        result.update(changed=False, started=False, prepared=[])
        try:
            modules = check_modules(self._task.args.get("modules"))
        except ValueError as exc:
            return dict(result, failed=True, msg=str(exc))
        if self._task.check_mode:
            return dict(result, msg="check mode: no connection opened")
        if modules and build_in_background(self, modules, dict(task_vars or {})):
            result["prepared"] = modules
        why = skip_reason(self._connection)
        if why:
            return dict(result, msg=f"nothing to warm: {why}")
        try:
            argv = warm_command(self._connection)
        except Exception as exc:  # noqa: BLE001 - best effort: the next task connects by itself
            return dict(result, msg=f"nothing to warm: the ssh command could not be built ({exc})")
        if not argv:
            return dict(result, msg="nothing to warm: the ssh connection keeps no master (no ControlPersist)")
        # Detached (its own session, no terminal, stdin from /dev/null): the worker that runs this task exits before
        # the handshake ends, and a BatchMode-less ssh must never wait for a prompt nobody answers.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: S603 - argv of ssh.py
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, env=dict(os.environ))
        return dict(result, started=True, msg="opening the ssh master connection in the background")
