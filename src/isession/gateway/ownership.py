"""Is the listener on a session's workspace port the session user's own? Asked before every forwarded connection.

A session's PORT is a loopback port of the workspace. When the session ends (or before its tunnel is up) any other
local user may bind that port, and a proxy that forwarded blindly would hand the logged-in user's requests - and
the app secret the gateway adds to them - to that user's process. The collection's own check
(``plugins/module_utils/_listeners.py``, the one ``session_ready`` and the watcher use) answers it from the
kernel's socket tables (here through netlink's socket diagnostics when available: the kernel then walks only its
listening sockets); the gateway reads them at most once a second for all ports together.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils import _listeners


def listener_belongs_to_user(port: int, uid: int, proc: str = "/proc") -> bool:
    """True when a connection to 127.0.0.1:``port`` reaches listeners of ``uid`` only (and at least one)."""
    return _listeners.check_port_owner(port, uid, proc=proc).ok


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR, _NLMSG_DONE = 4, 20, 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, an empty sockid
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16s12xIIIII")  # inet_diag_msg up to uid and inode


def dump_listening() -> List[_listeners.Listener]:
    """The LISTEN TCP sockets of this network namespace from the kernel's socket diagnostics (netlink, as ``ss``).

    The same facts as ``/proc/net/tcp`` and ``tcp6`` (address, port, owner uid, inode), but the kernel walks only
    its table of listening sockets: a fraction of a millisecond however many connections the host holds, where
    ``/proc/net/tcp`` walks every connection and took 9 ms under the benchmark's load. OSError when netlink
    is not there (then :func:`read_listening`).
    """
    found: List[_listeners.Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
            sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP,
                                     seq, 0) + req)
            done = False
            while not done:
                data = sock.recv(65536)
                if not data:
                    raise OSError("netlink: empty answer")
                at = 0
                while at + _NLMSGHDR.size <= len(data):
                    length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, at)
                    if length < _NLMSGHDR.size:
                        raise OSError("netlink: malformed answer")
                    if got_seq == seq:
                        if kind == _NLMSG_DONE:
                            done = True
                        elif kind == _NLMSG_ERROR:
                            raise OSError("netlink: sock_diag refused the dump")
                        elif kind == _SOCK_DIAG_BY_FAMILY:
                            msg = _DIAG_MSG.unpack_from(data, at + _NLMSGHDR.size)
                            fam, state, sport, src, uid, inode = msg[0], msg[1], msg[4], msg[6], msg[11], msg[12]
                            if state == _TCP_LISTEN:
                                raw = src[:4] if fam == socket.AF_INET else src
                                found.append(_listeners.Listener(socket.inet_ntop(fam, raw),
                                                                 int.from_bytes(sport, "big"), uid, inode))
                    at += (length + 3) & ~3
    return found


def read_listening(proc: str = "/proc") -> List[_listeners.Listener]:
    """:func:`_listeners.read_listeners`, parsing only the rows that can be LISTEN sockets.

    The tables list every TCP socket of the namespace, and a busy gateway host has thousands of connections (the
    gateway's own, TIME_WAIT) for a few dozen listeners. A row whose state column is ``0A`` (LISTEN) is the only
    one holding the two-character field `` 0A ``; the collection's parser then judges each kept row as always
    (a row kept by mistake is still dropped there, a listener is never dropped here).
    """
    found: List[_listeners.Listener] = []
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc}/net/{name}") as fh:
                head = fh.readline()
                rows = [row for row in fh if " 0A " in row]
        except FileNotFoundError:
            if ipv6:
                continue  # no IPv6 on this host
            raise
        found += _listeners.parse_tcp_table(head + "".join(rows), ipv6=ipv6)
    return found


def listening() -> List[_listeners.Listener]:
    """The LISTEN sockets: netlink when the kernel answers it, else the ``/proc`` tables."""
    try:
        return dump_listening()
    except OSError:
        return read_listening()


class OwnershipCache:
    """The listening sockets, read once per ``ttl`` seconds for every port at once, judged per port.

    A page load makes dozens of requests to one port and a busy gateway serves many ports; one read of the socket
    tables a second keeps the check off the hot path. A port found owned is trusted for at most ``ttl``; a port
    not owned (or not listening) is looked up again at once when the last read is older than ``recheck``, so a
    listener that just came up is seen. A table that cannot be read refuses every port.
    """

    def __init__(self, ttl: float = 1.0, recheck: float = 0.1, read: Optional[Callable[[], List]] = None) -> None:
        self.ttl, self.recheck = ttl, recheck
        self.read = read or listening
        self._by_port: Dict[int, List] = {}
        self._verdicts: Dict[Tuple[int, int], bool] = {}  # (port, uid) -> judged on the current read
        self._at = float("-inf")

    def _refresh(self, now: float) -> None:
        by_port: Dict[int, List] = {}
        try:
            for listener in self.read():
                by_port.setdefault(listener.port, []).append(listener)
        except OSError:
            by_port = {}
        self._by_port, self._verdicts, self._at = by_port, {}, now

    def _judge(self, port: int, uid: int) -> bool:
        verdict = self._verdicts.get((port, uid))
        if verdict is None:
            listeners = self._by_port.get(port)
            verdict = bool(listeners) and _listeners.judge_port_owner(listeners, port, uid).ok
            self._verdicts[(port, uid)] = verdict
        return verdict

    def ok(self, port: int, uid: int, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        age = now - self._at
        if age > self.ttl or (age > self.recheck and not self._judge(port, uid)):
            self._refresh(now)
        return self._judge(port, uid)

    def forget(self, port: int) -> None:
        self._at = float("-inf")
