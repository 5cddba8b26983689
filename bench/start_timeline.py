"""Benchmark (not a test): where the time of ``isession start SERVICE --target compute`` goes, Slurm's wait left out.

``--runs`` starts (after one unmeasured) on the bed's Slurm compute nodes, each cancelled before the next. For each,
from the command's own clock, the runner's job events and slurmctld's log (millisecond time stamps):
  to sbatch          the command's start -> slurmctld receives the job (the CLI, ansible-playbook's start-up, the
                     tasks before the submit and the submit's own part)
  Slurm wait         slurmctld receives the job -> allocates its node (Slurm's scheduling pass, at random from a few
                     milliseconds to ~3 s: ``batch_sched_delay``; a bare script draws it too)
  allocation -> URL  the node is allocated -> the command exits with the URL (the job starts the server and the
                     tunnel while the play records the job and waits for the app to answer)
  after readiness    the readiness check's end -> the command's exit (the summary, ansible-playbook's exit, the CLI)
  own time           the whole command minus Slurm's wait
Writes ``--out`` (JSON) and the table beside it (``.txt``), and prints the table. The medians are what to compare
between two commits: run it on each, in the same hour (``--reuse-collection`` skips installing this checkout).
Run as root: see bench/README.md.
"""
from __future__ import annotations

import argparse
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("to_sbatch_s", "slurm_wait_s", "allocation_to_url_s", "after_readiness_s", "own_time_s", "total_s")
LABELS = {"to_sbatch_s": "command -> slurmctld has the job", "slurm_wait_s": "Slurm: job received -> allocated",
          "allocation_to_url_s": "allocated -> command exits with the URL",
          "after_readiness_s": "readiness check's end -> exit", "own_time_s": "isession's own time (total - Slurm)",
          "total_s": "isession start (whole command)"}


def one_start(bed: bl.Bed, cli: bl.Cli, service: str, sid: str) -> Dict[str, Any]:
    run = cli.timed("start", service, "--target", "compute", "--resource", "controller", "--id", sid, "--json")
    out: Dict[str, Any] = {"sid": sid, "rc": run["rc"], "total_s": run["seconds"]}
    job = cli.read(sid, "state.json").get("job_id")
    times = bl.slurm_times(bl.slurm_log(bed), [job]).get(str(job)) if job else None
    tasks = bl.task_timeline(bl.load_events(cli.root / sid / "logs" / "runner" / "artifacts" / "start" /
                                            "job_events"))["tasks"]
    ready = [t for t in tasks if t["action"].endswith("session_ready") and t["span"] is not None]
    out["tasks"] = [{"name": t["name"], "span": t["span"]} for t in tasks if t["span"] is not None]
    if run["rc"] != 0 or times is None or not ready:
        out["error"] = (run["stdout"] + run["stderr"])[-2000:] or "no job, Slurm times or readiness task"
        return out
    submitted, allocated = times
    out.update(job_id=job, to_sbatch_s=round(submitted - run["t0"], 4), slurm_wait_s=round(allocated - submitted, 4),
               allocation_to_url_s=round(run["t1"] - allocated, 4),
               after_readiness_s=round(run["t1"] - (ready[0]["start"] + ready[0]["span"]), 4),
               own_time_s=round(run["seconds"] - (allocated - submitted), 4))
    return out


def task_spans(starts: List[Dict[str, Any]]) -> List[Any]:
    """Each task's span over the starts (summed when a task runs more than once in a start), in play order."""
    spans: Dict[str, List[float]] = {}
    for start in starts:
        mine: Dict[str, float] = {}
        for task in start.get("tasks", []):
            mine[task["name"]] = mine.get(task["name"], 0.0) + task["span"]
        for name, span in mine.items():
            spans.setdefault(name, []).append(span)
    return [(name, bl.stats(values)) for name, values in spans.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--service", default="vnc")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--reuse-collection", action="store_true")
    ap.add_argument("--standby", type=float, default=0.0, metavar="SECONDS",
                    help="starts with ISESSION_STANDBY=SECONDS: each takes the play the one before left waiting "
                    "(the first, unmeasured, start leaves the first one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bed = bl.ready_bed(args.reuse_collection)
    if bed is None:
        return 2
    stamp = datetime.now(timezone.utc)
    tag = stamp.strftime("%H%M%S")
    out_path = args.out or HERE / "results" / f"start_timeline-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    tmp = bed.user_tmpdir(bl.WS_USER)
    cli = bl.Cli(bed, tmp, "timeline-sessions", bl.cluster_inventory(bed, tmp))
    if args.standby:
        cli.use_standby(args.standby)
    starts: List[Dict[str, Any]] = []
    for i in range(args.runs + 1):
        res = one_start(bed, cli, args.service, f"bench-tl-{tag}-{i}")
        res["warmup"] = i == 0
        starts.append(res)
        cli.run("cancel", res["sid"], timeout=300)
        bl.wait_slurm_idle(bed)  # the node's teardown, so that the next job's allocation is not behind it
    if args.standby:
        cli.end_standbys()
    cli.stop_watcher()
    measured = [s for s in starts if not s["warmup"] and "error" not in s]
    summary = {part: bl.stats(s[part] for s in measured) for part in PARTS}
    summary["failed_starts"] = [s["sid"] for s in starts if "error" in s]
    summary["tasks"] = task_spans(measured)
    results = {"meta": {"date": stamp.strftime("%Y-%m-%d %H:%M UTC"), "machine": bl.machine(),
                        "commit": bl.git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
                        "hostname": socket.gethostname()},
               "starts": starts, "summary": summary}
    standby = f" - ISESSION_STANDBY={args.standby:g}" if args.standby else ""
    lines = [f"isession start {args.service} on Slurm compute {results['meta']['date']} - commit "
             f"{results['meta']['commit']}{standby}", "", f"{'part':44} median (min-max, n)"]
    lines += [f"{LABELS[part]:44} {bl.fmt_stats(summary[part])}" for part in PARTS]
    lines += ["", f"failed starts: {', '.join(summary['failed_starts']) or 'none'}", "",
              f"{'task of the start play (span: its start to the next one)':72} median (min-max, n)"]
    lines += [f"{name[:72]:72} {bl.fmt_stats(st)}" for name, st in summary["tasks"]]
    bl.save_results(out_path, results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
