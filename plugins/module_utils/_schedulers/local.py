# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``local``: run the script detached on this host (``setsid``), no scheduler.

The job id is the process group id (= the wrapper's pid). A record ``<state_dir>/<id>.json``
keeps name, user, script and the wrapper's start time (from ``/proc/<id>/stat``, so a reused
pid is not mistaken for the job). The wrapper — a constant ``sh -c`` program whose data comes
in as positional arguments, never interpolated — runs the script and writes its exit status to
``<id>.status``; ``cancel`` writes ``<id>.cancelled`` and signals the group (TERM, then KILL).
States: running (group leader alive), completed/failed (status file), cancelled (marker),
failed (died without a status, e.g. killed), absent (no record: ``found: false``).

Pids are reused (``pid_max`` is often 32768), so a job id comes back: the marker holds the start time of the job it
cancelled and counts only for that job, and a submit removes a marker an earlier job with the same id left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import Runner
from ansible_collections.hpc.interactive.plugins.module_utils._proc import start_time as proc_start_time
from ansible_collections.hpc.interactive.plugins.module_utils._proc import stat_fields
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import (
    DEFAULT_QUERY_TIMEOUT,
    Backend,
    JobInfo,
    JobOptions,
    QueryResult,
    undetermined,
)

WRAPPER = ('st="$1"; out="$2"; err="$3"; shift 3; '
           '"$@" >>"$out" 2>>"$err" </dev/null; rc=$?; echo "$rc" >"$st.tmp" && mv -f "$st.tmp" "$st"')


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "hpc-interactive", "local-jobs")


def group_members(pgid: int, proc_root: str = "/proc") -> List[int]:
    """Live (non-zombie) processes of process group ``pgid``: the job's leader may be gone, its children not."""
    members = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return members
    for entry in entries:
        if entry.isdigit():
            fields = stat_fields(entry, proc_root)
            if fields is not None and fields[2] == str(pgid):
                members.append(int(entry))
    return sorted(members)


class Local(Backend):
    name = "local"
    prefix = ""
    cd_in_body = True

    def __init__(self, state_dir: Optional[str] = None, proc_root: str = "/proc", hostname: Optional[str] = None,
                 spawn: Optional[Callable[[List[str]], int]] = None,
                 kill: Optional[Callable[[int, int], None]] = None):
        self.state_dir = state_dir or default_state_dir()
        self.proc_root = proc_root
        self.hostname = hostname or os.uname()[1]
        self._spawn = spawn or _spawn_detached
        self._kill = kill or os.killpg

    def render_header(self, opts: JobOptions) -> List[str]:
        return []

    def directive_keys(self, directive: str) -> List[str]:
        return [directive.split("=", maxsplit=1)[0].split(" ", maxsplit=1)[0]]

    def submit_argv(self, script_path: str, output: str = "/dev/null", error: str = "/dev/null",
                    status: str = "") -> List[str]:
        return ["/bin/sh", "-c", WRAPPER, "hpc-interactive-local", status, output, error, script_path]

    def _path(self, job_id: str, suffix: str) -> str:
        return os.path.join(self.state_dir, "%s.%s" % (job_id, suffix))

    def submit(self, script_path: str, name: str, user: str, output: Optional[str] = None,
               error: Optional[str] = None) -> str:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp_status = self._path("run-%s" % os.urandom(8).hex(), "status")
        out = output or os.path.splitext(script_path)[0] + ".out"
        err = error or out
        pid = self._spawn(self.submit_argv(script_path, out, err, tmp_status))
        job_id = str(pid)
        record = {"job_id": job_id, "name": name, "user": user, "script_path": script_path,
                  "start_time": proc_start_time(job_id, self.proc_root), "status_file": tmp_status}
        final = self._path(job_id, "json")
        try:  # an earlier job with this pid was cancelled: its marker is not this job's
            os.unlink(self._path(job_id, "cancelled"))
        except FileNotFoundError:
            pass
        with open(final + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(final + ".tmp", final)
        return job_id

    def parse_submit(self, stdout: str) -> str:
        return stdout.strip()

    def cancel_argv(self, job_id: str) -> List[str]:
        return ["kill", "-TERM", "--", "-%s" % job_id]

    def _record(self, job_id: str) -> Optional[dict]:
        try:
            with open(self._path(job_id, "json"), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _cancelled(self, record: dict) -> bool:
        """A cancel marker written for this very job (its start time), not for an earlier job with the same pid."""
        try:
            with open(self._path(record["job_id"], "cancelled"), encoding="utf-8") as handle:
                return handle.read().strip() == str(record.get("start_time"))
        except OSError:
            return False

    def _alive(self, record: dict) -> bool:
        started = proc_start_time(record["job_id"], self.proc_root)
        return started is not None and started == record.get("start_time")

    def job_info(self, job_id: str) -> JobInfo:
        record = self._record(job_id)
        if record is None:
            return undetermined([job_id], "no record of a local job %s" % job_id)[job_id]
        info = JobInfo(job_id=job_id, name=record.get("name", ""), user=record.get("user", ""),
                       nodes=[self.hostname])
        if self._alive(record):
            info.state, info.raw_state = "running", "R"
            return info
        info.nodes = []
        try:
            with open(record.get("status_file") or self._path(job_id, "status"), encoding="utf-8") as handle:
                info.exit_code = int(handle.read().strip())
        except (OSError, ValueError):
            info.exit_code = None
        if self._cancelled(record):
            info.state, info.raw_state = "cancelled", "CANCELLED"
        elif info.exit_code is None:
            info.state, info.raw_state, info.reason = "failed", "DIED", "ended without an exit status (killed?)"
        else:
            info.state = "completed" if info.exit_code == 0 else "failed"
            info.raw_state = "EXITED"
        return info

    def query(self, runner: Optional[Runner] = None, job_ids: Optional[Sequence[str]] = None,
              name: Optional[str] = None, user: Optional[str] = None,
              timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        ids = [str(j) for j in job_ids or []]
        if not ids:
            try:
                ids = sorted(f[:-5] for f in os.listdir(self.state_dir) if f.endswith(".json"))
            except OSError:
                ids = []
        jobs: Dict[str, JobInfo] = {j: self.job_info(j) for j in ids}
        if name:
            jobs = {k: v for k, v in jobs.items() if v.name == name}
        return QueryResult(jobs)

    def cancel(self, runner: Optional[Runner] = None, job_id: str = "", timeout: float = 10.0):
        """Signal the job's whole process group: TERM, then KILL for whatever is left of it.

        Only a job whose leader is still the recorded process is signalled (a reused pid is not ours);
        once the leader is gone the group id cannot be reused while members live, so the group is
        followed until it is empty (a grandchild that ignores TERM gets KILL). Returns False when
        there was nothing to cancel.
        """
        record = self._record(job_id)
        if record is None or not self._alive(record):
            return False
        marker = self._path(job_id, "cancelled")
        with open(marker + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(str(record.get("start_time")))
        os.replace(marker + ".tmp", marker)
        pgid = int(job_id)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                self._kill(pgid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not group_members(pgid, self.proc_root):
                    return True
                time.sleep(0.05)
        return True


def _spawn_detached(argv: List[str]) -> int:
    """Start ``argv`` in a new session (its pid is the process group id), detached from our fds."""
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)
    return proc.pid
