#!/usr/bin/env python3
"""Benchmark (not a test): `isession start jupyterlab --target compute` against the bare path, readiness latency,
cancel, and many concurrent sessions, on the test bed. Run as root: see bench/README.md.

Parts (``--parts``, default all):
  start  N rounds (``--runs``) of: the bare shell path (bare_start.sh + bare_job.sh: one ssh to the controller,
         sbatch a job that starts JupyterLab and ``ssh -R`` back, poll the URL) and ``isession start jupyterlab
         --target compute --resource controller`` until it exits with the URL (the order alternates per round);
         each step's share from the runner events and state.json history; port answering -> ``Running``
         (probe.py watches the port from inside the workspace every 20 ms); then ``isession cancel`` timed until
         nothing is left (no job, no listener, no process, no port reservation).
  many   ``--sessions`` nginx sessions started concurrently (``--parallel`` at once), port collisions and Pss per
         idle session without the app (many_sessions.py); all cancelled after.
Writes ``--out`` (JSON) and the summary table beside it (``.txt``), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import many_sessions  # noqa: E402

HERE = Path(__file__).resolve().parent
JUPYTER = "/opt/hpc-interactive/apps/jupyterlab/bin/jupyter-lab"
PORTS_DIR = Path("/tmp/isession-ports")  # noqa: S108 - the host-local reservation directory of free_port
TARGETS = {"start_ratio": 2.0, "start_ratio_stretch": 1.5, "ready_latency_s": 0.5, "cancel_s": 2.0,
           "idle_mib_per_session": 15.0, "port_collisions": 0}


class Probe:
    """probe.py running in the workspace namespace."""

    def __init__(self, bed: bl.Bed, *, port: Optional[int] = None, state: Optional[Path] = None,
                 timeout: float = 300) -> None:
        argv = ["/usr/bin/python3", str(HERE / "probe.py"), "--timeout", str(timeout)]
        argv += ["--port", str(port)] if port else ["--state", str(state)]
        self.proc = bed.popen("workspace", argv, stdout=-1, stderr=-1, text=True)

    def result(self, timeout: float = 30) -> Dict[str, Any]:
        try:
            out, _err = self.proc.communicate(timeout=timeout)
        except Exception:  # noqa: BLE001 - a stuck probe must not stop the benchmark
            self.proc.kill()
            out, _err = self.proc.communicate()
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}


def free_workspace_port(bed: bl.Bed) -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(bed.run("workspace", ["/usr/bin/python3", "-c", code], check=True).stdout)


def rel(at: Optional[float], t0: float) -> Optional[float]:
    return None if at is None else round(at - t0, 4)


# ---------------------------------------------------------------------------------------------- the bare path
def bare_round(bed: bl.Bed, tmp: Path, tag: str) -> Dict[str, Any]:
    wsport = free_workspace_port(bed)
    work = bed.user_tmpdir(bl.WS_USER)
    for name in ("bare_start.sh", "bare_job.sh"):
        shutil.copy(HERE / name, work / name)
    bl.chown_tree(work, bl.WS_USER)
    probe = Probe(bed, port=wsport, timeout=120)
    argv = ["bash", str(work / "bare_start.sh"), tag, str(wsport), str(work),
            f"{bl.CLUSTER_USER}@{bed.ip('controller')}", f"{bl.WS_USER}@{bed.ip('workspace')}", JUPYTER,
            str(work / "bare_job.sh")]
    t0 = time.time()
    try:
        cp = bed.run("workspace", argv, user=bl.WS_USER, timeout=180)
    except subprocess.TimeoutExpired as exc:
        cp = subprocess.CompletedProcess(argv, -9, str(exc.stdout or ""), str(exc.stderr or ""))
    t1 = time.time()
    marks = {}
    for line in cp.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            marks[parts[0]] = parts[1:]
    pr = probe.result()
    job = marks.get("submitted", [None, None])[1]
    out: Dict[str, Any] = {"rc": cp.returncode, "seconds": round(t1 - t0, 4), "job_id": job, "port": wsport}
    if cp.returncode != 0 or "ready" not in marks:
        out["error"] = (cp.stdout + cp.stderr)[-2000:]
    else:
        begin, submitted, ready = float(marks["begin"][0]), float(marks["submitted"][0]), float(marks["ready"][0])
        out["steps"] = {
            "script start": round(begin - t0, 4),
            "ssh + sbatch": round(submitted - begin, 4),
            "job start -> tunnel open": rel(pr.get("tcp_open_at"), submitted),
            "tunnel open -> app answers": rel(pr.get("http_ready_at"), pr.get("tcp_open_at") or submitted),
            "app answers -> script sees it": rel(ready, pr.get("http_ready_at") or ready),
            "script exit": round(t1 - ready, 4),
        }
        out["url_answers_s"] = rel(pr.get("http_ready_at"), t0)
    if job:
        bed.run("controller", ["scancel", job], user=bl.CLUSTER_USER)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bed.slurm(["squeue", "-h", "-j", job], check=False).stdout.strip():
            time.sleep(0.2)
    shutil.rmtree(Path(f"~{bl.CLUSTER_USER}").expanduser() / ".bench-bare" / tag, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- isession
def play_steps(artifacts: Path, t0: float, t1: float, tail: str) -> Dict[str, Any]:
    """Each step's seconds of one CLI run: startup, every task's span (runner events), the CLI's tail."""
    tl = bl.task_timeline(bl.load_events(artifacts / "job_events"))
    steps = {"CLI + ansible-playbook startup": rel(tl["play_start"], t0)}
    if tl["tasks"]:
        steps["play start -> first task"] = rel(tl["tasks"][0]["start"], tl["play_start"] or t0)
    for task in tl["tasks"]:
        name = task["name"] or task["action"]
        steps[name] = round(steps.get(name, 0.0) + (task["span"] or 0.0), 4)
    steps[tail] = rel(t1, tl["play_end"] or t1)
    return {"steps": steps, "module_seconds": round(sum(t.get("module") or 0.0 for t in tl["tasks"]), 4),
            "tasks": [{k: v for k, v in t.items() if k != "start"} for t in tl["tasks"]]}


def isession_round(bed: bl.Bed, cli: bl.Cli, sid: str) -> Dict[str, Any]:
    probe = Probe(bed, state=cli.root / sid / "state.json", timeout=300)
    run = cli.timed("start", "jupyterlab", "--target", "compute", "--resource", "controller", "--id", sid, "--json",
                    timeout=600)
    t0, t1 = run["t0"], run["t1"]
    pr = probe.result()
    state, service = cli.read(sid, "state.json"), cli.read(sid, "service.json")
    out: Dict[str, Any] = {"id": sid, "rc": run["rc"], "seconds": run["seconds"], "status": service.get("JOB_STATUS"),
                           "job_id": state.get("job_id")}
    if run["rc"] != 0 or service.get("JOB_STATUS") != "Running":
        out["error"] = (run["stdout"] + run["stderr"])[-3000:]
        return out
    hist = state.get("history") or []
    running_at = bl.first_at(hist, "running")
    out["history"] = {h["step"]: rel(float(h["at"]), t0) for h in hist}
    out["probe"] = {k: rel(pr.get(k), t0) for k in ("port_known_at", "tcp_open_at", "http_ready_at")}
    out["url_answers_s"] = out["probe"]["http_ready_at"]
    if pr.get("http_ready_at") and running_at:
        out["ready_latency_s"] = round(running_at - pr["http_ready_at"], 4)
    out.update(play_steps(cli.root / sid / "logs" / "runner" / "artifacts" / "start", t0, t1,
                          "play end -> CLI exit (watcher, output)"))
    remote = Path(state.get("remote_dir") or "/nonexistent")
    try:
        agent = json.loads((remote / "agent.json").read_text())
        out["node"], out["node_port"] = agent.get("host"), agent.get("node_port")
    except (OSError, ValueError):
        pass
    out["port"] = int(service.get("PORT") or 0)
    return out


CANCEL_RUN_RE = re.compile(r"isession\S* cancel |playbooks/cancel\.yml|artifacts/cancel-")


def leftovers(bed: bl.Bed, cli: bl.Cli, sid: str, rec: Dict[str, Any]) -> List[str]:
    """What is still there of session ``sid`` (empty list: nothing)."""
    left = []
    q = bed.slurm(["squeue", "-h", "-n", f"isession-{sid}", "-o", "%i %T"], check=False).stdout.strip()
    if q:
        left.append(f"job in the queue: {q}")
    if rec.get("port") and rec["port"] in bl.listeners(bed, "workspace"):
        left.append(f"listener on workspace:{rec['port']}")
    if rec.get("node") in bed.hosts and rec.get("node_port") and rec["node_port"] in bl.listeners(bed, rec["node"]):
        left.append(f"listener on {rec['node']}:{rec['node_port']}")
    table = bl.proc_table()
    # the cancel itself (the CLI, its ansible-playbook and workers) names the session too; it is not a leftover
    procs = [pid for pid in bl.session_pids(table, sid) if not CANCEL_RUN_RE.search(table[pid]["cmd"])]
    if procs:
        left.append(f"processes {procs}")
    for f in PORTS_DIR.glob("port-*") if PORTS_DIR.is_dir() else []:
        try:
            if json.loads(f.read_text()).get("owner") == sid:
                left.append(f"port reservation {f.name}")
        except (OSError, ValueError):
            continue
    status = cli.read(sid, "service.json").get("JOB_STATUS")
    if status != "Cancelled":
        left.append(f"JOB_STATUS {status}")
    return left


def cancel_round(bed: bl.Bed, cli: bl.Cli, sid: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    """Time ``isession cancel`` and, while it runs, the moment nothing of the session is left.

    service.json is read every 20 ms (a cheap file read that does not slow the cancel down) until it says
    Cancelled - the cancel play's last write, after the job is cancelled and the ports are released; from then on
    the full leftovers check (queue, listeners per namespace, processes, reservations) runs until it is empty.
    So the figure is when the resources are gone, not when ansible-playbook's Python has finished exiting.
    """
    box: Dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(run=cli.timed("cancel", sid, timeout=300)))
    t0 = time.time()
    worker.start()
    deadline = time.monotonic() + 60
    while cli.read(sid, "service.json").get("JOB_STATUS") != "Cancelled" and time.monotonic() < deadline:
        if not worker.is_alive() and "run" in box:
            break  # the CLI ended without Cancelled: the leftovers check below says what is there
        time.sleep(0.02)
    deadline = time.monotonic() + 15
    while True:
        at = time.time()
        left = leftovers(bed, cli, sid, rec)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    worker.join()
    run = box["run"]
    out = {"rc": run["rc"], "cli_seconds": run["seconds"], "left": left}
    runs = sorted((cli.root / sid / "logs" / "runner" / "artifacts").glob("cancel-*"), key=lambda p: p.stat().st_mtime)
    if runs:
        out.update(play_steps(runs[-1], run["t0"], run["t1"], "play end -> CLI exit"))
    if not left:
        out["nothing_left_s"] = round(at - min(t0, run["t0"]), 4)
    return out


def part_start(bed: bl.Bed, tmp: Path, inventory: Path, *, runs: int, warmup: int, tag: str) -> Dict[str, Any]:
    cli = bl.Cli(bed, tmp, "sessions-start", inventory)
    rounds: List[Dict[str, Any]] = []
    try:
        i, attempts = -warmup, 0
        while i < runs and attempts < 2 * (runs + warmup):  # a round broken by the bed (a node set DOWN by
            attempts += 1                                    # someone else) is recorded and run again
            order = ("bare", "isession") if i % 2 == 0 else ("isession", "bare")
            rnd: Dict[str, Any] = {"round": i, "warmup": i < 0, "order": list(order)}
            for which in order:
                if which == "bare":
                    rnd["bare"] = bare_round(bed, tmp, f"{tag}-{attempts}")
                else:
                    sid = f"bench-jl-{tag}-{attempts}"
                    rnd["isession"] = isession_round(bed, cli, sid)
                    rnd["cancel"] = cancel_round(bed, cli, sid, rnd["isession"])
            if "error" not in rnd["bare"] and rnd["isession"].get("status") == "Running":
                rnd["ratio"] = round(rnd["isession"]["seconds"] / rnd["bare"]["seconds"], 3)
                bl.add_slurm_waits(bed, rnd)
            print(f"round {i}: bare {rnd['bare'].get('seconds')}s isession {rnd['isession'].get('seconds')}s "
                  f"({rnd['isession'].get('status')}) ratio {rnd.get('ratio')} cancel "
                  f"{rnd.get('cancel', {}).get('nothing_left_s')}s", flush=True)
            rnd["attempt"] = attempts
            rounds.append(rnd)
            if "ratio" in rnd or i < 0:
                i += 1
    finally:
        cli.stop_watcher()
    return {"rounds": rounds, "summary": summarize_start([r for r in rounds if not r["warmup"]])}


def part_cancel(bed: bl.Bed, tmp: Path, inventory: Path, *, runs: int, targets: List[str], tag: str
                ) -> Dict[str, Any]:
    """Cancel alone, per target, on nginx (it stops at once: what is left to wait for is isession's own work)."""
    cli = bl.Cli(bed, tmp, "sessions-cancel", inventory)
    out: Dict[str, Any] = {}
    try:
        for target in targets:
            rounds = []
            for i in range(runs + 1):  # the first round is a warm-up
                sid = f"bench-cx-{target}-{tag}-{i}"
                where = ["--target", target] + (["--resource", "controller"] if target != "workspace" else [])
                run = cli.timed("start", "nginx", *where, "--id", sid, "--json", timeout=600)
                service, state = cli.read(sid, "service.json"), cli.read(sid, "state.json")
                if run["rc"] != 0 or service.get("JOB_STATUS") != "Running":
                    rounds.append({"error": (run["stdout"] + run["stderr"])[-2000:]})
                    continue
                rec: Dict[str, Any] = {"port": int(service.get("PORT") or 0)}
                try:
                    agent = json.loads((Path(state.get("remote_dir") or "/nonexistent") / "agent.json").read_text())
                    rec.update(node=agent.get("host"), node_port=agent.get("node_port"))
                except (OSError, ValueError):
                    pass
                rnd = cancel_round(bed, cli, sid, rec)
                rnd["warmup"] = i == 0
                print(f"cancel {target} round {i}: CLI {rnd['cli_seconds']}s nothing left "
                      f"{rnd.get('nothing_left_s')}s", flush=True)
                rounds.append(rnd)
            ok = [r for r in rounds if not r.get("warmup") and "nothing_left_s" in r]
            out[target] = {"rounds": rounds,
                           "cli_s": bl.stats(r["cli_seconds"] for r in ok),
                           "nothing_left_s": bl.stats(r["nothing_left_s"] for r in ok),
                           "leftovers": [r["left"] for r in rounds if r.get("left")]}
    finally:
        cli.stop_watcher()
    return out


def summarize_start(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in rounds if "ratio" in r]
    bare = [r["bare"]["seconds"] for r in ok]
    isess = [r["isession"]["seconds"] for r in ok]
    s: Dict[str, Any] = {
        "rounds_ok": len(ok), "rounds": len(rounds),
        "bare_s": bl.stats(bare), "isession_s": bl.stats(isess),
        "isession_url_answers_s": bl.stats(r["isession"]["url_answers_s"] for r in ok
                                           if r["isession"].get("url_answers_s") is not None),
        "ratio": bl.stats(r["ratio"] for r in ok),
        "ratio_of_medians": round(bl.stats(isess)["median"] / bl.stats(bare)["median"], 3) if ok else None,
        **bl.slurm_wait_stats(ok),
        "ready_latency_s": bl.stats(r["isession"]["ready_latency_s"] for r in ok if "ready_latency_s" in r["isession"]),
        "cancel_cli_s": bl.stats(r["cancel"]["cli_seconds"] for r in ok if "cancel" in r),
        "cancel_nothing_left_s": bl.stats(r["cancel"]["nothing_left_s"] for r in ok
                                          if "nothing_left_s" in r.get("cancel", {})),
        "cancel_leftovers": [r["cancel"]["left"] for r in ok if r.get("cancel", {}).get("left")],
        "module_seconds": bl.stats(r["isession"]["module_seconds"] for r in ok),
    }
    for key, field, total in (("bare_steps", "bare", "bare_s"), ("isession_steps", "isession", "isession_s"),
                              ("cancel_steps", "cancel", "cancel_cli_s")):
        names: List[str] = []
        for r in ok:
            names += [n for n in r.get(field, {}).get("steps", {}) if n not in names]
        med_total = s[total].get("median") or 1.0
        rows = []
        for n in names:
            st = bl.stats(r[field]["steps"][n] for r in ok if r.get(field, {}).get("steps", {}).get(n) is not None)
            if st["n"]:
                rows.append({"step": n, "median_s": st["median"], "share": round(st["median"] / med_total, 3),
                             "min_s": st["min"], "max_s": st["max"]})
        s[key] = rows
    return s


# ---------------------------------------------------------------------------------------------- report
def table(results: Dict[str, Any]) -> str:
    t = TARGETS
    lines = [f"hpc.interactive benchmark {results['meta']['date']} - {results['meta']['machine']['cores']} cores, "
             f"commit {results['meta']['commit']}", ""]
    st = results.get("start", {}).get("summary")
    if st:
        ratio = st["ratio"]
        lines += [
            f"{'measure':44} {'median (min-max, n)':34} target",
            f"{'bare path start -> URL answers':44} {bl.fmt_stats(st['bare_s']):34} -",
            f"{'isession start (exit with the URL)':44} {bl.fmt_stats(st['isession_s']):34} -",
            f"{'isession start -> URL first answers':44} {bl.fmt_stats(st['isession_url_answers_s']):34} -",
            f"{'ratio isession / bare':44} {bl.fmt_stats(ratio, 'x'):34} <= {t['start_ratio']}x "
            f"(stretch {t['start_ratio_stretch']}x)",
            f"{'  Slurm: submit -> allocated, bare path':44} {bl.fmt_stats(st['slurm_wait_bare_s']):34} -",
            f"{'  Slurm: submit -> allocated, isession':44} {bl.fmt_stats(st['slurm_wait_isession_s']):34} -",
            f"{'  ratio without Slurm wait (both paths)':44} "
            f"{bl.fmt_stats(st['ratio_without_slurm_wait'], 'x'):34} -",
            f"{'  ratio of the medians':44} {st['ratio_of_medians']}x",
            f"{'port answers -> Running':44} {bl.fmt_stats(st['ready_latency_s'], 's', 3):34} "
            f"<= {t['ready_latency_s']}s",
            f"{'isession cancel (CLI)':44} {bl.fmt_stats(st['cancel_cli_s']):34} -",
            f"{'cancel -> nothing left':44} {bl.fmt_stats(st['cancel_nothing_left_s']):34} <= {t['cancel_s']}s",
            "", "isession start, each step's share (median of rounds):"]
        lines += [f"  {r['step'][:62]:62} {r['median_s']:6.2f}s {100 * r['share']:5.1f}%" for r in st["isession_steps"]]
        lines += ["", "bare path, each step's share:"]
        lines += [f"  {r['step'][:62]:62} {r['median_s']:6.2f}s {100 * r['share']:5.1f}%" for r in st["bare_steps"]]
        lines += ["", "isession cancel, each step's share:"]
        lines += [f"  {r['step'][:62]:62} {r['median_s']:6.2f}s {100 * r['share']:5.1f}%" for r in st["cancel_steps"]]
        lines += ["", f"module run time inside the start play: {bl.fmt_stats(st['module_seconds'])}"]
    cancel = results.get("cancel")
    if cancel:
        lines += ["", "cancel of an nginx session (median (min-max, n)):"]
        for target, c in cancel.items():
            left = f"  LEFTOVERS {c['leftovers']}" if c["leftovers"] else ""
            lines += [f"  {target:10} CLI {bl.fmt_stats(c['cli_s']):30} nothing left "
                      f"{bl.fmt_stats(c['nothing_left_s']):30} target <= {t['cancel_s']}s{left}"]
    many = results.get("many", {}).get("summary")
    if many:
        lines += ["", many_sessions.table(many, t)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="start,cancel,many", help="comma list of: start, cancel, many")
    ap.add_argument("--cancel-targets", default="workspace,controller,compute",
                    help="targets of the cancel part (nginx sessions; default workspace,controller,compute)")
    ap.add_argument("--runs", type=int, default=5, help="measured rounds of the start part (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (cold caches; default 1)")
    ap.add_argument("--sessions", type=int, default=50, help="sessions of the many part (default 50)")
    ap.add_argument("--parallel", type=int, default=5, help="starts/cancels at once in the many part (default 5)")
    ap.add_argument("--many-target", choices=("workspace", "controller"), default="workspace")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before measuring memory (default 5)")
    ap.add_argument("--reuse-collection", action="store_true",
                    help="use the bed's current collection copy instead of installing one from this checkout")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/start_to_url-<UTC time>.json)")
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    bed = bl.ready_bed(args.reuse_collection)
    if bed is None:
        return 2
    stamp = datetime.now(timezone.utc)
    tag = stamp.strftime("%H%M%S")
    out = args.out or HERE / "results" / f"start_to_url-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    tmp = bed.user_tmpdir(bl.WS_USER)
    inventory = bl.cluster_inventory(bed, tmp)
    results: Dict[str, Any] = {"meta": {"date": stamp.strftime("%Y-%m-%d %H:%M UTC"), "machine": bl.machine(),
                                        "commit": bl.git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "targets": TARGETS, "hostname": socket.gethostname()}}
    if "start" in parts:
        results["start"] = part_start(bed, tmp, inventory, runs=args.runs, warmup=args.warmup, tag=tag)
    if "cancel" in parts:
        results["cancel"] = part_cancel(bed, tmp, inventory, runs=args.runs,
                                        targets=[x for x in args.cancel_targets.split(",") if x], tag=tag)
    if "many" in parts:
        results["many"] = many_sessions.run(bed, tmp, inventory, n=args.sessions, parallel=args.parallel,
                                            target=args.many_target, idle=args.idle, tag=tag)
    results["meta"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    bl.save_results(out, results, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
