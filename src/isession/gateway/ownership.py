"""Is the listener on a session's workspace port the session user's own?

A session's PORT is a loopback port of the workspace. When the session ends (or before its tunnel is up) any other
local user may bind that port, and a proxy that forwarded blindly would hand the logged-in user's requests - and
the app secret the gateway adds to them - to that user's process. So before the gateway forwards a connection it
checks that every socket LISTENing on the port belongs to the session's user.

:func:`listener_belongs_to_user` is the one call site; the collection's own check (the one ``session_ready`` and the
watcher use) will take its place when it lands in ``plugins/module_utils``. Until then it reads the kernel's socket
tables: ``/proc/net/tcp`` and ``tcp6`` give each socket's owner uid (the uid that created it), so the check is one
read of two small files, with no walk over ``/proc/<pid>/fd``.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional, Tuple

LISTEN = "0A"
TABLES = ("net/tcp", "net/tcp6")


def listeners(proc: str = "/proc") -> Dict[int, Tuple[int, ...]]:
    """``{port: owner uids}`` of every TCP socket LISTENing (any local address) in this network namespace."""
    out: Dict[int, List[int]] = {}
    for table in TABLES:
        try:
            with open(f"{proc}/{table}", encoding="ascii") as fh:
                rows: Iterable[str] = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split(None, 8)
            if len(f) > 7 and f[3] == LISTEN:
                out.setdefault(int(f[1].rsplit(":", 1)[1], 16), []).append(int(f[7]))
    return {port: tuple(uids) for port, uids in out.items()}


def listening_uids(port: int, proc: str = "/proc") -> Tuple[int, ...]:
    """Owner uids of the TCP sockets LISTENing on ``port`` (any local address) in this network namespace."""
    return listeners(proc).get(port, ())


def listener_belongs_to_user(port: int, uid: int, proc: str = "/proc") -> bool:
    """True when something listens on ``port`` and every listener is owned by ``uid``.

    No listener is False as well: the gateway then answers without connecting (the app is not up).
    """
    return owned(listening_uids(port, proc), uid)


def owned(uids: Tuple[int, ...], uid: int) -> bool:
    return bool(uids) and all(u == uid for u in uids)


class OwnershipCache:
    """The listening sockets' owners, read once per ``ttl`` seconds for every port at once.

    A page load makes dozens of requests to one port and a busy gateway serves many ports; one read of the socket
    tables a second keeps the check off the hot path. A port found owned is trusted for at most ``ttl``; a port
    not owned (or not listening) is looked up again at once when the last read is older than ``recheck``, so a
    listener that just came up is seen.
    """

    def __init__(self, ttl: float = 1.0, recheck: float = 0.1, read=listeners) -> None:
        self.ttl, self.recheck, self.read = ttl, recheck, read
        self._table: Dict[int, Tuple[int, ...]] = {}
        self._at = float("-inf")

    def ok(self, port: int, uid: int, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        age = now - self._at
        if age > self.ttl or (age > self.recheck and not owned(self._table.get(port, ()), uid)):
            self._table, self._at = self.read(), now
        return owned(self._table.get(port, ()), uid)

    def forget(self, port: int) -> None:
        self._at = float("-inf")
