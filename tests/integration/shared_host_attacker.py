"""The other user of the shared-host tests (test_shared_host_attacks.py); not a test. Standard library only.

Run as a plain script by wsuser2 on the workspace or cluser2 on a cluster host, it does what issue 9's attacker did:

    grab --dir D --uid U --log L     as soon as a port claim of uid U appears in D, bind 127.0.0.1 on its port, then
                                     answer every HTTP request 200 and log it
    bind --port P --log L            bind 127.0.0.1:P as soon as it is free (tried every 2 ms), then the same
    junk --dir D --first A --last B  an empty port-N file for every N in A..B; --live K: also K claims that look
                                     alive (a lease end a day away), more than one user may hold; prints how
                                     many files it made (existing names, other users' claims, are skipped)
    hold-lock --file F --log L       create F and hold an exclusive flock on it until killed

The log's first line is ``BOUND <port> <epoch>`` once a port is held (``LOCKED`` for hold-lock); then one line per
request: the request line and every header, so that a test sees whether anything (a secret) ever reached it.
"""
from __future__ import annotations

import argparse
import fcntl
import http.server
import os
import re
import socket
import sys
import time

CLAIM = re.compile(r"port-([0-9]{1,5})(?:\.[0-9]{1,3})?\Z")


class Logger:
    def __init__(self, path: str) -> None:
        self.fh = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def say(self, text: str) -> None:
        self.fh.write(text + "\n")


def serve(sock: socket.socket, log: Logger) -> None:
    """Answer every request on the already listening ``sock`` with 200, logging what came in."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            headers = " | ".join(f"{k}: {v}" for k, v in self.headers.items())
            log.say(f"REQUEST {self.requestline} | {headers}")
            body = b"the other user's page\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.serve_forever()


def try_bind(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
    except OSError:
        sock.close()
        return None
    return sock


def grab(directory: str, uid: int, log: Logger) -> None:
    seen = set(os.listdir(directory))
    while True:
        names = os.listdir(directory)
        for name in names:
            match = CLAIM.match(name)
            if name in seen or not match:
                continue
            seen.add(name)
            try:
                if os.lstat(os.path.join(directory, name)).st_uid != uid:
                    continue
            except FileNotFoundError:
                continue
            sock = try_bind(int(match.group(1)))
            if sock is not None:
                log.say(f"BOUND {match.group(1)} {time.time():.3f}")
                serve(sock, log)
        time.sleep(0.0005)


def bind(port: int, log: Logger) -> None:
    while True:
        sock = try_bind(port)
        if sock is not None:
            log.say(f"BOUND {port} {time.time():.3f}")
            serve(sock, log)
        time.sleep(0.002)


def junk(directory: str, first: int, last: int, live: int) -> None:
    """Prints how many files it made (names that already exist - other users' claims - are skipped)."""
    made = 0
    for port in range(first, last + 1):
        try:
            os.close(os.open(os.path.join(directory, f"port-{port}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            made += 1
        except FileExistsError:
            continue
    later = time.time() + 86400
    for port in range(first, first + live):
        path = os.path.join(directory, f"port-{port}.1")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        os.utime(path, (later, later))
        made += 1
    print(made)


def hold_lock(path: str, log: Logger) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    log.say(f"LOCKED {time.time():.3f}")
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shared_host_attacker.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("grab")
    p.add_argument("--dir", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--log", required=True)
    p = sub.add_parser("bind")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p = sub.add_parser("junk")
    p.add_argument("--dir", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--live", type=int, default=0)
    p = sub.add_parser("hold-lock")
    p.add_argument("--file", required=True)
    p.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "grab":
        grab(args.dir, args.uid, Logger(args.log))
    elif args.cmd == "bind":
        bind(args.port, Logger(args.log))
    elif args.cmd == "junk":
        junk(args.dir, args.first, args.last, args.live)
    else:
        hold_lock(args.file, Logger(args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
