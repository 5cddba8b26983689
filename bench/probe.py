"""Watch a session's workspace port from inside the workspace and print when it opened and first answered.

Run in the workspace's network namespace (the benchmark starts it with ``Bed.popen``). The port comes from
``--port`` or, for an ``isession`` start, from ``ports.workspace`` in the session's ``state.json`` once the
start has reserved it. Every ``--interval`` seconds it connects to 127.0.0.1:PORT (``tcp_open_at``: first
accepted connection, i.e. the listening end of the tunnel) and sends ``GET <path>`` (``http_ready_at``: first
status 2xx/3xx/401/403, the rule the session role's readiness check uses). Prints one JSON line (epoch
seconds) and exits at the first answer or after ``--timeout``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import time
from typing import Optional


def ready(status: Optional[int]) -> bool:
    return status is not None and (200 <= status < 400 or status in (401, 403))


def workspace_port(state_file: str) -> Optional[int]:
    try:
        with open(state_file, encoding="utf-8") as fh:
            port = (json.load(fh).get("ports") or {}).get("workspace")
    except (OSError, ValueError):
        return None
    return int(port) if port else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int)
    ap.add_argument("--state", help="state.json of an isession session (port read from it)")
    ap.add_argument("--path", default="/me/{port}/api/status", help="request path; {port} is replaced")
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    started = time.time()
    deadline = time.monotonic() + args.timeout
    port = args.port
    out = {"port": port, "started": started, "port_known_at": started if port else None, "tcp_open_at": None,
           "http_ready_at": None, "status": None, "polls": 0}
    while time.monotonic() < deadline:
        if port is None and args.state:
            port = workspace_port(args.state)
            if port:
                out.update(port=port, port_known_at=time.time())
        if port:
            out["polls"] += 1
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                sock = None
            if sock is not None:
                at = time.time()
                if out["tcp_open_at"] is None:
                    out["tcp_open_at"] = at
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.sock = sock
                try:
                    conn.request("GET", args.path.format(port=port))
                    status = conn.getresponse().status
                except (OSError, http.client.HTTPException):
                    status = None
                finally:
                    conn.close()
                if ready(status):
                    out.update(http_ready_at=time.time(), status=status)
                    break
        time.sleep(args.interval)
    print(json.dumps(out), flush=True)
    return 0 if out["http_ready_at"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
