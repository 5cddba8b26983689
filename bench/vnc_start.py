#!/usr/bin/env python3
"""Benchmark (not a test): a VNC desktop (Xvnc + xfce4 + websockify/noVNC) on the bed's Slurm compute nodes.

``--runs`` rounds (after ``--warmup`` unmeasured ones; the order of the two paths alternates per round) of:
  bare      bare_vnc_start.sh + bare_vnc_job.sh as wsuser: one ssh to the controller, sbatch a job that starts Xvnc,
            xfce4, websockify and ``ssh -R`` back; poll noVNC's page (``/me/WSPORT/vnc.html``) every 0.2 s.
  isession  ``isession start vnc --target compute --resource controller`` until it exits with the URL (exit 0 only
            when ``Running``, i.e. noVNC's page answered through the tunnel).
Both are also watched by probe.py from inside the workspace (20 ms polls of the same page): *URL answers* is that
first answer. After the isession start, the session is left idle ``--idle`` s and the memory of its processes on the
node is summed (Pss of every process whose environment names the session: the agent, Xvnc, websockify, the reapers,
the whole desktop, the tunnel). Then both are cancelled. Target: isession / bare <= 1.5x (the issue's).
Writes ``--out`` (JSON) and the table beside it (``.txt``), and prints the table. Run as root: see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from start_to_url import Probe, free_workspace_port, rel  # noqa: E402

HERE = Path(__file__).resolve().parent
PAGE = "/me/{port}/vnc.html"
TARGET_RATIO = 1.5
VNC_INSTALL = """- name: Install the VNC desktop
  hosts: localhost
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - name: Run the install entry point
      ansible.builtin.include_role:
        name: hpc.interactive.vnc
        tasks_from: install
"""


def bare_round(bed: bl.Bed, tag: str) -> Dict[str, Any]:
    wsport = free_workspace_port(bed)
    work = bed.user_tmpdir(bl.WS_USER)
    for name in ("bare_vnc_start.sh", "bare_vnc_job.sh"):
        shutil.copy(HERE / name, work / name)
    bl.chown_tree(work, bl.WS_USER)
    probe = _probe(bed, port=wsport)
    argv = ["bash", str(work / "bare_vnc_start.sh"), tag, str(wsport), str(work),
            f"{bl.CLUSTER_USER}@{bed.ip('controller')}", f"{bl.WS_USER}@{bed.ip('workspace')}",
            str(work / "bare_vnc_job.sh")]
    t0 = time.time()
    try:
        cp = bed.run("workspace", argv, user=bl.WS_USER, timeout=180)
    except subprocess.TimeoutExpired as exc:
        cp = subprocess.CompletedProcess(argv, -9, str(exc.stdout or ""), str(exc.stderr or ""))
    t1 = time.time()
    marks = {line.split()[0]: line.split()[1:] for line in cp.stdout.splitlines() if len(line.split()) >= 2}
    pr = probe.result()
    job = marks.get("submitted", [None, None])[1]
    out: Dict[str, Any] = {"rc": cp.returncode, "seconds": round(t1 - t0, 4), "job_id": job}
    if cp.returncode != 0 or "ready" not in marks:
        out["error"] = (cp.stdout + cp.stderr)[-2000:]
    else:
        out["url_answers_s"] = rel(pr.get("http_ready_at"), t0)
    if job:
        bed.run("controller", ["scancel", job], user=bl.CLUSTER_USER)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bed.slurm(["squeue", "-h", "-j", job], check=False).stdout.strip():
            time.sleep(0.2)
    return out


def _probe(bed: bl.Bed, *, port: int = 0, state: Path = Path()) -> Probe:  # noqa: B008 - a constant
    """probe.py watching noVNC's page (the Probe of start_to_url.py watches JupyterLab's /api/status)."""
    p = Probe.__new__(Probe)
    argv = ["/usr/bin/python3", str(HERE / "probe.py"), "--timeout", "300", "--path", PAGE]
    argv += ["--port", str(port)] if port else ["--state", str(state)]
    p.proc = bed.popen("workspace", argv, stdout=-1, stderr=-1, text=True)
    return p


def session_memory(sid: str) -> Dict[str, Any]:
    """Pss/Rss of every process whose environment names the session (ISESSION_ID=sid)."""
    needle = f"ISESSION_ID={sid}".encode()
    pids: List[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    table = bl.proc_table()
    by_comm: Dict[str, int] = {}
    for pid in pids:
        kb = bl.memory_kb([pid])["pss_kb"]
        comm = table.get(pid, {}).get("comm", "?")
        by_comm[comm] = by_comm.get(comm, 0) + kb
    total = bl.memory_kb(pids)
    top = sorted(by_comm.items(), key=lambda kv: -kv[1])[:8]
    return {"processes": len(pids), **total, "top_pss_kb": top}


def isession_round(bed: bl.Bed, cli: bl.Cli, sid: str, idle: float) -> Dict[str, Any]:
    probe = _probe(bed, state=cli.root / sid / "state.json")
    run = cli.timed("start", "vnc", "--target", "compute", "--resource", "controller", "--id", sid, "--json",
                    timeout=600)
    pr = probe.result()
    service = cli.read(sid, "service.json")
    out: Dict[str, Any] = {"id": sid, "rc": run["rc"], "seconds": run["seconds"], "status": service.get("JOB_STATUS"),
                           "job_id": cli.read(sid, "state.json").get("job_id")}
    if run["rc"] != 0 or service.get("JOB_STATUS") != "Running":
        out["error"] = (run["stdout"] + run["stderr"])[-3000:]
        return out
    out["url_answers_s"] = rel(pr.get("http_ready_at"), run["t0"])
    if idle > 0:
        time.sleep(idle)
        out["memory"] = session_memory(sid)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds idle before measuring memory (default 10)")
    ap.add_argument("--reuse-collection", action="store_true")
    ap.add_argument("--standby", type=float, default=0.0, metavar="SECONDS",
                    help="starts with ISESSION_STANDBY=SECONDS: each takes the play the one before left waiting "
                    "(the first, unmeasured, start leaves the first one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bed = bl.ready_bed(args.reuse_collection)
    if bed is None:
        return 2
    res = bed.playbook_json(VNC_INSTALL, user="root", timeout=1800)
    if res.rc != 0:
        print(f"the vnc install entry point failed:\n{res.stdout[-3000:]}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc)
    tag = stamp.strftime("%H%M%S")
    out_path = args.out or HERE / "results" / f"vnc_start-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    tmp = bed.user_tmpdir(bl.WS_USER)
    cli = bl.Cli(bed, tmp, "vnc-sessions", bl.cluster_inventory(bed, tmp))
    if args.standby:
        cli.use_standby(args.standby)
    rounds = []
    for i in range(args.warmup + args.runs):
        sid = f"bench-vnc-{tag}-{i}"
        order = ("bare", "isession") if i % 2 == 0 else ("isession", "bare")
        rnd: Dict[str, Any] = {"round": i, "warmup": i < args.warmup, "order": order}
        for which in order:
            bl.wait_slurm_idle(bed)  # the last job's node free again: its end is not the next job's wait
            if which == "bare":
                rnd["bare"] = bare_round(bed, f"{tag}-{i}")
            else:
                rnd["isession"] = isession_round(bed, cli, sid, args.idle if i >= args.warmup else 0)
                cli.run("cancel", sid, timeout=300)
        b, s = rnd["bare"], rnd["isession"]
        if "error" not in b and "error" not in s:
            rnd["ratio"] = round(s["seconds"] / b["seconds"], 4)
            rnd["ratio_url"] = round(s["url_answers_s"] / b["url_answers_s"], 4) \
                if s.get("url_answers_s") and b.get("url_answers_s") else None
            bl.add_slurm_waits(bed, rnd)
        rounds.append(rnd)
        print(json.dumps({k: rnd.get(k) for k in ("round", "warmup", "ratio", "ratio_url")}), flush=True)
    if args.standby:
        cli.end_standbys()
    cli.stop_watcher()
    measured = [r for r in rounds if not r["warmup"] and "ratio" in r]
    summary = {
        "bare_s": bl.stats(r["bare"]["seconds"] for r in measured),
        "bare_url_s": bl.stats(r["bare"]["url_answers_s"] for r in measured if r["bare"].get("url_answers_s")),
        "isession_s": bl.stats(r["isession"]["seconds"] for r in measured),
        "isession_url_s": bl.stats(r["isession"]["url_answers_s"] for r in measured
                                   if r["isession"].get("url_answers_s")),
        "ratio": bl.stats(r["ratio"] for r in measured),
        "ratio_url": bl.stats(r["ratio_url"] for r in measured if r.get("ratio_url")),
        **bl.slurm_wait_stats(measured),
        "idle_pss_mib": bl.stats(r["isession"]["memory"]["pss_kb"] / 1024 for r in measured
                                 if r["isession"].get("memory")),
        "idle_processes": bl.stats(r["isession"]["memory"]["processes"] for r in measured
                                   if r["isession"].get("memory")),
        "failed_rounds": [r["round"] for r in rounds if "ratio" not in r],
    }
    last_mem = next((r["isession"]["memory"] for r in reversed(measured) if r["isession"].get("memory")), {})
    results = {"meta": {"date": stamp.strftime("%Y-%m-%d %H:%M UTC"), "machine": bl.machine(),
                        "commit": bl.git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
                        "hostname": socket.gethostname(),
                        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3]},
               "rounds": rounds, "summary": summary}
    standby = f" - isession with ISESSION_STANDBY={args.standby:g}" if args.standby else ""
    lines = [f"VNC desktop on Slurm compute {results['meta']['date']} - commit {results['meta']['commit']}{standby}",
             "",
             f"{'measure':46} {'median (min-max, n)':34} target",
             f"{'bare path: start -> noVNC page (script exit)':46} {bl.fmt_stats(summary['bare_s']):34} -",
             f"{'bare path: start -> page first answers':46} {bl.fmt_stats(summary['bare_url_s']):34} -",
             f"{'isession start vnc (exit with the URL)':46} {bl.fmt_stats(summary['isession_s']):34} -",
             f"{'isession: start -> page first answers':46} {bl.fmt_stats(summary['isession_url_s']):34} -",
             f"{'ratio isession / bare (exit)':46} {bl.fmt_stats(summary['ratio'], 'x'):34} <= {TARGET_RATIO}x",
             f"{'ratio isession / bare (page first answers)':46} {bl.fmt_stats(summary['ratio_url'], 'x'):34} -",
             f"{'  Slurm: submit -> allocated, bare path':46} {bl.fmt_stats(summary['slurm_wait_bare_s']):34} -",
             f"{'  Slurm: submit -> allocated, isession':46} {bl.fmt_stats(summary['slurm_wait_isession_s']):34} -",
             f"{'  ratio without Slurm wait (both paths)':46} "
             f"{bl.fmt_stats(summary['ratio_without_slurm_wait'], 'x'):34} -",
             f"{'idle desktop session, Pss on the node':46} {bl.fmt_stats(summary['idle_pss_mib'], ' MiB', 1):34} -",
             f"{'  processes of the session':46} {bl.fmt_stats(summary['idle_processes'], '', 0):34} -",
             "", "largest parts of the idle session (Pss, last round): "
             + ", ".join(f"{c} {kb / 1024:.1f} MiB" for c, kb in last_mem.get("top_pss_kb", [])),
             f"failed rounds: {summary['failed_rounds'] or 'none'}"]
    bl.save_results(out_path, results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
