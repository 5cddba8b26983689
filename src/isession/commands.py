"""What each isession command does (the parser and the dispatch are in ``cli.py``).

Every command prints its result on stdout, as text or with ``--json`` as one JSON document; progress and messages
go to stdout in text mode and to stderr with ``--json``. The live progress view (``view.py``) is drawn only on a
terminal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TextIO

from ansible_collections.hpc.interactive.plugins.module_utils import _cmd, _state
from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import TERMINAL_STEPS

from . import config, sessions, view
from .cli import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK
from .collection import active, find_collection
from .config import UsageError
from .progress import QUEUE_FILE, Progress, read_queue_file
from .watchfiles import lock_pidfile, note_pending, read_teardown, request_fast_cancel, running_pid, write_pid


class Output:
    """Where a command writes: the result on stdout; messages on stdout, or on stderr with ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.stream: TextIO = sys.stderr if as_json else sys.stdout

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def result(self, doc: Any, text: Optional[str] = None) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str), flush=True)
        elif text is not None:
            print(text, flush=True)

    def live(self, progress: Progress, title: str, verbose: bool = False) -> contextlib.AbstractContextManager:
        """The live view of ``progress`` when it belongs on this output (a terminal, not ``-v``)."""
        if verbose or not view.wanted(self.stream):
            return contextlib.nullcontext()
        return view.LiveView(progress, title, self.stream)


def _session_or_fail(root: Path, session_id: str) -> sessions.Session:
    config.check_session_id(session_id)
    sess = sessions.load(root, session_id)
    if sess is None:
        raise UsageError(f"no session {session_id!r} under {root}")
    return sess


def _recorded_inventory(session_dir: Path, explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        return config.find_inventory(explicit)
    recorded = config.cli_record(session_dir).get("inventory")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    return config.find_inventory(user_config=config.load_user_config())


def _collection():
    return active() or find_collection()


class Interrupts:
    """SIGINT/SIGTERM set an event the runner's cancel_callback reads; remembers which came."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: Optional[int] = None

    def __enter__(self) -> Interrupts:
        self.old = {s: signal.signal(s, self._on) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on(self, signum: int, _frame: Any) -> None:
        self.signal = signum
        self.event.set()

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _cancel_goes_on(_signum: int, _frame: Any) -> None:
    # a signal handler: os.write, not print (the main thread may be inside a print)
    os.write(2, b"isession: the cancel goes on until it is done\n")


def cancel_after_interrupt(root: Path, sid: str, inventory: Optional[Path], emit: Callable[[str], None],
                           signum: int) -> int:
    """Cancel the session after Ctrl-C (SIGINT) or SIGTERM reached a start or an attached ``--wait``.

    Another Ctrl-C or SIGTERM while the cancel runs is acknowledged, not obeyed: stopping the cancel's playbook
    half-way would leave the job, a listener or the port reservation behind. Returns 128 + ``signum`` once the
    session has ended, EXIT_FAIL when the cancel failed.
    """
    emit("Interrupted: cancelling the session")
    old = {s: signal.signal(s, _cancel_goes_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = run_cancel(root, sid, inventory, emit)
        sess = sessions.load(root, sid)
        status = sess.status if sess else "Unknown"
        if rc == 0 and status in config.TERMINAL_STATUSES:
            emit(_ended_line(sess))
            return 128 + signum
        emit(f"the cancel failed (status {status}); `isession cancel {sid}` tries again")
        return EXIT_FAIL
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _ended_line(sess: Optional[sessions.Session]) -> str:
    if sess is None:
        return "session ended: its record is gone"
    return f"session ended: {sess.status}" + (f": {sess.message}" if sess.message else "")


def ensure_watcher(root: Path, inventory: Optional[Path], *, wait: bool = True) -> Optional[subprocess.Popen]:
    """Start the user's watcher (``isession watch --daemon``) unless one runs.

    With ``wait`` false the command is started and returned, not waited for (the caller reaps it later): a start on a
    cluster target starts it before its play, so that a job that ends while its app starts is seen at once (only the
    watcher asks the scheduler), without delaying the play.
    """
    if running_pid(root):
        return None
    argv = [sys.executable, "-m", "isession", "watch", "--daemon"]
    if inventory:
        argv += ["--inventory", str(inventory)]
    col = active()
    env = {**os.environ, "ISESSION_ROOT": str(root)}
    if col is not None:  # the watcher imports the copy this command uses
        env["ISESSION_COLLECTIONS"] = str(col.root)
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, env=env)
    return None


WATCHER_CANCEL_WAIT = 15.0  # seconds a cancel waits for the watcher's teardown before it runs the cancel playbook
NOTE_AFTER_END = 2.0  # seconds after a cancelled session's end within which the watcher's note is still to come


def watcher_cancelled(root: Path, session_id: str, timeout: float = WATCHER_CANCEL_WAIT) -> bool:
    """Wait until the user's watcher, woken by :func:`request_fast_cancel`, has ended the session and undone it all.

    True when the record reached a terminal step and the watcher's ``teardown.json`` says complete; the watcher may
    well have got there before this wait began (it acts on the tombstone at once, while the cancel stops the start).
    The watcher notes that its teardown is under way as soon as it records the end (``Watcher.note_under_way``), and
    this waits for the final note while that watcher runs, however long a burst of teardowns takes on shared cores.
    False at once for what the watcher does not tear down (no job recorded yet, a connect-mode session, a session that
    had ended otherwise than cancelled), when its teardown left something, when the watcher is gone, or after
    ``timeout``: the cancel playbook then does and confirms every step.
    """
    from ansible_collections.hpc.interactive.plugins.module_utils._dirwatch import Changes  # noqa: PLC0415

    directory = root / session_id
    state_path = str(directory / "state.json")
    try:
        rec = _state.read_record(state_path) or {}
    except ValueError:
        return False
    if not rec.get("job_id"):  # connect mode, or not submitted yet: nothing of the watcher's to wait for
        return False
    limit = time.monotonic() + timeout  # the whole wait, for a teardown the watcher says is under way
    if rec.get("step") in TERMINAL_STEPS:
        # ended already: by the watcher on this tombstone (its note says under way, or whether it undid everything),
        # or otherwise than cancelled. The watcher writes its first note just after it records the end: a session
        # cancelled moments ago without any note gets that moment; one cancelled long ago without a note was not
        # cancelled by the watcher.
        note = read_teardown(directory) if rec.get("step") == "cancelled" else None
        ended = rec.get("ended")
        if note is None and rec.get("step") == "cancelled" and isinstance(ended, (int, float)) \
                and time.time() - ended <= NOTE_AFTER_END:
            # the moment ends NOTE_AFTER_END after the end, unless the watcher's "under way" comes within it
            timeout = min(timeout, ended + NOTE_AFTER_END - time.time())
        elif note_pending(note, running_pid(root)) is None:
            return bool(note and note.get("complete"))
    deadline = time.monotonic() + timeout
    with Changes(str(directory)) as changes:
        while time.monotonic() < deadline:
            pid = running_pid(root)
            if not pid or pid < 0:
                return False
            try:
                rec = _state.read_record(state_path) or {}
            except ValueError:
                return False
            if rec.get("step") in TERMINAL_STEPS:
                note = read_teardown(directory)
                pending = note_pending(note, pid)
                if note is not None and pending is None:  # the final note, written after the teardown
                    return bool(note.get("complete"))
                if pending is False:  # under way for a watcher that is gone: nobody finishes it
                    return False
                if pending:
                    deadline = limit
            changes.wait(min(0.5, max(0.0, deadline - time.monotonic())))
    return False


def run_cancel(root: Path, session_id: str, inventory: Optional[Path], emit: Callable[[str], None],
               out: Optional[Output] = None, *, woke: Optional[bool] = None) -> int:
    """Cancel the session: the tombstone and the watcher's teardown, else the cancel playbook. ``woke``: what
    :func:`request_fast_cancel` returned when the command line did it already (None: it is done here)."""
    if woke is None:
        woke = request_fast_cancel(root, session_id)
    from .play import run_playbook, stop_runs_in_progress  # noqa: PLC0415

    col = _collection()
    session_dir = root / session_id
    stopped = stop_runs_in_progress(session_dir)
    if stopped:
        emit(f"  stopped the start in progress (pids {', '.join(map(str, stopped))})")
    # the watcher undoes the session with the one teardown over the connection it holds; when it says all is undone,
    # a cancel playbook would only confirm it (and costs an ansible-playbook, ~1 s of CPU, per cancel)
    if woke and watcher_cancelled(root, session_id):
        emit("  the user's watcher ended the session and undid everything it held")
        return 0
    progress = Progress()
    live = out.live(progress, f"cancel of {session_id}") if out else contextlib.nullcontext()
    with live:
        result = run_playbook(col, session_dir, "cancel", {"session_id": session_id, "session_root": str(root)},
                              inventory=inventory, ident=f"cancel-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}",
                              progress=progress)
    return 0 if result.status == "successful" else EXIT_FAIL


def _start_plan(args: argparse.Namespace, user_config: config.UserConfig, service: str) -> Dict[str, Any]:
    inputs_file = config.load_inputs(args.inputs) if args.inputs else {}
    return config.start_settings(user_config, service, target=args.target, resource=args.resource,
                                 inputs_file=inputs_file, extra=config.parse_extra(args.extra))


def cmd_start(args: argparse.Namespace) -> int:
    from . import standby  # noqa: PLC0415
    from .describe import services  # noqa: PLC0415
    from .play import playbook_path, run_from_standby, run_playbook, runner_dir  # noqa: PLC0415

    standby_for = standby.seconds_from(os.environ)
    col = _collection()
    service = config.check_service(args.service)
    if not (col.path / "playbooks" / f"start_{service}.yml").is_file():
        raise UsageError(f"no service {service!r} (services: {', '.join(services(col.path)) or 'none'})")
    user_config = config.load_user_config()
    plan = _start_plan(args, user_config, service)
    target, resource = plan["target"].value, plan["resource"].value
    root = config.session_root()
    inventory = config.find_inventory(args.inventory, user_config=user_config)
    if target != "workspace" and inventory is None:
        raise UsageError(f"--target {target} needs an inventory (--inventory, $ISESSION_INVENTORY, the config file's "
                         "inventory or ~/.config/isession/inventory.yml); without one only the workspace target exists")
    inputs = {k: s.value for k, s in plan["inputs"].items()}
    sid = config.check_session_id(args.id) if args.id else config.new_session_id(service)
    taken = sessions.load(root, sid) if args.id else None
    if taken is not None:
        # an id names one session for good: its record, logs and service.json stay after it ends
        raise UsageError(f"--id {sid}: the id is taken (that session is {taken.status}); leave --id out for a new "
                         "id or choose another")
    extravars = config.build_extravars(service, sid, root, target=target, resource=resource, inputs=inputs)
    out = Output(args.json)

    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    session_dir = root / sid
    runner_dir(session_dir)
    cli_json = session_dir / config.CLI_RECORD
    cli_json.write_text(json.dumps({"inventory": str(inventory) if inventory else None,
                                    "collection": str(col.root), "pid": os.getpid(), "inputs": extravars}))
    cli_json.chmod(0o600)
    where = target if target == "workspace" else f"{target} of {resource}"
    out.say(f"Starting {service} session {sid} on {where}")
    progress = Progress(verbose=args.verbose, queue_source=lambda: read_queue_file(session_dir / QUEUE_FILE))
    # a cluster job that ends while its app starts is seen only by the watcher: it must run before the readiness wait
    early_watcher = ensure_watcher(root, inventory, wait=False) if target != "workspace" else None
    # one handler from the start to the end of the command: a Ctrl-C at any point (the start's play, the report,
    # the wait) cancels the session, and none turns into a KeyboardInterrupt half-way
    with Interrupts() as intr:
        with out.live(progress, f"{service} session {sid}", verbose=args.verbose):
            emit = out.say if args.verbose else None
            # a standby (isession.standby), when one waits for this start; else the start's own play
            result = run_from_standby(col, root, session_dir, f"start_{service}", service=service,
                                      extravars=extravars, inventory=inventory, ident="start", progress=progress,
                                      emit=emit, cancel=intr.event) if standby_for else None
            if result is None:
                result = run_playbook(col, session_dir, f"start_{service}", extravars, inventory=inventory,
                                      ident="start", progress=progress, emit=emit, cancel=intr.event)
        if intr.signal is not None:
            if intr.signal == signal.SIGINT:
                return cancel_after_interrupt(root, sid, inventory, out.say, signal.SIGINT)
            return EXIT_INTERRUPTED  # SIGTERM: `isession cancel` stops the start and cancels it itself
        if early_watcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                early_watcher.wait(timeout=30)
        sess = sessions.load(root, sid) or sessions.Session(id=sid, dir=session_dir)
        ok = sess.status == "Running"
        if ok:
            ensure_watcher(root, inventory)
        doc = dict(sess.as_dict(), runner_status=result.status, failures=result.failures,
                   cancel=f"isession cancel {sid}")
        lines = [f"session   {sid}", f"status    {sess.status}"]
        if sess.message or (not ok and result.failures):
            lines.append(f"message   {sess.message or result.failures[-1]}")
        lines.append(f"file      {sess.service_json}")
        if sess.url:
            lines.append(f"url       {sess.url}")
        if sess.status not in config.TERMINAL_STATUSES and (session_dir / "state.json").exists():
            lines.append(f"cancel    isession cancel {sid}")
        out.result(doc, "\n".join(lines))
        if standby_for:  # the next start's play, started now that this one is done (best effort: it only saves time)
            with contextlib.suppress(OSError):
                standby.spawn(root, col.root, service, playbook_path(col, f"start_{service}"), inventory=inventory,
                              seconds=standby_for)
        if not ok:
            return EXIT_FAIL
        if args.wait:
            return wait_for_end(root, sid, inventory, out.say, intr)
        if intr.signal == signal.SIGINT:  # Ctrl-C while the result was printed
            return cancel_after_interrupt(root, sid, inventory, out.say, signal.SIGINT)
        return EXIT_OK


def wait_for_end(root: Path, sid: str, inventory: Optional[Path], emit: Callable[[str], None],
                 intr: Interrupts, *, interval: float = 0.5) -> int:
    """Stay attached until the session ends (like the seed's main script); Ctrl-C or SIGTERM cancels it.

    The last line is ``session ended: STATUS[: message]``. Exit codes: 0 when the session ended Cancelled or
    Completed by itself (a cancel from elsewhere, walltime, the server's exit), EXIT_FAIL when it Failed or its
    record vanished; after Ctrl-C 130 (SIGTERM 143) once the cancel is done, EXIT_FAIL if the cancel failed.
    ``intr`` is the caller's handler, so a signal that came just before the wait is not lost.
    """
    emit("Waiting until the session ends (Ctrl-C cancels it)")
    last = None
    while True:
        if intr.signal is not None:
            return cancel_after_interrupt(root, sid, inventory, emit, intr.signal)
        sess = sessions.load(root, sid)
        if sess is None and not (root / sid).is_dir():
            emit(_ended_line(None))
            return EXIT_FAIL
        status = sess.status if sess else "Unknown"
        if status in config.TERMINAL_STATUSES:
            emit(_ended_line(sess))
            return 0 if status in ("Completed", "Cancelled") else EXIT_FAIL
        if status != last:
            emit(f"  {status}" + (f": {sess.message}" if sess and sess.message else ""))
            last = status
        intr.event.wait(interval)


def cmd_cancel(args: argparse.Namespace) -> int:
    root = config.session_root()
    session_dir = config.existing_session_dir(root, args.id)
    inventory = _recorded_inventory(session_dir, args.inventory)
    out = Output(args.json)
    out.say(f"Cancelling session {args.id}")
    rc = run_cancel(root, args.id, inventory, out.say, out, woke=getattr(args, "woke", None))
    sess = sessions.load(root, args.id)
    out.result(sess.as_dict() if sess else {"id": args.id}, sessions.format_status(sess) if sess else None)
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    root = config.session_root()
    sess = _session_or_fail(root, args.id) if args.id else sessions.latest(root)
    if sess is None:
        raise UsageError(f"no sessions under {root}")
    Output(args.json).result(sess.as_dict(), sessions.format_status(sess))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    found = sessions.all_sessions(config.session_root())
    if args.live:
        found = [s for s in found if s.status not in config.TERMINAL_STATUSES]
    Output(args.json).result([s.as_dict() for s in found], sessions.format_table(found) if found else "no sessions")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    root = config.session_root()
    sess = _session_or_fail(root, args.id)
    out = Output(args.json)
    local = {str(path): sessions.tail(path, args.lines) for path in sessions.local_logs(sess.dir)}
    remote: Dict[str, str] = {}
    rec = sess.record
    rc = EXIT_OK
    if rec.get("target") in ("controller", "compute") and rec.get("remote_dir") and rec.get("resource"):
        from .remote import RemoteError, RemoteServer, inventory_conn  # noqa: PLC0415

        try:
            conn = inventory_conn(_recorded_inventory(sess.dir, args.inventory), rec["resource"])
            server = RemoteServer(conn, Path(_cmd.__file__).parent)
            files = server.ask({"op": "tail", "dir": rec["remote_dir"], "lines": args.lines}, 20).get("files", {})
            server.close()
            remote = {f"{rec['resource']}:{rec['remote_dir']}/{name}": text for name, text in files.items()}
        except (RemoteError, LookupError) as exc:
            print(f"isession: cannot read the logs on {rec['resource']}: {exc}", file=sys.stderr)
            rc = EXIT_FAIL
    text = "\n".join(f"==> {name} <==\n{body}\n" for name, body in {**local, **remote}.items())
    out.result({"id": sess.id, "files": local, "remote_files": remote}, text)
    return rc


def cmd_describe(args: argparse.Namespace) -> int:
    from .describe import describe, format_text  # noqa: PLC0415

    try:
        info = describe(_collection().path, config.check_service(args.service))
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    Output(args.json).result(info, format_text(info))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from . import watcher as w  # noqa: PLC0415

    root = config.session_root()
    inventory = config.find_inventory(args.inventory, user_config=config.load_user_config())
    out = Output(args.json)
    fd = lock_pidfile(root)
    if fd is None:
        pid = running_pid(root)
        out.result({"pid": pid, "started": False}, f"a watcher already runs (pid {pid})")
        return EXIT_OK
    if args.daemon and not w.daemonize(root, fd):
        for _attempt in range(50):
            pid = running_pid(root)
            if pid and pid > 0:
                out.result({"pid": pid, "started": True}, f"watcher started (pid {pid})")
                return EXIT_OK
            time.sleep(0.05)
        return EXIT_OK
    # SIGUSR1 (a cancel's nudge) must never kill a watcher whose pid is already visible but not yet set up
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    write_pid(fd)

    def log(msg: str) -> None:
        now = time.time()  # milliseconds: the lines of a burst of cancels or starts must show their order and gaps
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        line = json.dumps({"time": stamp, "message": msg}) if args.json else f"{stamp} {msg}"
        print(line, flush=True)

    watch = w.Watcher(root, inventory, log=log, interval=args.interval, idle_exit=args.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: watch.shutdown())
    signal.signal(signal.SIGINT, lambda *_: watch.shutdown())
    signal.signal(signal.SIGUSR1, lambda *_: watch.nudge())  # `isession cancel` asks for a tick now
    if args.once:
        watch.tick()
        watch.close()
        return EXIT_OK
    log(f"watcher pid {os.getpid()} on {root}")
    watch.run()
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_checks, gather_checks  # noqa: PLC0415

    if (args.target or args.extra) and not args.service:
        raise UsageError("doctor: --target and -e go with --service SERVICE")
    service = config.check_service(args.service) if args.service else None
    inputs = config.check_inputs(config.parse_extra(args.extra))
    inventory = config.find_inventory(args.inventory, user_config=config.load_user_config())
    checks = gather_checks(config.session_root(), inventory, args.resource, service=service, target=args.target,
                           inputs=inputs)
    failed = any(level == "FAIL" for level, _ignored, _ignored in checks)
    Output(args.json).result({"ok": not failed, "checks": [{"level": lv, "what": what, "detail": detail}
                                                           for lv, what, detail in checks]}, format_checks(checks))
    return EXIT_FAIL if failed else EXIT_OK
