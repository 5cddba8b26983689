"""Is the listener on a session's workspace port the session user's own? Asked before every forwarded connection.

A session's PORT is a loopback port of the workspace. When the session ends (or before its tunnel is up) any other
local user may bind that port, and a proxy that forwarded blindly would hand the logged-in user's requests - and
the app secret the gateway adds to them - to that user's process. The collection's own check
(``plugins/module_utils/_listeners.py``, the one ``session_ready`` and the watcher use) answers it from the
kernel's socket tables; the gateway reads those tables at most once a second for all ports together.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

from ansible_collections.hpc.interactive.plugins.module_utils import _listeners


def listener_belongs_to_user(port: int, uid: int, proc: str = "/proc") -> bool:
    """True when a connection to 127.0.0.1:``port`` reaches listeners of ``uid`` only (and at least one)."""
    return _listeners.check_port_owner(port, uid, proc=proc).ok


class OwnershipCache:
    """The listening sockets, read once per ``ttl`` seconds for every port at once, judged per port.

    A page load makes dozens of requests to one port and a busy gateway serves many ports; one read of the socket
    tables a second keeps the check off the hot path. A port found owned is trusted for at most ``ttl``; a port
    not owned (or not listening) is looked up again at once when the last read is older than ``recheck``, so a
    listener that just came up is seen. A table that cannot be read refuses every port.
    """

    def __init__(self, ttl: float = 1.0, recheck: float = 0.1, read: Optional[Callable[[], List]] = None) -> None:
        self.ttl, self.recheck = ttl, recheck
        self.read = read or _listeners.read_listeners
        self._by_port: Dict[int, List] = {}
        self._at = float("-inf")

    def _refresh(self, now: float) -> None:
        by_port: Dict[int, List] = {}
        try:
            for listener in self.read():
                by_port.setdefault(listener.port, []).append(listener)
        except OSError:
            by_port = {}
        self._by_port, self._at = by_port, now

    def _judge(self, port: int, uid: int) -> bool:
        listeners = self._by_port.get(port)
        return bool(listeners) and _listeners.judge_port_owner(listeners, port, uid).ok

    def ok(self, port: int, uid: int, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        age = now - self._at
        if age > self.ttl or (age > self.recheck and not self._judge(port, uid)):
            self._refresh(now)
        return self._judge(port, uid)

    def forget(self, port: int) -> None:
        self._at = float("-inf")
