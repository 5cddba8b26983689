# PYTHON_ARGCOMPLETE_OK
"""The isession command line: the parser, shell completion, exit codes, and the dispatch to the commands.

This module stays light (argparse, argcomplete): ``isession --help`` and shell completion run it without loading
Ansible. A command's code is imported when the command runs, after :func:`isession.collection.activate` made the
collection importable (the commands import its module_utils by their real names).

Adding a command: add its parser in :func:`build_parser` (``parents=[common]`` gives it ``--json``) and its handler
in :data:`HANDLERS` as ``"module:function"`` (relative to the isession package); the function takes the parsed
arguments and returns the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from . import __version__, completion
from .config import TARGETS, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_COLLECTION = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE, EXIT_TERMINATED = 130, 141, 143
EXIT_CODES = (
    (EXIT_OK, "success (start: the session is Running; start --wait: it ended Cancelled or Completed)"),
    (EXIT_FAIL, "failed: the session Failed, a start or cancel did not complete, a doctor check failed"),
    (EXIT_USAGE, "bad command line, input, inventory or config file (nothing was started)"),
    (EXIT_NO_COLLECTION, "the hpc.interactive collection is not installed"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl-C (a session being started is cancelled first)"),
    (EXIT_PIPE, "the reader of the output went away (e.g. `isession list | head`)"),
    (EXIT_TERMINATED, "terminated by SIGTERM"),
)

# command -> "module:function" (imported when the command runs)
HANDLERS: Dict[str, str] = {
    "start": "commands:cmd_start", "status": "commands:cmd_status", "list": "commands:cmd_list",
    "logs": "commands:cmd_logs", "cancel": "commands:cmd_cancel", "describe": "commands:cmd_describe",
    "watch": "commands:cmd_watch", "doctor": "commands:cmd_doctor", "config": "info:cmd_config",
    "collection": "info:cmd_collection", "gateway": "gateway:cmd_gateway",
    "_standby": "standby:cmd_standby",
}
# commands that work without the collection (they only report on it)
NO_COLLECTION_NEEDED = ("collection", "config")
# commands that run no Ansible plugin in their own process (their playbooks are ansible-playbook processes): they get
# ansible-core's collection finder alone, without its plugin loaders (see isession.collection.activate)
NO_PLUGINS_NEEDED = ("start", "cancel", "_standby")


class VersionAction(argparse.Action):
    """``--version``: isession's version, the collection copy in use (and any other found), ansible-core's."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        from .collection import version_report  # noqa: PLC0415 - reads Ansible's config

        print(f"isession {__version__}\n{version_report()}")
        parser.exit(EXIT_OK)


def _epilog() -> str:
    codes = "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES)
    return (f"exit codes:\n{codes}\n\nDefaults for start come from the config file (`isession config` shows it).\n"
            "Shell completion: eval \"$(register-python-argcomplete isession)\"")


class _NotBuilt:
    """Stands in for the parser of a command that was not asked for (see :func:`build_parser`)."""

    def add_argument(self, *_args: Any, **_kwargs: Any) -> _NotBuilt:
        return self  # the caller may set ``.completer`` on it


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a command of :data:`HANDLERS`), the top level and that command's parser
    alone: each subparser costs a millisecond to build, and twenty cancels at once pay it on the sessions' cores."""
    parser = argparse.ArgumentParser(prog="isession", description="Interactive sessions on HPC resources.",
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=VersionAction,
                        help="show isession's version, the hpc.interactive collection it uses, and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON document")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, inventory: bool = False) -> Any:
        if only is not None and name != only:
            return _NotBuilt()
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if inventory:
            p.add_argument("-i", "--inventory", help="Ansible inventory of the resources (default "
                           "$ISESSION_INVENTORY, the config file's inventory, then ~/.config/isession/inventory.yml)"
                           ).completer = completion.files
        return p

    p = add("start", "start a session and print its URL", inventory=True)
    p.add_argument("service", help="service to start (see `isession describe SERVICE`)").completer = completion.services
    p.add_argument("-r", "--resource", help="inventory host of the cluster's controller (default: the config file's)"
                   ).completer = completion.resources
    p.add_argument("-t", "--target", choices=TARGETS, default=None,
                   help="where the server runs (default: the config file's, else workspace)")
    p.add_argument("-e", "--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a role input (repeatable; JSON for lists); over the config file's and --inputs'"
                   ).completer = completion.inputs
    p.add_argument("--inputs", metavar="FILE", help="YAML file of role inputs (-e wins)").completer = completion.files
    p.add_argument("--id", help="session id (default: <service>-<UTC time>-<random>)")
    p.add_argument("--wait", action="store_true",
                   help="stay attached until the session ends, then exit 0 (Cancelled, Completed) or 1 (Failed); "
                        "Ctrl-C cancels the session and exits 130 (SIGTERM: 143), a second Ctrl-C does not stop "
                        "that cancel")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print one line per finished task (also when the output is not a terminal)")
    p.epilog = ("With $ISESSION_STANDBY=SECONDS, each start leaves the next start's play already started and waiting "
                "for up to SECONDS (about 0.5 s sooner at its first task); a start with another service, inventory, "
                "collection or environment runs its own play.")

    p = add("status", "status of a session (default: the newest)")
    p.add_argument("id", nargs="?").completer = completion.sessions
    p = add("list", "all sessions")
    p.add_argument("--live", action="store_true", help="only sessions that have not ended")
    p = add("logs", "job output, server, tunnel and runner logs of a session", inventory=True)
    p.add_argument("id").completer = completion.sessions
    p.add_argument("-n", "--lines", type=int, default=50, help="last N lines of each file (0: all)")
    p = add("cancel", "cancel a session (also a start still in progress)", inventory=True)
    p.add_argument("id").completer = completion.sessions
    p = add("describe", "the inputs of a service")
    p.add_argument("service").completer = completion.services
    p = add("watch", "run the watcher (one per user)", inventory=True)
    p.add_argument("--daemon", action="store_true", help="detach; do nothing if a watcher already runs")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--idle-exit", type=float, default=900.0,
                   help="exit after this many seconds without a live session (0: never)")
    p = add("doctor", "check that sessions can start", inventory=True)
    p.add_argument("-r", "--resource", help="check only this resource").completer = completion.resources
    p.add_argument("-s", "--service", help="also check this service's binaries where its sessions would run"
                   ).completer = completion.services
    p.add_argument("-t", "--target", choices=TARGETS,
                   help="with --service: only this target (default: the workspace, and the controller and a "
                   "compute node of each resource checked)")
    p.add_argument("-e", "--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="with --service: a role input as for start (e.g. jupyterlab_executable=PATH, "
                   "session_partition=P); repeatable")
    p = add("config", "show the config file and the settings a start would use")
    p.add_argument("-s", "--service", help="the settings and inputs a start of this service would use"
                   ).completer = completion.services
    add("collection", "show which hpc.interactive collection isession uses, and every copy found")
    if only in (None, "_standby"):  # a start's standby (isession.standby), started by `start`: not in the help
        sub.add_parser("_standby", parents=[common]).add_argument("directory")
    if only in (None, "gateway"):
        from .gateway import add_parser as add_gateway_parser  # noqa: PLC0415 - argparse only; aiohttp when it runs

        add_gateway_parser(sub)
    return parser


def command_asked(argv: Sequence[str], env: Mapping[str, str]) -> Optional[str]:
    """The command ``argv`` names first, when that is all the parser needs to know (:func:`build_parser`'s ``only``);
    None for anything else: no command, an option first (``--version``, ``-h``), or shell completion, which offers
    every command."""
    if "_ARGCOMPLETE" in env or not argv or argv[0] not in HANDLERS:
        return None
    return argv[0]


def _err(msg: str) -> None:
    print(f"isession: {msg}", file=sys.stderr)


def handler(command: str) -> Callable[[argparse.Namespace], int]:
    module, func = HANDLERS[command].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), func)


def _light_copy(args: argparse.Namespace) -> Any:
    """For ``cancel``, the copy of the collection the session's start ran, when it can be used without Ansible's
    configuration (:func:`isession.collection.recorded_copy`); None for every other command and every other case."""
    if args.command != "cancel":
        return None
    from . import config  # noqa: PLC0415
    from .collection import recorded_copy  # noqa: PLC0415

    # not config.check_session_id: it imports the collection's vocabulary, which must come through the finder
    # installed next; the command checks the id itself
    if not args.id or "/" in args.id or args.id.startswith("."):
        return None
    return recorded_copy(config.cli_record(config.session_root() / args.id))


def _fast_cancel(args: argparse.Namespace) -> Optional[bool]:
    """``isession cancel ID``: the tombstone set and the watcher woken (``watchfiles.request_fast_cancel``) before the
    command's own imports. In twenty cancels at once, each command's start-up shares the cores with the others, and
    the watcher can only begin once the tombstones are there. None when not done here (no such session, a malformed
    id): the command checks and reports it."""
    from . import config  # noqa: PLC0415
    from .watchfiles import request_fast_cancel  # noqa: PLC0415 - after activate: it imports the collection's _state

    root = config.session_root()
    try:
        config.existing_session_dir(root, args.id)
    except UsageError:
        return None
    return request_fast_cancel(root, args.id)


def main(argv: Optional[List[str]] = None) -> int:
    # SIGPIPE stays ignored (Python's default): with its default action, a write to a connection's ssh that has just
    # died (the watcher sending its payload to an unreachable controller) would kill the process instead of raising
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=command_asked(argv, os.environ))
    completion.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command not in HANDLERS:
        parser.print_help()
        return EXIT_USAGE
    from .collection import activate  # noqa: PLC0415 - reads Ansible's config, only when a command runs

    try:
        try:
            light = _light_copy(args)
            activate(light, plugins=args.command not in NO_PLUGINS_NEEDED)
        except LookupError as exc:  # the collection is missing
            if args.command not in NO_COLLECTION_NEEDED:
                _err(str(exc))
                return EXIT_NO_COLLECTION
        else:
            if args.command == "cancel":
                args.woke = _fast_cancel(args)
        return handler(args.command)(args)
    except BrokenPipeError:
        # `isession list | head`: the reader left; end quietly like other Unix tools (128 + SIGPIPE)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
