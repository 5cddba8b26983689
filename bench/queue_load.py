"""Queued sessions under load (issue 11): what waiting in the queue costs, how fast a queued job that starts is
``Running``, and how fast twenty cancels at once leave nothing behind. Not a test: it measures and prints.

1. Two 1-CPU filler jobs fill the bed's ``small`` partition; then ``--sessions`` (default 50) nginx sessions are
   started on it (``isession start ... -e session_partition=small``, at most ``--parallel`` starting at once) and
   wait, Queued.
2. CPU while they wait: utime+stime of every process in the workspace and the controller namespaces (the starts'
   ansible-playbook processes, the watcher and its ssh, sshd, slurmctld, ...), summed over a ``--window`` s window
   and given as % of one core, for each count in ``--steps`` (default 10, 50): it must not grow with the count.
   ``--windows`` (default 3) windows one after the other; the median is the figure. The table splits it by role
   (``role_of``): the watcher, its server on the controller, the start commands, their plays and waiting modules,
   and every other process by its command name.
   The window opens ``--settle`` s (default 30) after the last start of the step reached Queued, so that it holds
   the wait alone: for a few seconds after that, the plays of the starts queued last still run their tasks.
   slurmctld's job-query RPC rate (``sdiag``) over the same window shows who asks the scheduler.
3. Queued job start -> Running: a filler job is cancelled, so the oldest queued session's job starts; from the job's
   ``StartTime`` (Slurm, whole seconds) and from the moment the filler's scancel returned, to ``Running`` in the
   session's record (``history``), ``--runs`` times.
4. ``--cancels`` (default 20) cancels at once: per session, from the moment its ``isession cancel`` started until
   nothing of it is left (no job alive, no process, no port reservation, no workspace listener).

Targets (issue 11): CPU under 5% of one core in all and not growing with the number queued; queued job start ->
Running <= 1 s; cancel -> nothing left <= 3 s.

    flock /run/hpci-bed.lock python bench/queue_load.py [--sessions 50]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Tuple

import benchlib as bl

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
PORTS_DIR = Path("/tmp/isession-ports")  # noqa: S108 - the reservation directory the bed's hosts share


def role_of(name: str, cmd: str) -> str:
    """Who a process is, for the CPU table: the parts of a waiting session by their role, any other process by its
    command name (the bed's daemons: slurmctld, sshd, the SGE master that this bench does not use, ...)."""
    if "isession" in cmd and " watch" in f"{cmd} ":
        return "watcher"
    if "sys.stdin.buffer.readline()" in cmd:  # _remote_server.BOOT: the watcher's one server on the controller
        return "watcher's server on the controller (with its squeue)"
    if "isession" in cmd and " start " in f"{cmd} ":
        return "start commands"
    if "ansible-playbook" in cmd or "ansible_playbook" in cmd:
        return "start plays (ansible-playbook)"
    if "AnsiballZ_" in cmd or "ansible_" in cmd and "_payload" in cmd:
        return "start plays' waiting modules"
    return name


def ns_processes(hosts: List[str], roles: Dict[int, str]) -> Dict[int, Tuple[str, int]]:
    """pid -> (role, utime+stime+cutime+cstime in ticks) of every process whose network namespace is one of
    ``hosts``'. ``roles`` keeps each pid's role (:func:`role_of`) from its first sight."""
    wanted = set()
    for host in hosts:
        try:
            wanted.add(os.stat(f"/run/netns/hpcbed-{host}").st_ino)
        except OSError:
            pass
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino not in wanted:
                continue
            head, tail = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)
            if pid not in roles:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                roles[pid] = role_of(head.split("(", 1)[-1], cmd)
        except OSError:
            continue
        fields = [int(f) for f in tail.split()[11:15]]  # utime, stime, cutime, cstime
        out[pid] = (roles[pid], sum(fields))
    return out


def cpu_percent(window: float) -> Tuple[float, Dict[str, float]]:
    """% of one core used by the workspace's and the controller's processes over ``window`` seconds, in all and per
    role (who pays for the wait: :func:`role_of`)."""
    roles: Dict[int, str] = {}
    before, t0 = ns_processes(["workspace", "controller"], roles), time.monotonic()
    time.sleep(window)
    after, took = ns_processes(["workspace", "controller"], roles), time.monotonic() - t0
    by_name: Dict[str, float] = {}
    for pid, (name, ticks) in after.items():
        by_name[name] = by_name.get(name, 0.0) + ticks - before.get(pid, (name, 0))[1]
    shares = {n: round(100.0 * t / TICKS / took, 2) for n, t in sorted(by_name.items(), key=lambda i: -i[1]) if t}
    return round(sum(shares.values()), 2), shares


def job_info_rpcs(bed: bl.Bed) -> int:
    out = bed.slurm(["sdiag"], check=True).stdout
    return sum(int(n) for n in re.findall(r"REQUEST_JOB_INFO(?:_SINGLE)?\s+\(\s*\d+\)\s+count:(\d+)", out))


def status(cli: bl.Cli, sid: str) -> str:
    return cli.read(sid, "service.json").get("JOB_STATUS", "-")


def start_queued(bed: bl.Bed, cli: bl.Cli, sids: List[str], parallel: int) -> List[subprocess.Popen]:
    """Start the sessions (detached ``isession start``), ``parallel`` at a time until each is Queued."""
    argv = [str(bed.venv / "bin" / "python"), "-m", "isession"]
    procs = []
    for i in range(0, len(sids), parallel):
        batch = sids[i:i + parallel]
        for sid in batch:
            procs.append(bed.popen("workspace", argv + [
                "start", "nginx", "--id", sid, "--target", "compute", "--resource", "controller",
                "-e", "session_partition=small", "-e", "session_queue_timeout=3600"],
                user=bl.WS_USER, env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(status(cli, s) != "Queued" for s in batch):
            time.sleep(0.5)
    return procs


def fillers(bed: bl.Bed, n: int, tag: str) -> List[str]:
    ids = []
    for i in range(n):
        cp = bed.slurm(["sbatch", "--parsable", "-p", "small", "-c", "1", "-J", f"bench-fill-{tag}-{i}",
                        "--wrap", "sleep 3600"], user=bl.CLUSTER_USER, check=True)
        ids.append(cp.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = bed.slurm(["squeue", "-h", "-j", ",".join(ids), "-o", "%T"], check=False).stdout.split()
        if states.count("RUNNING") == n:
            break
        time.sleep(0.5)
    return ids


def slurm_start(bed: bl.Bed, job: str) -> float:
    out = bed.slurm(["scontrol", "show", "job", "-o", job], check=False).stdout
    m = re.search(r"\bStartTime=(\S+)", out)
    try:
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) if m else 0.0
    except ValueError:
        return 0.0


def process_kind(cmd: str) -> str:
    """Which part of a session a process is: the cancel command, the start command, its ansible-playbook, ..."""
    if "ansible-playbook" in cmd or "ansible_playbook" in cmd:
        return "start's ansible-playbook" if "start_" in cmd else "ansible-playbook"
    if "isession" in cmd and " cancel " in f"{cmd} ":
        return "cancel command"
    if "isession" in cmd and " start " in f"{cmd} ":
        return "start command"
    return cmd.split(maxsplit=1)[0].rsplit("/", 1)[-1] if cmd.split() else "?"


def left_of(bed: bl.Bed, cli: bl.Cli, sids: List[str], table) -> Dict[str, List[str]]:
    """What is left of each session: one ``squeue`` and one ``ss`` for all of them (a check per session per round
    was itself twenty scheduler queries every 0.1 s, on the same two cores as the cancels it timed)."""
    states = {sid: cli.read(sid, "state.json") for sid in sids}
    jobs = {sid: str(st.get("job_id") or "") for sid, st in states.items()}
    wanted = sorted({j for j in jobs.values() if j})
    alive = set(bed.slurm(["squeue", "-h", "-j", ",".join(wanted), "-t", "PD,R,CG", "-o", "%i"],
                          check=False).stdout.split()) if wanted else set()
    owners = set()
    for f in list(PORTS_DIR.glob("port-*")) if PORTS_DIR.is_dir() else []:
        try:
            owners.add(json.loads(f.read_text()).get("owner"))
        except (OSError, ValueError):
            continue
    listening = set(bl.parse_ss_listeners(bed.run("workspace", ["ss", "-Hltn"]).stdout))
    out: Dict[str, List[str]] = {}
    for sid in sids:
        what = []
        if jobs[sid] in alive:
            what.append("job")
        kinds = sorted({process_kind(table[pid]["cmd"]) for pid in bl.session_pids(table, sid)})
        what += [f"process ({k})" for k in kinds]
        if sid in owners:
            what.append("reservation")
        if (states[sid].get("ports") or {}).get("workspace") in listening:
            what.append("listener")
        out[sid] = what
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--steps", default="10,50", help="queued counts at which CPU is measured (default 10,50)")
    ap.add_argument("--parallel", type=int, default=5)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--windows", type=int, default=3, help="CPU windows per step; the median is the figure")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds between the last start reaching Queued and the CPU window (default 30): the plays "
                         "of the starts queued last still run the tasks before their wait for a few seconds, and "
                         "that is the start's cost, not the wait's")
    ap.add_argument("--runs", type=int, default=3, help="queued job start -> Running measurements")
    ap.add_argument("--cancels", type=int, default=20)
    ap.add_argument("--reuse-collection", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bed = bl.ready_bed(args.reuse_collection)
    if bed is None:
        return 2
    stamp = datetime.now(timezone.utc)
    tag = stamp.strftime("%H%M%S")
    tmp = bed.user_tmpdir(bl.WS_USER)
    cli = bl.Cli(bed, tmp, "sessions-queue", bl.cluster_inventory(bed, tmp))
    steps = sorted({min(int(s), args.sessions) for s in args.steps.split(",") if s.strip()})
    sids = [f"bench-q-{tag}-{i:02d}" for i in range(args.sessions)]
    res: Dict[str, Any] = {"meta": {"date": stamp.strftime("%Y-%m-%d %H:%M UTC"), "machine": bl.machine(),
                                    "commit": bl.git_commit(), "args": {k: str(v) for k, v in vars(args).items()}},
                           "cpu": [], "to_running_s": [], "cancel_s": {}}
    fill, procs = fillers(bed, 2, tag), []
    try:
        started = 0
        for count in steps:
            procs += start_queued(bed, cli, sids[started:count], args.parallel)
            started = count
            time.sleep(args.settle)  # the starts settle into their wait
            rpc0 = job_info_rpcs(bed)
            t0 = time.monotonic()
            # several windows: a 20 s window counts whole clock ticks (0.05% of a core each), and the machine's
            # other work moves it by a few tenths; the median of the windows is the figure, each window is kept
            windows = [cpu_percent(args.window) for _window in range(args.windows)]
            rpcs = (job_info_rpcs(bed) - rpc0) / (time.monotonic() - t0)
            queued = sum(status(cli, s) == "Queued" for s in sids[:count])
            cpu, shares = sorted(windows, key=lambda w: w[0])[len(windows) // 2]
            res["cpu"].append({"queued": queued, "cpu_percent_of_one_core": cpu,
                               "windows_percent": [w[0] for w in windows], "job_info_rpcs_per_s": round(rpcs, 2),
                               "by_role": shares})
            top = ", ".join(f"{n} {v:.2f}%" for n, v in list(shares.items())[:8])
            print(f"{queued} queued: {cpu:.2f}% of one core (workspace + controller; median of "
                  f"{', '.join(f'{w[0]:.2f}' for w in windows)}), {rpcs:.2f} job queries/s; {top}")
        for i in range(min(args.runs, len(fill))):
            waiting = [s for s in sids[:started] if status(cli, s) == "Queued"]
            t_cancel = time.time()
            bed.slurm(["scancel", fill[i]], user=bl.CLUSTER_USER, check=True)
            t_cancelled = time.time()
            deadline = time.monotonic() + 120
            runner = None
            while time.monotonic() < deadline and runner is None:
                runner = next((s for s in waiting if status(cli, s) == "Running"), None)
                time.sleep(0.05)
            if runner is None:
                print("no queued session reached Running after the filler was cancelled")
                continue
            hist = cli.read(runner, "state.json").get("history", [])
            running_at = bl.first_at(hist, "running") or time.time()
            job_start = slurm_start(bed, str(cli.read(runner, "state.json").get("job_id")))
            res["to_running_s"].append({"session": runner, "from_job_start": round(running_at - job_start, 2),
                                        "from_scancel": round(running_at - t_cancelled, 2),
                                        "scancel_took": round(t_cancelled - t_cancel, 2)})
            print(f"{runner}: Running {running_at - job_start:.2f} s after its job's StartTime (whole seconds), "
                  f"{running_at - t_cancelled:.2f} s after the filler's scancel returned")
        victims = sids[:min(args.cancels, started)]
        marks: Dict[str, float] = {}

        cli_done: Dict[str, float] = {}
        last_seen: Dict[str, Dict[str, float]] = {}  # session -> what was left -> the last check that saw it

        def cancel(sid: str) -> None:
            marks[sid] = time.time()
            cli.run("cancel", sid, timeout=600)
            cli_done[sid] = time.time() - marks[sid]

        with ThreadPoolExecutor(max_workers=len(victims) or 1) as pool:
            futures = [pool.submit(cancel, s) for s in victims]
            gone: Dict[str, float] = {}
            deadline = time.monotonic() + 300
            while len(gone) < len(victims) and time.monotonic() < deadline:
                waiting = [s for s in victims if s in marks and s not in gone]
                left = left_of(bed, cli, waiting, bl.proc_table())
                at = time.time()  # when the check ended: an upper bound on the moment nothing was left
                for sid, what in left.items():
                    for kind in what:
                        last_seen.setdefault(sid, {})[kind] = at - marks[sid]
                    if not what:
                        gone[sid] = at - marks[sid]
                time.sleep(0.1)
            for f in futures:
                f.result()
        unclean = [s for s in victims if s not in gone]
        notes = {}  # when the watcher wrote each session's teardown note (teardown.json "at"), after its cancel began
        for sid in victims:
            try:
                notes[sid] = float(cli.read(sid, "teardown.json")["at"]) - marks[sid]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        kinds = sorted({k for seen in last_seen.values() for k in seen})
        res["cancel_s"] = {"sessions": len(victims), "nothing_left_s": bl.stats(gone.values()),
                           "not_clean": left_of(bed, cli, unclean, bl.proc_table()) if unclean else {},
                           # what went last: per kind, the last check that still saw it (s after its cancel began)
                           "last_seen_s": {k: bl.stats(seen[k] for seen in last_seen.values() if k in seen)
                                           for k in kinds},
                           "cancel_command_s": bl.stats(cli_done.values()),
                           "watcher_note_s": bl.stats(notes.values())}
        print("  last seen: " + "; ".join(f"{k} {bl.fmt_stats(v)}" for k, v in res["cancel_s"]["last_seen_s"].items())
              + f"; the watcher's teardown note after {bl.fmt_stats(res['cancel_s']['watcher_note_s'])}"
              + f"; the cancel command took {bl.fmt_stats(res['cancel_s']['cancel_command_s'])}")
        print(f"{len(victims)} cancels at once -> nothing left: {bl.fmt_stats(res['cancel_s']['nothing_left_s'])}"
              f"; not clean (what is left): {res['cancel_s']['not_clean']}")
    finally:
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(lambda s: cli.run("cancel", s, timeout=600),
                          [s for s in sids if (cli.root / s / "state.json").exists()
                           and status(cli, s) not in ("Cancelled", "Completed", "Failed")]))
        bed.slurm(["scancel", *fill], user=bl.CLUSTER_USER, check=False)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        cli.stop_watcher()
    out = args.out or HERE / "results" / f"queue_load-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # the watcher's own account of each cancel (when it sent it, what it undid, how long that took)
        out.with_suffix(".watcher.log").write_text((cli.root / ".watcher.log").read_text())
    except OSError:
        pass
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("targets: CPU < 5% of one core, not growing with the number queued; queued job start -> Running <= 1 s; "
          "cancel -> nothing left <= 3 s")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
