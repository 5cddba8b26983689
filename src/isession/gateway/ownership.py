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
from typing import Dict, Iterable, Optional, Tuple

LISTEN = "0A"
TABLES = ("net/tcp", "net/tcp6")


def listening_uids(port: int, proc: str = "/proc") -> Tuple[int, ...]:
    """Owner uids of the TCP sockets LISTENing on ``port`` (any local address) in this network namespace."""
    uids = []
    for table in TABLES:
        try:
            with open(f"{proc}/{table}", encoding="ascii") as fh:
                rows: Iterable[str] = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 7 and f[3] == LISTEN and int(f[1].rsplit(":", 1)[1], 16) == port:
                uids.append(int(f[7]))
    return tuple(uids)


def listener_belongs_to_user(port: int, uid: int, proc: str = "/proc") -> bool:
    """True when something listens on ``port`` and every listener is owned by ``uid``.

    No listener is False as well: the gateway then answers without connecting (the app is not up).
    """
    uids = listening_uids(port, proc)
    return bool(uids) and all(u == uid for u in uids)


class OwnershipCache:
    """:func:`listener_belongs_to_user` remembered for ``ttl`` seconds per (port, uid).

    A page load makes dozens of requests to one port; one check a second per port keeps the check off the hot
    path. A positive answer is what is cached; the window in which a port could change hands unnoticed is ``ttl``.
    """

    def __init__(self, ttl: float = 1.0, check=listener_belongs_to_user) -> None:
        self.ttl = ttl
        self.check = check
        self._ok: Dict[Tuple[int, int], float] = {}

    def ok(self, port: int, uid: int, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        key = (port, uid)
        until = self._ok.get(key)
        if until is not None and until > now:
            return True
        if self.check(port, uid):
            self._ok[key] = now + self.ttl
            return True
        self._ok.pop(key, None)
        return False

    def forget(self, port: int) -> None:
        for key in [k for k in self._ok if k[0] == port]:
            del self._ok[key]
