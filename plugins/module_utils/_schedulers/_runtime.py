# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Glue shared by the scheduler modules: a runner resolving binaries, script writes, waiting."""
from __future__ import annotations

import os
import re
import stat
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import CommandResult, Runner, run
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import (
    ALIVE_STATES,
    TERMINAL_STATES,
    Backend,
    JobInfo,
)


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# PATH comes from scheduler_path (prepended, never replaced); the locale stays C so the output parses
RESERVED_ENV = ("PATH", "LC_ALL", "LANG", "LANGUAGE")


def scheduler_setup(path: Optional[Sequence[Any]] = None,
                    env: Optional[Mapping[str, Any]] = None) -> Tuple[List[str], Dict[str, str]]:
    """Check ``scheduler_path`` and ``scheduler_env`` -> (directories, environment); ValueError names the field.

    For a scheduler whose commands are not on the non-login ``PATH`` an SSH connection gets (a site's
    ``/opt/sge/bin/lx-amd64``) or that needs its own variables (Grid Engine's ``SGE_ROOT``/``SGE_CELL``).
    """
    dirs = []  # type: List[str]
    for entry in path or []:
        text = str(entry)
        if not text.startswith("/") or ":" in text or "\0" in text or "\n" in text:
            raise ValueError("scheduler_path: %r must be an absolute directory without ':' or newline" % (entry,))
        dirs.append(os.path.normpath(text))
    if env is not None and not isinstance(env, Mapping):
        raise ValueError("scheduler_env: must be a mapping of variable names to values, got %r" % (env,))
    out = {}  # type: Dict[str, str]
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise ValueError("scheduler_env: %r is not an environment variable name" % (key,))
        if key in RESERVED_ENV or key.startswith("LC_"):
            raise ValueError("scheduler_env: %s cannot be set here (PATH: use scheduler_path; the locale stays C)"
                             % key)
        if value is None or isinstance(value, (dict, list, tuple, bool)):
            raise ValueError("scheduler_env: %s must be a string or number, got %r" % (key, value))
        text = str(value)
        if "\0" in text or "\n" in text:
            raise ValueError("scheduler_env: %s must be one line" % key)
        out[key] = text
    return dirs, out


def find_in(dirs: Sequence[str], name: str) -> Optional[str]:
    """The first executable ``name`` in ``dirs`` (None when none has it)."""
    for directory in dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def make_runner(resolve: Callable[[str], Optional[str]], path: Sequence[str] = (),
                env: Optional[Mapping[str, str]] = None) -> Runner:
    """A runner that resolves ``argv[0]`` in ``path`` first, then with ``resolve`` (e.g. ``module.get_bin_path``).

    ``path`` is also put first on the commands' ``PATH`` (a scheduler command may run its siblings) and ``env`` is
    added to their environment (both checked by :func:`scheduler_setup`).
    """
    extra = dict(env or {})
    if path:
        extra["PATH"] = os.pathsep.join(list(path) + [os.environ.get("PATH") or os.defpath])

    def _run(argv: Sequence[str], timeout: Optional[float] = None) -> CommandResult:
        args = list(argv)
        if not args[0].startswith("/"):
            args[0] = find_in(path, args[0]) or resolve(args[0]) or args[0]
        return run(args, timeout=timeout, env=extra or None)

    return _run


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_atomic(path: str, text: str, mode: int = 0o700) -> None:
    """Write the batch script atomically, making its directory (0700) first if needed."""
    # imported here: the watcher ships this file to controllers without _service_file and never writes scripts
    from ansible_collections.hpc.interactive.plugins.module_utils import _service_file  # noqa: PLC0415

    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    _service_file.write_atomic(path, text, mode)


def _owner_label(uid: int) -> str:
    try:
        import pwd  # noqa: PLC0415 - POSIX only, like everything here

        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


def path_problem(path: str, uid: int, lstat: Callable[[str], os.stat_result] = os.lstat,
                 stat_: Callable[[str], os.stat_result] = os.stat,
                 realpath: Callable[[str], str] = os.path.realpath) -> Optional[str]:
    """Why another user than root and ``uid`` could change what ``path`` is or holds; None when nobody can.

    Every existing directory from ``/`` to ``path`` (and every symlink on the way) must belong to root or ``uid``,
    and a directory others may write to must be sticky (so that only the owner of an entry can rename or remove
    it): otherwise another user could put their own directory - with code in it - where ``path`` is meant to be.
    Missing trailing components are fine (the caller makes them, mode 0700).
    """
    current = "/"
    for part in [p for p in os.path.normpath(path).split("/") if p]:
        parent = realpath(current)
        pst = stat_(parent)
        if pst.st_uid not in (0, uid):
            return "%s belongs to %s, who could replace what is in it" % (parent, _owner_label(pst.st_uid))
        child = os.path.join(current, part)
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return "%s is writable by other users and not sticky: they could replace %s" % (parent, child)
        try:
            st = lstat(child)
        except FileNotFoundError:
            return None
        if st.st_uid not in (0, uid):
            what = " (a symlink)" if stat.S_ISLNK(st.st_mode) else ""
            return "%s%s belongs to %s, not to root or you: they could replace what is in it" % (
                child, what, _owner_label(st.st_uid))
        current = child
    final = realpath(current)
    fst = stat_(final)
    if fst.st_uid not in (0, uid):
        return "%s belongs to %s, not to root or you: they could replace what is in it" % (
            final, _owner_label(fst.st_uid))
    if fst.st_mode & 0o022 and not fst.st_mode & stat.S_ISVTX:
        return "%s is writable by other users and not sticky: they could replace what is in it" % final
    return None


def private_dir_problem(st: os.stat_result, uid: int) -> Optional[str]:
    """Why an existing directory (its ``lstat``) cannot be a session's own directory; None when it can."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return "already exists and belongs to %s: another user may have put files (code) in it" % (
            _owner_label(st.st_uid))
    if stat.S_IMODE(st.st_mode) != 0o700:
        return "already exists with mode %04o (0700 expected): others may have put files in it" % (
            stat.S_IMODE(st.st_mode))
    return None


def make_session_dir(path: str, uid: int, check: bool = False) -> bool:
    """Make a session's private directory exclusively (0700, missing parents 0700) -> whether it was made.

    ValueError (naming ``workdir``) when a user other than root and ``uid`` could change the path, or when the
    directory exists and is not the user's own, mode 0700 (anything else may hold files another user planted).
    With ``check``, only the checks run.
    """
    path = os.path.abspath(path)
    problem = path_problem(os.path.dirname(path), uid)
    if problem:
        raise ValueError("workdir: %s: refused, %s" % (path, problem))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        why = private_dir_problem(st, uid)
        if why:
            raise ValueError("workdir: %s %s; refused (remove it if it is yours)" % (path, why))
        return False
    if check:
        return True
    parent = os.path.dirname(path)
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise ValueError("workdir: %s appeared while it was being made; refused" % path) from None
    os.chmod(path, 0o700)
    why = private_dir_problem(os.lstat(path), uid)
    if why:
        raise ValueError("workdir: %s %s; refused" % (path, why))
    return True


def wait_for_state(backend: Backend, runner: Runner, job_id: str, wanted: str, timeout: float, *,
                   query_timeout: float = 10.0, interval: float = 0.1, max_interval: float = 1.0, hold: float = 2.0,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
    """Poll until the job is ``wanted`` (``queued`` = known to the scheduler and alive or later).

    Returns (info, ok, why). ``ok`` is False on timeout or when the job ended before ``running``. The first query
    is immediate; the pause between queries is ``interval`` for the first ``hold`` seconds, then grows by half up to
    ``max_interval``. A scheduler with free nodes starts a job at its next scheduling pass (Slurm's batch jobs wait
    up to ``batch_sched_delay``, 3 s by default), so that first stretch is where the job is most likely to start and
    where each pause is time the session waits for nothing; a long wait still does not flood the scheduler.
    Each look is the backend's ``poll``, the cheap question the watcher asks every tick (Slurm: ``squeue --jobs``
    in a fixed format instead of a JSON list of every job in the cluster).
    """
    start = clock()
    deadline = start + timeout
    info = JobInfo(job_id=job_id)
    while True:
        info = backend.poll(runner, [job_id], timeout=query_timeout).jobs.get(job_id, info)
        if wanted == "queued" and (info.state in ALIVE_STATES or info.state in TERMINAL_STATES):
            return info, True, ""
        if wanted == "running" and info.state == "running":
            return info, True, ""
        if wanted == "running" and info.state in TERMINAL_STATES:
            return info, False, "job %s ended (%s) before it was running" % (job_id, info.state)
        if clock() >= deadline:
            return info, False, "job %s not %s after %ss (state %s)" % (job_id, wanted, timeout, info.state)
        sleep(min(interval, max(0.0, deadline - clock())))
        if clock() - start >= hold - 1e-6:  # (the tolerance: a float sum of pauses that should reach hold exactly)
            interval = min(interval * 1.5, max_interval)
