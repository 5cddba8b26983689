"""``isession gateway``: the sessions in a browser (see docs/design/gateway.md)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Tuple

from .. import config

DEFAULT_LISTEN = "127.0.0.1:8181"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gateway", help="serve the sessions to a browser: pages, login, proxy (aiohttp)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"address and port to serve on (default {DEFAULT_LISTEN}; [::1]:PORT for IPv6)")
    p.add_argument("-i", "--inventory", help="Ansible inventory of the resources (as for start)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="single-user login secret, a 0600 file (default ~/.config/isession/gateway.secret, "
                        "made when missing)")
    p.add_argument("--users", metavar="FILE",
                   help="multi-user mode: YAML mapping each login name to its session root and secret file")
    p.add_argument("--trusted-header", metavar="NAME",
                   help="multi-user mode: take the user name from this header of the front proxy (no login form)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDR",
                   help="address of the front proxy allowed to send --trusted-header (repeatable; required with it)")
    p.add_argument("--public-origin", metavar="URL",
                   help="scheme://host[:port] browsers use to reach the gateway (default: from each request)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="the gateway's own files: logins, activity (default: <session root>/.gateway; "
                        "required with --users)")
    p.add_argument("--idle-timeout", type=float, default=0.0, metavar="MINUTES",
                   help="cancel a session after this long without traffic through the gateway (0: never; "
                        "the start form can set its own)")
    p.add_argument("--login-ttl", type=float, default=12 * 60.0, metavar="MINUTES",
                   help="how long a login lasts (default 720)")
    p.add_argument("--cookie-secure", choices=("auto", "yes", "no"), default="auto",
                   help="mark the login cookie Secure (auto: when the request came over https)")
    p.add_argument("--json", action="store_true",
                   help="say where it serves as one JSON line ({\"url\", \"users\", \"workers\"}) instead of text")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="serve from N processes sharing the port (SO_REUSEPORT; default 1). All state is in files, "
                        "so any worker serves any request; the first also runs idle auto-cancel")
    return p


def parse_listen(value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise config.UsageError(f"--listen: {value!r} is not ADDR:PORT")
    return host, int(port)


def settings_from_args(args: argparse.Namespace):
    from . import auth  # noqa: PLC0415
    from .server import Settings  # noqa: PLC0415

    host, port = parse_listen(args.listen)
    if not 1 <= args.workers <= 64:
        raise config.UsageError("--workers: between 1 and 64")
    inventory = config.find_inventory(args.inventory)
    if args.trusted_header and not args.users:
        raise config.UsageError("--trusted-header needs --users (it is multi-user mode)")
    if args.trusted_header and not args.trusted_proxy:
        raise config.UsageError("--trusted-header needs --trusted-proxy ADDR: a header from anyone else is refused")
    try:
        if args.users:
            if not args.state_dir:
                raise config.UsageError("--users needs --state-dir (the gateway's own files)")
            state = Path(args.state_dir).expanduser().resolve()
            users = auth.load_users_file(Path(args.users), state)
            multi = True
        else:
            root = config.session_root()
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            secret = Path(args.secret_file).expanduser() if args.secret_file else \
                Path.home() / ".config" / "isession" / "gateway.secret"
            if not args.secret_file and auth.ensure_secret(secret):
                print(f"isession gateway: made the login secret {secret} (0600); log in with its content",
                      file=sys.stderr)
            auth.read_secret(secret)
            state = Path(args.state_dir).expanduser().resolve() if args.state_dir else root / ".gateway"
            user = auth.single_user(root, secret, state)
            users, multi = {user.name: user}, False
    except auth.AuthError as exc:
        raise config.UsageError(str(exc)) from None
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Settings(host=host, port=port, users=users, multi=multi, state_dir=state,
                    trusted_header=args.trusted_header, trusted_proxies=tuple(args.trusted_proxy),
                    public_origin=args.public_origin, login_ttl=args.login_ttl * 60,
                    idle_timeout=max(0.0, args.idle_timeout) * 60, inventory=inventory,
                    cookie_secure={"auto": None, "yes": True, "no": False}[args.cookie_secure],
                    workers=args.workers)


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging  # noqa: PLC0415 - only the gateway logs this way; every other command parses its options too

    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    os.umask(0o077)
    who = "users: " + ", ".join(settings.users) if settings.multi else "user " + next(iter(settings.users))
    url = f"http://{settings.host}:{settings.port}/"
    if getattr(args, "json", False):
        print(json.dumps({"url": url, "users": sorted(settings.users), "workers": settings.workers}), flush=True)
    if settings.workers == 1:
        if not getattr(args, "json", False):
            print(f"isession gateway on {url} ({who})", flush=True)
        return serve(settings)
    children = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a worker process
            settings.primary = index == 0
            code = 1
            try:
                code = serve(settings, reuse_port=True)
            finally:
                os._exit(code)
        children.append(pid)
    if not getattr(args, "json", False):
        print(f"isession gateway on {url} ({who}; {settings.workers} workers)", flush=True)

    def stop(signum: int, _frame) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    for pid in children:  # one worker's end ends the gateway: the others are told to stop too
        _pid, status = os.waitpid(pid, 0)
        code = code or os.waitstatus_to_exitcode(status)
        stop(signal.SIGTERM, None)
    return 0 if code in (0, -signal.SIGTERM) else 1


def serve(settings, *, reuse_port: bool = False) -> int:
    from aiohttp import web  # noqa: PLC0415

    from .server import Gateway  # noqa: PLC0415

    gw = Gateway(settings)
    loop = None
    try:  # uvloop (libuv, as node uses) when installed: ~1.5x the requests per second of asyncio's own loop
        import uvloop  # noqa: PLC0415

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(gw.app(), host=settings.host, port=settings.port, print=None, access_log=None,
                handle_signals=True, shutdown_timeout=5, loop=loop, reuse_port=reuse_port or None)
    return 0


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - `python -m isession gateway` is the entry point
    from ..cli import main as cli_main  # noqa: PLC0415

    return cli_main(["gateway", *(argv or [])])
