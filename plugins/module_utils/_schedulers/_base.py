# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The interface every scheduler backend implements, and the types they share.

Private to the hpc.interactive collection. Standard library only. Backends are pure: they build
argv lists and parse output. Commands run through an injected :data:`_cmd.Runner`, so unit tests
replay recorded conversations.

State vocabulary (docs/design/sessions.md, "JOB_STATUS"): ``queued running completed failed
cancelled timeout undetermined``. ``found`` tells whether the scheduler (or its final-state
source) answered for the job: ``state == 'undetermined'`` with ``found == False`` and
``reachable == True`` means *absent* (the scheduler answered and does not know the job); with
``reachable == False`` it means the scheduler did not answer (timeout, connection error).
Only repeated confirmed absence may end a session.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import CommandResult, Runner

STATES = ("queued", "running", "completed", "failed", "cancelled", "timeout", "undetermined")
ALIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("completed", "failed", "cancelled", "timeout")
DEFAULT_QUERY_TIMEOUT = 10.0

# Messages that say the scheduler could not be reached (never mean "the job is gone").
_UNREACHABLE = re.compile(
    r"(timed out|time out|connection refused|unable to contact|cannot connect|"
    r"communication connection failure|zero bytes were transmitted|slurm_load_jobs error: (?!invalid job id)|"
    r"pbs_connect|cannot connect to server|unable to (?:connect|communicate)|no route to host|"
    r"problem loading jobs|error: commlib|unable to contact qmaster)",
    re.IGNORECASE,
)


@dataclass
class JobInfo:
    """What one job looks like to the collection."""

    job_id: str
    state: str = "undetermined"
    raw_state: str = ""
    nodes: List[str] = field(default_factory=list)
    reason: str = ""
    exit_code: Optional[int] = None
    name: str = ""
    user: str = ""
    found: bool = True

    def as_dict(self) -> Dict[str, object]:
        data = asdict(self)
        data.pop("job_id")
        return data

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES


@dataclass
class QueryResult:
    """The answer to one query: per-job info, and whether the scheduler answered at all."""

    jobs: Dict[str, JobInfo]
    reachable: bool = True
    error: str = ""


@dataclass
class JobOptions:
    """Typed, already validated and normalised job options (see ``_directives.normalise_options``)."""

    job_name: Optional[str] = None
    workdir: Optional[str] = None
    output: Optional[str] = None
    error: Optional[str] = None
    queue: Optional[str] = None
    walltime_seconds: Optional[int] = None
    nodes: Optional[int] = None
    ntasks: Optional[int] = None
    cpus_per_task: Optional[int] = None
    memory_mb: Optional[int] = None
    gpus: Optional[int] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    reservation: Optional[str] = None


def undetermined(job_ids: Sequence[str], reason: str, found: bool = False) -> Dict[str, JobInfo]:
    """Every asked id as *undetermined* (a timeout or an unreachable scheduler)."""
    return {str(j): JobInfo(job_id=str(j), state="undetermined", reason=reason, found=found) for j in job_ids}


def unanswered(job_ids: Sequence[str], why: str) -> QueryResult:
    """The answer to a query the scheduler did not give (``why``): every asked id undetermined, not reachable."""
    return QueryResult(undetermined(job_ids, "scheduler did not answer: " + why), False, why)


def looks_unreachable(result: CommandResult) -> bool:
    """True when the command timed out or its stderr says the scheduler could not be reached."""
    if result.timed_out:
        return True
    return bool(_UNREACHABLE.search(result.stderr or ""))


def describe_failure(result: CommandResult) -> str:
    """One short line saying why a command did not give a usable answer."""
    if result.timed_out:
        return "%s timed out" % (result.argv[0] if result.argv else "command")
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1][:300] if lines else "rc=%d" % result.rc


def format_hms(seconds: int) -> str:
    """``HH:MM:SS`` with hours not wrapped at 24 (PBS, SGE and Slurm all accept it)."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return "%02d:%02d:%02d" % (hours, minutes, secs)


class Backend:
    """One scheduler. Subclasses fill in the pure argv/parse methods; ``query`` ties them together."""

    name = "base"
    prefix = ""  # directive prefix, e.g. "#SBATCH"
    cd_in_body = False  # True: the rendered script changes to ``workdir`` itself
    submit_timeout = 30.0

    # --- rendering -------------------------------------------------------------------------
    def render_header(self, opts: JobOptions) -> List[str]:
        """Typed options -> directive arguments (without the prefix), in a stable order."""
        raise NotImplementedError

    def directive_keys(self, directive: str) -> List[str]:
        """The option(s) a directive sets, canonicalised (e.g. ``-t 5`` and ``--time=5`` -> ``time``)."""
        raise NotImplementedError

    def conflicts(self, user_key: str, enforced_key: str) -> bool:
        """Whether a user directive key is overridden by an enforced one."""
        return user_key == enforced_key

    def effective_values(self, directives: Sequence[str]) -> Dict[str, str]:
        """Last value per canonical key among directives (what the scheduler will use)."""
        return {}

    # --- commands --------------------------------------------------------------------------
    def submit_argv(self, script_path: str) -> List[str]:
        raise NotImplementedError

    def parse_submit(self, stdout: str) -> str:
        raise NotImplementedError

    def ending(self, info: JobInfo) -> bool:
        """The job is gone or on its way out (a cancel command refused now need not be repeated)."""
        return not info.alive

    def cancel_argv(self, job_id: str) -> List[str]:
        raise NotImplementedError

    def query(
        self,
        runner: Runner,
        job_ids: Optional[Sequence[str]] = None,
        name: Optional[str] = None,
        user: Optional[str] = None,
        timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> QueryResult:
        raise NotImplementedError

    def poll(self, runner: Runner, job_ids: Sequence[str], timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        """The watcher's question, asked every tick for a resource's live jobs: the same answer as ``query``.

        A backend may answer it with a cheaper command while every job is plainly queued or running, as long as it
        falls back to ``query`` for anything else (an ended job's exit code, a job the scheduler no longer lists).
        """
        return self.query(runner, job_ids=job_ids, timeout=timeout)

    def find_by_name(self, runner: Runner, name: str, user: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult:
        """Alive jobs of ``user`` named ``name`` (``reachable=False`` when the scheduler did not answer)."""
        result = self.query(runner, name=name, user=user, timeout=timeout)
        alive = {
            k: v for k, v in result.jobs.items() if v.alive and v.name == name and (not v.user or v.user == user)
        }
        return QueryResult(alive, result.reachable, result.error)

    def queue_details(self, runner: Runner, job_ids: Sequence[str],
                      timeout: float = DEFAULT_QUERY_TIMEOUT) -> Dict[str, Dict[str, Optional[int]]]:
        """Where queued jobs wait: ``{job id: {queue_position, queue_pending, start_time}}``.

        ``queue_position`` is 1 for the job that starts next among the jobs waiting in its partition (queue),
        ``queue_pending`` how many wait there, ``start_time`` the scheduler's estimated start (epoch seconds).
        Any of them is None when the scheduler does not say; backends without such a query return ``{}``.
        """
        return {}

    def cancel(self, runner: Runner, job_id: str, timeout: float = 30.0) -> CommandResult:
        return runner(self.cancel_argv(job_id), timeout)

    def cancel_checked(self, runner: Runner, job_id: str, timeout: float = 30.0,
                       query_timeout: float = DEFAULT_QUERY_TIMEOUT) -> Tuple[CommandResult, bool]:
        """Cancel ``job_id`` -> (the cancel command's result, whether the cancel failed).

        A refused cancel of a job that ended or is ending anyway (another cancel got there first, e.g. the user's
        watcher, or it finished by itself; torque's qdel refuses a job Slurm still shows as COMPLETING) is no
        failure: the job is queried again and only one the scheduler still shows alive makes it fail.
        """
        out = self.cancel(runner, job_id, timeout)
        if out.ok:
            return out, False
        res = self.query(runner, job_ids=[job_id], timeout=query_timeout)
        info = res.jobs.get(job_id)
        return out, not (res.reachable and (info is None or self.ending(info)))
