# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Grid Engine (SGE / Son of Grid Engine / OGS): ``qsub -terse`` / ``qstat -xml`` / ``qdel``.

``qstat`` lists pending and running jobs only; a job it no longer lists is reported absent
(``found: false``, ``undetermined``) — finished-job accounting (``qacct``) is not consulted.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: S405 - output of the local qstat
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


def map_state(raw: str) -> str:
    """SGE state letters: ``qw hqw Eqw r t Rr dr s S T`` ..."""
    code = (raw or "").strip()
    if not code:
        return "undetermined"
    if "E" in code:
        return "failed"
    if "d" in code:
        return "cancelled" if "r" not in code and "t" not in code else "running"
    if "r" in code or "t" in code:
        return "running" if "s" not in code.lower().replace("r", "") else "queued"
    if "q" in code or "h" in code or "s" in code.lower() or "w" in code:
        return "queued"
    return "undetermined"


def parse_xml(stdout: str) -> Dict[str, JobInfo]:
    root = ET.fromstring(stdout)  # noqa: S314
    jobs: Dict[str, JobInfo] = {}
    for job in root.iter("job_list"):
        fields = {child.tag: (child.text or "").strip() for child in job}
        job_id = fields.get("JB_job_number", "")
        if not job_id:
            continue
        queue = fields.get("queue_name", "")
        raw = fields.get("state", "")
        jobs[job_id] = JobInfo(
            job_id=job_id, state=map_state(raw), raw_state=raw,
            nodes=[queue.split("@", 1)[1].split(".")[0]] if "@" in queue else [],
            name=fields.get("JB_name", ""), user=fields.get("JB_owner", ""),
            reason=job.get("state", ""),
        )
    return jobs


class Sge(Backend):
    name = "sge"
    prefix = "#$"

    def render_header(self, opts: JobOptions) -> List[str]:
        # one slot on one host is what a plain job gets; more needs the site's parallel environment
        more = [name for name, value in (("nodes", opts.nodes), ("ntasks", opts.ntasks),
                                         ("cpus_per_task", opts.cpus_per_task)) if (value or 1) > 1]
        more += [name for name, value in (("gpus", opts.gpus), ("qos", opts.qos), ("constraint", opts.constraint))
                 if value]
        if more:
            raise ValueError("%s: depend on the site's parallel environments and complexes in Grid Engine; use "
                             "directives instead (e.g. '-pe smp 4', '-l gpu=1')" % ", ".join(more))
        out = ["-S /bin/bash"]
        for flag, value in (("-N", opts.job_name), ("-wd", opts.workdir), ("-o", opts.output), ("-e", opts.error),
                            ("-q", opts.queue), ("-P", opts.account), ("-ar", opts.reservation)):
            if value is not None:
                out.append("%s %s" % (flag, value))
        if opts.output is not None and opts.error is None:
            out.append("-j y")  # stderr into the output file, as Slurm does without --error
        if opts.walltime_seconds:
            out.append("-l h_rt=%s" % format_hms(opts.walltime_seconds))
        if opts.memory_mb:
            out.append("-l h_vmem=%dM" % opts.memory_mb)
        if opts.exclusive:
            out.append("-l exclusive=true")
        return out

    def directive_keys(self, directive: str) -> List[str]:
        flag, _sep, value = directive.strip().partition(" ")
        if flag in ("-l", "-hard", "-soft") and value:
            return ["-l " + item.split("=")[0] for item in value.split(",")]
        return [flag]

    def effective_values(self, directives: Sequence[str]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for directive in directives:
            flag, _sep, value = directive.strip().partition(" ")
            if flag == "-q":
                out["queue"] = value
            if flag == "-l":
                for item in value.split(","):
                    key, _sep, val = item.partition("=")
                    if key in ("h_rt", "s_rt"):
                        out["time"] = val
                    if key in ("h_vmem", "mem_free"):
                        out["memory"] = val
        return out

    def submit_argv(self, script_path: str) -> List[str]:
        return ["qsub", "-terse", script_path]

    def parse_submit(self, stdout: str) -> str:
        for line in (stdout or "").splitlines():
            match = re.match(r"^(?:Your job )?(\d+)", line.strip())
            if match:
                return match.group(1)
        raise ValueError("no job id in qsub output: %r" % (stdout,))

    def ending(self, info: JobInfo) -> bool:
        return not info.alive or "d" in info.raw_state  # deletion registered ("dr", "dt")

    def cancel_argv(self, job_id: str) -> List[str]:
        return ["qdel", str(job_id)]

    def query_argv(self, user: Optional[str] = None) -> List[str]:
        return ["qstat", "-xml", "-u", user or "*"]

    def query(self, runner: Runner, job_ids: Optional[Sequence[str]] = None, name: Optional[str] = None,
              user: Optional[str] = None, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        ids = [str(j) for j in job_ids or []]
        result = runner(self.query_argv(user), timeout)
        if looks_unreachable(result) or result.rc != 0:
            return unanswered(ids, describe_failure(result))
        try:
            jobs = parse_xml(result.stdout)
        except ET.ParseError as exc:
            return QueryResult(undetermined(ids, "unparseable qstat output: %s" % exc), False, str(exc))
        if name:
            jobs = {k: v for k, v in jobs.items() if v.name == name}
        if ids:
            out = {j: jobs[j] for j in ids if j in jobs}
            out.update(undetermined([j for j in ids if j not in jobs], "not listed by qstat"))
            return QueryResult(out)
        return QueryResult(jobs)
