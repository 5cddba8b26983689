# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Who listens on a loopback TCP port: the check that keeps a session's traffic from another user.

Private to the hpc.interactive collection. Standard library only and self-contained, so that it runs three
ways: imported by ``session_ready`` (before ``Running``), by the watcher (every tick) and by the gateway (before it
forwards a connection), and run by a batch job as a plain script before it opens its tunnel::

    python3 -I _listeners.py wait --port N [--timeout S] [--pid P]   # exit 0 own, 3 another user's, 4 none

A port reservation (``_ports.py``) keeps cooperating callers apart; it cannot stop another user from binding a port
that is free for a moment - before a session's tunnel or server comes up, or after its tunnel dropped - and then
receiving requests that carry the session's secret. :func:`check_port_owner` sees that: the kernel's uid column of
``/proc/net/tcp`` names the owner of every listening socket.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Listener:
    """One LISTEN socket of ``/proc/net/tcp`` or ``tcp6``."""

    address: str
    port: int
    uid: int
    inode: int


@dataclass(frozen=True)
class PortOwner:
    """Who a connection to a loopback port reaches: see :func:`check_port_owner`."""

    port: int
    state: str  # "own" | "foreign" | "none" | "unknown"
    uids: Tuple[int, ...] = ()  # owners of the listeners the connection can reach
    message: str = ""  # "" when state is "own"

    @property
    def ok(self) -> bool:
        return self.state == "own"


# A connection to 127.0.0.1 reaches a socket bound to 127.0.0.1 or 0.0.0.0 and, only when there is none, an IPv6
# one bound to :: (dual stack) or ::ffff:127.0.0.1; a connection to ::1 reaches ::1, else ::.
REACHES = {
    "127.0.0.1": (("127.0.0.1", "0.0.0.0"), ("::ffff:127.0.0.1", "::")),  # noqa: S104 - addresses compared, not bound
    "::1": (("::1",), ("::",)),
}


def user_label(uid: int) -> str:
    try:
        return "uid %d (%s)" % (uid, pwd.getpwuid(uid).pw_name)
    except KeyError:
        return "uid %d" % uid


def parse_tcp_table(text: str, ipv6: bool, byteorder: str = sys.byteorder) -> List[Listener]:
    """The LISTEN sockets (state ``0A``) of one ``/proc/net/tcp`` table (``ipv6``: ``tcp6``); pure.

    The kernel prints an address as 32-bit words in its own byte order, the port in hex and the socket's owner in
    the ``uid`` column.
    """
    out = []
    size = 16 if ipv6 else 4
    for row in text.splitlines()[1:]:
        cols = row.split()
        if len(cols) < 10 or cols[3] != "0A":
            continue
        addr_hex, port_hex = cols[1].split(":", 1) if ":" in cols[1] else (cols[1], "")
        try:
            raw, port, uid, inode = bytes.fromhex(addr_hex), int(port_hex, 16), int(cols[7]), int(cols[9])
        except ValueError:
            continue
        if len(raw) != size:
            continue
        if byteorder == "little":
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
        address = socket.inet_ntop(socket.AF_INET6 if ipv6 else socket.AF_INET, raw)
        out.append(Listener(address=address, port=port, uid=uid, inode=inode))
    return out


def reachable_listeners(listeners: Sequence[Listener], port: int, address: str = "127.0.0.1") -> List[Listener]:
    """The listeners a connection to ``address:port`` can reach (``address`` 127.0.0.1 or ::1); pure.

    An IPv6 socket bound to ``::`` with IPV6_V6ONLY cannot be told from a dual-stack one here: it counts when no IPv4
    socket holds the port (when one does, a dual-stack ``::`` socket could not have been bound).
    """
    if address not in REACHES:
        raise ValueError("address must be one of %s, got %r" % (", ".join(REACHES), address))
    first, then = REACHES[address]
    on_port = [lst for lst in listeners if lst.port == port]
    return [lst for lst in on_port if lst.address in first] or [lst for lst in on_port if lst.address in then]


def judge_port_owner(listeners: Sequence[Listener], port: int, uid: int, address: str = "127.0.0.1",
                     label: Callable[[int], str] = user_label) -> PortOwner:
    """:func:`check_port_owner` on listeners already read; pure but for ``label`` (uid -> words)."""
    reach = reachable_listeners(listeners, port, address)
    if not reach:
        return PortOwner(port, "none", (), "nothing listens on %s port %d" % (address, port))
    uids = tuple(sorted({lst.uid for lst in reach}))
    others = [u for u in uids if u != uid]
    if others:
        return PortOwner(port, "foreign", uids, "%s port %d is held by another user (%s), not by %s" % (
            address, port, ", ".join(label(u) for u in others), label(uid)))
    return PortOwner(port, "own", uids, "")


def read_listeners(proc: str = "/proc") -> List[Listener]:
    """The LISTEN TCP sockets of this process's network namespace; OSError when ``/proc/net/tcp`` is unreadable."""
    with open("%s/net/tcp" % proc) as fh:
        found = parse_tcp_table(fh.read(), ipv6=False)
    try:
        with open("%s/net/tcp6" % proc) as fh:
            found += parse_tcp_table(fh.read(), ipv6=True)
    except FileNotFoundError:
        pass  # no IPv6 on this host
    return found


def check_port_owner(port: int, uid: int, address: str = "127.0.0.1", proc: str = "/proc") -> PortOwner:
    """Whether a connection to ``address:port`` on this host reaches a listener of user ``uid``, and only of it.

    Call it before anything that trusts the port: before marking a session ``Running``, on every watcher tick, and
    before handing a connection (which carries the session's secret) to the port. It reads the LISTEN sockets of
    this process's network namespace from ``/proc/net/tcp`` and ``tcp6`` (the kernel's uid column is the socket's
    owner), keeps those a connection to ``address`` would reach (see :func:`reachable_listeners`), and returns
    ``state``:

    * ``"own"`` (``ok`` is true): there is at least one, and every one belongs to ``uid``;
    * ``"foreign"``: one belongs to another user (``uids`` names them): do not send it anything;
    * ``"none"``: nothing listens (a tunnel that dropped, a server not up yet);
    * ``"unknown"``: ``/proc`` could not be read.

    ``message`` says it in words ("" for ``"own"``). One read of the two tables: about a millisecond with a few
    hundred sockets.
    """
    try:
        listeners = read_listeners(proc)
    except OSError as exc:
        return PortOwner(port, "unknown", (), "cannot tell who listens on port %d: %s" % (port, exc))
    return judge_port_owner(listeners, port, uid, address)


def wait_port_owner(port: int, uid: int, timeout: float, *, interval: float = 0.05,
                    still: Optional[Callable[[], bool]] = None, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep,
                    check: Callable[[int, int], PortOwner] = check_port_owner) -> PortOwner:
    """Poll ``check`` until ``uid`` listens on ``port`` or another user does, ``still()`` turns false (the server
    died) or ``timeout`` passes; returns the last answer."""
    deadline = clock() + timeout
    while True:
        got = check(port, uid)
        if got.state in ("own", "foreign") or clock() >= deadline or (still is not None and not still()):
            return got
        sleep(interval)


def _pid_alive(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` runs: it exists and is no zombie (an exited server its parent has not reaped yet)."""
    try:
        with open("%s/%d/stat" % (proc, pid)) as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="_listeners.py", description="Who listens on a loopback TCP port.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    wait_p = sub.add_parser("wait", help="wait until this user listens on 127.0.0.1:PORT; exit 3 if another does, "
                                         "4 if nobody does in time")
    wait_p.add_argument("--port", type=int, required=True)
    wait_p.add_argument("--timeout", type=float, default=0.0)
    wait_p.add_argument("--pid", type=int, help="stop waiting when this process is gone")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be 1..65535")
    pid = args.pid
    still = None if pid is None else (lambda: _pid_alive(pid))
    got = wait_port_owner(args.port, os.geteuid(), args.timeout, still=still)
    sys.stdout.write(json.dumps({"state": got.state, "uids": list(got.uids), "message": got.message}) + "\n")
    return 0 if got.ok else (3 if got.state == "foreign" else 4)


if __name__ == "__main__":
    raise SystemExit(main())
