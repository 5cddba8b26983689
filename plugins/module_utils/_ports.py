# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Find free TCP ports and reserve them for a session, safely against concurrent callers and other users.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only and self-contained: the ``free_port`` module imports it, and a batch job
runs it as a plain script (``python3 -I _ports.py reserve --owner ID``) to pick its node port.

How a reservation works
-----------------------
* One host-local directory shared by all users (default ``/tmp/isession-ports``), owned by root
  and sticky (mode 1777): the install entry points and a tmpfiles.d line make it on every host
  that runs sessions. A directory owned by another user is refused (its owner could remove or
  block every reservation), as is a missing one unless the caller is root (root creates it,
  1777). A directory owned by the caller and writable by nobody else also works (one user's
  private reservations). Network file systems are refused: their exclusive create is not
  reliable and one directory would be shared by several hosts whose ports are independent.
  The directory is opened once (``O_NOFOLLOW``), checked through that descriptor and used only
  through it, so nothing can swap it between the check and the use.
* A reservation is a claim file ``port-<N>`` (or ``port-<N>.<G>``, see below), mode 0600. Its
  record (JSON: port, owner = session id, host, boot_id, watched pid and its start time,
  created, expires) is for its owner only; the file's own metadata is what other users judge:
  its uid, a link count of 1, and its mtime, which is set to the lease's end. The record is
  written to a private temp file and published with ``link(2)``, which fails with ``EEXIST``
  like ``O_EXCL`` but never shows a half-written record.
* A claim is *valid* (holds its port) when, for the caller's own claims, the record says so
  (lease running; on the host that wrote it, the host has not rebooted and the watched pid, with
  its start time, still runs), and for another user's claim, when its metadata says so: a
  regular file, one link, a lease end in the future and at most ``MAX_LEASE`` away, and its
  owner holds no more than ``USER_CAP`` live claims in the directory. Anything else - junk, an
  expired lease, a user over the cap - is ignored.
* Another user's invalid file cannot be removed from a sticky directory (root's can), so a claim
  may need another name: the claims of port N are ``port-N`` (generation 0), ``port-N.1``,
  ``port-N.2``, ... A caller takes the lowest generation that does not exist, with the exclusive
  create; contenders for one port meet on the same name, so exactly one of them gets it. After
  creating its claim the caller looks at every claim of that port again and withdraws if any
  other one is valid, so two callers never both win, whatever junk lies around.
* A port is free when it has no valid claim and binding it (``0.0.0.0``, ``127.0.0.1`` and ``::``
  when IPv6 exists, without ``SO_REUSEADDR``) succeeds: a listener or a socket in TIME_WAIT
  makes it busy. Nothing greps ``netstat``. After the lease, the server's own listening socket
  protects the port.
* No lock: a caller removes only its own invalid claims (root: any invalid claim), by renaming
  the file to a private name of the same port (``port-N.r<random>``) and unlinking it only if it
  is still the file that was judged (same inode); a fresh claim renamed by mistake stays a claim
  of its port under that name.
* Records are per host: a shared directory (as in a test bed whose hosts share one /tmp) keeps
  each host's reservations apart for idempotence and release.

Who listens on a reserved port is ``_listeners.py``'s question.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

DEFAULT_DIR = "/tmp/isession-ports"  # noqa: S108 - a shared, sticky, root-owned, host-local directory on purpose
DEFAULT_RANGE = (10000, 32767)
X11_RANGE = (6000, 6099)
MIN_PORT, MAX_PORT = 1024, 65535
DEFAULT_LEASE = 3600
MAX_LEASE = 30 * 24 * 3600
FUTURE_SLACK = 300  # seconds of clock difference tolerated beyond MAX_LEASE in another user's lease end
MAX_COUNT = 64
USER_CAP = 256  # live claims one user may hold in one directory; a user over it has none that count
MAX_GENERATION = 999
CONTEND_TRIES = 8  # publish-and-look rounds for one port when contenders withdraw together
CONTEND_BACKOFF = 0.002  # seconds: the first round's longest random wait; it doubles each round
EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MOUNTINFO_FILE = "/proc/self/mountinfo"
NETWORK_FS = frozenset(
    "nfs nfs4 cifs smb3 smbfs afs ceph glusterfs lustre gpfs beegfs panfs 9p ncpfs coda "
    "fuse.sshfs fuse.glusterfs fuse.ceph fuse.beegfs".split()
)
OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
CLAIM_TAIL = r"-([0-9]{1,5})(?:\.([1-9][0-9]{0,2}|r[0-9a-f]{16}))?\Z"
PREFIX_RE = re.compile(r"[a-z]{1,16}\Z")
TMP_RE = re.compile(r"\.tmp\.[0-9]+\.[0-9a-f]{16}\Z")
UNPARSABLE_GRACE = 60.0
TMP_MAX_AGE = 60.0
RECORD_MAX = 4096
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RangeT = Tuple[int, int]
_JITTER = random.SystemRandom()  # backoff: never the injectable rng, which tests seed alike in every contender


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


def range_ends(value: Any) -> List[Any]:
    """The ends of a range as given, unchecked: ``"A-B"`` and ``[A, B]`` -> ``[A, B]``; ``"A"`` or ``A`` -> ``[A, A]``
    (a list of another length comes back as it is, for the caller to refuse)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [p.strip() for p in value.split("-")] if "-" in value else [value, value]
    return [value, value]


def parse_range(value: Any, field: str = "port_range") -> RangeT:
    """``"A-B"``, ``"A"``, ``A``, ``[A, B]`` or ``{"start": A, "end": B}`` -> ``(A, B)``."""
    if isinstance(value, dict):
        if set(value) != {"start", "end"}:
            raise PortError(field, "a mapping needs exactly the keys start and end")
        pair = [value["start"], value["end"]]
    else:
        pair = range_ends(value)
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


# ---------------------------------------------------------------- records, claims and validity (pure)


@dataclass
class Reservation:
    """The record inside a claim file: no more than its owner needs to judge and release it."""

    port: int
    owner: str
    host: str
    boot_id: str
    created: float
    expires: float
    pid: Optional[int] = None
    pid_start: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Optional[Reservation]:
        try:
            data = json.loads(text)
            res = cls(**data)
        except (ValueError, TypeError):
            return None
        ints = (res.port,) + tuple(v for v in (res.pid, res.pid_start) if v is not None)
        nums = (res.created, res.expires)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
            return None
        if not all(isinstance(v, str) for v in (res.owner, res.host, res.boot_id)):
            return None
        return res


@dataclass(frozen=True)
class Me:
    """Who and where the caller is."""

    uid: int
    user: str
    host: str
    boot_id: str


@dataclass(frozen=True)
class Claim:
    """One claim file as ``lstat`` shows it: what every user can judge it by."""

    name: str
    port: int
    uid: int
    regular: bool
    nlink: int
    mtime: float
    ctime: float
    ino: int
    dev: int

    @classmethod
    def from_stat(cls, name: str, port: int, st: os.stat_result) -> Claim:
        return cls(name=name, port=port, uid=st.st_uid, regular=stat.S_ISREG(st.st_mode), nlink=st.st_nlink,
                   mtime=st.st_mtime, ctime=st.st_ctime, ino=st.st_ino, dev=st.st_dev)


def claim_port(name: str, prefix: str = "port") -> Optional[int]:
    """The number a claim file name is for (``port-N``, ``port-N.G``, ``port-N.r<hex>``; ``prefix`` names another kind
    of reservation kept in the same directory, e.g. ``display``); None for other names."""
    match = re.match(re.escape(prefix) + CLAIM_TAIL, name)
    return int(match.group(1)) if match else None


def claim_name(port: int, generation: int, prefix: str = "port") -> str:
    return f"{prefix}-{port}" if generation == 0 else f"{prefix}-{port}.{generation}"


def live_by_metadata(claim: Claim, now: float) -> bool:
    """Whether another user's claim file looks like a running lease: a regular file with one link whose mtime (the
    lease's end) is in the future, and no further than the longest lease."""
    return claim.regular and claim.nlink == 1 and now < claim.mtime <= now + MAX_LEASE + FUTURE_SLACK


def over_cap(claims: Sequence[Claim], now: float, cap: int = USER_CAP) -> Set[int]:
    """Uids holding more than ``cap`` live claims (distinct files): none of their claims count for others."""
    seen: Dict[int, Set[Tuple[int, int]]] = {}
    for claim in claims:
        if live_by_metadata(claim, now):
            seen.setdefault(claim.uid, set()).add((claim.dev, claim.ino))
    return {uid for uid, files in seen.items() if len(files) > cap}


def live_count(claims: Sequence[Claim], uid: int, now: float) -> int:
    """How many live claims (distinct files) ``uid`` holds, as other users count them."""
    return len({(c.dev, c.ino) for c in claims if c.uid == uid and live_by_metadata(c, now)})


def foreign_claim_valid(claim: Claim, now: float, capped: Set[int]) -> bool:
    """Whether another user's claim holds its port (judged by its metadata; its record is not readable)."""
    return live_by_metadata(claim, now) and claim.uid not in capped


def is_stale(res: Optional[Reservation], now: float, me: Me, age: float = 0.0,
             alive: Optional[Callable[[int, Optional[int]], bool]] = None) -> bool:
    """Whether one of the caller's own records no longer holds its port (``res`` None: unparsable, ``age`` old)."""
    if res is None:
        return age > UNPARSABLE_GRACE
    if res.expires <= now:
        return True
    if res.host != me.host:
        return False  # another host's pids and boots cannot be judged from here
    if res.boot_id and me.boot_id and res.boot_id != me.boot_id:
        return True
    return res.pid is not None and not (alive or pid_alive)(res.pid, res.pid_start)


def dir_problem(st: os.stat_result, uid: int) -> Optional[str]:
    """Why a directory (its ``lstat``/``fstat``) cannot hold the reservations of user ``uid``; None when it can.

    Root's directory must be sticky if others can write to it; a directory of the caller must be private; any
    other owner could remove or block every reservation in it.
    """
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    shared = st.st_mode & 0o022
    if st.st_uid == 0:
        if shared and not st.st_mode & stat.S_ISVTX:
            return "is writable by other users but not sticky"
        return None
    if st.st_uid == uid:
        if shared:
            return "is yours but writable by other users: a shared reservation directory must be owned by root"
        return None
    return f"is owned by {user_label(st.st_uid)}, not root: that user could remove or block every reservation in it"


def user_label(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def admin_fix(path: str) -> str:
    """What an administrator runs to make a reservation directory right (also said in the install entry point)."""
    return (f"an administrator makes it on every host that runs sessions, as root: rm -rf {path} && "
            f"install -d -o root -g root -m 1777 {path}, and keeps it across reboots with the tmpfiles.d line "
            f"'d {path} 1777 root root -' (the install entry point of any hpc.interactive service role does both)")


# ---------------------------------------------------------------- processes and binds


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
    """Reservations in one directory. Clock, pid and bind checks are injectable for tests.

    ``prefix`` names the claims (``port-N``); a subclass reserving other numbers in the same directory (displays)
    sets its own, and its claims and ports never meet. ``bindable`` says whether a number is free right now.
    """

    prefix = "port"

    def __init__(self, path: str = DEFAULT_DIR, *, me: Optional[Me] = None, clock: Callable[[], float] = time.time,
                 alive: Callable[[int, Optional[int]], bool] = pid_alive,
                 bindable: Callable[[int], bool] = port_bindable, rng: Optional[random.Random] = None,
                 mountinfo_file: str = MOUNTINFO_FILE, cap: int = USER_CAP,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not path or not os.path.isabs(path):
            raise PortError("reservation_dir", f"must be an absolute path, got {path!r}")
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"a claim prefix is 1-16 lowercase letters, got {self.prefix!r}")
        self.path = os.path.normpath(path)
        self.me = me or current_me()
        self.clock, self.alive, self.bindable = clock, alive, bindable
        self.rng = rng or random.SystemRandom()
        self.mountinfo_file = mountinfo_file
        self.cap = cap
        self.sleep = sleep

    # -- the directory, always used through one descriptor checked with fstat
    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def _refuse(self, why: str) -> PortError:
        return PortError("reservation_dir", f"{self.path} {why}; refused: {admin_fix(self.path)}")

    def _create(self) -> None:
        """Make the directory root:root 1777 in one step (root only; the umask must not take the sticky bit's peers)."""
        if self.me.uid != 0 or os.geteuid() != 0:
            raise PortError("reservation_dir", f"{self.path} does not exist: {admin_fix(self.path)}")
        old = os.umask(0)
        try:
            os.mkdir(self.path, 0o1777)  # noqa: S103 - shared by all users, sticky, root's
        except FileExistsError:
            pass  # made meanwhile by another root caller; checked like any other below
        except OSError as exc:
            raise PortError("reservation_dir", f"cannot create {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old)

    def _open(self, create: bool = False) -> int:
        """A descriptor on the checked directory; PortError when it is missing (and not made) or not trusted."""
        try:
            fd = os.open(self.path, DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise PortError("reservation_dir", f"{self.path} does not exist: {admin_fix(self.path)}") from None
            self._create()
            return self._open(create=False)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
                with contextlib.suppress(OSError):
                    raise self._refuse(dir_problem(os.lstat(self.path), self.me.uid) or "is not a directory") from exc
                raise self._refuse("is not a directory") from exc
            raise PortError("reservation_dir", f"{self.path}: {exc.strerror}") from exc
        try:
            problem = dir_problem(os.fstat(fd), self.me.uid)
            if problem:
                raise self._refuse(problem)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PortError("reservation_dir", f"{self.path} is not writable for uid {self.me.uid}")
            self._check_fs()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_fs(self) -> None:
        try:
            with open(self.mountinfo_file) as fh:
                fstype = fs_type_of(os.path.realpath(self.path), fh.read())
        except OSError:
            fstype = None
        if fstype in NETWORK_FS:
            raise PortError("reservation_dir", f"{self.path} is on a network file system ({fstype}); "
                                               "use a host-local one")

    @contextlib.contextmanager
    def _dir(self, create: bool = False) -> Iterator[int]:
        fd = self._open(create)
        try:
            yield fd
        finally:
            os.close(fd)

    def ensure(self) -> None:
        """Create the directory if missing (root only), then check it."""
        with self._dir(create=True):
            pass

    def validate(self) -> None:
        with self._dir():
            pass

    # -- claim files
    def _claims(self, fd: int, port: Optional[int] = None) -> List[Claim]:
        """Every claim file (of ``port`` when given), as lstat shows it now."""
        found = []
        for name in os.listdir(fd):
            num = claim_port(name, self.prefix)
            if num is None or (port is not None and num != port):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(Claim.from_stat(name, num, st))
        return found

    def _claim(self, fd: int, name: str) -> Optional[Claim]:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        port = claim_port(name, self.prefix)
        return None if port is None else Claim.from_stat(name, port, st)

    @staticmethod
    def _record(fd: int, claim: Claim) -> Optional[Reservation]:
        """The record of one of the caller's own claims; None when it is unreadable, junk or lies about its port."""
        try:
            ffd = os.open(claim.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None
        try:
            st = os.fstat(ffd)
            if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_dev) != (claim.ino, claim.dev):
                return None
            text = os.read(ffd, RECORD_MAX).decode("utf-8", "replace")
        finally:
            os.close(ffd)
        res = Reservation.from_json(text)
        return res if res is not None and res.port == claim.port else None

    def _mine(self, claim: Claim) -> bool:
        return claim.uid == self.me.uid

    def _valid(self, fd: int, claim: Claim, now: float, capped: Set[int]) -> bool:
        """Whether ``claim`` holds its port: the caller's own by its record, another user's by its metadata."""
        if not self._mine(claim):
            return foreign_claim_valid(claim, now, capped)
        if not claim.regular:
            return False
        res = self._record(fd, claim)
        return not is_stale(res, now, self.me, age=now - claim.ctime, alive=self.alive)

    def _remove(self, fd: int, claim: Claim) -> bool:
        """Remove ``claim`` if its name still holds that very file: rename it away, then unlink it only if it is."""
        aside = f"{self.prefix}-{claim.port}.r{os.urandom(8).hex()}"
        try:
            os.rename(claim.name, aside, src_dir_fd=fd, dst_dir_fd=fd)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            st = os.stat(aside, dir_fd=fd, follow_symlinks=False)
            if (st.st_ino, st.st_dev) != (claim.ino, claim.dev):
                return False  # a fresh claim took that name meanwhile: it stays a claim of its port, as `aside`
            os.unlink(aside, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def _publish(self, fd: int, res: Reservation, name: str) -> Optional[Tuple[int, int]]:
        """Publish ``res`` under ``name`` atomically (0600, mtime = lease end) -> the claim file's (dev, inode);
        None if ``name`` exists."""
        while True:
            tmp = f".tmp.{os.getpid()}.{os.urandom(8).hex()}"
            try:
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=fd)
            except FileExistsError:
                continue
            try:
                os.fchmod(tfd, 0o600)  # the record is its owner's; others judge the file's metadata
                os.write(tfd, res.to_json().encode())
                os.fsync(tfd)
                os.utime(tfd, (res.expires, res.expires))
                st = os.fstat(tfd)
            finally:
                os.close(tfd)
            try:
                os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                return st.st_dev, st.st_ino
            except FileExistsError:
                return None
            except FileNotFoundError:
                continue  # the temp file was swept (an old-looking clock): write it again
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)

    def _claim_port(self, fd: int, res: Reservation) -> Optional[Tuple[int, int]]:
        """Take ``res.port`` -> the claim file's (dev, inode), or None when another valid claim holds the port.

        Publish, then look: a claim that sees another valid claim of its port withdraws. Two contenders that
        published at once both withdraw; each then waits a random, growing while and tries again unless a claim
        has stayed meanwhile. So a port is never held twice, and a race for it ends with one holder. A claim is
        known by its file, not its name: a sweeper that raced it may have renamed it aside (see ``_remove``).
        """
        for attempt in range(CONTEND_TRIES):
            ident = self._publish_claim(fd, res)
            if ident is None:
                return None
            now = self.clock()
            every = self._claims(fd)
            capped = over_cap(every, now, self.cap)
            if not any(o.port == res.port and (o.dev, o.ino) != ident and self._valid(fd, o, now, capped)
                       for o in every):
                return ident
            self._withdraw(fd, res.port, ident)
            self.sleep(_JITTER.uniform(0.0, CONTEND_BACKOFF * (2**attempt)))
            now = self.clock()
            if any(self._valid(fd, o, now, capped) for o in self._claims(fd, res.port)):
                return None  # a contender stayed: the port is taken
        return None

    def _withdraw(self, fd: int, port: int, ident: Tuple[int, int]) -> None:
        """Remove this caller's claim file ``ident`` of ``port``, under whatever name it has now."""
        for claim in self._claims(fd, port):
            if (claim.dev, claim.ino) == ident:
                self._remove(fd, claim)

    def _publish_claim(self, fd: int, res: Reservation) -> Optional[Tuple[int, int]]:
        """Publish a claim of ``res.port`` under its first free or invalid name -> the file's (dev, inode); None
        when a valid claim holds a name in the way."""
        generation, capped, vanished = 0, None, 0
        while generation <= MAX_GENERATION:
            name = claim_name(res.port, generation, self.prefix)
            ident = self._publish(fd, res, name)
            if ident is not None:
                return ident
            there = self._claim(fd, name)
            if there is None and vanished < 10:
                vanished += 1
                continue  # removed meanwhile: try the same name again (a few times: its owner may toggle it)
            if there is None:
                generation += 1
                continue
            now = self.clock()
            if capped is None:
                capped = over_cap(self._claims(fd), now, self.cap)
            if self._valid(fd, there, now, capped):
                return None
            generation += 1
        return None

    # -- reading
    def _own_records(self, fd: int) -> List[Tuple[Claim, Optional[Reservation]]]:
        return [(c, self._record(fd, c)) for c in self._claims(fd) if self._mine(c) and c.regular]

    def held(self, owner: str) -> List[Reservation]:
        """The owner's valid reservations made by this uid on this host, by port."""
        if not self.exists():
            return []
        with self._dir() as fd:
            return self._held(fd, owner)

    def _held(self, fd: int, owner: str) -> List[Reservation]:
        now, found = self.clock(), {}
        for _claim, res in self._own_records(fd):
            if res is not None and res.owner == owner and res.host == self.me.host \
                    and not is_stale(res, now, self.me, alive=self.alive):
                found[res.port] = res
        return [found[port] for port in sorted(found)]

    def ports_on_disk(self) -> List[int]:
        """The ports that have a claim file (anyone's, valid or not)."""
        if not self.exists():
            return []
        with self._dir() as fd:
            return sorted({c.port for c in self._claims(fd)})

    # -- operations
    def sweep(self, fd: int) -> List[int]:
        """Remove this uid's invalid claims (root: anyone's) and old temp files -> the ports of removed claims."""
        now, swept = self.clock(), []
        for name in os.listdir(fd):
            if not TMP_RE.match(name):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if self.me.uid in (0, st.st_uid) and now - st.st_ctime > TMP_MAX_AGE:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                continue
        claims = self._claims(fd)
        capped = over_cap(claims, now, self.cap)
        for claim in claims:
            if self.me.uid not in (0, claim.uid):
                continue
            if not self._valid(fd, claim, now, capped) and self._remove(fd, claim):
                swept.append(claim.port)
        return sorted(swept)

    def _scan(self, fd: int, held: Sequence[int], need: int, candidates: Sequence[int],
              act: Optional[Callable[[int], bool]]) -> List[int]:
        """Walk ``candidates`` from a random start; ``act`` reserves a port (None: predict only)."""
        got: List[int] = []
        if not candidates or need <= 0:
            return got
        now = self.clock()
        claims = self._claims(fd)
        capped = over_cap(claims, now, self.cap)
        by_port: Dict[int, List[Claim]] = {}
        for claim in claims:
            by_port.setdefault(claim.port, []).append(claim)
        start = self.rng.randrange(len(candidates))
        for port in list(candidates[start:]) + list(candidates[:start]):
            if len(got) >= need:
                break
            if port in held:
                continue
            if any(self._valid(fd, c, now, capped) for c in by_port.get(port, ())):
                continue
            if not self.bindable(port):
                continue
            if act is None or act(port):
                got.append(port)
        return got

    def predict(self, owner: str, count: int, candidates: Sequence[int]) -> Tuple[List[int], List[int]]:
        """What :meth:`reserve` would return (all ports, new ports), touching nothing."""
        if not self.exists():
            if self.me.uid != 0:
                raise PortError("reservation_dir", f"{self.path} does not exist: {admin_fix(self.path)}")
            if not os.path.isdir(os.path.dirname(self.path)):
                raise PortError("reservation_dir", f"parent of {self.path} does not exist")
            return self._predict_empty(count, candidates)
        with self._dir() as fd:
            wanted = set(candidates)
            held = sorted(r.port for r in self._held(fd, owner) if r.port in wanted)
            if len(held) >= count:
                return held[:count], []
            new = self._scan(fd, held, count - len(held), candidates, None)
            return sorted(held + new), sorted(new)

    def _predict_empty(self, count: int, candidates: Sequence[int]) -> Tuple[List[int], List[int]]:
        got: List[int] = []
        start = self.rng.randrange(len(candidates)) if candidates else 0
        for port in list(candidates[start:]) + list(candidates[:start]):
            if len(got) >= count:
                break
            if self.bindable(port):
                got.append(port)
        return sorted(got), sorted(got)

    def reserve(self, owner: str, count: int, candidates: Sequence[int], lease: int = DEFAULT_LEASE,
                pid: Optional[int] = None) -> Tuple[List[int], List[int]]:
        """Reserve ``count`` ports for ``owner`` -> (its ports, the newly reserved ones).

        Valid reservations the owner already holds among ``candidates`` count first (a re-run is a
        no-op); ones outside ``candidates`` are kept but not returned (``release`` removes them).
        """
        check_request(owner, count, lease, pid, self.alive)
        pid_start = None if pid is None else pid_start_time(pid)
        with self._dir(create=True) as fd:
            self.sweep(fd)
            wanted = set(candidates)
            held = sorted(r.port for r in self._held(fd, owner) if r.port in wanted)
            if len(held) >= count:
                return held[:count], []
            now = self.clock()
            mine = live_count(self._claims(fd), self.me.uid, now)
            if mine + count - len(held) > self.cap:
                raise PortError("count", f"you hold {mine} live port reservations in {self.path} and at most "
                                         f"{self.cap} count for other users; release ended sessions' ports "
                                         "(free_port state=absent) or wait for their leases to end")
            made: Dict[int, Tuple[int, int]] = {}

            def act(port: int) -> bool:
                me = self.me
                res = Reservation(port=port, owner=owner, host=me.host, boot_id=me.boot_id, created=now,
                                  expires=now + lease, pid=pid, pid_start=pid_start)
                ident = self._claim_port(fd, res)
                if ident is not None:
                    made[port] = ident
                return ident is not None

            new = self._scan(fd, held, count - len(held), candidates, act)
            if len(held) + len(new) < count:
                for port in new:
                    self._withdraw(fd, port, made[port])
                raise PortError("count", f"only {len(held) + len(new)} of {count} ports are free in the range "
                                         "(after exclusions)")
            return sorted(held + new), sorted(new)

    def release(self, owner: str, dry_run: bool = False) -> List[int]:
        """Remove this uid's reservations of ``owner`` on this host (valid or stale) -> their ports."""
        validate_owner(owner)
        if not self.exists():
            return []
        with self._dir() as fd:
            mine = [(c, r) for c, r in self._own_records(fd) if r is not None and r.owner == owner
                    and r.host == self.me.host]
            if not dry_run:
                for claim, _res in mine:
                    self._remove(fd, claim)
            return sorted({r.port for _c, r in mine})


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
