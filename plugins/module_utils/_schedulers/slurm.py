# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Slurm: ``sbatch`` / ``squeue --json`` (fixed-format ``squeue -o`` fallback) / ``sacct`` / ``scancel``."""
from __future__ import annotations

import json
import re
import time
from typing import Any, Dict, List, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import Runner
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import (
    DEFAULT_QUERY_TIMEOUT,
    Backend,
    JobInfo,
    JobOptions,
    QueryResult,
    format_hms,
    describe_failure,
    looks_unreachable,
    unanswered,
    undetermined,
)
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._hostlist import expand

STATE_MAP = {
    "PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_FED": "queued",
    "REQUEUE_HOLD": "queued", "RESV_DEL_HOLD": "queued", "SUSPENDED": "queued", "STOPPED": "queued",
    "RUNNING": "running", "COMPLETING": "running", "SIGNALING": "running", "RESIZING": "running",
    "STAGE_OUT": "running", "COMPLETED": "completed", "TIMEOUT": "timeout", "CANCELLED": "cancelled",
    "FAILED": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
    "PREEMPTED": "failed", "DEADLINE": "failed", "SPECIAL_EXIT": "failed", "REVOKED": "failed",
}
# sbatch long options (getopt_long accepts unique prefixes, so user abbreviations are resolved here).
LONG_OPTIONS = (
    "account", "acctg-freq", "array", "batch", "bb", "begin", "chdir", "clusters", "comment", "constraint",
    "container", "contiguous", "core-spec", "cores-per-socket", "cpu-freq", "cpus-per-gpu", "cpus-per-task",
    "deadline", "delay-boot", "dependency", "distribution", "error", "exclude", "exclusive", "export",
    "get-user-env", "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task",
    "gres", "gres-flags", "hint", "hold", "ignore-pbs", "input", "job-name", "kill-on-invalid-dep", "licenses",
    "mail-type", "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus", "nice",
    "no-kill", "no-requeue", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu",
    "ntasks-per-node", "ntasks-per-socket", "open-mode", "output", "overcommit", "oversubscribe", "parsable",
    "partition", "power", "priority", "profile", "propagate", "qos", "quiet", "reboot", "requeue",
    "reservation", "signal", "sockets-per-node", "spread-job", "switches", "test-only", "thread-spec",
    "threads-per-core", "time", "time-min", "tmp", "uid", "use-min-nodes", "verbose", "wait", "wait-all-nodes",
    "wckey", "wrap",
)
SHORT_OPTIONS = {
    "A": "account", "a": "array", "b": "begin", "D": "chdir", "M": "clusters", "C": "constraint",
    "S": "core-spec", "d": "dependency", "m": "distribution", "e": "error", "x": "exclude", "G": "gpus",
    "H": "hold", "i": "input", "J": "job-name", "k": "no-kill", "L": "licenses", "w": "nodelist",
    "F": "nodefile", "N": "nodes", "n": "ntasks", "o": "output", "O": "overcommit", "s": "oversubscribe",
    "p": "partition", "q": "qos", "Q": "quiet", "t": "time", "c": "cpus-per-task", "W": "wait",
}
NO_ARG_SHORT = set("HkOsQW")
CONFLICT_GROUPS = ({"mem", "mem-per-cpu", "mem-per-gpu"}, {"gpus", "gpus-per-node", "gpus-per-task", "gres"})
LIMIT_KEYS = {"time": "time", "partition": "queue", "nodes": "nodes", "cpus-per-task": "cpus_per_task",
              "mem": "memory", "gpus": "gpus"}
SQUEUE_FORMAT = "%i|%T|%u|%N|%r|%j"  # name last: a '|' in a foreign job's name cannot shift columns
# every waiting job: id, partition(s), priority, submit time, the backfill scheduler's expected start (or N/A)
PENDING_FORMAT = "%i|%P|%Q|%V|%S"


class SchedulerUnreachable(Exception):
    """squeue answered, but says it could not load jobs from slurmctld."""


def _canon_long(name: str) -> str:
    if name in LONG_OPTIONS:
        return name
    matches = [opt for opt in LONG_OPTIONS if opt.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def split_directive(directive: str):
    """``--time=5`` / ``--time 5`` / ``-t 5`` / ``-t5`` -> (canonical long name, value or '')."""
    text = directive.strip()
    if text.startswith("--"):
        body = text[2:]
        name, sep, value = body.partition("=")
        if not sep:
            name, _sep, value = body.partition(" ")
        return _canon_long(name.strip()), value.strip()
    letter = text[1:2]
    rest = text[2:].strip()
    return SHORT_OPTIONS.get(letter, "-" + letter), ("" if letter in NO_ARG_SHORT else rest)


def _number(value: Any) -> Optional[int]:
    """Plain ints and the newer ``{"set": true, "number": N}`` shape."""
    if isinstance(value, dict):
        if value.get("set") is False or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def map_state(raw: str) -> str:
    base = (raw or "").split()[0].rstrip("+") if raw else ""
    return STATE_MAP.get(base.upper(), "undetermined")


class Slurm(Backend):
    name = "slurm"
    prefix = "#SBATCH"

    def render_header(self, opts: JobOptions) -> List[str]:
        out: List[str] = []
        pairs = (
            ("job-name", opts.job_name), ("chdir", opts.workdir), ("output", opts.output), ("error", opts.error),
            ("partition", opts.queue), ("account", opts.account), ("qos", opts.qos),
            ("reservation", opts.reservation), ("constraint", opts.constraint),
            ("time", self.format_time(opts.walltime_seconds) if opts.walltime_seconds else None),
            ("nodes", opts.nodes), ("ntasks", opts.ntasks), ("cpus-per-task", opts.cpus_per_task),
            ("mem", "%dM" % opts.memory_mb if opts.memory_mb else None), ("gpus", opts.gpus),
        )
        out.extend("--%s=%s" % (key, val) for key, val in pairs if val is not None)
        if opts.exclusive:
            out.append("--exclusive")
        return out

    @staticmethod
    def format_time(seconds: int) -> str:
        days, rest = divmod(seconds, 86400)
        return ("%d-%s" % (days, format_hms(rest))) if days else format_hms(rest)

    def directive_keys(self, directive: str) -> List[str]:
        return [split_directive(directive)[0]]

    def conflicts(self, user_key: str, enforced_key: str) -> bool:
        if user_key == enforced_key:
            return True
        if user_key not in LONG_OPTIONS and not user_key.startswith("-") and enforced_key.startswith(user_key):
            return True  # an ambiguous abbreviation of the enforced option: drop it too
        return any(user_key in group and enforced_key in group for group in CONFLICT_GROUPS)

    def effective_values(self, directives: Sequence[str]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for directive in directives:
            key, value = split_directive(directive)
            if key in LIMIT_KEYS:
                out[LIMIT_KEYS[key]] = value
        return out

    def submit_argv(self, script_path: str) -> List[str]:
        return ["sbatch", "--parsable", script_path]

    def parse_submit(self, stdout: str) -> str:
        for line in (stdout or "").splitlines():
            match = re.match(r"^(?:Submitted batch job )?(\d+)(?:;\S+)?\s*$", line.strip())
            if match:
                return match.group(1)
        raise ValueError("no job id in sbatch output: %r" % (stdout,))

    def ending(self, info: JobInfo) -> bool:
        return not info.alive or "COMPLETING" in info.raw_state.upper()

    def cancel_argv(self, job_id: str) -> List[str]:
        return ["scancel", str(job_id)]

    # --- queries ---------------------------------------------------------------------------
    def query_argv(self, job_ids=None, name=None, user=None, json_output=True) -> List[str]:
        argv = ["squeue", "--json"] if json_output else ["squeue", "-h", "-o", SQUEUE_FORMAT]
        argv.append("--states=all")
        if job_ids:
            argv.append("--jobs=" + ",".join(str(j) for j in job_ids))
        if name:
            argv.append("--name=" + name)
        if user:
            argv.append("--user=" + user)
        return argv

    def parse_query(self, stdout: str) -> Dict[str, JobInfo]:
        """``squeue --json`` output (v0.0.38 and newer shapes)."""
        data = json.loads(stdout)
        errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
        if errors:  # 22.05 exits 0 with no jobs and this list when slurmctld cannot be reached
            raise SchedulerUnreachable("; ".join(
                "%s: %s" % (e.get("source", ""), e.get("description") or e.get("error", "")) for e in errors))
        jobs: Dict[str, JobInfo] = {}
        for job in data.get("jobs", []):
            raw = job.get("job_state")
            states = raw if isinstance(raw, list) else [raw or ""]
            raw_state = ",".join(str(s) for s in states)
            state = map_state(states[0] if states else "")
            if "REQUEUED" in states[1:] or "CONFIGURING" in states[1:]:
                state = "queued" if state == "running" and "REQUEUED" in states[1:] else state
            job_id = str(_number(job.get("job_id")))
            exit_code = job.get("exit_code")
            if isinstance(exit_code, dict):
                code = _number(exit_code.get("return_code"))
            else:
                code = _number(exit_code)
                code = None if code is None else (code >> 8 if code > 255 else code)
            jobs[job_id] = JobInfo(
                job_id=job_id, state=state, raw_state=raw_state, nodes=expand(job.get("nodes") or ""),
                reason=str(job.get("state_reason") or "").replace("None", ""),
                exit_code=code if state in ("completed", "failed", "timeout", "cancelled") else None,
                name=str(job.get("name") or ""), user=str(job.get("user_name") or ""),
            )
        return jobs

    def parse_text(self, stdout: str) -> Dict[str, JobInfo]:
        """``squeue -h -o SQUEUE_FORMAT`` output; lines that do not fit are skipped (headers, notices)."""
        jobs: Dict[str, JobInfo] = {}
        for line in (stdout or "").splitlines():
            parts = line.strip().split("|", 5)
            if len(parts) != 6 or not re.match(r"^\d+(_\d+)?$", parts[0]):
                continue
            job_id, raw, user, nodes, reason, name = parts
            jobs[job_id] = JobInfo(job_id=job_id, state=map_state(raw), raw_state=raw, nodes=expand(nodes),
                                   reason="" if reason == "None" else reason, name=name, user=user)
        return jobs

    def parse_sacct(self, stdout: str) -> Dict[str, JobInfo]:
        """``sacct -n -P -X -o JobIDRaw,JobName,State,ExitCode,NodeList,User``."""
        jobs: Dict[str, JobInfo] = {}
        for line in (stdout or "").splitlines():
            parts = line.split("|")
            if len(parts) < 6 or not parts[0].isdigit():
                continue
            job_id, name, raw, exit_code, nodes, user = parts[:6]
            code = exit_code.split(":")[0]
            jobs[job_id] = JobInfo(job_id=job_id, state=map_state(raw), raw_state=raw, nodes=expand(nodes),
                                   exit_code=int(code) if code.isdigit() else None, name=name, user=user)
        return jobs

    def query(self, runner: Runner, job_ids: Optional[Sequence[str]] = None, name: Optional[str] = None,
              user: Optional[str] = None, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        ids = [str(j) for j in job_ids or []]
        result = runner(self.query_argv(ids, name, user), timeout)
        if looks_unreachable(result):
            return unanswered(ids, describe_failure(result))
        jobs: Optional[Dict[str, JobInfo]] = None
        if result.rc == 0:
            try:
                jobs = self.parse_query(result.stdout)
            except SchedulerUnreachable as exc:
                return unanswered(ids, str(exc))
            except (ValueError, AttributeError, TypeError):
                jobs = None
        elif "invalid job id" in result.stderr.lower():
            jobs = {}
        if jobs is None:  # no --json support (or unparseable): the fixed-format fallback
            result = runner(self.query_argv(ids, name, user, json_output=False), timeout)
            if looks_unreachable(result) or (result.rc != 0 and "invalid job id" not in result.stderr.lower()):
                return unanswered(ids, describe_failure(result))
            jobs = self.parse_text(result.stdout) if result.rc == 0 else {}
        # squeue --json (22.05) ignores --jobs/--name/--user: filter here, for both formats.
        if name:
            jobs = {k: v for k, v in jobs.items() if v.name == name}
        if user:
            jobs = {k: v for k, v in jobs.items() if v.user == user}
        if ids:
            missing = [j for j in ids if j not in jobs]
            jobs = {j: jobs[j] for j in ids if j in jobs}
            if missing:
                jobs.update(self._final_states(runner, missing, timeout))
        return QueryResult(jobs)

    def poll(self, runner: Runner, job_ids: Sequence[str], timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        """The watcher's every-tick question: fixed-format ``squeue --jobs`` first, ``query`` for anything else.

        ``squeue --json`` (22.05) ignores ``--jobs`` and describes every job in the cluster, which the watcher would
        ask for twice a second while sessions wait in a long queue. The fixed format lists only the jobs asked for.
        It carries no exit code and shows an ending job as ``COMPLETING`` whatever its end (a walltime, a failure),
        so it settles the answer only while each job is plainly ``PENDING`` or ``RUNNING``; otherwise ``query``
        asks again (JSON, then sacct), as it does for ``scheduler_job_info``.
        """
        ids = [str(j) for j in job_ids]
        if not ids:
            return QueryResult({})
        result = runner(self.query_argv(ids, json_output=False), timeout)
        if looks_unreachable(result):
            return unanswered(ids, describe_failure(result))
        jobs = self.parse_text(result.stdout) if result.rc == 0 else {}
        if all(j in jobs and jobs[j].raw_state in ("PENDING", "RUNNING") for j in ids):
            return QueryResult({j: jobs[j] for j in ids})
        return self.query(runner, job_ids=ids, timeout=timeout)

    def pending_argv(self) -> List[str]:
        return ["squeue", "-h", "--states=PENDING", "-o", PENDING_FORMAT]

    @staticmethod
    def parse_pending(stdout: str, job_ids: Sequence[str]) -> Dict[str, Dict[str, Optional[int]]]:
        """Position, count and expected start of ``job_ids`` among all waiting jobs of their partitions.

        Slurm starts waiting jobs of a partition by priority, then by submit time (then id); that order is the
        position. ``%S`` is the controller's local time, which ``time.mktime`` reads as this host's local time (the
        module runs on the controller).
        """
        rows = []
        for line in (stdout or "").splitlines():
            parts = line.strip().split("|")
            if len(parts) != 5 or not re.match(r"^\d+(_\d+)?$", parts[0]):
                continue
            job_id, partition, priority, submitted, start = parts
            rows.append((job_id, partition, int(priority) if priority.isdigit() else 0, submitted, start))
        out: Dict[str, Dict[str, Optional[int]]] = {}
        for job_id in job_ids:
            mine = [r for r in rows if r[0] == str(job_id)]
            if not mine:
                continue
            partition, start = mine[0][1], mine[0][4]
            waiting = sorted((r for r in rows if r[1] == partition),
                             key=lambda r: (-r[2], r[3], int(r[0].split("_")[0])))
            position = [r[0] for r in waiting].index(str(job_id)) + 1
            try:
                start_time: Optional[int] = int(time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")))
            except ValueError:  # N/A, Unknown: no estimate yet
                start_time = None
            out[str(job_id)] = {"queue_position": position, "queue_pending": len(waiting), "start_time": start_time}
        return out

    def queue_details(self, runner: Runner, job_ids: Sequence[str],
                      timeout: float = DEFAULT_QUERY_TIMEOUT) -> Dict[str, Dict[str, Optional[int]]]:
        result = runner(self.pending_argv(), timeout)
        if result.rc != 0 or looks_unreachable(result):
            return {}
        return self.parse_pending(result.stdout, job_ids)

    def _final_states(self, runner: Runner, ids: List[str], timeout: float) -> Dict[str, JobInfo]:
        """Jobs squeue no longer knows: ask sacct (needs accounting); otherwise absent."""
        argv = ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobIDRaw,JobName,State,ExitCode,NodeList,User"]
        result = runner(argv, timeout)
        found = self.parse_sacct(result.stdout) if result.rc == 0 and not result.timed_out else {}
        reason = "not in squeue; " + ("not in sacct" if result.rc == 0 else "sacct unavailable")
        out = {j: found[j] for j in ids if j in found}
        out.update(undetermined([j for j in ids if j not in found], reason))
        return out
