"""What every part of the bed shares: the hosts and users, running a command inside a host as a user,
daemons started in a host, waiting, the bed root's directories and lock, and the health record."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

HOSTS: Dict[str, str] = {
    "workspace": "10.199.77.10",
    "controller": "10.199.77.20",
    "compute1": "10.199.77.31",
    "compute2": "10.199.77.32",
}
COMPUTE_HOSTS = ("compute1", "compute2")
WS_USER = "wsuser"
WS_USER2 = "wsuser2"  # another user of the same workspace host (the shared-host tests' other user)
CLUSTER_USERS = ("cluser", "cluser2")
USERS = (WS_USER, WS_USER2, *CLUSTER_USERS)
SGE_ADMIN = "sgeadmin"  # the admin user gridengine-common's postinst would create (same name)
PORTS_DIR = Path("/tmp/isession-ports")  # _ports.DEFAULT_DIR: every bed host shares this /tmp
PREFIX = "hpcbed"
VENV = Path(os.environ.get("HPCBED_VENV", "/opt/hpc-interactive/venv"))
REPO = Path(__file__).resolve().parents[3]
MARKER = "# hpcbed: written by the hpc.interactive test bed (tests/bed); `tests/bed/bed down` removes it"
BOOT_TIMEOUT = 60.0
BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

PathLike = Union[str, Path]


class BedError(RuntimeError):
    """The bed could not do what was asked; the message says what and why."""


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


def default_root() -> Path:
    return Path(os.environ.get("HPCBED_ROOT", "/var/tmp/hpcbed"))


def _log(msg: str) -> None:
    print(f"bed: {msg}", file=sys.stderr, flush=True)


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 60, input_text: Optional[str] = None,  # noqa: PLR0917
        env: Optional[Mapping[str, str]] = None, cwd: Optional[PathLike] = None) -> subprocess.CompletedProcess:
    """Run a root-namespace command (argv list) and capture its text output."""
    full_env = dict(os.environ if env is None else env)
    full_env["LC_ALL"] = "C.UTF-8"
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input_text,
                        env=full_env, check=False, cwd=str(cwd) if cwd else None)
    if check and cp.returncode != 0:
        raise CommandFailed(cp.returncode, list(argv), cp.stdout, cp.stderr)
    return cp


def _proc_stat(path: str) -> List[str]:
    """Fields of a /proc stat file after the command name (state first); [] when it is gone."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pid_alive(pid: int) -> bool:
    """True while any thread of ``pid`` runs: a zombie leader whose threads still exit counts as alive."""
    fields = _proc_stat(f"/proc/{pid}/stat")
    if not fields:
        return False
    if fields[0] not in ("Z", "X"):
        return True
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any((_proc_stat(f"/proc/{pid}/task/{t}/stat") or ["X"])[0] not in ("Z", "X") for t in tids)


def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` (clock ticks since boot): tells a process from a later one with the same pid."""
    fields = _proc_stat(f"/proc/{pid}/stat")
    return fields[19] if len(fields) > 19 else None


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split()[4] == target for line in fh)


def _ns_inode(path: PathLike) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _proc_ns_inodes(pid: int, kind: str) -> set:
    """Inodes of ``pid``'s ``kind`` (net, uts) namespace; a zombie leader's come from its live threads."""
    ino = _ns_inode(f"/proc/{pid}/ns/{kind}")
    if ino is not None:
        return {ino}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    return {i for i in (_ns_inode(f"/proc/{pid}/task/{t}/ns/{kind}") for t in tids) if i is not None}


def _require_root() -> None:
    if os.geteuid() != 0:
        raise BedError("the test bed needs root (namespaces, daemons, users)")


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _ancestors(pid: int) -> List[int]:
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _write_in_place(path: Path, text: str) -> None:
    """Rewrite a file in place (/etc/hosts may be a bind mount that a rename would not replace)."""
    with open(path, "r+", encoding="utf-8") as fh:
        fh.seek(0)
        fh.write(text)
        fh.truncate()


class Health:
    """Per-host list of (check, ok, detail)."""

    def __init__(self) -> None:
        self.items: Dict[str, List[Tuple[str, bool, str]]] = {}

    def add(self, part: str, check: str, ok: bool, detail: str = "") -> None:
        self.items.setdefault(part, []).append((check, bool(ok), detail))

    def part_ok(self, part: str, ignore: Iterable[str] = ()) -> bool:
        return all(ok for check, ok, _ignored in self.items.get(part, []) if check not in ignore) and part in self.items

    @property
    def ok(self) -> bool:
        return bool(self.items) and all(ok for checks in self.items.values() for _ignored, ok, _ignored in checks) \
            and all(h in self.items for h in HOSTS)

    def report(self) -> str:
        lines = []
        for part, checks in self.items.items():
            bad = [c for c in checks if not c[1]]
            lines.append(f"{part:<11} {'ok' if not bad else 'FAILED'}  "
                         + "; ".join(f"{c}={'ok' if ok else 'FAIL'} ({d})" for c, ok, d in checks))
        return "\n".join(lines)


class BedBase:
    """The bed's root, its hosts and users, and running things inside a host. Every method that changes the
    machine needs root."""

    def __init__(self, root: Optional[PathLike] = None, repo: PathLike = REPO, venv: PathLike = VENV) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.repo = Path(repo)
        self.venv = Path(venv)
        self.hosts = dict(HOSTS)
        self.users = USERS
        self._collections: Optional[Path] = None

    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def ip(self, host: str) -> str:
        self._check_host(host)
        return self.hosts[host]

    @property
    def lock_path(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")

    def _check_host(self, host: str) -> None:
        if host not in HOSTS:
            raise BedError(f"unknown bed host {host!r}; hosts are {', '.join(HOSTS)}")

    def user_env(self, user: Optional[str], env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """A login-like environment for ``user`` (root when None) with the venv first on PATH."""
        name = user or "root"
        pw = pwd.getpwnam(name)
        path = f"{self.venv}/bin:{BASE_PATH}" if name == "root" else f"{self.venv}/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        out = {
            "HOME": pw.pw_dir, "USER": name, "LOGNAME": name, "SHELL": pw.pw_shell or "/bin/bash",
            "PATH": path, "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb"),
        }
        out.update(env or {})
        return out

    def wrap(self, host: Optional[str], argv: Union[str, Sequence[str]], user: Optional[str] = None) -> List[str]:
        """argv that runs ``argv`` in ``host``'s net+uts namespaces as ``user`` (root when None).

        ``host=None`` is the machine itself (the root namespaces), the only place that reaches the
        package registries: installs run there, and the bed's hosts share its filesystem. A string is
        run with ``bash -c``.
        """
        if isinstance(argv, str):
            argv = ["bash", "-c", argv]
        ns = [] if host is None else ["nsenter", f"--net={self.netns_path(host)}", f"--uts={self.uts_path(host)}", "--"]
        if user and user != "root":
            pw = pwd.getpwnam(user)
            ns += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
        return ns + list(argv)

    def popen(self, host: str, argv: Union[str, Sequence[str]], user: Optional[str] = None,
              env: Optional[Mapping[str, str]] = None, cwd: Optional[PathLike] = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``host`` as ``user``; keyword arguments go to ``subprocess.Popen``."""
        full_env = self.user_env(user, env)
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.wrap(host, argv, user), env=full_env,
                                cwd=str(cwd) if cwd else full_env["HOME"], **kwargs)

    def run(self, host: str, argv: Union[str, Sequence[str]], user: Optional[str] = None,  # noqa: PLR0917
            env: Optional[Mapping[str, str]] = None, input: Optional[str] = None,  # noqa: A002 (API name)
            timeout: Optional[float] = 60, check: bool = False, cwd: Optional[PathLike] = None
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host`` as ``user`` and wait; on timeout its process group is killed."""
        proc = self.popen(host, argv, user=user, env=env, cwd=cwd, stdin=subprocess.PIPE if input is not None
                          else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout or 0, out, err) from None
        cp = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and cp.returncode != 0:
            raise CommandFailed(cp.returncode, proc.args, out, err)
        return cp

    def user_tmpdir(self, user: Optional[str] = None) -> Path:
        """A fresh directory owned by ``user`` (root when None), mode 0700, under the bed root."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        path = Path(tempfile.mkdtemp(prefix=f"{user or 'root'}-", dir=base))
        if user and user != "root":
            pw = pwd.getpwnam(user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o700)
        return path

    def write_user_file(self, user: Optional[str], path: PathLike, text: str, mode: int = 0o600) -> Path:
        """Write ``text`` to ``path`` owned by ``user`` with ``mode``."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, mode)
        if user and user != "root":
            pw = pwd.getpwnam(user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    @contextlib.contextmanager
    def locked(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def boot_seconds(self) -> float:
        try:
            return float(json.loads((self.root / "bed.json").read_text())["boot_seconds"])
        except (OSError, ValueError, KeyError):
            return float("nan")

    def _write_state(self, data: Mapping) -> None:
        (self.root / "bed.json").write_text(json.dumps(dict(data), indent=2) + "\n")
        (self.root / "bed.json").chmod(0o644)

    def _make_dirs(self) -> None:
        for d in (self.root, self.root / "uts", self.root / "hosts", self.slurm_dir, self.slurm_dir / "ctld",
                  self.slurm_dir / "spool", self.root / "tmp", self.root / "log"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        for node in COMPUTE_HOSTS:
            (self.slurm_dir / "spool" / node).mkdir(exist_ok=True)

    @staticmethod
    def _provision_ports_dir() -> None:
        """The hosts' port reservation directory, root:root 1777, as a site's install entry point and tmpfiles.d line
        make it (free_port refuses one another user owns, and only root may make a missing one)."""
        if PORTS_DIR.is_symlink() or (PORTS_DIR.exists() and not PORTS_DIR.is_dir()):
            PORTS_DIR.unlink()
        PORTS_DIR.mkdir(exist_ok=True)
        os.chown(PORTS_DIR, 0, 0)
        PORTS_DIR.chmod(0o1777)  # noqa: S103 - shared by all users, sticky

    def _daemon(self, host: str, argv: Sequence[str], log_name: str, env: Optional[Mapping[str, str]] = None) -> None:
        """Start a daemonizing command inside ``host``'s namespaces and wait for its parent to exit."""
        self._daemons([(host, argv, log_name)], env=env)

    def _daemons(self, specs: Sequence[Tuple[str, Sequence[str], str]], env: Optional[Mapping[str, str]] = None,
                 timeout: float = 30, meanwhile=None) -> None:
        """Start daemonizing commands ``(host, argv, log_name)`` side by side; wait for every parent to exit.

        ``meanwhile`` (a callable) runs after they were started and before the wait.
        """
        full_env = {"PATH": BASE_PATH, "LC_ALL": "C", "HOME": "/root", **(env or {})}
        started = []
        for host, argv, log_name in specs:
            log = self.root / "log" / f"{log_name}.out"
            with open(log, "ab") as out:
                proc = subprocess.Popen(self.wrap(host, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        env=full_env, cwd="/", start_new_session=True)
            started.append((host, argv, log, proc))
        if meanwhile is not None:
            meanwhile()
        end = time.monotonic() + timeout
        errors = []
        for host, argv, log, proc in started:
            try:
                rc = proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                errors.append(f"{argv[0]} on {host} did not return in {timeout:.0f} s")
                continue
            if rc != 0:
                errors.append(f"{argv[0]} on {host} exited {rc}: {log.read_text()[-2000:]}")
        if errors:
            raise BedError("; ".join(errors))

    @staticmethod
    def _wait(pred, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                if pred():
                    return
            if time.monotonic() > end:
                raise BedError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)
