"""The ``many`` part of the benchmark: N nginx sessions started concurrently with ``isession start`` (at most
``parallel`` at once), then, while they idle: port collisions, and the memory each session costs besides the
app itself, as Pss from /proc/PID/smaps_rollup; then all cancelled (also ``parallel`` at once).

Which processes are a session's: every process in a process group of a process whose command line or working
directory names the session id (the local job's wrapper and agent shell, the tunnel supervisor and its ssh),
minus the app's own process group (``pids.server`` in agent.json) and the agent's transient ``sleep``; on the
controller target also the workspace sshd processes holding the tunnel's listening end. The per-user watcher
is counted as its share (its process tree's Pss / N).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import benchlib as bl


def ns_inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def host_of(pid: int, inodes: Dict[int, str]) -> str:
    return inodes.get(ns_inode(f"/proc/{pid}/ns/net") or -1, "other")


def agent_json(cli: bl.Cli, sid: str, state: Dict[str, Any]) -> Dict[str, Any]:
    for d in (Path(state["remote_dir"]) if state.get("remote_dir") else None, cli.root / sid):
        if d is not None:
            try:
                return json.loads((d / "agent.json").read_text())
            except (OSError, ValueError):
                continue
    return {}


def session_processes(table: Dict[int, Dict[str, Any]], sid: str, server_pg: Optional[int]) -> List[int]:
    marked = bl.session_pids(table, sid)
    groups = {table[p]["pgid"] for p in marked}
    return sorted(p for p, info in table.items()
                  if info["pgid"] in groups and info["pgid"] != server_pg and info["comm"] != "sleep")


def http_check(bed: bl.Bed, tmp: Path, cli: bl.Cli, sid: str, port: int) -> Dict[str, Any]:
    """The session's URL answers 200 with its own page given its secret, and refuses without it."""
    url = f"http://127.0.0.1:{port}/me/{port}/"
    secret = (cli.root / sid / "secret").read_text().strip()
    hfile = bed.write_user_file(None, tmp / f"h-{sid}", f"Authorization: Bearer {secret}\n")
    base = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"]
    with_secret = bed.run("workspace", [*base, "-H", f"@{hfile}", url]).stdout
    hfile.unlink()
    without = bed.run("workspace", [*base, url]).stdout
    body, _ignored, code = with_secret.rpartition("\n")
    return {"code": int(code or 0), "own_page": sid in body,
            "code_without_secret": int(without.rpartition("\n")[2] or 0)}


def run(bed: bl.Bed, tmp: Path, inventory: Path, *, n: int, parallel: int, target: str, idle: float,
        tag: str) -> Dict[str, Any]:
    cli = bl.Cli(bed, tmp, f"sessions-many-{target}", inventory)
    sids = [f"bench-ng-{tag}-{i:02d}" for i in range(n)]
    extra = [] if target == "workspace" else ["--target", target, "--resource", "controller"]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        starts = list(pool.map(lambda s: cli.timed("start", "nginx", "--id", s, "--json", *extra, timeout=900), sids))
    start_wall = time.time() - t0
    out: Dict[str, Any] = {"target": target, "sessions": n, "parallel": parallel,
                           "start_wall_s": round(start_wall, 2),
                           "start_s": bl.stats(s["seconds"] for s in starts)}
    try:
        out.update(measure(bed, tmp, cli, sids, starts, idle=idle))
    finally:
        t1 = time.time()
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            cancels = list(pool.map(lambda s: cli.timed("cancel", s, timeout=600), sids))
        out["cancel_wall_s"] = round(time.time() - t1, 2)
        out["cancel_s"] = bl.stats(c["seconds"] for c in cancels)
        out["cancel_failed"] = [s for s, c in zip(sids, cancels, strict=True) if c["rc"] != 0]
        time.sleep(1)
        table = bl.proc_table()
        out["left_after_cancel"] = {s: bl.session_pids(table, s) for s in sids if bl.session_pids(table, s)}
        cli.stop_watcher()
    out["summary"] = {k: v for k, v in out.items() if k not in ("per_session",)}
    return out


def measure(bed: bl.Bed, tmp: Path, cli: bl.Cli, sids: List[str], starts: List[Dict[str, Any]], *,
            idle: float) -> Dict[str, Any]:
    time.sleep(idle)
    inodes = {ns_inode(str(bed.netns_path(h))): h for h in bed.hosts}
    table = bl.proc_table()
    ws_listeners = bl.listeners(bed, "workspace")
    per: List[Dict[str, Any]] = []
    for sid, start in zip(sids, starts, strict=True):
        state, service = cli.read(sid, "state.json"), cli.read(sid, "service.json")
        row: Dict[str, Any] = {"id": sid, "rc": start["rc"], "status": service.get("JOB_STATUS"),
                               "port": int(service.get("PORT") or 0), "start_s": start["seconds"]}
        if row["status"] != "Running":
            row["error"] = (start["stdout"] + start["stderr"])[-1500:]
            per.append(row)
            continue
        agent = agent_json(cli, sid, state)
        server_pg = (agent.get("pids") or {}).get("server")
        pids = session_processes(table, sid, server_pg)
        listen = ws_listeners.get(row["port"], [])
        if state.get("target") != "workspace":  # the tunnel's listening end on the workspace: sshd for the user
            for pid in listen:
                pids.append(pid)
                parent = table.get(pid, {}).get("ppid")
                if parent and table.get(parent, {}).get("cmd", "").startswith("sshd:"):
                    pids.append(parent)
        pids = sorted(set(pids))
        app = [p for p, info in table.items() if server_pg and info["pgid"] == server_pg]
        by_host: Dict[str, List[int]] = {}
        for pid in pids:
            by_host.setdefault(host_of(pid, inodes), []).append(pid)
        row.update(
            processes={str(p): table[p]["cmd"][:80] for p in pids if p in table},
            mem_by_host={h: bl.memory_kb(ps) for h, ps in by_host.items()},
            app_mem=bl.memory_kb(app),
            listener_in_app=bool(listen) and all(p in app for p in listen) if state.get("target") == "workspace"
            else None,
        )
        row.update(http_check(bed, tmp, cli, sid, row["port"]))
        per.append(row)
    running = [r for r in per if r["status"] == "Running"]
    ports = [r["port"] for r in running]
    watcher = cli.watcher_pid()
    wpids = bl.descendants(table, watcher) if watcher else []
    wmem = bl.memory_kb(wpids)
    share = wmem["pss_kb"] / max(1, len(running))
    ws_kb = [r["mem_by_host"].get("workspace", {}).get("pss_kb", 0) + share for r in running]
    cluster_kb = [sum(m["pss_kb"] for h, m in r["mem_by_host"].items() if h != "workspace") for r in running]
    return {
        "per_session": per,
        "running": len(running),
        "unique_ports": len(set(ports)),
        "port_collisions": len(ports) - len(set(ports)) + sum(1 for r in running if r.get("listener_in_app") is False)
        + sum(1 for r in running if not r.get("own_page")),
        "http_ok": sum(1 for r in running if r.get("code") == 200 and r.get("own_page")),
        "refused_without_secret": sum(1 for r in running if r.get("code_without_secret") in (401, 403)),
        "watcher": {"pids": wpids, **wmem, "share_kb": round(share, 1)},
        "workspace_pss_mib_per_session": bl.stats(kb / 1024 for kb in ws_kb),
        "cluster_pss_mib_per_session": bl.stats(kb / 1024 for kb in cluster_kb) if any(cluster_kb) else {"n": 0},
        "app_pss_mib_per_session": bl.stats(r["app_mem"]["pss_kb"] / 1024 for r in running),
        "example_processes": running[0]["processes"] if running else {},
    }


def table(s: Dict[str, Any], targets: Dict[str, Any]) -> str:
    lines = [f"{s['sessions']} nginx sessions on the {s['target']} target, {s['parallel']} starts at once:",
             f"  running {s.get('running')}/{s['sessions']}, unique ports {s.get('unique_ports')}, "
             f"port collisions {s.get('port_collisions')} (target {targets['port_collisions']}), "
             f"own page with secret {s.get('http_ok')}, refused without {s.get('refused_without_secret')}",
             f"  start: wall {s['start_wall_s']}s, per start {bl.fmt_stats(s['start_s'])}",
             f"  Pss per idle session on the workspace, app excluded, watcher share included: "
             f"{bl.fmt_stats(s.get('workspace_pss_mib_per_session', {}), ' MiB')} "
             f"(target <= {targets['idle_mib_per_session']} MB)",
             f"  watcher: {s.get('watcher', {}).get('pss_kb', 0) / 1024:.1f} MiB Pss in all, "
             f"{s.get('watcher', {}).get('share_kb', 0) / 1024:.2f} MiB per session"]
    if s.get("cluster_pss_mib_per_session", {}).get("n"):
        lines.append(f"  Pss per session on the cluster side (agent, tunnel supervisor, ssh): "
                     f"{bl.fmt_stats(s['cluster_pss_mib_per_session'], ' MiB')}")
    app = bl.fmt_stats(s.get("app_pss_mib_per_session", {}), " MiB")
    lines += [f"  app (nginx) Pss per session, not counted: {app}",
              f"  cancel all: wall {s.get('cancel_wall_s')}s, per cancel {bl.fmt_stats(s.get('cancel_s', {}))}, "
              f"failed {len(s.get('cancel_failed', []))}, "
              f"sessions with processes left {len(s.get('left_after_cancel', {}))}"]
    return "\n".join(lines)
