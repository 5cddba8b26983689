"""The isession command line: start, status, list, logs, cancel, describe, watch, doctor, gateway."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import __version__, config, sessions
from .collection import find_collection
from .config import UsageError

EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isession", description="Interactive sessions on HPC resources.")
    parser.add_argument("--version", action="version", version=f"isession {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("collection", help="show which hpc.interactive collection isession uses")

    def with_inventory(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-i", "--inventory", help="Ansible inventory of the resources "
                       "(default $ISESSION_INVENTORY, then ~/.config/isession/inventory.yml)")
        return p

    p = with_inventory(sub.add_parser("start", help="start a session and print its URL"))
    p.add_argument("service", help="service to start (see `isession describe SERVICE`)")
    p.add_argument("-r", "--resource", help="inventory host of the cluster's controller")
    p.add_argument("-t", "--target", choices=config.TARGETS, default="workspace",
                   help="where the server runs (default: workspace)")
    p.add_argument("-e", "--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a role input (repeatable; JSON for lists)")
    p.add_argument("--inputs", metavar="FILE", help="YAML file of role inputs (-e wins)")
    p.add_argument("--id", help="session id (default: <service>-<UTC time>-<random>)")
    p.add_argument("--wait", action="store_true",
                   help="stay attached until the session ends, then exit 0 (Cancelled, Completed) or 1 (Failed); "
                        "Ctrl-C cancels the session and exits 130 (SIGTERM: 143), a second Ctrl-C does not stop "
                        "that cancel")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show skipped tasks")

    p = sub.add_parser("status", help="status of a session (default: the newest)")
    p.add_argument("id", nargs="?")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("list", help="all sessions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--live", action="store_true", help="only sessions that have not ended")
    p = with_inventory(sub.add_parser("logs", help="job output, server, tunnel and runner logs of a session"))
    p.add_argument("id")
    p.add_argument("-n", "--lines", type=int, default=50, help="last N lines of each file (0: all)")
    p = with_inventory(sub.add_parser("cancel", help="cancel a session (also a start still in progress)"))
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("describe", help="the inputs of a service")
    p.add_argument("service")
    p.add_argument("--json", action="store_true")
    p = with_inventory(sub.add_parser("watch", help="run the watcher (one per user)"))
    p.add_argument("--daemon", action="store_true", help="detach; do nothing if a watcher already runs")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--idle-exit", type=float, default=900.0,
                   help="exit after this many seconds without a live session (0: never)")
    p = with_inventory(sub.add_parser("doctor", help="check that sessions can start"))
    p.add_argument("-r", "--resource", help="check only this resource")
    p.add_argument("-s", "--service", help="also check this service's binaries where its sessions would run")
    p.add_argument("-t", "--target", choices=config.TARGETS,
                   help="with --service: only this target (default: the workspace, and the controller and a "
                   "compute node of each resource checked)")
    p.add_argument("-e", "--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="with --service: a role input as for start (e.g. jupyterlab_executable=PATH, "
                   "session_partition=P); repeatable")
    from .gateway import add_parser as add_gateway_parser  # noqa: PLC0415 - aiohttp is imported only when it runs

    add_gateway_parser(sub)
    return parser


def _err(msg: str) -> None:
    print(f"isession: {msg}", file=sys.stderr)


def _session_or_fail(root: Path, session_id: str) -> sessions.Session:
    config.check_session_id(session_id)
    sess = sessions.load(root, session_id)
    if sess is None:
        raise UsageError(f"no session {session_id!r} under {root}")
    return sess


def _recorded_inventory(session_dir: Path, explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        return config.find_inventory(explicit)
    try:
        data = json.loads((session_dir / "logs" / "runner" / "cli.json").read_text())
        if data.get("inventory") and Path(data["inventory"]).exists():
            return Path(data["inventory"])
    except (OSError, ValueError):
        pass
    return config.find_inventory()


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


def ensure_watcher(root: Path, inventory: Optional[Path]) -> None:
    from .watcher import running_pid  # noqa: PLC0415

    if running_pid(root):
        return
    argv = [sys.executable, "-m", "isession", "watch", "--daemon"]
    if inventory:
        argv += ["--inventory", str(inventory)]
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                   env={**os.environ, "ISESSION_ROOT": str(root)})


def request_fast_cancel(root: Path, session_id: str) -> bool:
    """Set the cancel tombstone now and wake the user's watcher, which cancels the job over the connection it holds.

    The tombstone is the cancel playbook's first step (``session_state`` op cancel, the same ``_state`` call), done
    here ~1 s earlier than ansible-playbook could; the playbook then does and confirms every step as always. True
    when a running watcher was woken. Any trouble here only means the playbook does all the work.
    """
    from . import mu  # noqa: PLC0415
    from .watcher import running_pid  # noqa: PLC0415

    try:
        mu.load("_state").run_op("cancel", str(root), session_id, {})
        pid = running_pid(root)
        if pid and pid > 0:
            os.kill(pid, signal.SIGUSR1)
            return True
    except (OSError, ValueError):
        pass
    return False


def run_cancel(root: Path, session_id: str, inventory: Optional[Path], emit: Callable[[str], None]) -> int:
    from .play import run_playbook, stop_runs_in_progress  # noqa: PLC0415

    col = find_collection()
    session_dir = root / session_id
    request_fast_cancel(root, session_id)
    stopped = stop_runs_in_progress(session_dir)
    if stopped:
        emit(f"  stopped the start in progress (pids {', '.join(map(str, stopped))})")
    result = run_playbook(col, session_dir, "cancel", {"session_id": session_id, "session_root": str(root)},
                          inventory=inventory, ident=f"cancel-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}",
                          emit=emit)
    return 0 if result.status == "successful" else EXIT_FAIL


def cmd_start(args: argparse.Namespace) -> int:
    from .play import run_playbook  # noqa: PLC0415

    col = find_collection()
    service = config.check_service(args.service)
    if not (col.path / "playbooks" / f"start_{service}.yml").is_file():
        from .describe import services  # noqa: PLC0415

        raise UsageError(f"no service {service!r} (services: {', '.join(services(col.path)) or 'none'})")
    root = config.session_root()
    inventory = config.find_inventory(args.inventory)
    if args.target != "workspace" and inventory is None:
        raise UsageError(f"--target {args.target} needs an inventory (--inventory, $ISESSION_INVENTORY or "
                         "~/.config/isession/inventory.yml); without one only the workspace target exists")
    inputs = config.load_inputs(args.inputs) if args.inputs else {}
    inputs.update(config.parse_extra(args.extra))
    sid = config.check_session_id(args.id) if args.id else config.new_session_id(service)
    extravars = config.build_extravars(service, sid, root, target=args.target, resource=args.resource,
                                       inputs=inputs)
    out = sys.stderr if args.json else sys.stdout

    def emit(line: str) -> None:
        print(line, file=out, flush=True)

    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    session_dir = root / sid
    from .play import runner_dir  # noqa: PLC0415

    cli_json = runner_dir(session_dir) / "cli.json"
    cli_json.write_text(json.dumps({"inventory": str(inventory) if inventory else None,
                                    "collection": str(col.root), "pid": os.getpid(), "inputs": extravars}))
    cli_json.chmod(0o600)
    where = args.target if args.target == "workspace" else f"{args.target} of {args.resource}"
    emit(f"Starting {service} session {sid} on {where}")
    # one handler from the start to the end of the command: a Ctrl-C at any point (the start's play, the report,
    # the wait) cancels the session, and none turns into a KeyboardInterrupt half-way
    with Interrupts() as intr:
        result = run_playbook(col, session_dir, f"start_{service}", extravars, inventory=inventory, ident="start",
                              emit=emit, verbose=args.verbose, cancel=intr.event)
        if intr.signal is not None:
            if intr.signal == signal.SIGINT:
                return cancel_after_interrupt(root, sid, inventory, emit, signal.SIGINT)
            return EXIT_INTERRUPTED  # SIGTERM: `isession cancel` stops the start and cancels it itself
        sess = sessions.load(root, sid) or sessions.Session(id=sid, dir=session_dir)
        ok = sess.status == "Running"
        if ok:
            ensure_watcher(root, inventory)
        doc = dict(sess.as_dict(), runner_status=result.status, failures=result.failures)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            emit(f"session   {sid}\nstatus    {sess.status}")
            if sess.message or (not ok and result.failures):
                emit(f"message   {sess.message or result.failures[-1]}")
            emit(f"file      {sess.service_json}")
            if sess.url:
                emit(f"url       {sess.url}")
        if not ok:
            return EXIT_FAIL
        if args.wait:
            return wait_for_end(root, sid, inventory, emit, intr)
        if intr.signal == signal.SIGINT:  # Ctrl-C while the result was printed
            return cancel_after_interrupt(root, sid, inventory, emit, signal.SIGINT)
        return 0


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
    config.check_session_id(args.id)
    session_dir = root / args.id
    if not session_dir.is_dir():
        raise UsageError(f"no session {args.id!r} under {root}")
    inventory = _recorded_inventory(session_dir, args.inventory)
    emit: Callable[[str], None] = (lambda s: print(s, file=sys.stderr)) if args.json else print
    emit(f"Cancelling session {args.id}")
    rc = run_cancel(root, args.id, inventory, emit)
    sess = sessions.load(root, args.id)
    if args.json:
        print(json.dumps(sess.as_dict() if sess else {"id": args.id}, indent=2))
    elif sess:
        print(sessions.format_status(sess))
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    root = config.session_root()
    sess = _session_or_fail(root, args.id) if args.id else sessions.latest(root)
    if sess is None:
        raise UsageError(f"no sessions under {root}")
    print(json.dumps(sess.as_dict(), indent=2) if args.json else sessions.format_status(sess))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = sessions.all_sessions(config.session_root())
    if args.live:
        found = [s for s in found if s.status not in config.TERMINAL_STATUSES]
    if args.json:
        print(json.dumps([s.as_dict() for s in found], indent=2))
    elif found:
        print(sessions.format_table(found))
    else:
        print("no sessions")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    root = config.session_root()
    sess = _session_or_fail(root, args.id)
    for path in sessions.local_logs(sess.dir):
        print(f"==> {path} <==\n{sessions.tail(path, args.lines)}\n")
    rec = sess.record
    if rec.get("target") in ("controller", "compute") and rec.get("remote_dir") and rec.get("resource"):
        from . import mu  # noqa: PLC0415
        from .remote import RemoteError, RemoteServer, inventory_conn  # noqa: PLC0415

        try:
            conn = inventory_conn(_recorded_inventory(sess.dir, args.inventory), rec["resource"])
            server = RemoteServer(conn, Path(mu.load("_cmd").__file__).parent)
            files = server.ask({"op": "tail", "dir": rec["remote_dir"], "lines": args.lines}, 20).get("files", {})
            server.close()
        except (RemoteError, LookupError) as exc:
            _err(f"cannot read the logs on {rec['resource']}: {exc}")
            return EXIT_FAIL
        for name, text in files.items():
            print(f"==> {rec['resource']}:{rec['remote_dir']}/{name} <==\n{text}\n")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .describe import describe, format_text  # noqa: PLC0415

    try:
        info = describe(find_collection().path, config.check_service(args.service))
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(info, indent=2, default=str) if args.json else format_text(info))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from . import watcher as w  # noqa: PLC0415

    root = config.session_root()
    inventory = config.find_inventory(args.inventory)
    fd = w.lock_pidfile(root)
    if fd is None:
        print(f"a watcher already runs (pid {w.running_pid(root)})")
        return 0
    if args.daemon and not w.daemonize(root, fd):
        for _ in range(50):
            pid = w.running_pid(root)
            if pid and pid > 0:
                print(f"watcher started (pid {pid})")
                return 0
            time.sleep(0.05)
        return 0
    # SIGUSR1 (a cancel's nudge) must never kill a watcher whose pid is already visible but not yet set up
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    w.write_pid(fd)

    def log(msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)

    watch = w.Watcher(root, inventory, log=log, interval=args.interval, idle_exit=args.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: watch.shutdown())
    signal.signal(signal.SIGINT, lambda *_: watch.shutdown())
    signal.signal(signal.SIGUSR1, lambda *_: watch.nudge())  # `isession cancel` asks for a tick now
    if args.once:
        watch.tick()
        watch.close()
        return 0
    log(f"watcher pid {os.getpid()} on {root}")
    watch.run()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_checks  # noqa: PLC0415

    if (args.target or args.extra) and not args.service:
        raise UsageError("doctor: --target and -e go with --service SERVICE")
    service = config.check_service(args.service) if args.service else None
    inputs = config.check_inputs(config.parse_extra(args.extra))
    return run_checks(config.session_root(), config.find_inventory(args.inventory), args.resource,
                      service=service, target=args.target, inputs=inputs)


def cmd_gateway(args: argparse.Namespace) -> int:
    from .gateway import cmd_gateway as run  # noqa: PLC0415

    return run(args)


def cmd_collection() -> int:
    try:
        col = find_collection()
    except LookupError as exc:
        print(f"isession: {exc}", file=sys.stderr)
        return 1
    print(f"hpc.interactive {col.version} at {col.path}")
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "start": cmd_start, "status": cmd_status, "list": cmd_list, "logs": cmd_logs, "cancel": cmd_cancel,
    "describe": cmd_describe, "watch": cmd_watch, "doctor": cmd_doctor, "gateway": cmd_gateway,
}


def main(argv: Optional[List[str]] = None) -> int:
    # SIGPIPE stays ignored (Python's default): with its default action, a write to a connection's ssh that has just
    # died (the watcher sending its payload to an unreachable controller) would kill the process instead of raising
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "collection":
        return cmd_collection()
    if args.command not in COMMANDS:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # `isession list | head`: the reader left; end quietly like other Unix tools (128 + SIGPIPE)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except LookupError as exc:  # the collection is missing
        _err(str(exc))
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
