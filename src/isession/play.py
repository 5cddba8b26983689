"""Run the collection's playbooks through ansible-runner's Python API and follow its events.

Each run gets a private data dir ``<session dir>/logs/runner`` (0700) and its own ``ident``, so the
artifacts (stdout, job_events) stay with the session. Extravars never hold a secret. While a run is
in progress ``<session dir>/logs/runner/<ident>.pid`` names the ``isession`` process and the
ansible-playbook process group, so ``isession cancel`` can stop it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils import _proc

from .collection import Collection
from .config import embedded_inventory
from .progress import Progress

RUNNER_DIR = Path("logs") / "runner"
STRATEGY = "hpc.interactive.linear_idle"
# how often ansible-runner's loop wakes while ansible-playbook is silent (a start waiting in the queue). A cancel does
# not wait for it: the cancel event wakes a thread that stops the play at once (stop_play_on_cancel); the loop then
# only sees the play gone. So the wake can be rare: each one costs a waiting start CPU, and fifty starts may wait.
RUNNER_WAKE = 600.0  # seconds
CANCEL_FIND_FOR = 5.0  # seconds a cancel looks for an ansible-playbook spawned just after it (0.05 s apart)
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a cancelled play


@dataclass
class PlayResult:
    status: str  # successful | failed | canceled | timeout | error
    rc: Optional[int]
    ident: str
    artifacts: Path
    failures: List[str] = field(default_factory=list)


def runner_dir(session_dir: Path) -> Path:
    path = session_dir / RUNNER_DIR
    for p in (session_dir, session_dir / "logs", path):
        p.mkdir(mode=0o700, exist_ok=True)
    return path


def playbook_path(col: Collection, name: str) -> Path:
    return col.path / "playbooks" / f"{name}.yml"


# the tag of the start's steps only a play run without isession needs (the watcher's start, the play's own summary):
# isession ensures the watcher and prints the result itself, so its plays skip them (added to the user's own skips)
CLI_SKIP_TAG = "session_without_cli"


def runner_env(col: Collection, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for ansible-playbook: our collection first, the venv's binaries on PATH."""
    base = os.environ if base is None else base
    venv_bin = str(Path(sys.executable).parent)
    path = base.get("PATH", "/usr/bin:/bin")
    return {
        "ANSIBLE_SKIP_TAGS": ",".join(t for t in (base.get("ANSIBLE_SKIP_TAGS", "").strip(" ,"), CLI_SKIP_TAG) if t),
        # linear, minus its 1000 checks a second for a result while a task runs: a start waiting in the queue keeps
        # its ansible-playbook waiting for as long as the job does (see plugins/strategy/linear_idle.py)
        "ANSIBLE_STRATEGY": base.get("ANSIBLE_STRATEGY") or STRATEGY,
        "ANSIBLE_COLLECTIONS_PATH": str(col.root),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "PATH": path if path.split(os.pathsep)[0] == venv_bin else venv_bin + os.pathsep + path,
    }


def _no_delay_after_close() -> None:
    """Drop ptyprocess's fixed 0.1 s sleep in ``close()`` for ansible-runner's child.

    ansible-runner closes the ansible-playbook pty only after its loop saw the process gone (``isalive()`` false, so
    already reaped), and ``PtyProcess.close`` then sleeps ``delayafterclose`` "to give the kernel time to update the
    process status" before asking again: a tenth of a second added to every command that runs a play, for nothing.
    Set per instance (``__init__`` sets it), so the close is wrapped; a ptyprocess without the attribute is left alone.
    """
    try:
        from ptyprocess import ptyprocess  # noqa: PLC0415 - ansible-runner's dependency, imported with it
    except ImportError:  # pragma: no cover - ansible-runner always brings it
        return
    cls = ptyprocess.PtyProcess
    close = cls.close
    if getattr(close, "_isession_no_delay", False) or not hasattr(cls, "isalive"):
        return

    def close_without_delay(self: Any, force: bool = True) -> None:
        if getattr(self, "delayafterclose", None) is not None and not self.isalive():
            self.delayafterclose = 0
        close(self, force)

    close_without_delay._isession_no_delay = True  # type: ignore[attr-defined]
    cls.close = close_without_delay  # type: ignore[method-assign]


def playbook_children(parent: Optional[int] = None) -> List[int]:
    """The ansible-playbook processes whose parent is ``parent`` (this process): the play ansible-runner spawned."""
    me = str(os.getpid() if parent is None else parent)
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _proc.stat_fields(name)
            if fields is not None and fields[1] == me and any("ansible-playbook" in a for a in _proc.cmdline(name)[:2]):
                found.append(int(name))
    return found


def stop_play_on_cancel(cancel: threading.Event, done: threading.Event,
                        known_pid: Callable[[], Optional[int]]) -> threading.Thread:
    """A thread that stops the play as soon as ``cancel`` is set, unless ``done`` (the run is over) is set first.

    It stops the play at once instead of at the runner loop's next wake-up, and more completely than the runner's
    own cancel (``Runner.handle_termination``, a SIGKILL to the play's process group): each of ansible-core's
    workers runs in a session of its own (``os.setsid``), out of reach of a signal to that group, so a killed play
    would leave the running task's worker and its commands behind. SIGTERM lets ansible-playbook pass the signal to
    its workers; what is still alive after ``STOP_GRACE`` s gets SIGKILL. The runner's loop then finds the process
    gone. The play's pid is the one its events named (``known_pid``) or, for a cancel that came before the first
    event, this process's ansible-playbook child, looked for up to ``CANCEL_FIND_FOR`` s in case the runner has not
    spawned it yet. The thread sleeps in ``cancel.wait()``: no CPU while nothing happens.
    """
    def run() -> None:
        cancel.wait()
        deadline = time.monotonic() + CANCEL_FIND_FOR
        while not done.is_set():
            pid = known_pid()
            pids = [pid] if pid else playbook_children()
            if pids:
                _stop_groups(pids, STOP_GRACE)
                return
            if time.monotonic() > deadline:
                return
            done.wait(0.05)

    thread = threading.Thread(target=run, name="isession-stop-play", daemon=True)
    thread.start()
    return thread


def write_pidfile(path: Path, playbook_pid: Optional[int]) -> None:
    data = {"cli_pid": os.getpid(), "playbook_pid": playbook_pid, "started": time.time()}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


# ansible-runner's settings for every play isession runs: no output of its own, and its loop's wake
RUNNER_SETTINGS: Mapping[str, Any] = {"suppress_ansible_output": True, "pexpect_timeout": RUNNER_WAKE}


def _inventory_or_embedded(inventory: Optional[Path], pdd: Path) -> Path:
    """``inventory``, or (None) the embedded one written to ``pdd/inventory.yml`` (0600): a run in the workspace."""
    if inventory is not None:
        return inventory
    inv_file = pdd / "inventory.yml"
    inv_file.write_text(embedded_inventory())
    inv_file.chmod(0o600)
    return inv_file


def run_playbook(col: Collection, session_dir: Path, playbook: str, extravars: Mapping[str, Any], *,
                 inventory: Optional[Path], ident: str, progress: Optional[Progress] = None,
                 emit: Optional[Callable[[str], None]] = None, cancel: Optional[threading.Event] = None) -> PlayResult:
    """Run ``playbooks/<playbook>.yml`` with ansible_runner.run_async.

    Every event goes to ``progress`` (what a live view draws); ``emit``, when given, gets its plain line per task.
    Setting ``cancel`` stops the play at once (:func:`stop_play_on_cancel`); the result's status is then
    ``canceled``.
    """
    import ansible_runner  # noqa: PLC0415 - heavy import, only for commands that run playbooks

    _no_delay_after_close()
    pdd = runner_dir(session_dir)
    inventory = _inventory_or_embedded(inventory, pdd)
    pidfile = pdd / f"{ident}.pid"
    progress = progress if progress is not None else Progress()
    watch_cancel = cancel is not None
    cancel = cancel or threading.Event()

    def on_event(event: Dict[str, Any]) -> bool:
        first = progress.playbook_pid is None
        line = progress.line(event)
        if first and progress.playbook_pid is not None:
            write_pidfile(pidfile, progress.playbook_pid)
        if line and emit is not None:
            emit(line)
        return True

    write_pidfile(pidfile, None)
    done = threading.Event()
    if watch_cancel:  # a caller's event (its Ctrl-C, a SIGTERM): one thread per run, asleep until it is set
        stop_play_on_cancel(cancel, done, lambda: progress.playbook_pid)
    try:
        thread, runner = ansible_runner.run_async(
            private_data_dir=str(pdd),
            # ansible-playbook (and the ssh ControlMaster it leaves behind for a minute) must not hold the session
            # directory as its working directory
            project_dir="/",
            playbook=str(playbook_path(col, playbook)),
            inventory=str(inventory),
            extravars=dict(extravars),
            envvars=runner_env(col),
            ident=ident,
            quiet=True,
            event_handler=on_event,
            cancel_callback=cancel.is_set,
            settings=dict(RUNNER_SETTINGS),
        )
        thread.join()
    finally:
        done.set()
        pidfile.unlink(missing_ok=True)
    # a play the cancel stopped before the runner's loop first looked at the callback ends "failed" (killed) there
    status = "canceled" if cancel.is_set() and runner.status in ("failed", "error") else runner.status
    return PlayResult(status=status, rc=runner.rc, ident=ident, artifacts=pdd / "artifacts" / ident,
                      failures=list(progress.failed))


def stop_runs_in_progress(session_dir: Path, grace: float = 3.0, exclude_pid: Optional[int] = None) -> List[int]:
    """Stop any start still running for this session: its ansible-playbook process group and its CLI.

    Only processes of our own uid whose command line is what the pid file says are signalled.
    Returns the pids signalled.
    """
    pdd = session_dir / RUNNER_DIR
    plays: List[int] = []
    clis: List[int] = []
    for pidfile in sorted(pdd.glob("*.pid")) if pdd.is_dir() else []:
        try:
            data = json.loads(pidfile.read_text())
        except (OSError, ValueError):
            continue
        pb = data.get("playbook_pid")
        if isinstance(pb, int) and _ours(pb, b"ansible-playbook"):
            plays.append(pb)
        cli = data.get("cli_pid")
        if isinstance(cli, int) and cli != exclude_pid and cli != os.getpid() and _ours(cli, b"isession"):
            _signal(cli, signal.SIGTERM)
            clis.append(cli)
    # only the playbooks are killed: the start's CLI exits by itself once its playbook is gone, with 130 like every
    # interrupted start (a SIGKILL here ended some with 137, Killed)
    _stop_groups(plays, grace, waited=clis)
    return plays + clis


def _stop_groups(pids: List[int], grace: float, waited: Sequence[int] = ()) -> None:
    """SIGTERM each pid's process group, then SIGKILL the groups whose pid is still alive after ``grace`` s.

    ``waited``: processes the caller has signalled itself, waited for (until ``grace``) but never killed.
    """
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in [*pids, *waited]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)


def _ours(pid: int, needle: bytes) -> bool:
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return needle in fh.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    return bool(_proc.alive(pid))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    try:
        if pgid == pid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass


def standby_run(col: Collection, pdd: Path, playbook: Path, inventory: Optional[Path], *, socket_path: Path,
                seconds: float, ident: str = "start") -> PlayResult:
    """A start play that waits before its first task for a start's extra vars (:mod:`isession.standby`): run by
    ansible-runner as :func:`run_playbook` runs a start, in ``pdd``, with the strategy told where to listen."""
    import ansible_runner  # noqa: PLC0415

    _no_delay_after_close()
    pdd.mkdir(mode=0o700, parents=True, exist_ok=True)
    inventory = _inventory_or_embedded(inventory, pdd)
    env = runner_env(col)
    env.update({"ISESSION_STANDBY_SOCKET": str(socket_path), "ISESSION_STANDBY_FOR": str(seconds)})
    # SIGTERM or SIGINT ends the standby at once (its play, waiting or taken, with it), not at the runner's next wake
    cancel, done = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: cancel.set())
    stop_play_on_cancel(cancel, done, lambda: None)
    try:
        thread, runner = ansible_runner.run_async(
            private_data_dir=str(pdd), project_dir="/", playbook=str(playbook), inventory=str(inventory),
            extravars={}, envvars=env, ident=ident, quiet=True, cancel_callback=cancel.is_set,
            settings=dict(RUNNER_SETTINGS))
        thread.join()
    finally:
        done.set()
    return PlayResult(status=runner.status, rc=runner.rc, ident=ident, artifacts=pdd / "artifacts" / ident)


def run_from_standby(col: Collection, root: Path, session_dir: Path, playbook: str, *, service: str,
                     extravars: Mapping[str, Any], inventory: Optional[Path], ident: str, progress: Progress,
                     emit: Optional[Callable[[str], None]], cancel: threading.Event) -> Optional[PlayResult]:
    """:func:`run_playbook`'s result for a play a standby runs (:mod:`isession.standby`), or None when no standby
    made for this start waits (the caller then runs the play itself). The events reach ``progress`` and ``emit`` as
    they would from a play of this process; ``cancel`` stops the play as :func:`stop_play_on_cancel` does."""
    from . import standby  # noqa: PLC0415

    fp = standby.fingerprint(col.root, playbook_path(col, playbook), inventory, os.environ)
    taken = standby.take(root, service, fp, extravars, session_dir)
    if taken is None:
        return None
    pidfile = session_dir / RUNNER_DIR / f"{ident}.pid"
    write_pidfile(pidfile, taken.playbook_pid)
    # the inputs where ansible-runner keeps a cold start's (env/extravars), 0600
    (session_dir / RUNNER_DIR / "env").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(session_dir / RUNNER_DIR / "env" / "extravars", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(extravars), fh)

    def on_event(event: Dict[str, Any]) -> None:
        line = progress.line(event)
        if line and emit is not None:
            emit(line)

    try:
        status, rc = standby.follow(taken, on_event, cancel, lambda pid: _stop_groups([pid], STOP_GRACE))
    finally:
        pidfile.unlink(missing_ok=True)
    status = "canceled" if cancel.is_set() and status in ("failed", "error") else status
    return PlayResult(status=status, rc=rc, ident=ident, artifacts=session_dir / RUNNER_DIR / "artifacts" / ident,
                      failures=list(progress.failed))
