"""The hpc.interactive test bed: four "hosts" made of network + UTS namespaces on one machine.

Standard library only; run as root. ``tests/bed/bed`` is the command-line face of this module and
``tests/integration/conftest.py`` hands a :class:`Bed` to the tests.

Layout (``HPCBED_ROOT``, default ``/var/tmp/hpcbed``; removed by ``down``)::

    bed.json            what was booted and how long it took
    inventory.ini       the Ansible inventory (also printed by ``bed inventory``)
    uts/<host>          UTS namespace files (nsfs bind mounts) -> ``hostname`` says <host>
    hosts/<host>/       sshd config, host key, pid and log of that host
    slurm/              slurmctld state, slurmd spool dirs (%n), pids, logs, jobcomp.txt
    sge/                SGE_ROOT of the Son of Grid Engine cluster (cell ``default``: common/, spool/),
                        bin|utilbin|lib/lx-amd64 -> the unpacked binaries, hpcbed/ (qconf input), tmp/ (jobs)
    collections/        the installed copy of the collection (``install_collection``)
    callback_plugins/   the ``bed_json`` stdout callback used by ``playbook_json``
    tmp/                per-user scratch dirs made by ``user_tmpdir``

Outside the root: network namespaces ``hpcbed-<host>`` and ``hpcbed-net`` (the bridge), a marked
block in /etc/hosts, /etc/slurm/slurm.conf (a pre-existing one is kept as
``slurm.conf.hpcbed-backup`` and restored by ``down``), one munged on the default socket, the port
reservation directory /tmp/isession-ports made root:root 1777 as a site's install does (kept by ``down``), and the
users wsuser, wsuser2 (a second workspace user: the other user of the shared-host tests), cluser, cluser2 (kept by
``down``: their homes hold their keys) and the system user sgeadmin. ``install`` also fills
/opt/hpc-interactive/sge (the unpacked gridengine .debs) and /opt/hpc-interactive/sge-debs (the .debs); both stay.

Son of Grid Engine 8.1.9 runs beside Slurm: sge_qmaster on the controller, sge_execd on compute1 and
compute2 (queue ``all.q``). Its binaries come from Debian's gridengine .debs, unpacked by ``install``
into ``/opt/hpc-interactive/sge`` and never installed with dpkg: gridengine-client conflicts with
slurm-wlm-torque (both ship /usr/bin/qsub), which the bed needs. sge_qmaster and the spool tools
dlopen() a hard-coded /usr/lib/gridengine/libspoolc.so, so they run in a private mount namespace
with a read-only overlay that adds the unpacked /usr/lib/gridengine (nothing outside sees it). SGE is
not on any system PATH: use ``Bed.sge`` or source ``$SGE_ROOT/default/common/settings.sh``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
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
PORTS_DIR = Path("/tmp/isession-ports")  # _ports.DEFAULT_DIR: every bed host shares this /tmp
PREFIX = "hpcbed"
NET_NS = "hpcbed-net"
BRIDGE = "br-hpcbed"
NETNS_DIR = Path("/run/netns")
PACKAGES = (
    "openssh-server", "openssh-client", "slurmctld", "slurmd", "slurm-client", "munge", "slurm-wlm-torque",
    "iproute2", "procps", "psmisc", "python3-venv", "python3-yaml", "curl", "util-linux", "nginx-light",
    "environment-modules",  # a real `module` command for the session_modules tests
    "chromium",  # the browser of the desktop and gateway tests (tests/integration/browser.py); the VNC desktop itself
    # is provisioned by the vnc role's install entry point (tests/integration/desktop_common.py)
    # runtime libraries of the unpacked gridengine binaries (see SGE_PREFIX; install() checks them with ldd)
    "libjemalloc2", "libhwloc15", "libmunge2", "libtirpc3", "libdb5.3", "libssl3",
)
# never among them: gridengine-client/-master/-exec (they conflict with slurm-wlm-torque; see SGE_PREFIX)
VENV = Path(os.environ.get("HPCBED_VENV", "/opt/hpc-interactive/venv"))
REPO = Path(__file__).resolve().parents[2]
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURM_BACKUP = SLURM_CONF.with_name("slurm.conf.hpcbed-backup")
ETC_HOSTS = Path("/etc/hosts")
HOSTS_BEGIN = "# BEGIN hpcbed (hpc.interactive test bed; removed by `tests/bed/bed down`)"
HOSTS_END = "# END hpcbed"
MARKER = "# hpcbed: written by the hpc.interactive test bed (tests/bed); `tests/bed/bed down` removes it"
MUNGE_RUN = Path("/run/munge")
MUNGE_PID = MUNGE_RUN / "munged.pid"
BOOT_TIMEOUT = 60.0
BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STALE_DOWN_SECONDS = 300.0  # `up` resumes nodes downed longer ago (a test in progress may have downed a newer one)
_USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")

# Son of Grid Engine: Debian's .debs unpacked (dpkg-deb -x) into SGE_PREFIX, cached in SGE_DEB_CACHE
SGE_PREFIX = Path(os.environ.get("HPCBED_SGE_PREFIX", "/opt/hpc-interactive/sge"))
SGE_DEB_CACHE = SGE_PREFIX.with_name(SGE_PREFIX.name + "-debs")
SGE_DEBS = ("gridengine-common", "gridengine-client", "gridengine-exec", "gridengine-master")
SGE_STAMP = ".hpcbed-sge.json"  # in SGE_PREFIX: {package: version} of what is unpacked there
SGE_CELL = "default"
SGE_ARCH = "lx-amd64"
SGE_ADMIN = "sgeadmin"  # the admin user gridengine-common's postinst would create (same name)
SGE_QMASTER_HOST = "controller"
SGE_EXEC_HOSTS = COMPUTE_HOSTS
SGE_SUBMIT_HOSTS = (SGE_QMASTER_HOST, *SGE_EXEC_HOSTS)
SGE_QUEUE = "all.q"
SGE_SLOTS = 2
SGE_GID_BASE = 20000  # each execd gets its own 100 job-tracking group ids (the hosts share one /proc)
SGE_PROGRAMS = ("sge_qmaster", "sge_execd", "sge_shepherd", "qsub", "qstat", "qdel", "qacct", "qconf",
                "spoolinit", "spooldefaults.bin")
SGE_BAD_QUEUE_STATES = "uaEdo"  # unknown, alarm, Error, disabled, orphaned

PathLike = Union[str, Path]


class BedError(RuntimeError):
    """The bed could not do what was asked; the message says what and why."""


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


class PlaybookResult(dict):
    """Parsed output of the ``bed_json`` callback, plus ``rc``, ``stdout`` and ``stderr``."""

    rc: int = 0
    stdout: str = ""
    stderr: str = ""

    def tasks(self) -> List[dict]:
        return [t for play in self.get("plays", []) for t in play.get("tasks", [])]

    def task(self, name: str, host: Optional[str] = None) -> dict:
        """Result of the first task called ``name`` (for ``host``, or the only host it ran on)."""
        for t in self.tasks():
            if t["task"]["name"] == name:
                hosts = t["hosts"]
                if host is None:
                    if len(hosts) != 1:
                        raise KeyError(f"task {name!r} ran on {sorted(hosts)}: say which host")
                    return next(iter(hosts.values()))
                return hosts[host]
        raise KeyError(f"no task {name!r} in {[t['task']['name'] for t in self.tasks()]}")


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


class Bed:
    """The test bed. Every method that changes the machine needs root."""

    def __init__(self, root: Optional[PathLike] = None, repo: PathLike = REPO, venv: PathLike = VENV) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.repo = Path(repo)
        self.venv = Path(venv)
        self.hosts = dict(HOSTS)
        self.users = USERS
        self._collections: Optional[Path] = None

    # ------------------------------------------------------------------ paths and names
    @staticmethod
    def ns_name(host: str) -> str:
        return f"{PREFIX}-{host}"

    def netns_path(self, host: str) -> Path:
        self._check_host(host)
        return NETNS_DIR / self.ns_name(host)

    def uts_path(self, host: str) -> Path:
        self._check_host(host)
        return self.root / "uts" / host

    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def ip(self, host: str) -> str:
        self._check_host(host)
        return self.hosts[host]

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory.ini"

    @property
    def collections_path(self) -> Path:
        """ANSIBLE_COLLECTIONS_PATH: this object's own installed copy, else the last one installed.

        Each :meth:`install_collection` makes a new copy (``collections/c-<pid>-<time>``) and points
        ``collections/current`` at it, so a session installing its copy never pulls the files from under
        another session's running playbooks.
        """
        if self._collections is not None:
            return self._collections
        return self.root / "collections" / "current"

    @property
    def callback_dir(self) -> Path:
        return self.root / "callback_plugins"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def sge_root(self) -> Path:
        """SGE_ROOT of the bed's Son of Grid Engine cluster (cell ``default``)."""
        return self.root / "sge"

    @property
    def sge_cell(self) -> str:
        return SGE_CELL

    @property
    def sge_bin(self) -> Path:
        """The SGE client and daemon bin dir ($SGE_ROOT/bin/lx-amd64, a link to the unpacked binaries)."""
        return self.sge_root / "bin" / SGE_ARCH

    @property
    def sge_common(self) -> Path:
        return self.sge_root / SGE_CELL / "common"

    @property
    def sge_qmaster_spool(self) -> Path:
        return self.sge_root / SGE_CELL / "spool" / "qmaster"

    @property
    def sge_execd_spool(self) -> Path:
        """execd_spool_dir; each execd spools to <this>/<host>."""
        return self.sge_root / SGE_CELL / "spool" / "execd"

    @property
    def sge_conf_dir(self) -> Path:
        """The files ``up`` feeds to spooldefaults and qconf."""
        return self.sge_root / "hpcbed"

    @property
    def sge_tmpdir(self) -> Path:
        """The queue's tmpdir (execd makes <job>.<task>.<queue>/ in it for each job)."""
        return self.sge_root / "tmp"

    @staticmethod
    def sge_binaries() -> Path:
        """Where the unpacked gridengine binaries are (binary_path; $SGE_ROOT/bin/lx-amd64 points here)."""
        return SGE_PREFIX / "usr" / "lib" / "gridengine"

    @staticmethod
    def sge_share() -> Path:
        return SGE_PREFIX / "usr" / "share" / "gridengine"

    def sge_env(self) -> Dict[str, str]:
        """SGE_ROOT, SGE_CELL and SGE_ARCH: what every SGE client and daemon needs (PATH not included)."""
        return {"SGE_ROOT": str(self.sge_root), "SGE_CELL": SGE_CELL, "SGE_ARCH": SGE_ARCH}

    @property
    def lock_path(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")

    def _check_host(self, host: str) -> None:
        if host not in HOSTS:
            raise BedError(f"unknown bed host {host!r}; hosts are {', '.join(HOSTS)}")

    # ------------------------------------------------------------------ running inside a host
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

    # ------------------------------------------------------------------ Ansible
    def install_collection(self, repo: Optional[PathLike] = None) -> Path:
        """Build the collection from the repo and install a world-readable copy under the bed root."""
        repo = Path(repo or self.repo)
        ansible_galaxy = str(self.venv / "bin" / "ansible-galaxy")
        with tempfile.TemporaryDirectory(prefix="hpcbed-build-") as build:
            build_argv = [ansible_galaxy, "collection", "build", str(repo), "--output-path", build, "--force"]
            for attempt in range(3):  # files appearing/vanishing in a busy checkout can fail one walk
                cp = _sh(build_argv, timeout=300, check=False)
                if cp.returncode == 0:
                    break
                _log(f"collection build failed (attempt {attempt + 1}): {cp.stderr.strip()[-500:]}")
                time.sleep(1)
            else:
                raise CommandFailed(cp.returncode, build_argv, cp.stdout, cp.stderr)
            tarballs = sorted(Path(build).glob("*.tar.gz"))
            if not tarballs:
                raise BedError(f"ansible-galaxy built no tarball from {repo}")
            dest = Path(tempfile.mkdtemp(prefix=f"c-{os.getpid()}-", dir=self._collections_base()))
            _sh([ansible_galaxy, "collection", "install", str(tarballs[-1]), "-p", str(dest), "--force"], timeout=300)
        self._world_readable(dest)
        current = dest.parent / "current"
        tmp_link = dest.parent / f".current.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(dest.name)
        os.replace(tmp_link, current)
        self._collections = dest
        self._install_callback()
        return dest

    def _collections_base(self) -> Path:
        base = self.root / "collections"
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        return base

    def collection_installed(self) -> bool:
        return (self.collections_path / "ansible_collections" / "hpc" / "interactive" / "MANIFEST.json").is_file()

    def _install_callback(self) -> None:
        self.callback_dir.mkdir(parents=True, exist_ok=True)
        self.callback_dir.chmod(0o755)
        src = Path(__file__).with_name("callback_plugins") / "bed_json.py"
        tmp = self.callback_dir / f".bed_json.{os.getpid()}"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)
        os.replace(tmp, self.callback_dir / "bed_json.py")

    @staticmethod
    def _world_readable(top: Path) -> None:
        for dirpath, _dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)  # noqa: S103 - read-only copy every bed user must read
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o444)

    def ansible_env(self, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        out = {
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections_path),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "ANSIBLE_CALLBACK_PLUGINS": str(self.callback_dir),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        out.update(env or {})
        return out

    def _playbook_path(self, playbook: PathLike, user: str) -> Path:
        if isinstance(playbook, str) and "\n" in playbook:  # playbook text: write it where the user can read it
            return self.write_user_file(user, self.user_tmpdir(user) / "playbook.yml", playbook)
        return Path(playbook)

    def ansible_playbook(self, playbook: PathLike, host: str = "workspace", user: str = WS_USER,  # noqa: PLR0917
                         extra_vars: Optional[Mapping] = None, check: bool = False, diff: bool = False,
                         inventory: Optional[PathLike] = None, limit: Optional[str] = None, timeout: float = 600,
                         env: Optional[Mapping[str, str]] = None, verbosity: int = 0) -> subprocess.CompletedProcess:
        """Run ansible-playbook from the venv inside ``host`` as ``user`` against the bed inventory.

        ``playbook`` is a path the user can read, or playbook text (a string with newlines).
        ``extra_vars`` go through a 0600 file owned by the user (``-e @file``), never argv.
        """
        path = self._playbook_path(playbook, user)
        argv = [str(self.venv / "bin" / "ansible-playbook"), "-i", str(inventory or self.inventory_path), str(path)]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        if limit:
            argv += ["--limit", limit]
        if verbosity:
            argv.append("-" + "v" * verbosity)
        if extra_vars is not None:
            ev = self.write_user_file(user, self.user_tmpdir(user) / "extra_vars.json", json.dumps(dict(extra_vars)))
            argv += ["-e", f"@{ev}"]
        return self.run(host, argv, user=user, env=self.ansible_env(env), timeout=timeout, cwd=path.parent)

    def playbook_json(self, playbook: PathLike, host: str = "workspace", user: str = WS_USER,  # noqa: PLR0917
                      extra_vars: Optional[Mapping] = None, check: bool = False, diff: bool = False,
                      inventory: Optional[PathLike] = None, limit: Optional[str] = None, timeout: float = 600,
                      env: Optional[Mapping[str, str]] = None) -> PlaybookResult:
        """Like :meth:`ansible_playbook` with the ``bed_json`` callback; returns the parsed document."""
        if not (self.callback_dir / "bed_json.py").exists():
            self._install_callback()
        full_env = {"ANSIBLE_STDOUT_CALLBACK": "bed_json", **(env or {})}
        cp = self.ansible_playbook(playbook, host=host, user=user, extra_vars=extra_vars, check=check, diff=diff,
                                   inventory=inventory, limit=limit, timeout=timeout, env=full_env)
        result = PlaybookResult()
        text = cp.stdout
        start = text.find("{")
        try:
            result.update(json.loads(text[start:]) if start >= 0 else {})
        except ValueError as exc:
            result["parse_error"] = str(exc)
        result.rc, result.stdout, result.stderr = cp.returncode, cp.stdout, cp.stderr
        return result

    def ansible_module(self, module: str, args: Mapping, host: str = "workspace",  # noqa: PLR0917
                       user: str = WS_USER,
                       target: str = "localhost", check: bool = False, diff: bool = False,
                       timeout: float = 600, env: Optional[Mapping[str, str]] = None) -> dict:
        """Call one module on ``target`` (an inventory host or localhost) and return its result dict.

        The call is a one-task play written to a 0600 file (arguments stay out of argv); every string
        argument is marked ``!unsafe`` so it reaches the module verbatim. The result carries ``rc``
        (ansible-playbook's exit code) and, when no result was recorded, ``failed`` with the output.
        """
        play_vars = "{ansible_python_interpreter: /usr/bin/python3}" if target == "localhost" else "{}"
        text = (f"- hosts: {json.dumps(target)}\n  gather_facts: false\n  vars: {play_vars}\n  tasks:\n"
                f"    - name: bed module call\n      {module}: {_unsafe_yaml(dict(args))}\n")
        res = self.playbook_json(text, host=host, user=user, check=check, diff=diff, timeout=timeout, env=env)
        try:
            out = dict(res.task("bed module call", target))
        except KeyError:
            out = {"failed": True, "msg": "no result recorded", "stdout": res.stdout, "stderr": res.stderr}
        out["rc"] = res.rc
        return out

    # ------------------------------------------------------------------ Slurm helpers
    def slurm(self, argv: Sequence[str], user: Optional[str] = None, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command on the controller (as root by default)."""
        return self.run("controller", list(argv), user=user, check=check, timeout=timeout, env={"LC_ALL": "C"})

    def node_state(self, name: str) -> str:
        """Slurm's long state of node ``name`` (e.g. ``idle``, ``down``, ``down*``)."""
        return self.slurm(["sinfo", "-h", "-N", "-n", name, "-o", "%T"]).stdout.split()[0]

    def node_down_for(self, name: str) -> float:
        """Seconds since ``name`` was marked down/drained by hand (0 when it is not)."""
        out = self.slurm(["scontrol", "show", "node", "-o", name], check=False).stdout
        state = re.search(r"\bState=(\S+)", out)
        if not state or not any(w in state.group(1) for w in ("DOWN", "DRAIN", "FAIL")):
            return 0.0
        stamp = re.search(r"\bReason=.*\[[^@\]]*@(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\]", out)
        if not stamp:
            return float("inf")
        return max(0.0, time.time() - time.mktime(time.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S")))

    def node_down(self, name: str, reason: str = "hpcbed test", timeout: float = 60) -> None:
        """Mark ``name`` DOWN (simulated node loss) and wait until Slurm reports it down."""
        self.slurm(["scontrol", "update", f"NodeName={name}", "State=DOWN", f"Reason={reason}"])
        # scontrol's State carries the DOWN flag at once; sinfo may say "mixed" while a job is killed
        self._wait(lambda: "DOWN" in self.node_flags(name), timeout, f"node {name} down")

    def node_flags(self, name: str) -> str:
        """``State=`` of ``scontrol show node`` (e.g. ``IDLE``, ``DOWN``, ``MIXED+DRAIN``)."""
        out = self.slurm(["scontrol", "show", "node", "-o", name], check=False).stdout
        m = re.search(r"\bState=(\S+)", out)
        return m.group(1) if m else ""

    def node_resume(self, name: str, timeout: float = 60) -> None:
        """Return ``name`` to service (when it is down/drained/failed) and wait until it is usable."""
        state = self.node_state(name).lower()
        if any(word in state for word in ("down", "drain", "fail")):
            self.slurm(["scontrol", "update", f"NodeName={name}", "State=RESUME"], check=False)
        self._wait(lambda: self.node_state(name).lower() in _USABLE_NODE_STATES, timeout,
                   f"node {name} usable after resume")

    # ------------------------------------------------------------------ SGE helpers
    def sge(self, argv: Sequence[str], user: Optional[str] = None, check: bool = True,  # noqa: PLR0917
            timeout: float = 30, cwd: Optional[PathLike] = None, host: str = SGE_QMASTER_HOST
            ) -> subprocess.CompletedProcess:
        """Run an SGE client command (qsub, qstat, qdel, qacct, qconf...) on the controller (as root by default).

        SGE_ROOT, SGE_CELL and SGE_ARCH are set and the SGE bin dir comes first on PATH, so ``qsub`` is
        SGE's and not Slurm's torque wrapper /usr/bin/qsub. ``host`` picks another submit host.
        """
        env = {**self.sge_env(), "LC_ALL": "C", "PATH": f"{self.sge_bin}:{self.user_env(user)['PATH']}"}
        return self.run(host, list(argv), user=user, env=env, check=check, timeout=timeout, cwd=cwd)

    def sge_queue_instances(self, timeout: float = 15) -> Dict[str, Tuple[str, str]]:
        """``{host: (load_avg, states)}`` of the all.q instances from ``qstat -f`` (load ``-NA-`` = no report yet)."""
        cp = self.sge(["qstat", "-f", "-q", SGE_QUEUE], check=False, timeout=timeout)
        out = {}
        for line in cp.stdout.splitlines():
            cols = line.split()
            if cols and cols[0].startswith(f"{SGE_QUEUE}@") and len(cols) >= 5:
                out[cols[0].split("@", 1)[1]] = (cols[3], cols[5] if len(cols) > 5 else "")
        return out

    def _sge_daemon_pids(self) -> Dict[str, int]:
        """``{host: pid}`` of the SGE daemons whose pid files name a live sge_* process (not checked: its netns)."""
        files = {SGE_QMASTER_HOST: self.sge_qmaster_spool / "qmaster.pid"}
        files.update({h: self.sge_execd_spool / h / "execd.pid" for h in SGE_EXEC_HOSTS})
        out = {}
        for host, path in files.items():
            pid = _read_pid(path)
            if pid and _pid_alive(pid) and _comm(pid).startswith("sge_"):
                out[host] = pid
        return out

    # ------------------------------------------------------------------ lifecycle
    @contextlib.contextmanager
    def locked(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def missing_packages(self) -> List[str]:
        cp = _sh(["dpkg-query", "-W", "-f=${Package}\t${Status}\n", *PACKAGES], check=False)
        installed = set()
        for line in cp.stdout.splitlines():
            name, _ignored, status = line.partition("\t")
            if status.endswith("install ok installed"):
                installed.add(name.split(":")[0])
        return [pkg for pkg in PACKAGES if pkg not in installed]

    def install(self) -> List[str]:
        """Install what the bed needs (apt-get update only when something is missing), unpack SGE; fix venv perms.

        Returns what was installed: apt packages, and ``gridengine-*=VERSION`` when the SGE .debs were
        (re)unpacked into SGE_PREFIX.
        """
        _require_root()
        missing = self.missing_packages()
        if missing:
            _log(f"installing {' '.join(missing)}")
            _apt(["update"], timeout=600)
            _apt_install(missing)
        unpacked = self.install_sge()
        self._ensure_venv()
        return missing + unpacked

    def sge_installed(self) -> Dict[str, str]:
        """``{package: version}`` of the gridengine .debs unpacked in SGE_PREFIX ({} when incomplete)."""
        try:
            stamp = json.loads((SGE_PREFIX / SGE_STAMP).read_text())
        except (OSError, ValueError):
            return {}
        if set(stamp) != set(SGE_DEBS) or not all(os.access(self.sge_binaries() / p, os.X_OK) for p in SGE_PROGRAMS):
            return {}
        return stamp

    def install_sge(self) -> List[str]:
        """Make the gridengine binaries available without installing the packages.

        gridengine-client conflicts with slurm-wlm-torque (apt would remove the torque wrappers the bed
        needs), so the four .debs are fetched with ``apt-get download`` into SGE_DEB_CACHE and unpacked
        with ``dpkg-deb -x`` into SGE_PREFIX; dpkg never hears of them. Idempotent: nothing happens when
        SGE_PREFIX already holds the candidate versions (or holds a complete tree and apt knows no
        candidate). Returns ``package=version`` for each .deb unpacked.
        """
        _require_root()
        have = self.sge_installed()
        want = _apt_candidates(SGE_DEBS)
        if not all(want.values()) and not have:
            _apt(["update"], timeout=600)
            want = _apt_candidates(SGE_DEBS)
        if have and (have == want or not all(want.values())):
            self._check_sge_libraries()
            return []
        if not all(want.values()):
            raise BedError(f"apt knows no candidate for {[p for p, v in want.items() if not v]}")
        SGE_DEB_CACHE.mkdir(parents=True, exist_ok=True)
        SGE_DEB_CACHE.chmod(0o755)
        debs = []
        for pkg, version in want.items():
            deb = _cached_deb(pkg, version)
            if deb is None:
                _log(f"downloading {pkg}={version} into {SGE_DEB_CACHE}")
                _apt(["download", f"{pkg}={version}"], timeout=600, cwd=SGE_DEB_CACHE)
                deb = _cached_deb(pkg, version)
                if deb is None:
                    raise BedError(f"apt-get download {pkg}={version} left no such .deb in {SGE_DEB_CACHE}")
            debs.append(deb)
        new = SGE_PREFIX.with_name(f".{SGE_PREFIX.name}.new-{os.getpid()}")
        old = SGE_PREFIX.with_name(f".{SGE_PREFIX.name}.old-{os.getpid()}")
        shutil.rmtree(new, ignore_errors=True)
        for deb in debs:
            _sh(["dpkg-deb", "-x", str(deb), str(new)], timeout=300)
        (new / SGE_STAMP).write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
        new.chmod(0o755)
        if SGE_PREFIX.exists():
            os.rename(SGE_PREFIX, old)
        os.rename(new, SGE_PREFIX)
        shutil.rmtree(old, ignore_errors=True)
        self._check_sge_libraries()
        _log(f"unpacked {' '.join(p.name for p in debs)} into {SGE_PREFIX}")
        return [f"{p}={v}" for p, v in want.items()]

    def _check_sge_libraries(self) -> None:
        missing = set()
        for prog in SGE_PROGRAMS:
            cp = _sh(["ldd", str(self.sge_binaries() / prog)], check=False)
            missing.update(line.split()[0] for line in cp.stdout.splitlines()
                           if "not found" in line and "libspool" not in line)  # libspool*: dlopen()ed, see up
        if missing:
            raise BedError(f"the gridengine binaries miss shared libraries {sorted(missing)}: add their packages "
                           "to PACKAGES in tests/bed/bedlib.py")

    def _ensure_venv(self) -> None:
        if not (self.venv / "bin" / "python").exists():
            _log(f"creating {self.venv}")
            _sh(["/usr/bin/python3", "-m", "venv", str(self.venv)], timeout=300)
            _sh([str(self.venv / "bin" / "pip"), "install", "-q", *_pyproject_requirements(self.repo)], timeout=1200)
        probe = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                 str(self.venv / "bin" / "python"), "-c", "import ansible, pytest"]
        if _sh(probe, check=False, env={"PATH": BASE_PATH, "HOME": "/"}).returncode != 0:
            _log(f"making {self.venv} world-readable")
            for parent in reversed(self.venv.parents):
                if parent != Path("/"):
                    os.chmod(parent, os.stat(parent).st_mode | 0o555)  # noqa: S103 - users run the venv
            self._world_readable_x(self.venv)

    @staticmethod
    def _world_readable_x(top: Path) -> None:
        for dirpath, _dirs, filenames in os.walk(top):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103 - users run the venv
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    mode = os.stat(p).st_mode
                    os.chmod(p, mode | 0o444 | (0o111 if mode & 0o100 else 0))

    def up(self) -> float:
        """Boot the bed (install first if needed). Healthy already -> quick no-op. Returns seconds taken."""
        _require_root()
        t0 = time.monotonic()
        with self.locked():
            if self.missing_packages() or not (self.venv / "bin" / "python").exists() or not self.sge_installed():
                self.install()
            health = self.health(logins=True) if self.root.joinpath("bed.json").exists() else None
            if health is not None and not health.ok:  # a busy machine can fail one probe: look twice
                _log("health check failed, checking again in 2 s:\n" + health.report())
                time.sleep(2)
                health = self.health(logins=True)
            if health is not None and health.ok:
                self._provision_ports_dir()
                if SLURM_CONF.read_text() != _slurm_conf(self.slurm_dir):  # the bed's config changed: apply it
                    self._write_slurm_conf()
                    self.slurm(["scontrol", "reconfigure"])
                for node in COMPUTE_HOSTS:
                    if self.node_down_for(node) > STALE_DOWN_SECONDS:
                        self.node_resume(node)
                took = time.monotonic() - t0
                _log(f"already up and healthy ({took:.2f} s; booted in {self.boot_seconds():.2f} s)")
                return took
            if health is not None or self._anything_left():
                _log("bed is half up: tearing it down first")
                self._teardown()
            t0 = time.monotonic()
            self._boot()
            took = time.monotonic() - t0
            self._write_state({"boot_seconds": round(took, 3), "booted_at": time.time()})
            _log(f"up in {took:.2f} s")
            return took

    def down(self) -> None:
        """Stop everything the bed started and remove its namespaces, mounts and files (users stay)."""
        _require_root()
        with self.locked():
            self._teardown()

    def boot_seconds(self) -> float:
        try:
            return float(json.loads((self.root / "bed.json").read_text())["boot_seconds"])
        except (OSError, ValueError, KeyError):
            return float("nan")

    def _write_state(self, data: Mapping) -> None:
        (self.root / "bed.json").write_text(json.dumps(dict(data), indent=2) + "\n")
        (self.root / "bed.json").chmod(0o644)

    # ------------------------------------------------------------------ boot
    def _boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        self._make_dirs()
        self._provision_ports_dir()
        self._ensure_users()
        self._make_network()
        self._make_uts()
        self._write_etc_hosts()
        self._start_sge_qmaster()  # it boots (~0.5 s) while sshd and Slurm start
        self._ssh_setup()
        for host in HOSTS:
            self._start_sshd(host)
        self._start_munge()
        self._write_slurm_conf()
        self._start_slurmctld(deadline)
        for node in COMPUTE_HOSTS:
            self._start_slurmd(node)
        self._start_sge_execds(deadline)
        self._write_inventory()
        self._install_callback()
        self._wait_healthy(deadline)

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

    def _ensure_users(self) -> None:
        try:
            pwd.getpwnam(SGE_ADMIN)
        except KeyError:  # what gridengine-common's postinst would make (a system user, no login)
            _sh(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", SGE_ADMIN])
        for user in USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                _sh(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", user])
            _sh(["usermod", "-p", "*", "-s", "/bin/bash", user])  # unlocked for sshd with UsePAM no
            pw = pwd.getpwnam(user)
            home = Path(pw.pw_dir)
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            home.chmod(0o700)
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(exist_ok=True)
            os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
            ssh_dir.chmod(0o700)
            key = ssh_dir / "id_ed25519"
            if not key.exists() or not key.with_suffix(".pub").exists():
                for p in (key, key.with_suffix(".pub")):
                    p.unlink(missing_ok=True)
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{user}@hpcbed", "-f", str(key)])
            for p in (key, key.with_suffix(".pub")):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            key.chmod(0o600)

    def _make_network(self) -> None:
        def ip(*args: str) -> None:
            _sh(["ip", *args])

        ip("netns", "add", NET_NS)
        ip("-n", NET_NS, "link", "set", "lo", "up")
        ip("-n", NET_NS, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", NET_NS, "link", "set", BRIDGE, "up")
        for host, addr in HOSTS.items():
            ns = self.ns_name(host)
            ip("netns", "add", ns)
            ip("-n", NET_NS, "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", NET_NS, "link", "set", f"v-{host}", "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def _make_uts(self) -> None:
        for host in HOSTS:
            path = self.uts_path(host)
            path.touch()
            _sh(["unshare", f"--uts={path}", "hostname", host])

    def _write_etc_hosts(self) -> None:
        text = _strip_block(ETC_HOSTS.read_text())
        block = [HOSTS_BEGIN] + [f"{addr} {host}" for host, addr in HOSTS.items()] + [HOSTS_END]
        _write_in_place(ETC_HOSTS, text.rstrip("\n") + "\n" + "\n".join(block) + "\n")

    def _ssh_setup(self) -> None:
        known = []
        for host, addr in HOSTS.items():
            d = self.host_dir(host)
            d.mkdir(parents=True, exist_ok=True)
            key = d / "ssh_host_ed25519_key"
            if not key.exists():
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host}", "-f", str(key)])
            pub = key.with_suffix(".pub").read_text().split()
            known.append(f"{host},{addr} {pub[0]} {pub[1]}")
            (d / "sshd_config").write_text(_sshd_config(d, key))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        pubs = {u: (Path(pwd.getpwnam(u).pw_dir) / ".ssh/id_ed25519.pub").read_text().strip() for u in USERS}
        authorized = {WS_USER: [pubs[WS_USER], *(pubs[c] for c in CLUSTER_USERS)], WS_USER2: [pubs[WS_USER2]]}
        for c in CLUSTER_USERS:
            authorized[c] = [pubs[WS_USER], pubs[c]]
        for user in USERS:
            pw = pwd.getpwnam(user)
            ssh_dir = Path(pw.pw_dir) / ".ssh"
            self.write_user_file(user, ssh_dir / "authorized_keys", "\n".join(authorized[user]) + "\n", 0o600)
            self.write_user_file(user, ssh_dir / "known_hosts", "\n".join(known) + "\n", 0o644)

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

    def _start_sshd(self, host: str) -> None:
        d = self.host_dir(host)
        self._daemon(host, ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], f"sshd-{host}")

    def _start_munge(self) -> None:
        if _munge_ok():
            return
        MUNGE_RUN.mkdir(exist_ok=True)
        munge_pw = pwd.getpwnam("munge")
        os.chown(MUNGE_RUN, munge_pw.pw_uid, munge_pw.pw_gid)
        MUNGE_RUN.chmod(0o755)
        _sh(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"])
        self._wait(_munge_ok, 10, "munged answering")

    def _write_slurm_conf(self) -> None:
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text() and not SLURM_BACKUP.exists():
            shutil.copy2(SLURM_CONF, SLURM_BACKUP)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_slurm_conf(self.slurm_dir))
        SLURM_CONF.chmod(0o644)

    def _start_slurmctld(self, deadline: float) -> None:
        self._daemon("controller", ["/usr/sbin/slurmctld", "-i"], "slurmctld")
        self._wait(lambda: "UP" in self.slurm(["scontrol", "ping"], check=False, timeout=15).stdout,
                   max(1.0, deadline - time.monotonic()), "slurmctld answering scontrol ping")

    def _start_slurmd(self, node: str) -> None:
        self._daemon(node, ["/usr/sbin/slurmd"], f"slurmd-{node}")

    # ------------------------------------------------------------------ SGE boot
    def _start_sge_qmaster(self) -> None:
        """Son of Grid Engine, part 1: the cell and the qmaster spool (offline), then sge_qmaster on the controller."""
        if not self.sge_installed():
            raise BedError(f"no gridengine binaries in {SGE_PREFIX}: run tests/bed/bed install")
        self._sge_make_cell()
        self._daemon(SGE_QMASTER_HOST, self._sge_overlay([str(self.sge_bin / "sge_qmaster")]), "sge_qmaster",
                     env=self.sge_env())

    def _start_sge_execds(self, deadline: float) -> None:
        """Part 2: wait for the qmaster, configure it with qconf, start sge_execd on the compute hosts.

        ``_wait_healthy`` then waits until their queue instances report load.
        """
        self._wait(lambda: self.sge(["qconf", "-sh"], check=False, timeout=10).returncode == 0,
                   max(1.0, deadline - time.monotonic()), "sge_qmaster answering qconf -sh")
        # each sge_execd parent waits ~1 s for its daemon: start them side by side, and configure meanwhile
        # (their hosts were spooled offline by _sge_make_cell)
        self._daemons([(node, [str(self.sge_bin / "sge_execd")], f"sge_execd-{node}") for node in SGE_EXEC_HOSTS],
                      env=self.sge_env(), meanwhile=self._sge_configure)

    @staticmethod
    def _sge_overlay(argv: Sequence[str]) -> List[str]:
        """argv that runs ``argv`` where /usr/lib/gridengine exists.

        sge_qmaster, spoolinit and spooldefaults dlopen() "/usr/lib/gridengine/libspoolc.so" (a path built
        into Debian's binaries; an absolute spooling_lib becomes /usr/lib/gridengine//...). They run in a
        private mount namespace with a read-only overlay of the unpacked usr/lib over /usr/lib, which no
        process outside that namespace sees; it goes away with the last process in it.
        """
        script = 'mount -t overlay hpcbed-sge-usrlib -o "lowerdir=$1:/usr/lib" /usr/lib && shift && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(SGE_PREFIX / "usr" / "lib"), *argv]

    def _sge_make_cell(self) -> None:
        """SGE_ROOT layout, bootstrap (classic spooling), settings.sh, and the qmaster's initial spool."""
        root, common, conf = self.sge_root, self.sge_common, self.sge_conf_dir

        def put(path: Path, text: str) -> None:  # every user's clients read bootstrap, act_qmaster, settings.*
            path.write_text(text)
            path.chmod(0o644)

        for d in (root, root / SGE_CELL, common, root / SGE_CELL / "spool", self.sge_qmaster_spool,
                  self.sge_execd_spool, conf, conf / "adminhosts", conf / "submithosts", conf / "exechosts",
                  conf / "lconf", self.sge_tmpdir,
                  root / "bin", root / "utilbin", root / "lib"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        for sub in ("bin", "utilbin", "lib"):  # where SGE looks for its tools ($SGE_ROOT/utilbin/<arch>/...)
            (root / sub / SGE_ARCH).symlink_to(self.sge_binaries())
        (root / "util").symlink_to(self.sge_share() / "util")
        put(common / "bootstrap", f"""# Version: 8.1.9 (hpcbed)
admin_user              {SGE_ADMIN}
default_domain          none
ignore_fqdn             true
spooling_method         classic
spooling_lib            libspoolc
spooling_params         {common};{self.sge_qmaster_spool}
binary_path             {self.sge_binaries()}
qmaster_spool_dir       {self.sge_qmaster_spool}
security_mode           none
job_spooling            true
listener_threads        2
worker_threads          2
scheduler_threads       1
""")
        put(common / "act_qmaster", SGE_QMASTER_HOST + "\n")
        env = self.sge_env()
        put(common / "settings.sh", f"{MARKER}\n" + "".join(f"{k}={v}; export {k}\n" for k, v in env.items())
            + f"PATH={self.sge_bin}:$PATH; export PATH\n")
        put(common / "settings.csh", f"{MARKER}\n" + "".join(f"setenv {k} {v}\n" for k, v in env.items())
            + f"setenv PATH {self.sge_bin}:$PATH\n")
        # the global configuration: Debian's default with the bed's spool dir, quick load reports and
        # accounting records written at once (qacct sees a job as soon as it ended)
        glob = (self.sge_share() / "default-configuration").read_text()
        glob = _set_conf_fields(glob, {
            "execd_spool_dir": str(self.sge_execd_spool), "load_report_time": "00:00:05", "mailer": "/bin/true",
            "reporting_params": "accounting=true reporting=false flush_time=00:00:01 joblog=false "
                                "sharelog=00:00:00 accounting_flush_time=00:00:00"})
        put(conf / "global", glob)
        # hosts, offline too, so an execd can start as soon as the qmaster answers: admin hosts (an exec
        # host must be one before its execd registers), submit hosts, exec hosts, and each exec host's
        # local configuration with its own job-tracking gid_range (the hosts share one /proc)
        for host in SGE_SUBMIT_HOSTS:
            put(conf / "adminhosts" / host, f"hostname {host}\n")
            put(conf / "submithosts" / host, f"hostname {host}\n")
        for i, node in enumerate(SGE_EXEC_HOSTS):
            unset = ("load_scaling", "complex_values", "user_lists", "xuser_lists", "projects", "xprojects",
                     "usage_scaling", "report_variables")
            put(conf / "exechosts" / node, f"hostname {node}\n" + "".join(f"{k} NONE\n" for k in unset))
            lo = SGE_GID_BASE + 100 * i
            put(conf / "lconf" / node, f"mailer /bin/true\nxterm /usr/bin/xterm\ngid_range {lo}-{lo + 99}\n")
        admin = pwd.getpwnam(SGE_ADMIN)
        for top in (root / SGE_CELL, conf):
            for dirpath, _dirs, files in os.walk(top):
                os.chown(dirpath, admin.pw_uid, admin.pw_gid)
                for name in files:
                    os.chown(os.path.join(dirpath, name), admin.pw_uid, admin.pw_gid)
        resources = self.sge_share() / "util" / "resources"
        steps = [["spoolinit", "classic", "libspoolc", f"{common};{self.sge_qmaster_spool}", "init"],
                 ["spooldefaults", "configuration", str(conf / "global")],
                 ["spooldefaults", "complexes", str(resources / "centry")],
                 ["spooldefaults", "usersets", str(resources / "usersets")],
                 ["spooldefaults", "managers", "root", SGE_ADMIN],
                 ["spooldefaults", "adminhosts", str(conf / "adminhosts")],
                 ["spooldefaults", "submithosts", str(conf / "submithosts")],
                 ["spooldefaults", "exechosts", str(conf / "exechosts")],
                 *(["spooldefaults", "local_conf", str(conf / "lconf" / n), n] for n in SGE_EXEC_HOSTS)]
        # one overlay namespace and one setpriv for all steps (sh -e stops at the first failing one)
        script = "set -e\numask 022\n" + "".join(
            f"echo '>>' {shlex.quote(step[0])} {shlex.quote(step[1])}; "
            f"{shlex.join([str(self.sge_bin / step[0]), *step[1:]])}\n" for step in steps)
        cp = _sh(self._sge_overlay(["setpriv", f"--reuid={admin.pw_uid}", f"--regid={admin.pw_gid}", "--init-groups",
                                    "--", "sh", "-c", script]),
                 env={"PATH": BASE_PATH, "HOME": "/", **env}, check=False, timeout=120)
        if cp.returncode != 0:
            raise BedError(f"making the SGE spool failed ({cp.returncode}): {cp.stdout[-1500:]}{cp.stderr[-1500:]}")

    def _sge_configure(self) -> None:
        """qconf as root on the controller (a manager, on an admin host): fast scheduler, @allhosts, all.q."""
        conf = self.sge_conf_dir

        def write(name: str, text: str) -> str:
            path = conf / name
            path.write_text(text)
            path.chmod(0o644)
            return str(path)

        # scheduler: a run every second and right after each submit and job end (the default, 15 s, is slow)
        sconf = _set_conf_fields(self.sge(["qconf", "-ssconf"]).stdout, {
            "schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"})
        self.sge(["qconf", "-Msconf", write("sconf", sconf)])
        self.sge(["qconf", "-Ahgrp", write("allhosts", f"group_name @allhosts\nhostlist {' '.join(SGE_EXEC_HOSTS)}\n")])
        self.sge(["qconf", "-Aq", write(SGE_QUEUE, _sge_queue_conf(self.sge_tmpdir))])

    def _write_inventory(self) -> None:
        self.inventory_path.write_text(self.inventory_text())
        self.inventory_path.chmod(0o644)

    def inventory_text(self) -> str:
        lines = ["# hpc.interactive test bed inventory (tests/bed/bed inventory)", "[workspace]",
                 "workspace ansible_connection=local", "", "[cluster]",
                 f"controller ansible_host={HOSTS['controller']} ansible_user={CLUSTER_USERS[0]}", "", "[compute]"]
        lines += [f"{n} ansible_host={HOSTS[n]} ansible_user={CLUSTER_USERS[0]}" for n in COMPUTE_HOSTS]
        lines += ["", "[all:vars]", "ansible_python_interpreter=/usr/bin/python3", ""]
        return "\n".join(lines)

    def _wait_healthy(self, deadline: float) -> None:
        # everything but SGE first, and the logins, while the execds start (each sleeps 2 s after it
        # registered, before its first load report); then SGE
        self._wait_health(deadline, sge=False)
        logins = self.health(logins=True, sge=False)
        if not logins.ok:
            raise BedError("bed daemons up but logins fail:\n" + logins.report())
        self._wait_health(deadline, sge=True)

    def _wait_health(self, deadline: float, sge: bool) -> None:
        while True:
            last = self.health(logins=False, sge=sge)
            if last.ok:
                return
            if time.monotonic() > deadline:
                raise BedError("bed not healthy in time:\n" + last.report())
            time.sleep(0.2)

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

    # ------------------------------------------------------------------ health
    def health(self, logins: bool = True, sge: bool = True) -> Health:
        """Check every part; ``logins`` adds real ssh logins between the bed's users; ``sge=False`` skips SGE."""
        h = Health()
        h.add("bed", "root", self.root.exists(), str(self.root))
        h.add("bed", "munge", _munge_ok(), "munge -n | unmunge")
        h.add("bed", "slurm.conf", SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text(), str(SLURM_CONF))
        h.add("bed", "network", (NETNS_DIR / NET_NS).exists(), NET_NS)
        missing = [u for u in USERS if not _user_exists(u)]
        h.add("bed", "users", not missing, f"missing: {' '.join(missing)}" if missing else " ".join(USERS))
        for host in HOSTS:
            ns_ok = self.netns_path(host).exists()
            h.add(host, "netns", ns_ok, self.ns_name(host))
            uts_ok = _is_mountpoint(self.uts_path(host))
            h.add(host, "uts", uts_ok, str(self.uts_path(host)))
            if not (ns_ok and uts_ok):
                continue
            name = _sh(["nsenter", f"--uts={self.uts_path(host)}", "hostname"], check=False).stdout.strip()
            h.add(host, "hostname", name == host, name)
            pid = _read_pid(self.host_dir(host) / "sshd.pid")
            listening = self._listening(host, 22)
            h.add(host, "sshd", bool(pid and _pid_alive(pid) and listening), f"pid {pid}, :22 listening={listening}")
        if h.part_ok("controller"):
            pid = _read_pid(self.slurm_dir / "slurmctld.pid")
            ping = self.slurm(["scontrol", "ping"], check=False, timeout=15).stdout.strip() if pid else ""
            h.add("controller", "slurmctld", bool(pid and _pid_alive(pid) and "UP" in ping), f"pid {pid}: {ping}")
            states = {}
            if "UP" in ping:
                cp = self.slurm(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=15)
                states = dict(line.split(None, 1) for line in cp.stdout.splitlines() if line.strip())
            for node in COMPUTE_HOSTS:
                if not h.part_ok(node, ignore=("slurmd",)):
                    continue
                pid = _read_pid(self.slurm_dir / f"slurmd-{node}.pid")
                state = states.get(node, "?")
                responding = state != "?" and not state.endswith("*") and "unknown" not in state \
                    and "not_responding" not in state
                h.add(node, "slurmd", bool(pid and _pid_alive(pid) and responding), f"pid {pid}, node {state}")
        if sge and h.part_ok(SGE_QMASTER_HOST, ignore=("slurmctld",)):
            self._sge_health(h)
        if logins and h.ok:
            checks = [("workspace", WS_USER, c, h_) for h_ in ("controller", *COMPUTE_HOSTS) for c in CLUSTER_USERS[:1]]
            checks.append(("compute1", CLUSTER_USERS[0], WS_USER, "workspace"))
            procs = [(src, user, dest_user, dest, self.popen(
                src, ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{dest_user}@{dest}", "hostname"],
                user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True))
                for src, user, dest_user, dest in checks]
            for src, user, dest_user, dest, p in procs:
                try:
                    out, err = p.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    out, err = p.communicate()
                h.add(dest, "login", out.strip() == dest,
                      f"{user}@{src} -> {dest_user}@{dest}: {(out.strip() or err.strip())[:200]}")
        return h

    def _sge_health(self, h: Health) -> None:
        """sge_qmaster alive in the controller's netns and answering; each execd alive in its host's netns
        with its all.q instance reporting load and in no u/a/E/d/o state. (Liveness matters: qmaster
        keeps a dead execd's queue looking fine until max_unheard, 5 min.)"""
        pids = self._sge_daemon_pids()

        def in_netns(host: str) -> bool:
            pid = pids.get(host)
            return bool(pid) and _proc_ns_inodes(pid, "net") == {_ns_inode(self.netns_path(host))}

        admin_hosts: List[str] = []
        if in_netns(SGE_QMASTER_HOST):
            cp = self.sge(["qconf", "-sh"], check=False, timeout=10)
            admin_hosts = cp.stdout.split() if cp.returncode == 0 else []
        qmaster_ok = SGE_QMASTER_HOST in admin_hosts
        h.add(SGE_QMASTER_HOST, "sge_qmaster", qmaster_ok,
              f"pid {pids.get(SGE_QMASTER_HOST)}, qconf -sh: {' '.join(admin_hosts) or 'no answer'}")
        instances = self.sge_queue_instances() if qmaster_ok else {}
        for node in SGE_EXEC_HOSTS:
            if not h.part_ok(node, ignore=("slurmd",)):
                continue
            load, states = instances.get(node, ("?", ""))
            ok = in_netns(node) and load not in ("?", "-NA-") and not set(states) & set(SGE_BAD_QUEUE_STATES)
            h.add(node, "sge_execd", ok, f"pid {pids.get(node)}, {SGE_QUEUE}@{node} load={load} states={states or '-'}")

    def _listening(self, host: str, port: int) -> bool:
        cp = _sh(["nsenter", f"--net={self.netns_path(host)}", "ss", "-Hltn", f"sport = :{port}"], check=False)
        return bool(cp.stdout.strip())

    def status(self) -> Tuple[bool, str]:
        h = self.health(logins=True)
        head = f"hpcbed root={self.root} boot_seconds={self.boot_seconds():.2f}"
        return h.ok, head + "\n" + h.report() + ("\nhealthy" if h.ok else "\nNOT HEALTHY")

    # ------------------------------------------------------------------ teardown
    def bed_pids(self) -> List[int]:
        """Processes that belong to the bed: in its namespaces, owned by its users, or its munged."""
        net_inodes = {i for i in (_ns_inode(p) for p in NETNS_DIR.glob(f"{PREFIX}-*")) if i}
        uts_inodes = {i for i in (_ns_inode(p) for p in (self.root / "uts").glob("*") if _is_mountpoint(p)) if i}
        uids = set()
        for user in USERS:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(user).pw_uid)
        spare = {os.getpid(), *_ancestors(os.getpid())}
        munged = _read_pid(MUNGE_PID)
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in spare:
                continue
            pid = int(entry)
            try:
                if pid == munged or os.stat(f"/proc/{pid}").st_uid in uids \
                        or _proc_ns_inodes(pid, "net") & net_inodes \
                        or _proc_ns_inodes(pid, "uts") & uts_inodes:
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def _kill_all(self) -> List[int]:
        """SIGTERM every bed process, SIGKILL after 2 s; wait until each has really exited.

        A process that is exiting loses /proc/PID/ns/* before it is gone (and a multi-threaded one, like
        sge_qmaster, can be a zombie leader while its threads still run), so every pid seen once is
        remembered (with its start time, against pid reuse) until it is gone or a zombie with no live thread.
        """
        seen: Dict[int, Optional[str]] = {}
        net_inodes = {i for i in (_ns_inode(p) for p in NETNS_DIR.glob(f"{PREFIX}-*")) if i}
        for pid in self._sge_daemon_pids().values():  # the spool is removed anyway: no clean shutdown (~7 s)
            if _proc_ns_inodes(pid, "net") & net_inodes:
                seen[pid] = _proc_start(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

        def alive() -> List[int]:
            for pid in self.bed_pids():
                if pid not in seen:
                    seen[pid] = _proc_start(pid)
            for pid, start in list(seen.items()):
                if not _pid_alive(pid) or _proc_start(pid) != start:
                    del seen[pid]
            return sorted(seen)

        for sig, rounds in ((signal.SIGTERM, 20), (signal.SIGKILL, 30)):
            for _attempt in range(rounds):
                pids = alive()
                if not pids:
                    return []
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                time.sleep(0.1)
        return alive()

    def _anything_left(self) -> bool:
        return bool(self.leftovers())

    def leftovers(self) -> List[str]:
        """What a ``down`` would have to remove (empty when the machine is clean)."""
        left = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{PREFIX}-*")] if NETNS_DIR.exists() else []
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            left += [f"mount {line.split()[4]}" for line in fh
                     if line.split()[4].startswith(str(self.root) + "/") or f"/{PREFIX}-" in line.split()[4]]
        left += [f"process {p} ({_comm(p)})" for p in self.bed_pids() if _pid_alive(p)]
        if HOSTS_BEGIN in ETC_HOSTS.read_text():
            left.append("/etc/hosts block")
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            left.append(str(SLURM_CONF))
        if self.root.exists():
            left.append(f"dir {self.root}")
        return left

    def _teardown(self) -> None:
        survivors = self._kill_all()
        for p in sorted((self.root / "uts").glob("*")) if (self.root / "uts").exists() else []:
            while _is_mountpoint(p):
                if _sh(["umount", str(p)], check=False).returncode != 0:
                    _sh(["umount", "-l", str(p)], check=False)
                    break
        for p in sorted(NETNS_DIR.glob(f"{PREFIX}-*")) if NETNS_DIR.exists() else []:
            _sh(["ip", "netns", "delete", p.name], check=False)
        if NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            while _is_mountpoint(NETNS_DIR):
                if _sh(["umount", str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        if ETC_HOSTS.exists() and HOSTS_BEGIN in ETC_HOSTS.read_text():
            _write_in_place(ETC_HOSTS, _strip_block(ETC_HOSTS.read_text()))
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
        if SLURM_BACKUP.exists() and not SLURM_CONF.exists():
            shutil.move(str(SLURM_BACKUP), str(SLURM_CONF))
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise BedError(f"processes survived SIGKILL: {survivors}")
        left = self.leftovers()
        if left:
            raise BedError("down left things behind: " + ", ".join(left))


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


# ---------------------------------------------------------------------- helpers
def _require_root() -> None:
    if os.geteuid() != 0:
        raise BedError("the test bed needs root (namespaces, daemons, users)")


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _munge_ok() -> bool:
    if not (MUNGE_RUN / "munge.socket.2").exists():
        return False
    try:
        cred = _sh(["munge", "-n"], check=False, timeout=5)
        return cred.returncode == 0 and _sh(["unmunge"], check=False, input_text=cred.stdout, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _apt(args: Sequence[str], timeout: float = 600, cwd: Optional[PathLike] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return _sh(["apt-get", *args], timeout=timeout, env=env, cwd=cwd)


def _apt_install(packages: Sequence[str]) -> None:
    """apt-get install ``packages``, refused when apt would remove anything (e.g. slurm-wlm-torque)."""
    args = ["install", "-y", "--no-install-recommends", *packages]
    plan = _apt(["-s", *args], timeout=300).stdout
    removals = [line.split()[1] for line in plan.splitlines() if line.startswith("Remv ")]
    if removals:
        raise BedError(f"apt-get install {' '.join(packages)} would remove {' '.join(removals)}: refused")
    _apt(args, timeout=1200)


def _apt_candidates(packages: Sequence[str]) -> Dict[str, str]:
    """``{package: candidate version}`` from the local apt lists ('' when apt knows none)."""
    out = dict.fromkeys(packages, "")
    cp = _sh(["apt-cache", "policy", *packages], check=False)
    pkg = None
    for line in cp.stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            pkg = line[:-1]
        elif pkg in out and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            out[pkg] = "" if version == "(none)" else version
    return out


def _cached_deb(package: str, version: str) -> Optional[Path]:
    for deb in sorted(SGE_DEB_CACHE.glob(f"{package}_*.deb")):
        cp = _sh(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=False)
        fields = dict(line.split(": ", 1) for line in cp.stdout.splitlines() if ": " in line)
        if fields.get("Package") == package and fields.get("Version") == version:
            return deb
    return None


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


def _strip_block(text: str) -> str:
    return re.sub(rf"(?ms)^{re.escape(HOSTS_BEGIN)}\n.*?^{re.escape(HOSTS_END)}\n?", "", text)


def _write_in_place(path: Path, text: str) -> None:
    """Rewrite a file in place (/etc/hosts may be a bind mount that a rename would not replace)."""
    with open(path, "r+", encoding="utf-8") as fh:
        fh.seek(0)
        fh.write(text)
        fh.truncate()


def _unsafe_yaml(value) -> str:
    """YAML flow text for ``value`` with every string tagged ``!unsafe`` (not templated by Ansible)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_unsafe_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_unsafe_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return f"!unsafe {json.dumps(value)}"
    return json.dumps(value)


def _pyproject_requirements(repo: Path) -> List[str]:
    import tomllib  # noqa: PLC0415 - Python 3.11+, needed only when the venv has to be created

    data = tomllib.loads((repo / "pyproject.toml").read_text())
    project = data.get("project", {})
    return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("test", []))


def _sshd_config(d: Path, key: Path) -> str:
    return f"""{MARKER}
Port 22
AddressFamily inet
ListenAddress 0.0.0.0
HostKey {key}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowUsers {' '.join(USERS)}
StrictModes yes
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel VERBOSE
MaxStartups 200:30:400
MaxSessions 100
ClientAliveInterval 15
ClientAliveCountMax 4
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def _set_conf_fields(text: str, fields: Mapping[str, str]) -> str:
    """Set ``name value`` lines of an SGE configuration text (each name must be there)."""
    for name, value in fields.items():
        text, n = re.subn(rf"(?m)^{re.escape(name)}[ \t]+.*$", f"{name:<32} {value}", text)
        if n != 1:
            raise BedError(f"SGE configuration has {n} lines for {name!r}")
    return text


def _sge_queue_conf(tmpdir: Path) -> str:
    """all.q on @allhosts: no load thresholds (a busy 2-core machine would put it in alarm state and
    jobs would wait), ``#!`` honoured (unix_behavior), job tmp dirs under the bed root."""
    fields = {
        "qname": SGE_QUEUE, "hostlist": "@allhosts", "seq_no": "0", "load_thresholds": "NONE",
        "suspend_thresholds": "NONE", "nsuspend": "1", "suspend_interval": "00:05:00", "priority": "0",
        "min_cpu_interval": "00:05:00", "processors": "UNDEFINED", "qtype": "BATCH INTERACTIVE",
        "ckpt_list": "NONE", "pe_list": "NONE", "rerun": "FALSE", "slots": str(SGE_SLOTS), "tmpdir": str(tmpdir),
        "shell": "/bin/bash", "prolog": "NONE", "epilog": "NONE", "shell_start_mode": "unix_behavior",
        "starter_method": "NONE", "suspend_method": "NONE", "resume_method": "NONE", "terminate_method": "NONE",
        "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE", "xuser_lists": "NONE",
        "subordinate_list": "NONE", "complex_values": "NONE", "projects": "NONE", "xprojects": "NONE",
        "calendar": "NONE", "initial_state": "default",
    }
    for limit in ("rt", "cpu", "fsize", "data", "stack", "core", "rss", "vmem"):
        fields[f"s_{limit}"] = fields[f"h_{limit}"] = "INFINITY"
    return "".join(f"{k:<21} {v}\n" for k, v in fields.items())


def _slurm_conf(sd: Path) -> str:
    c = HOSTS["controller"]
    nodes = "\n".join(f"NodeName={n} NodeAddr={HOSTS[n]} CPUs=16 RealMemory=16000 State=UNKNOWN"
                      for n in COMPUTE_HOSTS)
    return f"""{MARKER}
# Slurm 22.05 for the bed: controller runs slurmctld, compute1/compute2 run slurmd (nsenter'ed).
ClusterName=hpcbed
SlurmctldHost=controller({c})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={sd / 'jobcomp.txt'}
MailProg=/bin/true
PropagateResourceLimits=NONE
# 1, not 2: with 2 slurmctld puts a node that an admin set DOWN back in service at its next ping
# (seconds later), which would undo the node-loss simulation `scontrol update ... State=DOWN`.
ReturnToService=1
# Node loss ends the job (NODE_FAIL) instead of silently requeueing it; sbatch --requeue opts in.
JobRequeue=0
KillWait=2
MinJobAge=10
InactiveLimit=0
Waittime=0
SlurmdTimeout=30
SlurmctldTimeout=30
SlurmdParameters=config_overrides
StateSaveLocation={sd / 'ctld'}
SlurmdSpoolDir={sd / 'spool' / '%n'}
SlurmctldPidFile={sd / 'slurmctld.pid'}
SlurmdPidFile={sd / 'slurmd-%n.pid'}
SlurmctldLogFile={sd / 'slurmctld.log'}
SlurmdLogFile={sd / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=debug Nodes={','.join(COMPUTE_HOSTS)} Default=YES MaxTime=INFINITE State=UP
PartitionName=small Nodes=compute2 MaxCPUsPerNode=2 MaxTime=INFINITE State=UP
"""


__all__ = ["Bed", "BedError", "CommandFailed", "PlaybookResult", "HOSTS", "USERS", "WS_USER", "WS_USER2",
           "CLUSTER_USERS", "COMPUTE_HOSTS", "default_root"]
