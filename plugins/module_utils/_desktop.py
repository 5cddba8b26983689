# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""X displays for desktop sessions: reserved race-free, stale X server files reclaimed, the VNC password.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only. The desktop roles' agent fragment runs it as a plain script beside ``_ports.py`` and ``_proc.py``
(``python3 _desktop.py reserve --owner ID --pid PID``); the gateway and the filter plugin import it.

Displays are reserved with the port reservation scheme of ``_ports.py``, not a second one: the same
``ReservationDir`` (private claim files published with ``link(2)``, a lease, a watched pid, invalid claims
removed by their owner, every claim of a number looked at again after creating one), in a directory of its own,
``/tmp/isession-displays`` (root-owned, mode 1777, made by the vnc role's install entry point), where a claim
file ``port-<N>`` stands for display N. Of any number of concurrent callers, of any user, exactly one gets a
display; the only thing that differs from ports is the test of whether a number is free:

A display N is usable when, besides having no valid reservation, no X server owns it:

* ``/tmp/.X<N>-lock`` (the X server's own lock, holding its pid) is absent, or names a dead process (or a zombie);
* ``/tmp/.X11-unix/X<N>`` is absent, or nothing accepts a connection on it;
* nothing accepts a connection on the abstract socket ``@/tmp/.X11-unix/X<N>`` (per network namespace);
* TCP port 6000+N can be bound (an X server listening on TCP).

Files of a dead X server (lock, socket) are removed only after the display is reserved, re-checked and
compared by inode before the unlink, and only when they are the caller's (``/tmp`` is sticky; root
removes any). A live server's files are never touched. ``release`` removes a session's display records
and, when the session's X server is gone, its leftover files.

The VNC password: VNC authentication takes at most 8 characters, so the session's password is derived
from the session secret (``vnc_password``): the first 8 characters of the URL-safe base64 of
SHA-256(``"hpc.interactive vnc password\\n"`` + secret), 48 bits. Knowing it reveals nothing of the secret.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import socket
import stat
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__:
    from ansible_collections.hpc.interactive.plugins.module_utils import _ports, _proc
else:  # run as a plain script: its own siblings _ports.py and _proc.py, never another copy an installed collection has
    import _ports  # type: ignore[no-redef]
    import _proc  # type: ignore[no-redef]

DISPLAYS_DIR = "/tmp/isession-displays"  # noqa: S108 - shared, sticky, root-owned, host-local, like the ports'
DISPLAY_RANGE = (1, 99)
MAX_DISPLAY = 999
X_TMP = "/tmp"  # noqa: S108 - where X servers keep their lock files and sockets
PASSWORD_CONTEXT = b"hpc.interactive vnc password\n"
# what ends a session's processes: TERM (the agent, scancel), INT, HUP, and USR2 - Grid Engine's warning before its
# kill (jobs submitted with -notify), which reaches every process of the job
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
VNC_PASSWORD_LEN = 8
PASSWORD_FAILED = 3  # exit status of `reserve --password-from` when the display was reserved but no password written
KILL_WAIT = 2.0  # s: how long stop_marked waits for what it KILLed to be gone


class DisplayError(_ports.PortError):
    """A refused input or an impossible request; ``field`` names the option at fault."""


# ---------------------------------------------------------------- the VNC password (pure)


def vnc_password(secret: str) -> str:
    """The session's VNC password (8 characters of [A-Za-z0-9_-]) derived from its secret."""
    secret = secret.strip()
    if not secret:
        raise DisplayError("secret", "the session secret is empty")
    digest = hashlib.sha256(PASSWORD_CONTEXT + secret.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:VNC_PASSWORD_LEN]


# ---------------------------------------------------------------- input parsing (pure)


def parse_display_range(value: Any, field: str = "display_range") -> Tuple[int, int]:
    """``"A-B"``, ``"A"``, ``[A, B]`` -> ``(A, B)`` within 1..MAX_DISPLAY."""
    pair = _ports.range_ends(value)
    if len(pair) != 2:
        raise DisplayError(field, f"expected START-END, got {value!r}")
    nums = []
    for item in pair:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.isdigit())):
            raise DisplayError(field, f"not a display number: {item!r}")
        nums.append(int(item))
    start, end = nums
    if not 1 <= start <= end <= MAX_DISPLAY:
        raise DisplayError(field, f"displays are 1-{MAX_DISPLAY}, start <= end; got {start}-{end}")
    return start, end


# ---------------------------------------------------------------- the X server's own files


def lock_path(display: int, xtmp: str = X_TMP) -> str:
    return os.path.join(xtmp, f".X{display}-lock")


def socket_path(display: int, xtmp: str = X_TMP) -> str:
    return os.path.join(xtmp, ".X11-unix", f"X{display}")


def lock_pid(display: int, xtmp: str = X_TMP) -> Optional[int]:
    """The pid in the display's lock file; None if there is none; 0 if it is unreadable or garbled."""
    try:
        fd = os.open(lock_path(display, xtmp), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else 0


def _accepts(family: int, address: Any) -> bool:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(0.5)
    try:
        sock.connect(address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def socket_live(display: int, xtmp: str = X_TMP) -> bool:
    """True if an X server accepts connections for ``display`` (its file or abstract unix socket)."""
    path = socket_path(display, xtmp)
    if os.path.exists(path) and _accepts(socket.AF_UNIX, path):
        return True
    return sys.platform.startswith("linux") and _accepts(socket.AF_UNIX, "\0" + path)


def x_tcp_free(display: int) -> bool:
    """True if X's TCP port 6000+N can be bound (no X server listens on TCP for it)."""
    port = 6000 + display
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("0.0.0.0", port))  # noqa: S104 - a bind test, closed at once
        return True
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
    finally:
        sock.close()


def _mine(path: str, uid: int) -> bool:
    try:
        return uid == 0 or os.lstat(path).st_uid == uid
    except FileNotFoundError:
        return True


def display_state(display: int, uid: Optional[int] = None, xtmp: str = X_TMP) -> str:
    """``free``, ``stale`` (a dead server's files that ``uid`` may remove) or ``busy``."""
    uid = os.geteuid() if uid is None else uid
    pid = lock_pid(display, xtmp)
    stale = False
    if pid is not None:
        if pid == 0 or _proc.alive(pid):  # a zombie server (killed, not reaped yet) serves nothing: dead
            return "busy"  # a live server (or a lock we cannot judge): never touched
        if not _mine(lock_path(display, xtmp), uid):
            return "busy"
        stale = True
    if socket_live(display, xtmp) or not x_tcp_free(display):
        return "busy"
    sock = socket_path(display, xtmp)
    if os.path.lexists(sock):
        if not _mine(sock, uid):
            return "busy"
        stale = True
    return "stale" if stale else "free"


def _unlink_same(path: str, seen: os.stat_result) -> bool:
    try:
        cur = os.lstat(path)
        if (cur.st_ino, cur.st_dev) != (seen.st_ino, seen.st_dev):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def reclaim_x_files(display: int, uid: Optional[int] = None, xtmp: str = X_TMP) -> List[str]:
    """Remove the lock and socket of a dead X server on ``display`` (the caller's, or any for root).

    Call it only while holding the display's reservation. Each file is re-checked and compared by
    inode right before the unlink; a live server's files are never removed. Returns what was removed.
    """
    uid = os.geteuid() if uid is None else uid
    removed: List[str] = []
    lock = lock_path(display, xtmp)
    try:
        seen = os.lstat(lock)
    except FileNotFoundError:
        seen = None
    if seen is not None:
        pid = lock_pid(display, xtmp)
        if pid == 0 or (pid is not None and _proc.alive(pid)) or not _mine(lock, uid):
            return removed
        if not _unlink_same(lock, seen):
            return removed
        removed.append(lock)
    sock = socket_path(display, xtmp)
    try:
        seen = os.lstat(sock)
    except FileNotFoundError:
        return removed
    if stat.S_ISSOCK(seen.st_mode) and not socket_live(display, xtmp) and _mine(sock, uid) \
            and _unlink_same(sock, seen):
        removed.append(sock)
    return removed


# ---------------------------------------------------------------- reservations (the scheme of _ports.py)


class DisplayDir(_ports.ReservationDir):
    """``ReservationDir`` of displays (in ``DISPLAYS_DIR``); a display is usable when no X server owns it."""

    def __init__(self, path: str = DISPLAYS_DIR, *, xtmp: str = X_TMP, **kw: Any) -> None:
        self.xtmp = xtmp
        kw.setdefault("bindable", self._usable)
        super().__init__(path, **kw)

    def _usable(self, display: int) -> bool:
        return display_state(display, self.me.uid, self.xtmp) != "busy"

    def reserve_display(self, owner: str, pid: Optional[int] = None, display_range: Any = DISPLAY_RANGE,
                        display: Optional[int] = None, lease: int = _ports.DEFAULT_LEASE) -> Tuple[int, List[str]]:
        """Reserve one display for ``owner`` -> (display, the dead server's files reclaimed for it).

        ``display`` asks for that one display (refused, naming it, when in use); otherwise the first
        usable one of ``display_range`` from a random start.
        """
        if display is not None:
            first = parse_display_range(display, "display")[0]
            candidates = [first]
        else:
            start, end = parse_display_range(display_range)
            candidates = list(range(start, end + 1))
        try:
            got, _new = self.reserve(owner, 1, candidates, lease, pid)
        except _ports.PortError as exc:
            if exc.field != "count":
                raise
            if display is not None:
                raise DisplayError("display", f"display :{candidates[0]} is in use on {self.me.host}") from None
            raise DisplayError("display_range", f"no free display in :{candidates[0]}-:{candidates[-1]} "
                                                f"on {self.me.host}") from None
        return got[0], reclaim_x_files(got[0], self.me.uid, self.xtmp)


def release_displays(owner: str, path: str = DISPLAYS_DIR, xtmp: str = X_TMP) -> Dict[str, List[Any]]:
    """Undo a session's displays on this host: its records, and the files of its X servers if they are dead.

    The one teardown call for display reservations (idempotent: nothing left -> empty lists).
    """
    rdir = DisplayDir(path, xtmp=xtmp)
    if not rdir.exists():
        return {"released": [], "removed": []}
    released = rdir.release(owner)
    removed: List[str] = []
    for display in released:
        removed += reclaim_x_files(display, rdir.me.uid, xtmp)
    return {"released": released, "removed": removed}


# ---------------------------------------------------------------- the desktop's processes


def marked_processes(marker: str, uid: Optional[int] = None, proc: str = "/proc") -> List[int]:
    """Pids of ``uid``'s processes whose environment holds ``marker`` (``NAME=value``), but never the
    caller or its ancestors. Desktop sessions start daemons that leave their process group (``setsid``:
    ssh-agent, gpg-agent, ...); the environment they inherit still names the session."""
    uid = os.geteuid() if uid is None else uid
    needle = marker.encode()
    skip, pid = set(), os.getpid()
    while pid > 1 and pid not in skip:  # the caller and its ancestors
        skip.add(pid)
        try:
            with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as handle:
                pid = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            if os.stat(f"{proc}/{entry}").st_uid != uid:
                continue
            with open(f"{proc}/{entry}/environ", "rb") as handle:
                env = handle.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return sorted(found)


def stop_marked(marker: str, grace: float = 2.0, clock: Callable[[], float] = time.monotonic) -> List[int]:
    """TERM every process :func:`marked_processes` finds, KILL what is left after ``grace`` s -> pids."""
    pids = marked_processes(marker)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    _wait_gone(pids, grace, clock)
    killed = marked_processes(marker)
    for pid in killed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # a KILL is not instant: the caller releases the display next, and a server still alive then keeps its files
    _wait_gone(killed, KILL_WAIT, clock)
    return pids


def _wait_gone(pids: List[int], seconds: float, clock: Callable[[], float]) -> None:
    """Wait up to ``seconds`` until none of ``pids`` runs (gone, or a zombie)."""
    deadline = clock() + seconds
    while pids and clock() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if _proc.alive(p)]


def descendants(root: int, proc: str = "/proc") -> List[int]:
    """Pids below ``root`` in the process tree (read from ``/proc/*/stat``), parents before children."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                ppid = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _collect(child: int) -> Optional[int]:
    """Reap every exited process below this one (orphans re-parented here, too) -> ``child``'s exit status, if it
    is among them (a signal's death as ``128 + signal``)."""
    status = None
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, raw = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid == child:
                status = os.waitstatus_to_exitcode(raw)
                status = 128 - status if status < 0 else status
    return status


def reap(argv: Sequence[str], grace: float = 2.0) -> int:
    """Run ``argv`` as a child of this process made a child subreaper; end with everything below it.

    Desktops start daemons that double-fork and call ``setsid`` (ssh-agent, gpg-agent, D-Bus activated services):
    they leave the process group, and some make their ``/proc/PID/environ`` unreadable, but as orphans they are
    re-parented to the nearest subreaper, this process. When the command exits, or this process gets one of
    ``STOP_SIGNALS``, every process below it gets TERM, and KILL after ``grace`` s. Returns the command's exit status.

    The stop signals and SIGCHLD stay blocked and are taken with ``sigwaitinfo``, never by a handler: a session's
    cancel signals the job's process group and the agent then signals this process again, a few microseconds apart,
    and a second signal must not interrupt the end below (a handler that raises would end this process there, and
    leave the daemons running).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    waited = {*STOP_SIGNALS, signal.SIGCHLD}
    # with its default disposition, an unblocked SIGCHLD is discarded; a handler (never run) keeps it pending
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    rc = 143
    child = os.posix_spawnp(argv[0], list(argv), dict(os.environ), setsigmask=before)
    while signal.sigwaitinfo(waited).si_signo == signal.SIGCHLD:
        status = _collect(child)
        if status is not None:
            rc = status
            break
    _end_below(os.getpid(), grace)
    return rc


def _end_below(root: int, grace: float) -> None:
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        if not descendants(root):
            return
        time.sleep(0.05)
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


# ---------------------------------------------------------------- the script


def write_password(secret_file: str, out: str) -> str:
    """Write the VNC password derived from ``secret_file``'s first line to ``out`` (made anew, 0600, never through
    a link); returns ``out``."""
    with open(secret_file, encoding="utf-8") as handle:
        password = vnc_password(handle.readline())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(password + "\n")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="_desktop.py", description="X displays and VNC passwords of sessions.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    res_p = sub.add_parser("reserve", help="reserve a display; prints JSON with display")
    res_p.add_argument("--owner", required=True)
    res_p.add_argument("--pid", type=int)
    res_p.add_argument("--range", dest="display_range", default="%d-%d" % DISPLAY_RANGE)
    res_p.add_argument("--display", type=int)
    res_p.add_argument("--lease", type=int, default=_ports.DEFAULT_LEASE)
    res_p.add_argument("--dir", default=DISPLAYS_DIR)
    # the session's VNC password written in the same process (one interpreter start less on the job's way to Running)
    res_p.add_argument("--password-from", metavar="SECRET_FILE", help="also write the VNC password (as `password`)")
    res_p.add_argument("--password-out", metavar="FILE")
    rel_p = sub.add_parser("release", help="release the owner's displays and a dead server's files")
    rel_p.add_argument("--owner", required=True)
    rel_p.add_argument("--dir", default=DISPLAYS_DIR)
    stop_p = sub.add_parser("stop", help="stop the marked processes, then release the owner's displays")
    stop_p.add_argument("--marker", required=True, help="NAME=value in the processes' environment")
    stop_p.add_argument("--owner", required=True)
    stop_p.add_argument("--grace", type=float, default=2.0)
    stop_p.add_argument("--dir", default=DISPLAYS_DIR)
    reap_p = sub.add_parser("reap", help="run a command as the child of a subreaper; end everything below it after")
    reap_p.add_argument("--grace", type=float, default=2.0)
    reap_p.add_argument("argv", nargs="+")
    pw_p = sub.add_parser("password", help="write the VNC password derived from a secret file to a 0600 file")
    pw_p.add_argument("--secret-file", required=True)
    pw_p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "reserve" and bool(args.password_from) != bool(args.password_out):
        parser.error("--password-from and --password-out go together")
    try:
        if args.cmd == "reserve":
            rdir = DisplayDir(args.dir)
            display, removed = rdir.reserve_display(args.owner, args.pid, args.display_range, args.display,
                                                    args.lease)
            out: Dict[str, Any] = {"display": display, "reclaimed": removed, "reservation_dir": rdir.path}
            if args.password_from:
                try:
                    out["password_written"] = write_password(args.password_from, args.password_out)
                except OSError as exc:  # the display stays reserved: the caller's end releases it (stop)
                    sys.stderr.write(json.dumps({"error": f"{exc.filename}: {exc.strerror}", "field": "password",
                                                 "display": display}) + "\n")
                    return PASSWORD_FAILED
        elif args.cmd == "release":
            _ports.validate_owner(args.owner)
            out = release_displays(args.owner, args.dir)
        elif args.cmd == "reap":
            return reap(args.argv, args.grace)
        elif args.cmd == "stop":
            for sig in STOP_SIGNALS:  # the end of a session's end is not cut short (it is bounded by --grace)
                signal.signal(sig, signal.SIG_IGN)
            _ports.validate_owner(args.owner)
            if not re.match(r"[A-Za-z_][A-Za-z0-9_]*=.+\Z", args.marker):
                raise DisplayError("marker", "must be NAME=value")
            stopped = stop_marked(args.marker, args.grace)
            out = dict(release_displays(args.owner, args.dir), stopped=stopped)
        else:
            out = {"written": write_password(args.secret_file, args.out)}
    except _ports.PortError as exc:
        sys.stderr.write(json.dumps({"error": str(exc), "field": exc.field}) + "\n")
        return 1
    except OSError as exc:
        sys.stderr.write(json.dumps({"error": f"{exc.filename}: {exc.strerror}", "field": "secret_file"}) + "\n")
        return 1
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
