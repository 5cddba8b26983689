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
"""

from __future__ import annotations

import os
import subprocess
import typing as t

from ansible.plugins.action import ActionBase

SSH_TRANSPORTS = frozenset({"ssh", "ansible.builtin.ssh"})


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


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset()

    def run(self, tmp: t.Any = None, task_vars: t.Optional[dict[str, t.Any]] = None) -> dict[str, t.Any]:
        result = super().run(tmp, task_vars)
        result.update(changed=False, started=False)
        if self._task.args:
            return dict(result, failed=True, msg=f"warm_connection takes no options, got {sorted(self._task.args)}")
        if self._task.check_mode:
            return dict(result, msg="check mode: no connection opened")
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
