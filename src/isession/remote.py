"""Ask a resource's scheduler about many jobs, cheaply, once a second: the workspace end of the watcher's server.

The server itself, and why it exists, is the collection's ``plugins/module_utils/_remote_server.py``: one
``python3 -c BOOT`` per resource, over one ssh session (``ControlMaster``/``ControlPersist``, so a reconnect is
cheap), fed the collection's own module_utils on standard input and answering one JSON line per request line
(ops ``query``, ``tail`` and ``teardown``). This file starts it, speaks to it, and reads how to reach a resource
from the inventory.
"""
from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ansible_collections.hpc.interactive.plugins.module_utils import _remote_server


def payload(mu_dir: Path) -> bytes:
    """What the server's BOOT reads: the shipped module_utils of ``mu_dir`` and the server itself."""
    return _remote_server.payload(str(mu_dir))


def control_dir(base: str = "/tmp") -> Optional[Path]:  # noqa: S108 - a private 0700 dir, checked below
    """A short private directory for ssh control sockets (a socket path must stay under ~104 bytes).

    None when it cannot be made safely (exists but is not ours or not 0700): then no master is used.
    """
    path = Path(base) / f"isession-cm-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or (st.st_mode & 0o077) or not path.is_dir() or path.is_symlink():
        return None
    return path


def ssh_argv(conn: Mapping[str, Any], cm_dir: Optional[Path], command: List[str]) -> List[str]:
    """``ssh`` to the resource with a reused master connection; ``conn`` = host, user, port, key."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=2"]
    if cm_dir is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={cm_dir}/cm-%C", "-o", "ControlPersist=120"]
    else:
        argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    if conn.get("port"):
        argv += ["-p", str(int(conn["port"]))]
    if conn.get("key"):
        argv += ["-i", str(conn["key"])]
    if conn.get("user"):
        argv += ["-l", str(conn["user"])]
    # ssh hands the remote login shell ONE string: quote every argument so none is re-split or expanded
    return [*argv, "--", str(conn["host"]), " ".join(shlex.quote(c) for c in command)]


class RemoteError(RuntimeError):
    """The connection broke or an answer did not come in time (the resource counts as unreachable)."""


class RemoteServer:
    """One long-lived ``python3`` on a resource, spoken to over one ssh session."""

    def __init__(self, conn: Mapping[str, Any], mu_dir: Path, local: bool = False) -> None:
        self.conn = dict(conn)
        self.local = local  # run the server here instead of over ssh (tests, the workspace itself)
        self.mu_dir = mu_dir
        self.proc: Optional[subprocess.Popen] = None
        self._buf = b""
        # one request/answer at a time: the watcher's per-scheduler threads share this connection,
        # and interleaved requests would hand one thread the other's answer
        self._lock = threading.Lock()

    def start(self, timeout: float = 30.0) -> None:
        python = str(self.conn.get("python") or "/usr/bin/python3")
        command = [python, "-c", _remote_server.BOOT]
        argv = command if self.local else ssh_argv(self.conn, control_dir(), command)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "LC_ALL": "C"})
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._buf = b""
        # the payload (~190 KB) is more than a pipe holds: it is written as the far side reads it, never past timeout
        self._send(payload(self.mu_dir), time.monotonic() + timeout)

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            self.proc.wait()
            self.proc = None

    def ask(self, request: Mapping[str, Any], timeout: float) -> Dict[str, Any]:
        """One request, one answer within ``timeout`` s; on any trouble the session is closed."""
        with self._lock:
            return self._ask(request, timeout)

    def _ask(self, request: Mapping[str, Any], timeout: float) -> Dict[str, Any]:
        try:
            deadline = time.monotonic() + timeout
            if self.proc is None or self.proc.poll() is not None:
                self.close()
                self.start(timeout)
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            self._send(json.dumps(request).encode() + b"\n", deadline)
            return json.loads(self._readline(max(0.0, deadline - time.monotonic())))
        except (OSError, ValueError, RemoteError) as exc:
            self.close()
            raise RemoteError(str(exc) or type(exc).__name__) from None

    def _send(self, data: bytes, deadline: float) -> None:
        """Write all of ``data`` to the server's stdin (non-blocking) before ``deadline``, else RemoteError.

        An ssh that hangs before it reads its stdin (a connection that never completes) must not hang the watcher:
        a blocking write of more than a pipe holds would wait for it forever.
        """
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"{self.conn.get('host')} did not take the request in time")
            _r, ready, _x = select.select([], [fd], [], left)
            if ready:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue

    def _readline(self, timeout: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"no answer from {self.conn.get('host')} within {timeout:.0f} s")
            ready, _ignored, _ignored = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RemoteError(f"connection to {self.conn.get('host')} closed")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def inventory_conn(inventory: Optional[Path], resource: str) -> Dict[str, Any]:
    """Connection facts of ``resource`` from an Ansible inventory (ansible_host/user/port/key/python)."""
    if inventory is None:
        raise LookupError(f"resource {resource!r}: no inventory (use --inventory or $ISESSION_INVENTORY)")
    from ansible.inventory.manager import InventoryManager  # noqa: PLC0415 - only the watcher/doctor need it
    from ansible.parsing.dataloader import DataLoader  # noqa: PLC0415
    from ansible.vars.manager import VariableManager  # noqa: PLC0415

    loader = DataLoader()
    inv = InventoryManager(loader=loader, sources=[str(inventory)])
    host = inv.get_host(resource)
    if host is None:
        raise LookupError(f"resource {resource!r} is not a host in {inventory}")
    hv = VariableManager(loader=loader, inventory=inv).get_vars(host=host, include_hostvars=False)

    def plain(key: str) -> Optional[str]:
        value = hv.get(key)
        if value is None or "{{" in str(value):
            return None
        return str(value)

    path, env = hv.get("isession_scheduler_path") or [], hv.get("isession_scheduler_env") or {}
    if "{{" in json.dumps([path, env], default=str):
        path, env = [], {}  # templated: only a play can tell; the watcher then finds the commands on PATH or not
    return {"host": plain("ansible_host") or resource, "user": plain("ansible_user"),
            "scheduler_path": [str(d) for d in path] if isinstance(path, list) else [],
            "scheduler_env": {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
            "port": plain("ansible_port"), "key": plain("ansible_ssh_private_key_file"),
            "python": plain("ansible_python_interpreter") or "/usr/bin/python3",
            "scheduler": plain("isession_scheduler"), "remote_root": plain("isession_remote_root")}
