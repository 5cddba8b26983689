"""Helpers of the hpc.interactive benchmarks (no benchmark here, and no test: nothing in bench/ is collected).

Pure parts (statistics, runner-event timelines, ``ss`` and ``/proc`` parsing) take plain data; the rest drives
the test bed (``tests/bed/bedlib.py``) as root from the root namespace: all bed hosts share one pid namespace and
one filesystem, so ``/proc`` and the users' files are read directly.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BED_DIR = REPO / "tests" / "bed"
if str(BED_DIR) not in sys.path:
    sys.path.insert(0, str(BED_DIR))

from bedlib import Bed  # noqa: E402

WS_USER = "wsuser"
CLUSTER_USER = "cluser"
READY_CODES = re.compile(r"^(2\d\d|3\d\d|401|403)$")


# ---------------------------------------------------------------------------------------------- statistics
def ready_bed(reuse_collection: bool) -> Optional[Bed]:
    """The bed a benchmark runs on, with this checkout's collection installed unless ``reuse_collection``; None (and
    why, on stderr) when the bed is not healthy."""
    bed = Bed()
    if not bed.status()[0]:
        print("the test bed is not healthy: run `tests/bed/bed up` first", file=sys.stderr)
        return None
    if not reuse_collection:
        bed.install_collection()
    return bed


def stats(values: Iterable[float]) -> Dict[str, Any]:
    """n, median, min, max, mean, stdev and spread (max - min) of ``values``; empty -> n 0."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "median": round(statistics.median(vals), 4),
        "min": round(vals[0], 4),
        "max": round(vals[-1], 4),
        "mean": round(statistics.fmean(vals), 4),
        "stdev": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
        "spread": round(vals[-1] - vals[0], 4),
    }


def fmt_stats(st: Dict[str, Any], unit: str = "s", digits: int = 2) -> str:
    """``median (min-max)`` for a table cell."""
    if not st.get("n"):
        return "-"
    return f"{st['median']:.{digits}f}{unit} ({st['min']:.{digits}f}-{st['max']:.{digits}f}, n={st['n']})"


# ---------------------------------------------------------------------------------------------- runner events
def parse_iso(text: str) -> float:
    """An ISO timestamp from ansible-runner (UTC, aware or naive) -> epoch seconds."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def load_events(events_dir: Path) -> List[dict]:
    """The job events of one runner artifact directory, in emission order."""
    events = []
    for path in events_dir.glob("*.json") if events_dir.is_dir() else []:
        try:
            events.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(events, key=lambda e: e.get("counter", 0))


def task_timeline(events: Sequence[dict]) -> Dict[str, Any]:
    """Per-task spans from runner events.

    A task's ``span`` runs from its ``playbook_on_task_start`` to the next task's start (the last one to
    ``playbook_on_stats``), so spans add up to the whole play and include Ansible's own overhead between
    tasks; ``module`` is the module's run time for the host (the result event's start/end).
    """
    starts: List[dict] = []
    results: Dict[str, dict] = {}
    play_start = play_end = None
    for ev in events:
        kind, data = ev.get("event"), ev.get("event_data") or {}
        created = parse_iso(ev["created"]) if ev.get("created") else None
        if kind == "playbook_on_start":
            play_start = created
        elif kind == "playbook_on_stats":
            play_end = created
        elif kind == "playbook_on_task_start":
            starts.append({"uuid": data.get("task_uuid"), "name": data.get("task") or data.get("name", ""),
                           "action": data.get("task_action", ""), "start": created})
        elif kind.startswith("runner_on_") and kind not in ("runner_on_start",) and data.get("task_uuid"):
            res = {"status": kind[len("runner_on_"):]}
            if data.get("start") and data.get("end"):
                res["module_start"] = parse_iso(data["start"])
                res["module_end"] = parse_iso(data["end"])
            results[data["task_uuid"]] = res
    tasks = []
    for i, task in enumerate(starts):
        end = starts[i + 1]["start"] if i + 1 < len(starts) else play_end
        res = results.get(task["uuid"], {"status": "none"})
        row = {"name": task["name"], "action": task["action"], "status": res["status"], "start": task["start"],
               "span": round(end - task["start"], 4) if end and task["start"] else None}
        if "module_start" in res:
            row["module"] = round(res["module_end"] - res["module_start"], 4)
        tasks.append(row)
    return {"play_start": play_start, "play_end": play_end, "tasks": tasks}


SLURM_LOG_RE = re.compile(
    r"^\[(\S+)\] (?:_slurm_rpc_submit_batch_job:|sched: Allocate|(?:sched/)?backfill: (?:_start_job: )?Started) "
    r"JobId=(\d+)\b")


def slurm_waits(log_text: str, job_ids: Iterable[str]) -> Dict[str, float]:
    """Seconds each job waited in slurmctld between its submission and its allocation, from slurmctld's log.

    Slurm does not always schedule a batch job when it is submitted: with the default ``batch_sched_delay`` (3 s) it
    may wait for the next scheduling pass, anywhere from a few milliseconds to about 3 s. Two paths measured side by
    side draw that wait at random, so it is reported beside each path's time rather than hidden in it.
    """
    return {j: round(allocated - submitted, 3) for j, (submitted, allocated) in slurm_times(log_text, job_ids).items()}


def slurm_times(log_text: str, job_ids: Iterable[str]) -> Dict[str, Tuple[float, float]]:
    """When slurmctld received each job's submission and when it allocated its nodes (epoch seconds, from its log's
    millisecond time stamps); only jobs with both."""
    wanted, submitted, allocated = {str(j) for j in job_ids}, {}, {}
    for line in log_text.splitlines():
        m = SLURM_LOG_RE.match(line)
        if not m or m.group(2) not in wanted:
            continue
        at = datetime.fromisoformat(m.group(1)).timestamp()
        if "submit" in line:
            submitted[m.group(2)] = at
        else:
            allocated.setdefault(m.group(2), at)
    return {j: (submitted[j], allocated[j]) for j in wanted if j in submitted and j in allocated}


def wait_slurm_idle(bed: Bed, timeout: float = 60.0) -> float:
    """Wait until Slurm's queue is empty and every node is idle -> seconds waited.

    A cancelled job's node stays COMPLETING until the job's last process is gone (a desktop takes seconds to end), and
    a job submitted meanwhile waits for it: a benchmark that starts the next job at once measures the last job's end,
    not the new job's scheduling. Raises after ``timeout`` s."""
    started = time.monotonic()
    while True:
        queue = bed.slurm(["squeue", "-h", "-o", "%i"], check=False).stdout.strip()
        states = bed.slurm(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
        if not queue and states and all(state == "idle" for state in states):
            return round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"Slurm not idle after {timeout:.0f} s: queue {queue!r}, nodes {states}")
        time.sleep(0.1)


def slurm_log(bed: Bed) -> str:
    try:
        return (bed.root / "slurm" / "slurmctld.log").read_text(errors="replace")
    except OSError:
        return ""


def add_slurm_waits(bed: Bed, rnd: Dict[str, Any]) -> None:
    """Each path's Slurm wait (``slurm_wait_s``) in a round with ``bare`` and ``isession`` results (``job_id``,
    ``seconds``), and the round's ``ratio_without_slurm_wait`` when both are known."""
    b, s = rnd["bare"], rnd["isession"]
    waits = slurm_waits(slurm_log(bed), [b.get("job_id"), s.get("job_id")])
    b["slurm_wait_s"], s["slurm_wait_s"] = waits.get(str(b.get("job_id"))), waits.get(str(s.get("job_id")))
    if b["slurm_wait_s"] is not None and s["slurm_wait_s"] is not None:
        rnd["ratio_without_slurm_wait"] = round((s["seconds"] - s["slurm_wait_s"]) / (b["seconds"] - b["slurm_wait_s"]),
                                                3)


def slurm_wait_stats(rounds: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The summary entries of :func:`add_slurm_waits` over measured rounds."""
    return {
        "slurm_wait_bare_s": stats(r["bare"]["slurm_wait_s"] for r in rounds
                                   if r["bare"].get("slurm_wait_s") is not None),
        "slurm_wait_isession_s": stats(r["isession"]["slurm_wait_s"] for r in rounds
                                       if r["isession"].get("slurm_wait_s") is not None),
        "ratio_without_slurm_wait": stats(r["ratio_without_slurm_wait"] for r in rounds
                                          if "ratio_without_slurm_wait" in r),
    }


def first_at(history: Sequence[dict], step: str) -> Optional[float]:
    """The time ``step`` was first entered in a state.json history."""
    for item in history or []:
        if item.get("step") == step:
            return float(item["at"])
    return None


# ---------------------------------------------------------------------------------------------- processes, memory
def read_proc(pid: int) -> Optional[Dict[str, Any]]:
    """ppid, pgid, state, comm, cmdline and cwd of ``pid`` (None when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return {"pid": pid, "state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]), "comm": comm,
            "cmd": cmd, "cwd": cwd}


def proc_table() -> Dict[int, Dict[str, Any]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info and info["state"] not in ("Z", "X"):
                table[int(entry)] = info
    return table


def descendants(table: Dict[int, Dict[str, Any]], root: int) -> List[int]:
    """``root`` and every process below it."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(p for p, info in table.items() if info["ppid"] == pid)
    return out


def parse_smaps_rollup(text: str) -> Dict[str, int]:
    """``{"Rss": kB, "Pss": kB, ...}`` from /proc/PID/smaps_rollup."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def memory_kb(pids: Iterable[int]) -> Dict[str, int]:
    """Summed Pss and Rss (kB) of ``pids`` (processes that vanished count 0)."""
    pss = rss = 0
    for pid in pids:
        try:
            roll = parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
        except OSError:
            continue
        pss += roll.get("Pss", 0)
        rss += roll.get("Rss", 0)
    return {"pss_kb": pss, "rss_kb": rss}


def session_pids(table: Dict[int, Dict[str, Any]], marker: str) -> List[int]:
    """Processes whose cwd or command line mention ``marker`` (a session id or directory)."""
    return sorted(pid for pid, info in table.items() if marker in info["cmd"] or marker in info["cwd"])


SS_USER_RE = re.compile(r"pid=(\d+)")


def parse_ss_listeners(text: str) -> Dict[int, List[int]]:
    """``ss -Hltnp`` output -> {local port: [pids]}."""
    out: Dict[int, List[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local = parts[3]
        port = local.rsplit(":", 1)[-1]
        if not port.isdigit():
            continue
        pids = [int(p) for p in SS_USER_RE.findall(line)]
        out.setdefault(int(port), []).extend(pids)
    return out


def listeners(bed: Bed, host: str) -> Dict[int, List[int]]:
    return parse_ss_listeners(bed.run(host, ["ss", "-Hltnp"], check=True).stdout)


# ---------------------------------------------------------------------------------------------- the bed's users
def chown_tree(top: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, _dirs, files in os.walk(top):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)


def cluster_inventory(bed: Bed, directory: Path) -> Path:
    """The bed inventory with the controller described as a Slurm resource (as the session tests do)."""
    text = bed.inventory_path.read_text().replace(
        "controller ansible_host=10.199.77.20 ansible_user=cluser",
        "controller ansible_host=10.199.77.20 ansible_user=cluser isession_scheduler=slurm "
        "isession_workspace_address=10.199.77.10 isession_workspace_user=wsuser isession_tunnel_via=direct")
    if "isession_workspace_address" not in text:
        raise RuntimeError("the bed inventory changed shape: cannot describe the controller as a resource")
    return bed.write_user_file(WS_USER, directory / "inventory.ini", text, mode=0o644)


class Cli:
    """``isession`` as ``wsuser`` in the workspace: a private copy of src/isession, its own session root."""

    def __init__(self, bed: Bed, tmp: Path, root_name: str, inventory: Optional[Path]) -> None:
        self.bed = bed
        src = tmp / "src"
        if not src.exists():
            shutil.copytree(REPO / "src" / "isession", src / "isession", ignore=shutil.ignore_patterns("__pycache__"))
            chown_tree(src, WS_USER)
        self.root = tmp / root_name
        self.env = {"PYTHONPATH": str(src), "ISESSION_COLLECTIONS": str(bed.collections_path),
                    "ISESSION_ROOT": str(self.root), "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False"}
        if inventory:
            self.env["ISESSION_INVENTORY"] = str(inventory)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.bed.run("workspace", [str(self.bed.venv / "bin" / "python"), "-m", "isession", *args],
                            user=WS_USER, env=self.env, timeout=timeout)

    def timed(self, *args: str, timeout: float = 600) -> Dict[str, Any]:
        """Run and time one command: ``{t0, t1, seconds, rc, stdout, stderr}`` (epoch seconds)."""
        t0 = time.time()
        cp = self.run(*args, timeout=timeout)
        t1 = time.time()
        return {"t0": t0, "t1": t1, "seconds": round(t1 - t0, 4), "rc": cp.returncode, "stdout": cp.stdout,
                "stderr": cp.stderr}

    def read(self, sid: str, name: str) -> Dict[str, Any]:
        try:
            return json.loads((self.root / sid / name).read_text())
        except (OSError, ValueError):
            return {}

    def watcher_pid(self) -> Optional[int]:
        """The pid of the watcher that holds this root's pid-file lock (the collection's own check,
        ``_watcher_pid.watcher_pid``); None when no watcher holds it: a pid file left by a dead watcher may name a
        process that reused its pid, which must not be signalled. (-1, a watcher whose pid is not written yet, is
        None here too: ``os.kill(-1, ...)`` would signal every process.)"""
        pid = _watcher_pid().watcher_pid(str(self.root))
        return pid if pid and pid > 0 else None

    def use_standby(self, seconds: float) -> None:
        """Starts with ``ISESSION_STANDBY`` (isession.standby): each leaves the next start's play waiting."""
        self.env["ISESSION_STANDBY"] = str(seconds)

    def end_standbys(self) -> None:
        """Ask the waiting standby of this root to end (only the user's own processes may)."""
        code = "import sys; from pathlib import Path; from isession import standby; standby.retire(Path(sys.argv[1]))"
        self.bed.run("workspace", [str(self.bed.venv / "bin" / "python"), "-c", code, str(self.root)], user=WS_USER,
                     env=self.env, timeout=60)

    def stop_watcher(self) -> None:
        pid = self.watcher_pid()
        if pid:
            try:
                os.kill(pid, 15)
            except OSError:
                pass


def _watcher_pid() -> Any:
    """The collection's ``_watcher_pid`` module, loaded from this checkout (it needs nothing but the standard
    library, so no collection loader)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("isession_bench_watcher_pid",
                                                  REPO / "plugins" / "module_utils" / "_watcher_pid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_results(out: Path, results: Any, text: str) -> None:
    """Write a benchmark's results (``out``, JSON) and its table (the same name with ``.txt``); print the table and
    where the results are."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.with_suffix(".txt").write_text(text)
    print(text)
    print(f"results: {out}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> Dict[str, Any]:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 1048576, 1), "loadavg_at_start": load,
            "kernel": os.uname().release, "python": sys.version.split()[0]}
