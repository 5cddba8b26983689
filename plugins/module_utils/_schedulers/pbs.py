# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PBS: ``qsub`` / ``qstat`` / ``qdel`` for PBS Pro / OpenPBS, Torque and Slurm's torque wrappers.

Queries ask ``qstat -f -F json -x IDS`` first (PBS Pro: structured, ``-x`` includes finished
jobs). Where that is refused (Torque, Slurm's wrapper: unknown ``-F``), the fixed text of
``qstat -f IDS`` is parsed. Torque's ``qstat -x`` XML is parsed too when given (``parse_query``
detects the format). Slurm's wrapper prints ``C`` for every ended job without an exit status:
that is reported as ``completed`` with ``exit_code`` unknown.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET  # noqa: S405 - output of the local qstat, not untrusted network input
from typing import Dict, List, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import Runner
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import (
    DEFAULT_QUERY_TIMEOUT,
    Backend,
    JobInfo,
    JobOptions,
    QueryResult,
    describe_failure,
    format_hms,
    looks_unreachable,
    unanswered,
    undetermined,
)
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._hostlist import exec_hosts

STATE_MAP = {"Q": "queued", "H": "queued", "W": "queued", "T": "queued", "S": "queued", "U": "queued",
             "M": "queued", "R": "running", "E": "running", "B": "running"}
# PBS Pro exit statuses with a meaning of their own (JOB_EXEC_* and signal + 256).
EXIT_WALLTIME = (-29,)
EXIT_KILLED = (271, 265, 143)  # SIGTERM/SIGKILL by qdel (256+15, 256+9, 128+15)
LIMIT_RESOURCES = {"walltime": "time", "mem": "memory", "nodes": "nodes", "ngpus": "gpus"}
_ID = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?$")


def map_state(raw: str, exit_status: Optional[int] = None, comment: str = "") -> str:
    code = (raw or "").strip().upper()[:1]
    if code in STATE_MAP:
        return STATE_MAP[code]
    if code in ("F", "C", "X"):
        if exit_status is None:
            return "completed"
        if exit_status == 0:
            return "completed"
        if exit_status in EXIT_WALLTIME or "walltime" in comment.lower():
            return "timeout"
        if exit_status in EXIT_KILLED or "deleted" in comment.lower():
            return "cancelled"
        return "failed"
    return "undetermined"


def short_id(job_id: str) -> str:
    """``123.server`` -> ``123`` (the key users pass back)."""
    return str(job_id).split(".", maxsplit=1)[0]


def _int(value) -> Optional[int]:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _info(job_id: str, attrs: Dict[str, str]) -> JobInfo:
    exit_status = _int(attrs.get("Exit_status", attrs.get("exit_status")))
    comment = str(attrs.get("comment", ""))
    raw = str(attrs.get("job_state", ""))
    owner = str(attrs.get("Job_Owner", "")).split("@", maxsplit=1)[0]
    euser = str(attrs.get("euser", "")).split("(", maxsplit=1)[0]
    return JobInfo(
        job_id=short_id(job_id), state=map_state(raw, exit_status, comment), raw_state=raw,
        nodes=exec_hosts(str(attrs.get("exec_host", ""))), reason=comment, exit_code=exit_status,
        name=str(attrs.get("Job_Name", "")), user=owner or euser,
    )


def parse_json(stdout: str) -> Dict[str, JobInfo]:
    data = json.loads(stdout)
    jobs: Dict[str, JobInfo] = {}
    for job_id, attrs in (data.get("Jobs") or {}).items():
        info = _info(job_id, {k: v for k, v in attrs.items() if not isinstance(v, dict)})
        jobs[info.job_id] = info
    return jobs


def parse_text(stdout: str) -> Dict[str, JobInfo]:
    """``qstat -f`` text: ``Job Id: X`` blocks of ``key = value``; tab-indented continuation lines."""
    jobs: Dict[str, JobInfo] = {}
    current: Optional[str] = None
    attrs: Dict[str, str] = {}
    last_key = ""

    def flush() -> None:
        if current is not None:
            info = _info(current, attrs)
            jobs[info.job_id] = info

    for line in (stdout or "").splitlines():
        match = re.match(r"^Job Id:\s*(\S+)", line)
        if match:
            flush()
            current, attrs, last_key = match.group(1), {}, ""
            continue
        if current is None or not line.strip():
            continue
        kv = re.match(r"^\s+([A-Za-z_][\w.]*)\s=\s?(.*)$", line)
        if kv:
            last_key = kv.group(1)
            attrs[last_key] = kv.group(2).strip()
        elif last_key and line.startswith("\t"):
            attrs[last_key] += line.strip()
    flush()
    return jobs


def parse_xml(stdout: str) -> Dict[str, JobInfo]:
    """Torque ``qstat -x``: ``<Data><Job><Job_Id>..</Job_Id><job_state>..`` ."""
    root = ET.fromstring(stdout)  # noqa: S314
    jobs: Dict[str, JobInfo] = {}
    for job in root.iter("Job"):
        attrs = {child.tag: (child.text or "") for child in job}
        info = _info(attrs.get("Job_Id", ""), attrs)
        jobs[info.job_id] = info
    return jobs


class Pbs(Backend):
    name = "pbs"
    prefix = "#PBS"
    cd_in_body = True  # qsub has no portable workdir directive: the script starts with ``cd WORKDIR``

    def __init__(self, flavor: str = "torque"):
        self.flavor = flavor  # how node/cpu/memory requests are written: "torque" (nodes=) or "pro" (select=)

    def render_header(self, opts: JobOptions) -> List[str]:
        out: List[str] = []
        for flag, value in (("-N", opts.job_name), ("-q", opts.queue), ("-A", opts.account),
                            ("-o", opts.output), ("-e", opts.error)):
            if value is not None:
                out.append("%s %s" % (flag, value))
        if opts.walltime_seconds:
            out.append("-l walltime=%s" % format_hms(opts.walltime_seconds))
        cpus = (opts.ntasks or 1) * (opts.cpus_per_task or 1)
        if self.flavor == "pro":
            chunk = "select=%d:ncpus=%d" % (opts.nodes or 1, cpus)
            if opts.memory_mb:
                chunk += ":mem=%dmb" % opts.memory_mb
            if opts.gpus:
                chunk += ":ngpus=%d" % opts.gpus
            if opts.nodes or opts.ntasks or opts.cpus_per_task or opts.memory_mb or opts.gpus:
                out.append("-l " + chunk)
            if opts.exclusive:
                out.append("-l place=excl")
        else:
            if opts.nodes or opts.ntasks or opts.cpus_per_task or opts.gpus:
                spec = "nodes=%d:ppn=%d" % (opts.nodes or 1, cpus)
                out.append("-l " + spec + (":gpus=%d" % opts.gpus if opts.gpus else ""))
            if opts.memory_mb:
                out.append("-l mem=%dmb" % opts.memory_mb)
            if opts.exclusive:
                out.append("-n")
        if opts.qos or opts.constraint or opts.reservation:
            raise ValueError("qos, constraint and reservation have no PBS equivalent here; use directives")
        return out

    def directive_keys(self, directive: str) -> List[str]:
        flag, _sep, value = directive.strip().partition(" ")
        if flag == "-l" or flag.startswith("-l") and len(flag) > 2:
            value = value if flag == "-l" else flag[2:]
            return ["-l " + item.split("=")[0].split(":")[0] for item in re.split(r"[,:]", value)
                    if "=" in item and not item.startswith(("ncpus", "mem", "ngpus", "ppn", "gpus"))
                    ] or ["-l"]
        return [flag[:2]]

    def effective_values(self, directives: Sequence[str]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for directive in directives:
            flag, _sep, value = directive.strip().partition(" ")
            if flag == "-q":
                out["queue"] = value.strip()
            if flag == "-l":
                for item in re.split(r"[,:]", value):
                    key, _sep, val = item.partition("=")
                    if key in LIMIT_RESOURCES:
                        out[LIMIT_RESOURCES[key]] = val
                    if key == "select":
                        out["nodes"] = val
        return out

    def submit_argv(self, script_path: str) -> List[str]:
        return ["qsub", script_path]

    def parse_submit(self, stdout: str) -> str:
        for line in (stdout or "").splitlines():
            if _ID.match(line.strip()):
                return short_id(line.strip())
        raise ValueError("no job id in qsub output: %r" % (stdout,))

    def ending(self, info: JobInfo) -> bool:
        return not info.alive or info.raw_state.strip().upper() == "E"  # exiting

    def cancel_argv(self, job_id: str) -> List[str]:
        return ["qdel", str(job_id)]

    def query_argv(self, job_ids=None, json_output=True) -> List[str]:
        argv = ["qstat", "-f", "-F", "json", "-x"] if json_output else ["qstat", "-f"]
        return argv + [str(j) for j in job_ids or []]

    def parse_query(self, stdout: str) -> Dict[str, JobInfo]:
        text = (stdout or "").lstrip()
        if text.startswith("{"):
            return parse_json(text)
        if text.startswith("<"):
            return parse_xml(text)
        return parse_text(text)

    def query(self, runner: Runner, job_ids: Optional[Sequence[str]] = None, name: Optional[str] = None,
              user: Optional[str] = None, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        ids = [short_id(j) for j in job_ids or []]
        jobs: Optional[Dict[str, JobInfo]] = None
        result = runner(self.query_argv(ids), timeout)
        if looks_unreachable(result):
            return unanswered(ids, describe_failure(result))
        if result.stdout.lstrip().startswith("{"):
            try:
                jobs = parse_json(result.stdout)
            except ValueError:
                jobs = None
        if jobs is None:
            result = runner(self.query_argv(ids, json_output=False), timeout)
            unknown_only = all("unknown job" in line.lower() for line in result.stderr.strip().splitlines())
            if looks_unreachable(result) or (result.rc != 0 and not unknown_only):
                return unanswered(ids, describe_failure(result))
            try:
                jobs = self.parse_query(result.stdout)
            except (ValueError, ET.ParseError) as exc:
                return QueryResult(undetermined(ids, "unparseable qstat output: %s" % exc), False, str(exc))
        if name:
            jobs = {k: v for k, v in jobs.items() if v.name == name}
        if user:
            jobs = {k: v for k, v in jobs.items() if not v.user or v.user == user}
        if ids:
            out = {j: jobs[j] for j in ids if j in jobs}
            out.update(undetermined([j for j in ids if j not in jobs], "not known to qstat"))
            return QueryResult(out)
        return QueryResult(jobs)
