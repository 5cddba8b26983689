#!/usr/bin/env python3
"""Benchmark (not a test): ``isession gateway`` against direct and against configurable-http-proxy 5.3.0.

    flock /run/hpci-bed.lock /opt/hpc-interactive/venv/bin/python bench/gateway_proxy.py [--duration 10]

On loopback in the root namespace, as root: 50 sessions (records written through the collection's ``_state`` and
``_service_file``, like a start writes them) whose ports are served by one nginx (``return 200``; one listener per
port); the gateway logged in with its cookie; CHP (npm, installed once into ``--chp-dir``, never into the repo)
with one route per session. Measured in the same run, interleaved, ``--rounds`` times:

* HTTP: ``wrk`` with 50 connections, every request to a random one of the 50 sessions' paths (direct: one port,
  as a proxy-less client would): requests/s and p50/p99 latency, and for CHP and the gateways their own CPU time
  (user + system, workers included) per request served - the figure other load on the machine moves least;
* WebSocket echo round-trip: one connection, ``--ws-messages`` sequential 64-byte messages to an aiohttp echo
  backend (median and p99);
* the gateway's memory (RSS and PSS from ``/proc/PID/smaps_rollup``, workers included) after the load.

The gateway is measured with 1 worker process (the default) and with ``--workers 2`` (``--gateway-workers``),
once it has run its start-up plays (one per service, to read each app's auth entry): those would compete with the
measurement. The load average before and after goes into the results. To measure another version of the gateway
with the same script, put its ``src`` first: ``PYTHONPATH=/path/to/other/src python bench/gateway_proxy.py``.

Results: ``bench/results/gateway-<UTC>.json`` and ``.txt``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHP_VERSION = "5.3.0"
BASE_PORT = 9701
WS_PORT = 9760
GW_PORT, CHP_PORT, CHP_API = 9790, 9791, 9792
SECRET = "bench-login-secret-0123456789"  # noqa: S105 - a throwaway login for a loopback benchmark


def sh(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def wait_port(port: int, timeout: float = 30) -> None:
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def ensure_chp(directory: Path) -> Path:
    exe = directory / "node_modules" / ".bin" / "configurable-http-proxy"
    if not exe.exists():
        directory.mkdir(parents=True, exist_ok=True)
        sh(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(directory),
            f"configurable-http-proxy@{CHP_VERSION}"], timeout=600)
    return exe


def ensure_wrk() -> None:
    """wrk, the load generator: Debian's package, installed here when missing (it is a benchmark's tool, not a
    test's, so the test bed does not carry it)."""
    if shutil.which("wrk") is None:
        sh(["apt-get", "install", "-y", "--no-install-recommends", "wrk"], timeout=600)


def nginx_conf(work: Path, ports) -> Path:
    servers = "".join(f"  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"ok {p}\\n\"; }} }}\n"
                      for p in ports)
    conf = work / "nginx.conf"
    conf.write_text(f"worker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/nginx.err;\n"
                    f"events {{ worker_connections 4096; }}\nhttp {{ access_log off;\n"
                    f"  client_body_temp_path {work}/t1; proxy_temp_path {work}/t2; fastcgi_temp_path {work}/t3;\n"
                    f"  uwsgi_temp_path {work}/t4; scgi_temp_path {work}/t5;\n{servers}}}\n")
    return conf


WS_BACKEND = """
import sys
from aiohttp import web
async def ws(request):
    s = web.WebSocketResponse(); await s.prepare(request)
    async for m in s:
        await s.send_str(m.data)
    return s
app = web.Application(); app.router.add_get('/me/%d/ws', ws)
web.run_app(app, host='127.0.0.1', port=%d, print=None)
""" % (WS_PORT, WS_PORT)

WRK_LUA = """
math.randomseed(%d)
request = function()
  local port = %d + math.random(0, %d)
  return wrk.format("GET", "/me/" .. port .. "/")
end
"""


def make_sessions(root: Path, ports, collections: Path) -> None:
    code = ("import sys\nsys.path.insert(0, %r)\n"
            "from ansible_collections.hpc.interactive.plugins.module_utils import _state, _service_file\n"
            "root = %r\nfor port in %r:\n"
            "    sid = 'bench-%%d' %% port\n"
            "    _state.run_op('create', root, sid, {'service': 'nginx', 'target': 'workspace', 'url': '/me',"
            " 'ports': {'workspace': port}})\n"
            "    _state.run_op('update', root, sid, {'step': 'running'})\n"
            "    _service_file.update_service_file(root + '/' + sid + '/service.json', url='/me', port=str(port),"
            " slug='', job_status='Running')\n") % (str(collections), str(root), list(ports))
    sh([sys.executable, "-c", code])


def login(port: int) -> str:
    data = urllib.parse.urlencode({"secret": SECRET, "next": "/"}).encode()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"http://127.0.0.1:{port}/login", data=data, timeout=10)
    except urllib.error.HTTPError as exc:
        cookie = exc.headers.get("Set-Cookie", "")
        m = re.search(r"isession_gateway=([A-Za-z0-9_-]+)", cookie)
        if m:
            return m.group(1)
    raise SystemExit("gateway login failed")


def wrk(port: int, script: Path, duration: float, connections: int, cookie: str = "", *, pids=()) -> dict:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{int(duration)}s", "--latency", "-s", str(script)]
    if cookie:
        argv += ["-H", f"Cookie: isession_gateway={cookie}"]
    cpu = cpu_seconds(pids)
    out = sh(argv + [f"http://127.0.0.1:{port}/"], timeout=duration + 60).stdout
    cpu = cpu_seconds(pids) - cpu
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))

    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": ms("50"), "p99_ms": ms("99"), "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock.group(1) if sock else "",
            "cpu_us_per_request": round(1e6 * cpu / done, 1) if pids and done else None}


async def ws_rtt(url: str, n: int, cookie: str = "", origin: str = "http://127.0.0.1") -> dict:
    import aiohttp  # noqa: PLC0415

    headers = {"Origin": origin}
    if cookie:
        headers["Cookie"] = f"isession_gateway={cookie}"
    times = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url, headers=headers) as ws:
        payload = "x" * 64
        for _i in range(50):
            await ws.send_str(payload)
            await ws.receive()
        for _i in range(n):
            t = time.perf_counter()
            await ws.send_str(payload)
            await ws.receive()
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p99_ms": times[int(len(times) * 0.99) - 1]}


def tree_pids(pid: int) -> list:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pids) -> float:
    """User + system CPU time of ``pids`` (those still running)."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def settle(pids, timeout: float = 300) -> float:
    """Wait until no ``ansible-playbook`` has run under ``pids`` for 5 s: a fresh gateway reads each service's auth
    entry by running the service role once, one service per idle round (2 s), and those plays would compete with
    the measurement. Returns the seconds waited."""
    start = quiet_since = time.monotonic()
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        if any(b"ansible-playbook" in _cmdline(p) for pid in pids for p in tree_pids(pid)):
            quiet_since = now
        elif now - quiet_since >= 5:
            break
        time.sleep(0.5)
    return round(time.monotonic() - start, 1)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def proxy_pids(pid: int) -> list:
    """A proxy's own processes: ``pid`` and its worker children (not the plays or watchers it starts)."""
    with contextlib.suppress(OSError):
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [pid] + [k for k in kids if _cmdline(k) == _cmdline(pid)]  # forked workers keep the command line
    return [pid]


def tree_memory(pid: int) -> dict:
    """RSS and PSS of ``pid`` and its worker children (PSS counts pages shared after fork once)."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    rss = pss = 0.0
    for p in pids:
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        rss += int(re.search(r"^Rss:\s+(\d+) kB", text, re.M).group(1)) / 1024
        pss += int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) / 1024
    return {"processes": len(pids), "rss_mib": round(rss, 1), "pss_mib": round(pss, 1)}


def main() -> int:  # noqa: PLR0915
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ws-messages", type=int, default=2000)
    ap.add_argument("--gateway-workers", default="1,2",
                    help="gateway configurations to measure, as worker counts (default 1,2)")
    ap.add_argument("--chp-dir", default="/var/tmp/isession-bench/chp")  # noqa: S108 - root's bench-only cache
    ap.add_argument("--out", help="results file stem (default bench/results/gateway-<UTC>)")
    args = ap.parse_args()
    venv = Path(sys.executable).parent
    load_before = os.getloadavg()
    collections = venv.parent / "collections"
    chp = ensure_chp(Path(args.chp_dir))
    ensure_wrk()
    ports = list(range(BASE_PORT, BASE_PORT + args.sessions))
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = []
    try:
        root = work / "sessions"
        root.mkdir(mode=0o700)
        make_sessions(root, ports + [WS_PORT], collections)
        secret = work / "login.secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_conf(work, ports)), "-p", str(work), "-e",
                                       str(work / "nginx.err"), "-g", "daemon off;"], start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, "-c", WS_BACKEND], start_new_session=True))
        env = dict(os.environ, ISESSION_ROOT=str(root))  # the collection pip installed with isession
        gateways = {}  # name -> (port, process)
        for i, workers in enumerate(int(w) for w in args.gateway_workers.split(",")):
            name = "gateway" if workers == 1 else f"gateway-{workers}w"
            port = GW_PORT + 10 * i
            gw = subprocess.Popen([str(venv / "isession"), "gateway", "--listen", f"127.0.0.1:{port}", "--workers",
                                   str(workers), "--secret-file", str(secret)], env=env, start_new_session=True,
                                  stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
            procs.append(gw)
            gateways[name] = (port, gw)
        token = "bench-chp-api-token"  # noqa: S105
        chp_proc = subprocess.Popen([str(chp), "--ip", "127.0.0.1", "--port", str(CHP_PORT), "--api-ip",
                                     "127.0.0.1", "--api-port", str(CHP_API), "--log-level", "error"],
                                    env=dict(os.environ, CONFIGPROXY_AUTH_TOKEN=token), start_new_session=True)
        procs.append(chp_proc)
        for port in (ports[0], WS_PORT, CHP_PORT, CHP_API):
            wait_port(port)
        for name, (port, _proc) in gateways.items():
            try:
                wait_port(port, timeout=90)  # its start-up imports Ansible: slow on a loaded machine
            except SystemExit:
                raise SystemExit(f"{name} did not start:\n{(work / f'{name}.log').read_text()}") from None
        for port in ports + [WS_PORT]:
            req = urllib.request.Request(f"http://127.0.0.1:{CHP_API}/api/routes/me/{port}", method="POST",
                                         data=json.dumps({"target": f"http://127.0.0.1:{port}"}).encode(),
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).close()  # noqa: S310 - loopback
        cookies = {name: login(port) for name, (port, _proc) in gateways.items()}
        settled = settle([proc.pid for _port, proc in gateways.values()])
        script = work / "random.lua"
        script.write_text(WRK_LUA % (42, BASE_PORT, args.sessions - 1))
        one = work / "one.lua"
        one.write_text(WRK_LUA % (42, BASE_PORT, 0))
        targets = {"direct": (ports[0], one, "", ()), "chp": (CHP_PORT, script, "", proxy_pids(chp_proc.pid))}
        targets.update({name: (port, script, cookies[name], proxy_pids(proc.pid))
                        for name, (port, proc) in gateways.items()})
        for port, scr, ck, _extra in targets.values():  # warm-up
            wrk(port, scr, 2, args.sessions, ck)
        http = {name: [] for name in targets}
        for _i in range(args.rounds):
            for name, (port, scr, ck, pids) in targets.items():
                http[name].append(wrk(port, scr, args.duration, args.sessions, ck, pids=pids))
        load_after = os.getloadavg()
        mem = {name: tree_memory(proc.pid) for name, (_port, proc) in gateways.items()}
        ws = {"direct": asyncio.run(ws_rtt(f"ws://127.0.0.1:{WS_PORT}/me/{WS_PORT}/ws", args.ws_messages)),
              "chp": asyncio.run(ws_rtt(f"ws://127.0.0.1:{CHP_PORT}/me/{WS_PORT}/ws", args.ws_messages))}
        for name, (port, _proc) in gateways.items():
            ws[name] = asyncio.run(ws_rtt(f"ws://127.0.0.1:{port}/me/{WS_PORT}/ws", args.ws_messages, cookies[name],
                                          origin=f"http://127.0.0.1:{port}"))
    finally:
        watcher = work / "sessions" / ".watcher.pid"  # the watcher the gateway started for the bench's root
        if watcher.exists() and watcher.read_text().strip().isdigit():
            with contextlib.suppress(OSError):
                os.kill(int(watcher.read_text().strip()), signal.SIGTERM)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    def med(name, key):
        return statistics.median(r[key] for r in http[name])

    gateways_seen = [name for name in http if name.startswith("gateway")]
    summary = {name: {"rps": round(med(name, "rps")), "p50_ms": round(med(name, "p50_ms"), 2),
                      "p99_ms": round(med(name, "p99_ms"), 2),
                      "cpu_us_per_request": med(name, "cpu_us_per_request") if name != "direct" else None}
               for name in http}
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sessions": args.sessions,
              "duration_s": args.duration, "rounds": args.rounds, "connections": args.sessions,
              "nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
              "settle_s": settled, "http_runs": http, "http": summary,
              "ws_echo": ws, "gateway_memory": mem, "chp_version": CHP_VERSION}
    lines = [f"isession gateway benchmark {result['when']} ({args.sessions} sessions, {args.rounds} rounds x "
             f"{args.duration:g} s, wrk -t2 -c{args.sessions}; medians; load average "
             f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} "
             f"after)", "",
             f"{'path':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}{'ws echo med ms':>16}"
             f"{'ws p99 ms':>11}"]
    for name, s in summary.items():
        w = ws[name]
        cpu = "-" if s["cpu_us_per_request"] is None else f"{s['cpu_us_per_request']:.0f}"
        lines.append(f"{name:<14}{s['rps']:>10}{s['p50_ms']:>10}{s['p99_ms']:>10}{cpu:>12}{w['median_ms']:>16.3f}"
                     f"{w['p99_ms']:>11.3f}")
    lines.append("")
    for name in gateways_seen:
        m, s, c = mem[name], summary[name], summary["chp"]
        lines += [f"{name}: memory after the load RSS {m['rss_mib']} MiB, PSS {m['pss_mib']} MiB "
                  f"({m['processes']} processes); target req/s >= chp ({s['rps']} vs {c['rps']}: "
                  f"{'met' if s['rps'] >= c['rps'] else 'NOT met'}), p99 <= chp ({s['p99_ms']} vs {c['p99_ms']}: "
                  f"{'met' if s['p99_ms'] <= c['p99_ms'] else 'NOT met'})"]
    stem = Path(args.out) if args.out else REPO / "bench" / "results" / \
        f"gateway-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
