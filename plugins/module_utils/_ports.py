# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Find free TCP ports and reserve them for a session, safely against concurrent callers.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only and self-contained: the ``free_port`` module imports it, and a batch job
runs it as a plain script (``python3 _ports.py reserve --owner ID``) to pick its node port.

How a reservation works
-----------------------
* One host-local directory shared by all users (default ``/tmp/isession-ports``: local on
  every node, cleared at boot). It is created mode 1777 (sticky) if missing. A directory that
  is a symlink is refused; one not owned by the caller must be sticky. Network file systems
  (NFS, Lustre, GPFS, ...) are refused: their exclusive create is not reliable and one
  directory would be shared by several hosts whose ports are independent.
* One file per port, ``port-<N>``. The record (JSON: port, owner, user, uid, host, boot_id,
  pid, pid_start, created, expires) is written to a private temp file created with
  ``O_CREAT|O_EXCL`` and published with ``link(2)``, which fails with ``EEXIST`` exactly like
  ``O_EXCL`` but never shows a half-written record. Of any number of concurrent callers, of any
  user, exactly one gets a port.
* A port is free when no valid record holds it and binding it (``0.0.0.0``, ``127.0.0.1`` and
  ``::`` when IPv6 exists, without ``SO_REUSEADDR``) succeeds: a listener or a socket in
  TIME_WAIT makes it busy. Nothing greps ``netstat``.
* A record is stale when its lease has expired, or - on the host that wrote it - the host has
  rebooted since or the watched ``pid`` is gone (pid start time checked, so a reused pid does
  not keep it alive). After the lease the running server's own listening socket protects the
  port. Unreadable or unparsable files count as taken for a grace period.
* Stale files are reclaimed under an ``flock`` on ``.lock`` in the directory (re-checked and
  compared by inode before unlinking). In a sticky directory only the file's owner (or root)
  can unlink it, so another user's stale file is skipped as taken; root reclaims all.
* Records are per host: a shared directory (as in a test bed whose hosts share one /tmp) keeps
  each host's reservations apart for idempotence and release.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pwd
import random
import re
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

DEFAULT_DIR = "/tmp/isession-ports"  # noqa: S108 - a shared, sticky, host-local directory on purpose
DEFAULT_RANGE = (10000, 32767)
X11_RANGE = (6000, 6099)
MIN_PORT, MAX_PORT = 1024, 65535
DEFAULT_LEASE = 3600
MAX_LEASE = 30 * 24 * 3600
MAX_COUNT = 64
EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MOUNTINFO_FILE = "/proc/self/mountinfo"
NETWORK_FS = frozenset(
    "nfs nfs4 cifs smb3 smbfs afs ceph glusterfs lustre gpfs beegfs panfs 9p ncpfs coda "
    "fuse.sshfs fuse.glusterfs fuse.ceph fuse.beegfs".split()
)
OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
FILE_RE = re.compile(r"port-([0-9]{1,5})\Z")
LOCK_NAME = ".lock"
UNPARSABLE_GRACE = 60.0
LOCK_TIMEOUT = 10.0
RECORD_MAX = 4096

RangeT = Tuple[int, int]


class PortError(Exception):
    """A refused input or an impossible request; ``field`` names the option at fault."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field


# ---------------------------------------------------------------- input parsing (pure)


def validate_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        raise PortError("owner", f"must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, got {owner!r}")
    return owner


def parse_port(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise PortError(field, f"not a port number: {value!r}")
    if isinstance(value, str) and re.match(r"\s*[0-9]{1,5}\s*\Z", value):
        value = int(value)
    if not isinstance(value, int):
        raise PortError(field, f"not a port number: {value!r}")
    if not MIN_PORT <= value <= MAX_PORT:
        raise PortError(field, f"port {value} is outside {MIN_PORT}-{MAX_PORT}")
    return value


def parse_range(value: Any, field: str = "port_range") -> RangeT:
    """``"A-B"``, ``"A"``, ``A``, ``[A, B]`` or ``{"start": A, "end": B}`` -> ``(A, B)``."""
    if isinstance(value, dict):
        if set(value) != {"start", "end"}:
            raise PortError(field, "a mapping needs exactly the keys start and end")
        pair = [value["start"], value["end"]]
    elif isinstance(value, (list, tuple)):
        pair = list(value)
    elif isinstance(value, str):
        pair = [p.strip() for p in value.split("-")] if "-" in value else [value, value]
    else:
        pair = [value, value]
    if len(pair) != 2:
        raise PortError(field, f"expected START-END, got {value!r}")
    start, end = parse_port(pair[0], field), parse_port(pair[1], field)
    if start > end:
        raise PortError(field, f"start {start} is above end {end}")
    return start, end


def parse_ranges(values: Optional[Sequence[Any]], field: str = "exclude") -> List[RangeT]:
    return [parse_range(v, field) for v in (values or [])]


def parse_ephemeral(text: str) -> Optional[RangeT]:
    parts = text.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) <= int(parts[1]):
        return int(parts[0]), int(parts[1])
    return None


def read_ephemeral_range(path: str = EPHEMERAL_FILE) -> Optional[RangeT]:
    try:
        with open(path) as fh:
            return parse_ephemeral(fh.read())
    except OSError:
        return None


def candidate_ports(port_range: RangeT, exclude: Sequence[RangeT] = (),
                    ephemeral: Optional[RangeT] = None) -> List[int]:
    """Ports of ``port_range`` minus X11's 6000-6099, ``exclude`` and ``ephemeral`` (if given)."""
    banned = [X11_RANGE] + list(exclude) + ([ephemeral] if ephemeral else [])
    return [p for p in range(port_range[0], port_range[1] + 1) if not any(a <= p <= b for a, b in banned)]


def fs_type_of(path: str, mountinfo: str) -> Optional[str]:
    """File system type of the mount holding the absolute, resolved ``path`` (mountinfo text)."""
    best, best_type = "", None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, best_type = mnt, right.split()[0]
    return best_type


def check_request(owner: str, count: int, lease: int = DEFAULT_LEASE, pid: Optional[int] = None,
                  alive: Optional[Callable[[int, Optional[int]], bool]] = None) -> None:
    """Refuse a bad owner, count, lease or pid (a pid must run on this host)."""
    validate_owner(owner)
    if not 1 <= count <= MAX_COUNT:
        raise PortError("count", f"must be 1..{MAX_COUNT}, got {count}")
    if not 1 <= lease <= MAX_LEASE:
        raise PortError("lease", f"must be 1..{MAX_LEASE} seconds, got {lease}")
    if pid is not None and (pid <= 0 or not (alive or pid_alive)(pid, None)):
        raise PortError("pid", f"process {pid!r} is not running on this host")


# ---------------------------------------------------------------- records and staleness


@dataclass
class Reservation:
    port: int
    owner: str
    user: str
    uid: int
    host: str
    boot_id: str
    created: float
    expires: float
    pid: Optional[int] = None
    pid_start: Optional[int] = None
    creator_pid: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Optional[Reservation]:
        try:
            data = json.loads(text)
            res = cls(**data)
        except (ValueError, TypeError):
            return None
        ints = (res.port, res.uid) + tuple(v for v in (res.pid, res.pid_start, res.creator_pid) if v is not None)
        nums = (res.created, res.expires)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
            return None
        if not all(isinstance(v, str) for v in (res.owner, res.user, res.host, res.boot_id)):
            return None
        return res


@dataclass(frozen=True)
class Me:
    """Who and where the caller is."""

    uid: int
    user: str
    host: str
    boot_id: str


def current_me() -> Me:
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        with open(BOOT_ID_FILE) as fh:
            boot_id = fh.read().strip()
    except OSError:
        boot_id = ""
    return Me(uid=uid, user=user, host=socket.gethostname(), boot_id=boot_id)


def pid_start_time(pid: int) -> Optional[int]:
    """Start time (clock ticks after boot) of ``pid`` from /proc, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """True if ``pid`` runs (any user's), and is the same process when ``start`` is known."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is None:
        return True
    now_start = pid_start_time(pid)
    return now_start is None or now_start == start


def is_stale(res: Optional[Reservation], now: float, me: Me, age: float = 0.0,
             alive: Callable[[int, Optional[int]], bool] = pid_alive) -> bool:
    """Whether a record no longer holds its port. ``res`` None = unparsable file of age ``age``."""
    if res is None:
        return age > UNPARSABLE_GRACE
    if res.expires <= now:
        return True
    if res.host != me.host:
        return False  # another host's pids and boots cannot be judged from here
    if res.boot_id and me.boot_id and res.boot_id != me.boot_id:
        return True
    return res.pid is not None and not alive(res.pid, res.pid_start)


def port_bindable(port: int) -> bool:
    """True if nothing holds ``port``: bind tests without SO_REUSEADDR (TIME_WAIT counts as busy)."""
    tries = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")]  # noqa: S104 - a bind test, closed at once
    if socket.has_ipv6:
        tries.append((socket.AF_INET6, "::"))
    for family, addr in tries:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # address family not available on this host
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue
            return False
        finally:
            sock.close()
    return True


# ---------------------------------------------------------------- the reservation directory


class ReservationDir:
    """Reservations in one directory. Clock, pid and bind checks are injectable for tests."""

    def __init__(self, path: str = DEFAULT_DIR, *, me: Optional[Me] = None, clock: Callable[[], float] = time.time,
                 alive: Callable[[int, Optional[int]], bool] = pid_alive,
                 bindable: Callable[[int], bool] = port_bindable, rng: Optional[random.Random] = None,
                 mountinfo_file: str = MOUNTINFO_FILE) -> None:
        if not path or not os.path.isabs(path):
            raise PortError("reservation_dir", f"must be an absolute path, got {path!r}")
        self.path = os.path.normpath(path)
        self.me = me or current_me()
        self.clock, self.alive, self.bindable = clock, alive, bindable
        self.rng = rng or random.SystemRandom()
        self.mountinfo_file = mountinfo_file

    # -- directory
    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def ensure(self) -> None:
        """Create the directory (1777) if missing, then validate it."""
        if not self.exists():
            parent = os.path.dirname(self.path)
            tmp = os.path.join(parent, f".{os.path.basename(self.path)}.{os.getpid()}.{os.urandom(8).hex()}")
            try:
                os.mkdir(tmp, 0o700)
                os.chmod(tmp, 0o1777)  # noqa: S103 - shared by all users, sticky
                os.rename(tmp, self.path)  # appears complete, with its final mode
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.rmdir(tmp)
                if not self.exists():
                    raise PortError("reservation_dir", f"cannot create {self.path}: {exc.strerror}") from exc
        self.validate()

    def validate(self) -> None:
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            raise PortError("reservation_dir", f"{self.path}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise PortError("reservation_dir", f"{self.path} is a symlink; refused")
        if not stat.S_ISDIR(st.st_mode):
            raise PortError("reservation_dir", f"{self.path} is not a directory")
        if st.st_uid != self.me.uid and not st.st_mode & stat.S_ISVTX:
            raise PortError("reservation_dir", f"{self.path} is neither sticky (mode 1777) nor owned by you; refused")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise PortError("reservation_dir", f"{self.path} is not writable for uid {self.me.uid}")
        try:
            with open(self.mountinfo_file) as fh:
                fstype = fs_type_of(os.path.realpath(self.path), fh.read())
        except OSError:
            fstype = None
        if fstype in NETWORK_FS:
            raise PortError("reservation_dir", f"{self.path} is on a network file system ({fstype}); "
                                               "use a host-local one")

    # -- files
    def _file(self, port: int) -> str:
        return os.path.join(self.path, f"port-{port}")

    def read(self, port: int) -> Optional[Tuple[Optional[Reservation], os.stat_result]]:
        """The record and stat of ``port``'s file; None if there is none. Unreadable -> (None, st)."""
        try:
            fd = os.open(self._file(port), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                return None, os.lstat(self._file(port))
            except FileNotFoundError:
                return None
        try:
            st = os.fstat(fd)
            text = os.read(fd, RECORD_MAX).decode("utf-8", "replace") if stat.S_ISREG(st.st_mode) else ""
        finally:
            os.close(fd)
        res = Reservation.from_json(text)
        if res is not None and (res.port != port or res.uid != st.st_uid):
            res = None  # a record that lies about its port or its owner is junk
        return res, st

    def ports_on_disk(self) -> List[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in (FILE_RE.match(n) for n in names) if m)

    def held(self, owner: str) -> List[Reservation]:
        """The owner's valid reservations made by this uid on this host, by port."""
        now, found = self.clock(), []
        for port in self.ports_on_disk():
            got = self.read(port)
            if not got or got[0] is None:
                continue
            res, st = got
            if (res.owner == owner and st.st_uid == self.me.uid and res.host == self.me.host
                    and not is_stale(res, now, self.me, alive=self.alive)):
                found.append(res)
        return found

    def _state(self, port: int, now: float) -> str:
        """'free' (no file), 'stale' (reclaimable by us), or 'taken'."""
        got = self.read(port)
        if got is None:
            return "free"
        res, st = got
        if not is_stale(res, now, self.me, age=now - st.st_mtime, alive=self.alive):
            return "taken"
        return "stale" if self.me.uid in (0, st.st_uid) else "taken"

    def _open_lock(self) -> int:
        """A read-only fd on ``.lock`` (created 0644 if missing), or -1 if it is not a usable file."""
        path, flags = os.path.join(self.path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        for _attempt in range(3):
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                except OSError:
                    return -1
            except OSError:
                return -1
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            return -1
        return -1

    @contextlib.contextmanager
    def _lock(self, timeout: Optional[float] = None) -> Iterator[bool]:
        """Exclusive flock on ``.lock``; yields whether it was obtained (a hostile lock is not fatal)."""
        fd, got = self._open_lock(), False
        try:
            deadline = time.monotonic() + (LOCK_TIMEOUT if timeout is None else timeout)
            while fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
            yield got
        finally:
            if fd >= 0:
                os.close(fd)  # also drops the flock

    def _reclaim(self, port: int) -> bool:
        """Remove ``port``'s stale file if it is still the same stale file. Under the lock only."""
        with self._lock() as locked:
            if not locked:
                return False
            now = self.clock()
            got = self.read(port)
            if got is None:
                return True
            res, st = got
            if not is_stale(res, now, self.me, age=now - st.st_mtime, alive=self.alive):
                return False
            try:
                cur = os.lstat(self._file(port))
                if (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
                    return False
                os.unlink(self._file(port))
            except FileNotFoundError:
                return True
            except OSError:
                return False
            return True

    def _create(self, res: Reservation) -> bool:
        """Publish ``res`` atomically; False if the port's file already exists."""
        while True:
            tmp = os.path.join(self.path, f".tmp.{self.me.uid}.{os.getpid()}.{os.urandom(8).hex()}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
        try:
            os.fchmod(fd, 0o644)  # readable by everyone: others judge staleness from it
            os.write(fd, res.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self._file(res.port))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _unlink_own(self, ports: Sequence[int]) -> None:
        with self._lock():  # released even without the lock: these are our own files
            for port in ports:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._file(port))

    # -- operations
    def _scan(self, held: Sequence[int], need: int, candidates: Sequence[int],
              act: Optional[Callable[[int], bool]]) -> List[int]:
        """Walk ``candidates`` from a random start; ``act`` reserves a port (None: predict only)."""
        got: List[int] = []
        if not candidates or need <= 0:
            return got
        start = self.rng.randrange(len(candidates))
        for port in list(candidates[start:]) + list(candidates[:start]):
            if len(got) >= need:
                break
            if port in held:
                continue
            state = self._state(port, self.clock())
            if state == "taken" or not self.bindable(port):
                continue
            if act is None or ((state == "free" or self._reclaim(port)) and act(port)):
                got.append(port)
        return got

    def sweep(self) -> List[int]:
        """Reclaim this uid's stale records (any owner) and temp files of dead processes."""
        now, swept = self.clock(), []
        try:
            names = os.listdir(self.path)
        except OSError:
            return swept
        for name in names:
            tmp = re.match(r"\.tmp\.([0-9]+)\.([0-9]+)\.[0-9a-f]+\Z", name)
            if tmp and int(tmp.group(1)) == self.me.uid and not self.alive(int(tmp.group(2)), None):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
        for port in self.ports_on_disk():
            got = self.read(port)
            if got and got[1].st_uid == self.me.uid and self._state(port, now) == "stale" and self._reclaim(port):
                swept.append(port)
        return swept

    def predict(self, owner: str, count: int, candidates: Sequence[int]) -> Tuple[List[int], List[int]]:
        """What :meth:`reserve` would return (all ports, new ports), touching nothing."""
        if self.exists():
            self.validate()
        elif not os.path.isdir(os.path.dirname(self.path)):
            raise PortError("reservation_dir", f"parent of {self.path} does not exist")
        wanted = set(candidates)
        held = sorted(r.port for r in self.held(owner) if r.port in wanted) if self.exists() else []
        if len(held) >= count:
            return held[:count], []
        new = self._scan(held, count - len(held), candidates, None)
        return sorted(held + new), sorted(new)

    def reserve(self, owner: str, count: int, candidates: Sequence[int], lease: int = DEFAULT_LEASE,
                pid: Optional[int] = None) -> Tuple[List[int], List[int]]:
        """Reserve ``count`` ports for ``owner`` -> (its ports, the newly reserved ones).

        Valid reservations the owner already holds among ``candidates`` count first (a re-run is a
        no-op); ones outside ``candidates`` are kept but not returned (``release`` removes them).
        """
        check_request(owner, count, lease, pid, self.alive)
        pid_start = None if pid is None else pid_start_time(pid)
        self.ensure()
        self.sweep()
        wanted = set(candidates)
        held = sorted(r.port for r in self.held(owner) if r.port in wanted)
        if len(held) >= count:
            return held[:count], []
        now = self.clock()

        def act(port: int) -> bool:
            me = self.me
            return self._create(Reservation(port=port, owner=owner, user=me.user, uid=me.uid, host=me.host,
                                            boot_id=me.boot_id, created=now, expires=now + lease, pid=pid,
                                            pid_start=pid_start, creator_pid=os.getpid()))

        new = self._scan(held, count - len(held), candidates, act)
        if len(held) + len(new) < count:
            self._unlink_own(new)
            raise PortError("count", f"only {len(held) + len(new)} of {count} ports are free in the range "
                                     "(after exclusions)")
        return sorted(held + new), sorted(new)

    def release(self, owner: str, dry_run: bool = False) -> List[int]:
        """Remove this uid's reservations of ``owner`` on this host (valid or stale) -> their ports."""
        validate_owner(owner)
        if not self.exists():
            return []
        self.validate()
        mine = []
        for port in self.ports_on_disk():
            got = self.read(port)
            if got and got[0] is not None and got[0].owner == owner and got[1].st_uid == self.me.uid \
                    and got[0].host == self.me.host:
                mine.append(port)
        if mine and not dry_run:
            self._unlink_own(mine)
        return mine


# ---------------------------------------------------------------- one call, for the module and the script


def build_candidates(port_range: Any = None, exclude: Optional[Sequence[Any]] = None, avoid_ephemeral: bool = True,
                     ephemeral_file: str = EPHEMERAL_FILE) -> List[int]:
    rng = DEFAULT_RANGE if port_range in (None, "") else parse_range(port_range)
    ephemeral = read_ephemeral_range(ephemeral_file) if avoid_ephemeral else None
    ports = candidate_ports(rng, parse_ranges(exclude), ephemeral)
    if not ports:
        raise PortError("port_range", f"{rng[0]}-{rng[1]} has no port left after excluding X11 6000-6099, exclude"
                        + (" and the ephemeral range" if avoid_ephemeral else ""))
    return ports


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="_ports.py", description="Reserve free TCP ports for a session.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    res_p = sub.add_parser("reserve")
    res_p.add_argument("--owner", required=True)
    res_p.add_argument("--count", type=int, default=1)
    res_p.add_argument("--range", dest="port_range")
    res_p.add_argument("--exclude", action="append", default=[])
    res_p.add_argument("--lease", type=int, default=DEFAULT_LEASE)
    res_p.add_argument("--pid", type=int)
    res_p.add_argument("--allow-ephemeral", action="store_true")
    res_p.add_argument("--dir", default=DEFAULT_DIR)
    rel_p = sub.add_parser("release")
    rel_p.add_argument("--owner", required=True)
    rel_p.add_argument("--dir", default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    try:
        rdir = ReservationDir(args.dir)
        if args.cmd == "release":
            out: Dict[str, Any] = {"released": rdir.release(args.owner), "reservation_dir": rdir.path}
        else:
            candidates = build_candidates(args.port_range, args.exclude, not args.allow_ephemeral)
            ports, new = rdir.reserve(args.owner, args.count, candidates, args.lease, args.pid)
            out = {"ports": ports, "port": ports[0], "new": new, "reservation_dir": rdir.path}
    except PortError as exc:
        sys.stderr.write(json.dumps({"error": str(exc), "field": exc.field}) + "\n")
        return 1
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
