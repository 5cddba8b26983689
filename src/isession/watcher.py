"""The watcher: one per user, polls every resource once a second and applies the JOB_STATUS table.

It is also what a queued start waits on (``session_wait`` reads the record it writes): while any session is queued it
ticks every ``WAITING_INTERVAL`` s and keeps each queued session's ``queue.json`` (reason, position, estimated start).

``decide`` is the pure heart (docs/design/sessions.md, "JOB_STATUS"); :class:`Watcher` does the I/O:
it groups live sessions by resource, asks each resource ONCE per tick for all of their jobs (see
``remote.py`` for why over one persistent ssh session), writes service.json (``_service_file``)
and state.json (``_state``), and when a session ends tears down what is left of it (the collection's
one teardown, ``_teardown``: on the resource through the server it holds, then on the workspace).

Fast cancel: a live session whose record carries the cancel tombstone is torn down by the watcher at once, over the
connection it already holds (the same ``_teardown`` table the cancel playbook's ``session_teardown`` runs), and
polled every ``CANCEL_INTERVAL`` s until the scheduler confirms the end. ``isession cancel`` sets the tombstone and
wakes the watcher (SIGUSR1); once the end is recorded and the teardown run again for what the end left, the
watcher notes in ``teardown.json`` whether everything is undone, and the cancel command ends on a complete note
without a playbook; otherwise the cancel playbook does and confirms every step (docs/design/sessions.md, "Fast
cancel"; docs/design/teardown.md).

The workspace port: every tick, for each running session, the watcher asks the kernel who listens on the session's
workspace port (``_listeners``; ``decide_listener`` is the pure rule). A session whose own listener is gone (its
tunnel dropped) says so with ``Starting`` and a message until it is back; one whose port another user took is
ended ``Failed`` and its job cancelled, so that no request carrying its secret goes to that user
(docs/design/security.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from ansible_collections.hpc.interactive.plugins.module_utils import (
    _cmd,
    _directives,
    _dirwatch,
    _listeners,
    _service_file,
    _state,
    _teardown,
    _vocabulary,
)
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import _base, _registry, _runtime

from .config import cli_record
from .progress import QUEUE_FILE
from .remote import RemoteError, RemoteServer, inventory_conn
from .watchfiles import TEARDOWN_FILE, UNDER_WAY

CONFIRM_ABSENT = 3
QUERY_TIMEOUT = 5.0
CANCEL_INTERVAL = 0.1  # poll period while a cancel is under way ...
CANCEL_FAST_FOR = 30.0  # ... for at most this long after the watcher sent it
# poll period while a start waits on this watcher for its queued job (session_wait): still one query per resource per
# tick for all sessions, so the cost does not grow with the number queued, and a job that starts is seen sooner
WAITING_INTERVAL = 0.5
# with inotify, only sessions whose files changed are looked at again; every session's state.json is still stat'ed
# this often (a change inotify cannot report: a write from another host to a shared home)
FULL_SCAN_EVERY = 30.0
QUEUE_DETAILS_EVERY = 5.0  # the queue's position and estimated start (one more query per resource) at most this often
QUEUEFILE = QUEUE_FILE  # where a queued session waits, for isession's progress view (progress.read_queue_file)
LINGER_FOR = 600.0  # how long an ended session's workspace port is retried while a listener of the user stays on it
# how long the watcher remembers that it recorded a session's end (Watcher.ended): far longer than any poll or listener
# check that read the session live just before can still be under way (their queries time out in QUERY_TIMEOUT s), so
# a long-lived watcher's memory stays bounded by the ends of the last hour
ENDED_KEEP = 3600.0
WATCHFILE = "watch.json"  # written by the start play (session_state, with the record: roles/session/tasks/start.yml)
LOGFILE = ".watcher.log"
_WORDS = _vocabulary  # steps, statuses and the table between them
LIVE_STEPS = _WORDS.LIVE_STEPS
TERMINAL_STEPS = _WORDS.TERMINAL_STEPS
TERMINAL_STATUSES = _WORDS.TERMINAL_STATUSES
STEP_OF = _WORDS.STEP_OF_STATUS  # the step each JOB_STATUS is recorded as
FAILED_WORDS = {
    "NODE_FAIL": "node failure", "OUT_OF_MEMORY": "out of memory", "BOOT_FAIL": "node boot failure",
    "PREEMPTED": "preempted by the scheduler", "DEADLINE": "deadline reached",
}


class SessionPaths(NamedTuple):
    """The files of a session that every tick looks at."""

    state: str
    service: str
    queue: str


class Quiet(NamedTuple):
    """What a poll that changed nothing saw of a session (``Watcher.apply``): the same again needs no decision."""

    gen: Tuple[int, int]  # (Watcher._epoch, the session's change count) before the files were read
    info: Mapping[str, Any]  # the scheduler's answer about the job
    watched: bool  # inotify reported the session's changes then (else the stamps below count)
    state: Optional[Tuple[int, int, int]]  # state.json's and service.json's stat stamps (without inotify)
    service: Optional[Tuple[int, int, int]]

    def holds(self, info: Mapping[str, Any], gen: Tuple[int, int], watched: bool,
              rec_st: Optional[os.stat_result], doc_st: Optional[os.stat_result]) -> bool:
        """True when a poll that now gets ``info`` would decide nothing again: the same answer, and neither file
        changed since the memo (inotify's change count ``gen`` when ``watched``, else the files' stats ``rec_st`` and
        ``doc_st`` against the stamps)."""
        if info != self.info or watched != self.watched:
            return False
        if watched:
            return gen == self.gen
        return rec_st is not None and doc_st is not None and _dirwatch.unchanged(rec_st, self.state) \
            and _dirwatch.unchanged(doc_st, self.service)


@dataclass(frozen=True)
class Decision:
    """What to write for one session after one poll. ``status`` None = leave service.json alone."""

    status: Optional[str] = None
    message: str = ""
    absent: int = 0  # the new absence count
    reason: str = ""  # why nothing changes (for the log)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _where(info: Mapping[str, Any]) -> str:
    nodes = info.get("nodes") or []
    return f" on {', '.join(nodes)}" if nodes else ""


def _detail(job_id: str, info: Mapping[str, Any]) -> str:
    bits = [str(info.get("raw_state") or info.get("state") or "")]
    if info.get("exit_code") not in (None, 0):
        bits.append(f"exit code {info['exit_code']}")
    if info.get("reason") and info.get("reason") not in ("None", "none"):
        bits.append(str(info["reason"]))
    return f"job {job_id}: " + ", ".join(b for b in bits if b)


def timed_out(info: Mapping[str, Any]) -> bool:
    """The job reached its walltime: TIMEOUT, or still COMPLETING with Slurm's reason ``TimeLimit``.

    Slurm shows a job it ended as COMPLETING (its final state hidden) until every process of the job is gone,
    which takes up to KillWait (30 s by default) after the time limit; the reason already says why it ended.
    """
    if info.get("state") == "timeout":
        return True
    raw = str(info.get("raw_state") or "").upper()
    return raw.startswith("COMPLETING") and str(info.get("reason") or "") == "TimeLimit"


def decide(record: Mapping[str, Any], current: Optional[str], info: Optional[Mapping[str, Any]],
           reachable: bool, *, absent: int = 0, confirm: int = CONFIRM_ABSENT) -> Decision:
    """Apply the JOB_STATUS table to one session.

    ``record``: state.json; ``current``: service.json's JOB_STATUS; ``info``: the scheduler's
    answer for the job (``scheduler_job_info`` shape) or None when it did not list it;
    ``reachable``: whether the scheduler answered at all; ``absent``: how often in a row it
    answered without knowing the job. Only a terminal scheduler state, or absence confirmed
    ``confirm`` times, ends a session; a scheduler that did not answer changes nothing.
    """
    job_id = str(record.get("job_id") or "")
    if record.get("step") in TERMINAL_STEPS or current in TERMINAL_STATUSES:
        return Decision(absent=0, reason="already ended")
    if not reachable:
        return Decision(absent=absent, reason="scheduler did not answer: undetermined")
    if info is not None and timed_out(info):
        info = dict(info, state="timeout", raw_state="TIMEOUT")
    state = (info or {}).get("state", "undetermined")
    if info is None or (state == "undetermined" and info.get("found") is False):
        absent += 1
        if absent < confirm:
            return Decision(absent=absent, reason=f"job {job_id} not listed ({absent}/{confirm})")
        if record.get("cancel_requested"):
            return Decision("Cancelled", "", absent)
        return Decision("Failed", f"job {job_id} is no longer known to the scheduler (checked {absent} times in a "
                                  "row); it ended outside isession", absent)
    if state == "undetermined":
        return Decision(absent=0, reason=f"job {job_id} undetermined: {info.get('reason', '')}")
    if state == "queued":
        reason = str(info.get("reason") or "")
        reason = "" if reason in ("None", "none") else reason
        return Decision("Queued", reason, 0)
    if state == "running":
        # a record already at running was marked so by the readiness check, which writes service.json Running
        # right after: Starting now would move state.json back (the listener check judges a running session)
        if current in (None, "Submitting", "Queued") and record.get("step") != "running":
            return Decision("Starting", "", 0)
        return Decision(absent=0, reason="running")
    if record.get("cancel_requested") and state in ("completed", "timeout", "cancelled", "failed"):
        # a cancel is under way (tombstone): however the scheduler words the end (PBS says C for a qdel), the
        # session was cancelled, and the cancel playbook's own "cancelled" must not be refused
        return Decision("Cancelled", "", 0)
    if state == "completed":
        return Decision("Completed", f"the job ended{_where(info)} ({_detail(job_id, info)})", 0)
    if state == "timeout":
        walltime = record.get("walltime")
        limit = f"walltime {walltime} reached" if walltime else "walltime reached"
        return Decision("Completed", f"{limit} ({_detail(job_id, info)})", 0)
    if state == "cancelled":
        if record.get("cancel_requested"):
            return Decision("Cancelled", "", 0)
        return Decision("Failed", f"the job was cancelled outside isession ({_detail(job_id, info)})", 0)
    # failed
    raw = str(info.get("raw_state") or "").upper()
    what = FAILED_WORDS.get(raw, "the job failed")
    return Decision("Failed", f"{what}{_where(info)} ({_detail(job_id, info)})", 0)


def predates(record: Mapping[str, Any], status: Optional[str], asked_at: Optional[float]) -> bool:
    """Whether an answer the scheduler gave when asked at ``asked_at`` (``time.time()``) is older than the record's
    step and would move it back (``status`` non-terminal, of an earlier step): e.g. "pending" asked just before the
    job ran, applied once the readiness check had marked the session running. Such an answer is left for the next
    poll, whose answer is newer than the step; a requeue seen after the step was entered still moves it back."""
    step, new = record.get("step"), STEP_OF.get(status or "")
    if asked_at is None or new is None or new in TERMINAL_STEPS or step not in _WORDS.STEPS:
        return False
    if _WORDS.STEPS.index(new) >= _WORDS.STEPS.index(step):
        return False
    history = record.get("history") or []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    entered = last.get("at") if last.get("step") == step else record.get("updated")
    return isinstance(entered, (int, float)) and entered >= asked_at


def decide_listener(record: Mapping[str, Any], current: Optional[str], owner: Any) -> Optional[Decision]:
    """What the listener on a running session's workspace port means for it; None when nothing changes.

    ``owner`` is ``_listeners.check_port_owner``'s answer (``state`` own / none / foreign / unknown) for the
    session's workspace port and the watcher's user. Only a session that reached ``running`` (state.json) and is not
    being cancelled is judged:

    * its own listener: ``Running`` (again, after a drop);
    * no listener while service.json says ``Running``: ``Starting`` with the reason (the tunnel reconnects, or
      the watcher records the end from the scheduler); state.json keeps step ``running``;
    * another user's listener: ``Failed``, terminal - the port's traffic would go to that user;
    * ``/proc`` unreadable: nothing (undetermined).
    """
    if record.get("step") != "running" or record.get("cancel_requested") or current in TERMINAL_STATUSES:
        return None
    port = owner.port
    if owner.state == "own":
        return None if current == "Running" else Decision("Running", "", reason="own listener is back")
    if owner.state == "none":
        if current != "Running":
            return None
        if record.get("target") == "workspace":
            why = f"the app no longer listens on workspace port {port}"
        else:
            why = (f"the tunnel to the session is down: nothing listens on workspace port {port}; "
                   "waiting for it to be restored")
        return Decision("Starting", why, reason="no listener")
    if owner.state == "foreign":
        return Decision("Failed", f"another user took the session's workspace port: {owner.message}; the session "
                                  "was ended so that its requests and its secret cannot reach that user",
                        reason="foreign listener")
    return None


def with_agent_words(words: str, job_id: str, info: Optional[Mapping[str, Any]]) -> str:
    """A failure in the agent's own words (its ``agent.error``), with the scheduler's short detail after it.

    The agent knows what happened ("the nginx server exited with status 137 on cn1; see logs/server.log"); the
    scheduler only that the job failed, so its text stays as the detail in parentheses. "" when the agent said nothing.
    """
    line = next((ln.strip() for ln in words.splitlines() if ln.strip()), "")[:500]
    if not line:
        return ""
    return f"{line} ({_detail(job_id, info)})" if info else line


def walltime_text(value: Any) -> str:
    """A walltime input (minutes, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) as the scheduler shows it: ``HH:MM:SS``.

    Same reading as ``scheduler_submit`` (``_directives.parse_walltime``); text it cannot read is kept as given.
    """
    if value in (None, "") or isinstance(value, bool):
        return ""
    try:
        seconds = _directives.parse_walltime("session_walltime", value)
    except ValueError:
        return str(value)
    if not seconds:
        return ""
    days, rest = divmod(seconds, 86400)
    hms = _base.format_hms(rest)
    return f"{days}-{hms}" if days else hms


def is_connect(record: Mapping[str, Any]) -> bool:
    """A connect-mode session: no job, only the tunnel it made to a server that runs (a ``remote_dir``, no job id).

    No scheduler knows it, so it is never polled; its workspace port's listener is judged like any other's."""
    return not record.get("job_id") and bool(record.get("remote_dir"))


def group_key(record: Mapping[str, Any]) -> Tuple[str, str]:
    """(resource, scheduler) a session is polled through; the workspace itself is ``("", "local")``."""
    if record.get("target") == "workspace" or not record.get("resource"):
        return "", str(record.get("scheduler") or "local")
    return str(record["resource"]), str(record.get("scheduler") or "slurm")


def scheduler_setup_of(conn: Mapping[str, Any]) -> Dict[str, Any]:
    """The resource's scheduler_path/scheduler_env (inventory) as request fields; none when it has neither."""
    out: Dict[str, Any] = {}
    if conn.get("scheduler_path"):
        out["path"] = list(conn["scheduler_path"])
    if conn.get("scheduler_env"):
        out["env"] = dict(conn["scheduler_env"])
    return out


# ---------------------------------------------------------------------------- teardown
def holding_of(sid: str, record: Mapping[str, Any]) -> Any:
    """What the session holds, for the one teardown (``_teardown.Holding``)."""
    return _teardown.Holding.from_record(record, sid)


def summary(outcomes: List[Any]) -> str:
    """``job 42, tunnel isession-a, node port 30001``; "" when nothing was left."""
    return ", ".join(u for o in outcomes for u in o.undone)


# ---------------------------------------------------------------------------- the loop
class Watcher:
    def __init__(self, root: Path, inventory: Optional[Path], *, log: Callable[[str], None] = print,
                 interval: float = 1.0, confirm: int = CONFIRM_ABSENT, idle_exit: float = 0.0,
                 query_timeout: float = QUERY_TIMEOUT) -> None:
        self.root = root
        self.inventory = inventory
        self.log = log
        self.interval = interval
        self.confirm = confirm
        self.idle_exit = idle_exit
        self.query_timeout = query_timeout
        self.absent: Dict[str, int] = {}
        self.reservation_dir: Optional[str] = None  # None: the collection's default (free_port's)
        self.servers: Dict[str, RemoteServer] = {}
        self.busy: Dict[Tuple[str, str], Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="isession-watch")
        self.stop = threading.Event()
        self.wake = threading.Event()  # set by nudge(): tick now (a cancel was requested)
        self.cancel_sent: Dict[str, float] = {}  # session -> when the watcher sent its cancel
        # sessions whose end this watcher recorded -> when: a tick or listener that read them live just before never
        # sends their cancel again (their cancel_sent entry is gone with the rest of the end's bookkeeping); forgotten
        # after ENDED_KEEP s
        self.ended: Dict[str, float] = {}
        # sessions whose cancel's teardown runs now, beside a poll of their resource: that poll leaves them alone
        self.in_flight: set = set()
        self.undone: Dict[str, set] = {}  # session -> kinds this watcher's teardown already undid
        # ended sessions with a kind left for later (the workspace port while the user's listener is still on it):
        # session -> (resource key, record, since when); tried again every tick
        self.lingering: Dict[str, Tuple[Tuple[str, str], Dict[str, Any], float]] = {}
        self.cancelling = False  # a live session carries the tombstone: poll fast
        self.waiting = False  # a live session's job is queued: a start may wait on this watcher (session_wait)
        self.details_at: Dict[Tuple[str, str], float] = {}  # resource -> when its queue details were last asked
        self.details: Dict[str, Dict[str, Any]] = {}  # job id -> its last queue details
        self.queue_files: Dict[str, Dict[str, Any]] = {}  # session -> what its queue.json says now
        # scheduled sessions found with nothing on their workspace port -> when; judged after their resource's next
        # answer (see check_listeners)
        self.unheard: Dict[str, float] = {}
        self._lock = threading.Lock()
        self.st = _state
        self.sf = _service_file
        # path -> (stat stamp, parsed content): every tick looks at every session's files, most of them unchanged
        self._parsed: Dict[str, Tuple[Tuple[int, int, int], Any]] = {}
        self._listed: FrozenSet[str] = frozenset()  # the session root's entries at the last prune of _parsed
        self.root_str = str(root)
        self._paths: Dict[str, SessionPaths] = {}  # session -> its files' paths, joined once
        # which sessions' files changed (inotify on the root and on each session directory); None: not available
        self._tree: Optional[_dirwatch.Tree] = None
        self._tree_lock = threading.Lock()
        self._changed: Optional[set] = None  # sessions changed since the last look (None: look at every session)
        self._scanned_at = -FULL_SCAN_EVERY  # when every session was last looked at
        self._tree_tried = -FULL_SCAN_EVERY  # when a Tree was last made
        self._live: Dict[str, Dict[str, Any]] = {}  # the live sessions' records, as last read
        # session -> what a poll that changed nothing saw of it (``Quiet``): the same again needs no decision
        self._quiet: Dict[str, Quiet] = {}
        # a session's change count (inotify news of its files) and the count of "look at everything" (inotify lost
        # or not available): a memo made before either moved is not trusted
        self._gen: Dict[str, int] = {}
        self._epoch = 0

    # -- sessions
    def paths_of(self, sid: str) -> SessionPaths:
        """The paths of ``sid``'s files, joined once (every tick looks at every session's files)."""
        paths = self._paths.get(sid)
        if paths is None:
            directory = os.path.join(self.root_str, sid)
            paths = self._paths[sid] = SessionPaths(os.path.join(directory, "state.json"),
                                                    os.path.join(directory, "service.json"),
                                                    os.path.join(directory, QUEUEFILE))
        return paths

    def read_cached(self, path: Union[str, Path], reader: Callable[[str], Any],
                    st: Optional[os.stat_result] = None) -> Any:
        """``reader(path)``, parsed again only when the file changed since the last read (``_dirwatch.unchanged``);
        ``st``: the file's stat when the caller has just taken it. Raises what ``os.stat`` and ``reader`` raise."""
        key = str(path)
        st = st or os.stat(key)
        hit = self._parsed.get(key)
        if hit is None or not _dirwatch.unchanged(st, hit[0]):
            # read after the stat: the content is at least as new as the stamp, so a change is never missed
            hit = self._parsed[key] = (_dirwatch.stamp_of(st), reader(key))
        return dict(hit[1]) if isinstance(hit[1], dict) else hit[1]

    def live_sessions(self) -> Dict[str, Dict[str, Any]]:
        """The live sessions' records (copies: what a caller does to one stays with it).

        Every tick, for every session: with inotify (``_dirwatch.Tree``) only the sessions whose ``state.json`` or
        ``service.json`` changed are read again, so a session whose files do not change (waiting in the queue,
        running, or long ended) costs no system call; without it, and every ``FULL_SCAN_EVERY`` s, every
        session's ``state.json`` is stat'ed and parsed again only when its stamp changed (``read_cached``).
        """
        changed = self.drain_changes()
        if changed is None:
            self._live = self.scan_all()
        else:
            for name in changed:
                self._live.pop(name, None)
                if name.startswith("."):
                    continue
                self._parsed.pop(self.paths_of(name).state, None)  # reported changed: parsed again, whatever its stamp
                rec = self.read_live(name)
                if rec is not None:
                    self._live[name] = rec
        return {name: dict(rec) for name, rec in self._live.items()}

    def read_live(self, name: str) -> Optional[Dict[str, Any]]:
        """Session ``name``'s record when it is live (watched from now on when inotify is used), else None."""
        tree = self._tree
        if tree is not None:
            tree.add(name)  # before the read: a change after it is reported
        try:
            rec = self.read_cached(self.paths_of(name).state, self.st.read_record)
        except (ValueError, OSError):
            return None
        if rec and rec.get("step") in LIVE_STEPS and (rec.get("job_id") or is_connect(rec)):
            return rec
        return None

    def scan_all(self) -> Dict[str, Dict[str, Any]]:
        """Every session looked at: plain strings, no pathlib, and the caches pruned only when the directory's list
        changed."""
        out: Dict[str, Dict[str, Any]] = {}
        self._scanned_at = time.monotonic()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return out
        root = self.root_str
        for name in names:
            if name.startswith("."):
                continue
            rec = self.read_live(name)
            if rec is not None:
                out[name] = rec
        listed = frozenset(names)
        if listed != self._listed:
            self._listed = listed
            here = {os.path.join(root, name) for name in names}
            # list(): a snapshot, the resource polls add entries from their own threads meanwhile
            for key in [k for k in list(self._parsed) if os.path.dirname(k) not in here]:
                self._parsed.pop(key, None)  # the files of a session directory that went away
            for sid in [s for s in list(self._paths) if s not in listed]:
                self._paths.pop(sid, None)
                self._quiet.pop(sid, None)
                self._gen.pop(sid, None)
        return out

    def drain_changes(self) -> Optional[set]:
        """The sessions whose files changed since the last call, or None: look at every session (no inotify, a
        change it may have missed, or ``FULL_SCAN_EVERY`` s since the last full look). Called by the tick; the polls
        call :meth:`note_changes`, whose news this returns too."""
        self.note_changes()
        with self._tree_lock:
            changed, self._changed = self._changed, set()
            if self._tree is None or time.monotonic() - self._scanned_at >= FULL_SCAN_EVERY:
                changed = None
            return changed

    def note_changes(self) -> None:
        """Read what inotify reports (making the session root's watch when there is none yet), keep it for
        :meth:`drain_changes`, and count each changed session's news (``_gen``; ``_epoch`` when everything must be
        looked at), which makes its poll memo (``_quiet``) stale."""
        with self._tree_lock:
            tree = self._tree
            if tree is None or not tree.active:
                if tree is not None:
                    tree.close()
                self._tree = tree = None
                now = time.monotonic()
                if now - self._tree_tried >= FULL_SCAN_EVERY:  # not at every tick where inotify is not available
                    self._tree_tried = now
                    made = _dirwatch.Tree(self.root_str, ("state.json", "service.json"))
                    if made.active:
                        self._tree = tree = made
                    else:
                        made.close()
            got = tree.changed() if tree is not None else None
            if got is None:
                self._changed = None
                with self._lock:
                    self._epoch += 1
            else:
                if self._changed is not None:
                    self._changed |= got
                with self._lock:
                    for name in got:
                        self._gen[name] = self._gen.get(name, 0) + 1

    def cli_record(self, session_id: str) -> Dict[str, Any]:
        """What the CLI noted at start (inventory, inputs; never a secret); {} for sessions started without it."""
        return cli_record(self.root / session_id)

    def play_record(self, session_id: str) -> Dict[str, Any]:
        """What the start play noted for the watcher (``watch.json``: inventory, walltime); {} when absent.

        Sessions started by ``ansible-playbook`` without the CLI have no cli.json: this is how the watcher
        learns how to reach their resource and the walltime they asked for.
        """
        try:
            data = json.loads((self.root / session_id / WATCHFILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def inventory_for(self, session_id: str) -> Optional[Path]:
        """The inventory the session was started with (CLI record, then the play's note), else the watcher's own."""
        for recorded in (self.cli_record(session_id).get("inventory"), self.play_record(session_id).get("inventory")):
            if recorded and Path(recorded).exists():
                return Path(recorded)
        return self.inventory

    def walltime_for(self, session_id: str) -> str:
        """The walltime the session asked for, as ``HH:MM:SS`` when it parses ("" when none was given)."""
        value = (self.cli_record(session_id).get("inputs") or {}).get("session_walltime")
        if value in (None, ""):
            value = self.play_record(session_id).get("walltime")
        return walltime_text(value)

    # -- querying
    def query(self, key: Tuple[str, str], job_ids: List[str], inventory: Optional[Path]) -> Dict[str, Any]:
        resource, scheduler = key
        if not resource:
            backend = _registry.get_backend(scheduler)
            res = backend.poll(_runtime.make_runner(shutil.which), job_ids, timeout=self.query_timeout)
            return {"jobs": {k: v.as_dict() for k, v in res.jobs.items()}, "reachable": res.reachable,
                    "error": res.error}
        server = self.server_for(resource, inventory)
        req = {"op": "query", "scheduler": scheduler, "job_ids": job_ids, "timeout": self.query_timeout,
               **scheduler_setup_of(server.conn)}
        return server.ask(req, self.query_timeout + 3)

    def server_for(self, resource: str, inventory: Optional[Path]) -> RemoteServer:
        """The one persistent server of ``resource`` (made on first use)."""
        with self._lock:
            server = self.servers.get(resource)
            if server is None:
                conn = inventory_conn(inventory, resource)
                mu_dir = Path(_cmd.__file__).parent
                server = self.servers[resource] = RemoteServer(conn, mu_dir)
            return server

    def agent_error(self, sid: str, rec: Mapping[str, Any]) -> str:
        """The agent's ``agent.error`` (its words for a failure), read where the agent ran; "" when there is none."""
        resource, _scheduler = group_key(rec)
        directory = str(rec.get("remote_dir") or (self.root / sid))
        try:
            if not resource:
                return (Path(directory) / "agent.error").read_text(errors="replace")
            server = self.server_for(resource, self.inventory_for(sid))
            answer = server.ask({"op": "tail", "dir": directory, "lines": 5}, self.query_timeout + 3)
            return str((answer.get("files") or {}).get("agent.error") or "")
        except (RemoteError, LookupError, OSError, ValueError):
            return ""

    def teardown(self, key: Tuple[str, str], sid: str, rec: Mapping[str, Any],
                 skip: Tuple[str, ...] = (), listener_wait: float = 1.0) -> Tuple[str, List[str]]:
        """The one teardown of a session: its resource side over the connection held, then its workspace side.

        ``skip`` names kinds not to undo (the job, when the scheduler just said it ended); kinds an earlier call
        already undid are skipped too. Returns (what was undone in words, what could not be done); raises nothing:
        the cancel playbook still confirms every kind. A kind left for later (``_teardown.TeardownPending``: the
        user's listener still on the workspace port) puts the session into ``lingering``, tried again every tick.
        """
        return self.teardown_many(key, [(sid, rec, tuple(skip))], listener_wait)[sid]

    def teardown_many(self, key: Tuple[str, str], batch: List[Tuple[str, Mapping[str, Any], Tuple[str, ...]]],
                      listener_wait: float = 1.0) -> Dict[str, Tuple[str, List[str]]]:
        """:meth:`teardown` of several sessions of one resource at once: one request for all their resource sides
        (carried out side by side there), then their workspace sides side by side here."""
        td = _teardown
        plans = []
        for sid, rec, skip in batch:
            held = holding_of(sid, rec)
            done = self.undone.setdefault(sid, set())
            plans.append((sid, rec, held, tuple(sorted(set(skip) | done)), done))
        remote = [(sid, held, skip_now) for sid, _rec, held, skip_now, _done in plans
                  if td.plan(held, td.RESOURCE, skip_now)]
        answers = self.resource_teardowns(key, remote) if remote else {}
        ctx = td.Context(reservation_dir=self.reservation_dir, timeout=self.query_timeout,
                         query_timeout=self.query_timeout, listener_wait=listener_wait)

        def finish(plan: Tuple[str, Mapping[str, Any], Any, Tuple[str, ...], set]) -> Tuple[str, List[str]]:
            sid, rec, held, skip_now, done = plan
            outcomes, problems = answers.get(sid, ([], []))
            outcomes = outcomes + td.teardown(held, td.WORKSPACE, ctx, skip=skip_now)
            problems = problems + td.errors(outcomes)
            done.update(o.kind for o in outcomes if not o.error and not o.pending)
            later = td.pending(outcomes)
            with self._lock:
                if later and sid not in self.lingering:
                    self.lingering[sid] = (key, dict(rec), time.monotonic())
                    self.log(f"{sid}: left for later: {'; '.join(later)}")
                elif not later:
                    self.lingering.pop(sid, None)
            return summary(outcomes), problems

        if len(plans) == 1:
            return {plans[0][0]: finish(plans[0])}
        # each may wait up to listener_wait for a tunnel's listener to go: never one after another
        with ThreadPoolExecutor(max_workers=min(8, len(plans)), thread_name_prefix="isession-undo") as pool:
            return dict(zip([p[0] for p in plans], pool.map(finish, plans), strict=True))

    def resource_teardowns(self, key: Tuple[str, str], items: List[Tuple[str, Any, Tuple[str, ...]]]
                           ) -> Dict[str, Tuple[List[Any], List[str]]]:
        """The resource sides of ``items`` (session, holding, kinds to skip), asked over the resource's connection:
        session -> (outcomes, problems). One ``teardown`` request for one session, one ``teardowns`` for many."""
        td = _teardown
        reqs = [{"holding": dataclasses.asdict(held), "skip": list(skip_now)} for _sid, held, skip_now in items]
        try:
            server = self.server_for(key[0], self.inventory_for(items[0][0]))
            setup = scheduler_setup_of(server.conn)
            if len(items) == 1:
                answers = [server.ask(dict({"op": "teardown", **reqs[0], "timeout": self.query_timeout}, **setup),
                                      self.query_timeout + 3)]
            else:  # the far side runs 8 at a time, each within the timeout
                rounds = -(-len(items) // 8)
                got = server.ask(dict({"op": "teardowns", "items": reqs, "timeout": self.query_timeout}, **setup),
                                 rounds * self.query_timeout + 3)
                answers = list(got.get("answers") or [])
                if len(answers) != len(items):
                    raise ValueError(got.get("error") or f"{len(answers)} answers to {len(items)} teardowns")
        except (RemoteError, LookupError, OSError, ValueError) as exc:
            answers = [{"error": str(exc)}] * len(items)
        out: Dict[str, Tuple[List[Any], List[str]]] = {}
        for (sid, _held, _skip), answer in zip(items, answers, strict=True):
            got = [td.Outcome(o["kind"], o["side"], list(o["undone"]), o.get("error", ""), o.get("pending", ""))
                   for o in answer.get("outcomes") or []]
            out[sid] = (got, [str(answer["error"])] if answer.get("error") and not got else [])
        return out

    def retry_lingering(self) -> None:
        """Try again what ended sessions left for later; give up after ``LINGER_FOR`` s (the lease ends anyway)."""
        for sid, (key, rec, since) in list(self.lingering.items()):
            said, problems = self.teardown(key, sid, rec, listener_wait=0.0)
            if sid not in self.lingering:
                self.note_teardown(sid, problems)
                self.undone.pop(sid, None)
                self.log(f"{sid}: the listener on its workspace port is gone: released {said or 'nothing'}"
                         + (f"; not carried out: {'; '.join(problems)}" if problems else ""))
            elif time.monotonic() - since > LINGER_FOR:
                with self._lock:
                    self.lingering.pop(sid, None)
                self.undone.pop(sid, None)
                self.log(f"{sid}: a listener is still on its workspace port after {LINGER_FOR:.0f} s; its "
                         "reservation is left to its lease")

    def note_teardown(self, sid: str, problems: List[str]) -> None:
        """Write ``teardown.json``: whether everything the ended session held is undone (``complete``), or what not.

        ``isession cancel`` finishes on it without running the cancel playbook when it is complete; anything else
        (problems, a listener left for later, no note at all) and the playbook does and confirms every step.
        """
        pending = sid in self.lingering
        self.write_note(sid, {"complete": not problems and not pending, "problems": list(problems), "pending": pending})

    def note_under_way(self, sid: str) -> None:
        """Write ``teardown.json`` saying this watcher recorded the end and its teardown is under way.

        A burst of ends is torn down side by side, and on shared cores a note can come seconds after its end;
        ``isession cancel`` waits for the final note while the watcher named here runs, and does not take the late
        note for a cancel that was not the watcher's.
        """
        self.write_note(sid, {"complete": False, "problems": [], "pending": False, UNDER_WAY: os.getpid()})

    def write_note(self, sid: str, doc: Mapping[str, Any]) -> None:
        try:
            write_private(self.root / sid / TEARDOWN_FILE,
                          json.dumps(dict(doc, at=round(time.time(), 3)), sort_keys=True) + "\n")
        except OSError as exc:
            self.log(f"{sid}: cannot write {TEARDOWN_FILE}: {exc}")

    def claim_cancels(self, sessions: Mapping[str, Mapping[str, Any]]) -> Dict[str, Mapping[str, Any]]:
        """Those of ``sessions`` whose cancel nobody has sent yet, now marked as sent and under way (``in_flight``)
        until :meth:`send_claimed` is done with them."""
        with self._lock:
            todo = {sid: rec for sid, rec in sessions.items() if sid not in self.cancel_sent and sid not in self.ended}
            now = time.monotonic()
            self.cancel_sent.update({sid: now for sid in todo})
            self.in_flight.update(todo)
        return todo

    def send_cancels(self, key: Tuple[str, str], sessions: Mapping[str, Mapping[str, Any]]) -> None:
        """Tear these sessions of one resource down now, together (each once); the cancel playbook confirms it whatever
        happens here."""
        self.send_claimed(key, self.claim_cancels(sessions))

    def send_claimed(self, key: Tuple[str, str], todo: Mapping[str, Mapping[str, Any]]) -> None:
        """The teardown of sessions :meth:`claim_cancels` returned, logged per session."""
        if not todo:
            return
        started = time.monotonic()
        try:
            results = self.teardown_many(key, [(sid, rec, ()) for sid, rec in todo.items()])
        finally:
            with self._lock:
                self.in_flight.difference_update(todo)
        took = time.monotonic() - started
        together = f", {len(todo)} together" if len(todo) > 1 else ""
        for sid, (said, problems) in results.items():
            if problems and not said:
                self.log(f"{sid}: cancel request not carried out ({'; '.join(problems)}); the cancel playbook does "
                         f"it ({took:.2f}s{together})")
            else:
                self.log(f"{sid}: cancel requested: stopped {said or 'nothing (already ended)'}"
                         + (f"; not carried out: {'; '.join(problems)}" if problems else "")
                         + f" ({took:.2f}s{together})")
            if not problems and todo[sid].get("cancel_requested"):
                self.record_cancelled(sid)

    def forget_ended(self, sid: str, *, undone: bool) -> None:
        """The bookkeeping of a session's end, wherever it is recorded: it is never polled or cancelled again;
        ``undone`` also drops what its teardown undid (kept while something is left for later)."""
        with self._lock:
            self.ended[sid] = time.monotonic()
            self.absent.pop(sid, None)
            self.cancel_sent.pop(sid, None)
            if undone:
                self.undone.pop(sid, None)

    def record_cancelled(self, sid: str) -> None:
        """Record the end of a session whose cancel's teardown has just undone everything: ``Cancelled`` now, and the
        final note (``teardown.json`` complete), as the cancel playbook records it after the same teardown.

        Without this the end waited for the resource's next poll to see the job gone (0.1-0.4 s in a burst of
        cancels), then a second teardown that found nothing left. A session with something left for later
        (``lingering``), or one that ended otherwise meanwhile (the record refuses: already ended), is left to the
        poll, which records its end as always.
        """
        if sid in self.lingering:
            return
        service_json = self.paths_of(sid).service
        try:
            current = (self.sf.read_service_file(service_json) or {}).get("JOB_STATUS")
            # no write when the cancel playbook recorded it first: both leave an unchanged file as it is
            self.st.update_state(self.root_str, sid, step=STEP_OF["Cancelled"], error=None)
            self.sf.update_service_file(service_json, job_status="Cancelled", error_message="")
        except ValueError as exc:
            if "already ended" not in str(exc):
                self.log(f"{sid}: not updated: {exc}")
            return
        self.forget_ended(sid, undone=True)
        self.note_teardown(sid, [])
        # the cancel playbook may have recorded it first (its own teardown found this one's work done)
        moved = "Cancelled already" if current == "Cancelled" else f"{current or '-'} -> Cancelled"
        self.log(f"{sid}: {moved} (its teardown is complete)")

    def poll_group(self, key: Tuple[str, str], sessions: Dict[str, Dict[str, Any]]) -> None:
        asked = {sid: rec for sid, rec in sessions.items()
                 if rec.get("cancel_requested") and sid not in self.cancel_sent}
        if asked:
            self.send_cancels(key, asked)
        ids = sorted({str(r["job_id"]) for r in sessions.values()})
        started, asked_at = time.monotonic(), time.time()
        try:
            answer = self.query(key, ids, self.inventory_for(next(iter(sessions))))
        except (RemoteError, LookupError, OSError) as exc:
            answer = {"jobs": {}, "reachable": False, "error": str(exc)}
        took = time.monotonic() - started
        self.note_changes()  # what changed during the query (a tombstone) makes its session's memo stale
        if not answer.get("reachable", False):
            self.log(f"{key[0] or 'workspace'}: undetermined ({answer.get('error')}); {len(ids)} job(s) left "
                     f"as they are ({took:.2f}s)")
        jobs, reachable = answer.get("jobs", {}), bool(answer.get("reachable"))

        def apply_one(item: Tuple[str, Dict[str, Any]]) -> None:
            self.apply(item[0], item[1], jobs.get(str(item[1]["job_id"])), reachable, asked_at)

        if sum(bool(rec.get("cancel_requested")) for rec in sessions.values()) > 1:
            # a burst of cancels: each end is written (fsync'ed records) and torn down side by side
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="isession-end") as pool:
                list(pool.map(apply_one, sessions.items()))
        else:
            for item in sessions.items():
                apply_one(item)
        self.judge_unheard(sessions, started)
        if answer.get("reachable"):
            self.note_queue(key, sessions, answer.get("jobs") or {})

    def queue_details(self, key: Tuple[str, str], job_ids: List[str], inventory: Optional[Path]) -> Dict[str, Any]:
        """Position and estimated start of queued jobs, one query for all of them (``Backend.queue_details``)."""
        resource, scheduler = key
        if not resource:
            return _registry.get_backend(scheduler).queue_details(_runtime.make_runner(shutil.which), job_ids,
                                                                  timeout=self.query_timeout)
        server = self.server_for(resource, inventory)
        req = {"op": "queue", "scheduler": scheduler, "job_ids": job_ids, "timeout": self.query_timeout,
               **scheduler_setup_of(server.conn)}
        return dict(server.ask(req, self.query_timeout + 3).get("details") or {})

    def note_queue(self, key: Tuple[str, str], sessions: Mapping[str, Mapping[str, Any]],
                   jobs: Mapping[str, Any]) -> None:
        """Keep each queued session's ``queue.json`` (reason, position, estimated start) for a start that waits.

        The details are asked at most every ``QUEUE_DETAILS_EVERY`` s per resource (they change slowly; Slurm's
        backfill estimates every 30 s); the file goes once the job left the queue.
        """
        queued = {sid: str(rec["job_id"]) for sid, rec in sessions.items()
                  if (jobs.get(str(rec["job_id"])) or {}).get("state") == "queued"}
        now = time.monotonic()
        if queued and now - self.details_at.get(key, -QUEUE_DETAILS_EVERY) >= QUEUE_DETAILS_EVERY:
            self.details_at[key] = now
            try:
                self.details.update(self.queue_details(key, sorted(set(queued.values())),
                                                       self.inventory_for(next(iter(queued)))))
            except (RemoteError, LookupError, OSError, ValueError) as exc:
                self.log(f"{key[0] or 'workspace'}: queue details not available: {exc}")
        for sid in sessions:
            path = self.paths_of(sid).queue
            if sid not in queued:
                if self.queue_files.pop(sid, None) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            job = queued[sid]
            reason = str(jobs[job].get("reason") or "")
            doc = {"job_id": job, "reason": "" if reason in ("None", "none") else reason,
                   **{k: v for k, v in (self.details.get(job) or {}).items()
                      if k in ("queue_position", "queue_pending", "start_time")}}
            if self.queue_files.get(sid) != doc:
                try:
                    write_private(Path(path), json.dumps(doc) + "\n")
                except OSError as exc:
                    self.log(f"{sid}: cannot write {QUEUEFILE}: {exc}")
                    continue
                self.queue_files[sid] = doc

    def apply(self, sid: str, rec: Dict[str, Any], info: Optional[Dict[str, Any]], reachable: bool,
              asked_at: Optional[float] = None) -> None:
        """Record what the scheduler said of session ``sid`` (asked at ``asked_at``, ``time.time()``)."""
        if sid in self.in_flight:  # its cancel's teardown runs beside this poll: the next poll records the end
            return
        # every tick, for every polled session: paths joined once, and nothing decided again when neither file
        # changed and the scheduler says what it said when the last poll changed nothing
        paths = self.paths_of(sid)
        service_json = paths.service
        with self._lock:  # before any read: news that comes after it makes the memo made below stale
            gen = (self._epoch, self._gen.get(sid, 0))
        watched = self._tree is not None
        quiet = self._quiet.get(sid)
        rec_st: Optional[os.stat_result] = None
        doc_st: Optional[os.stat_result] = None
        if not watched:  # with inotify, a session whose files did not change costs not even a stat
            try:
                rec_st, doc_st = os.stat(paths.state), os.stat(service_json)
            except OSError:
                rec_st = doc_st = None
        if quiet is not None and info is not None and reachable and quiet.holds(info, gen, watched, rec_st, doc_st):
            return
        try:  # the record as it is now, after the query: a cancel's tombstone set meanwhile must count
            rec = self.read_cached(paths.state, self.st.read_record, rec_st) or rec
        except (ValueError, OSError):
            pass
        try:
            doc = self.read_cached(service_json, self.sf.read_service_file, doc_st) or {}
        except (ValueError, OSError):  # none yet, or one to be rebuilt: this write starts it afresh
            doc = {}
        current, current_message = doc.get("JOB_STATUS"), doc.get("ERROR_MESSAGE") or ""
        if info and timed_out(info):
            walltime = self.walltime_for(sid)
            if walltime:
                rec = dict(rec, walltime=walltime)
        d = decide(rec, current, info, reachable, absent=self.absent.get(sid, 0), confirm=self.confirm)
        with self._lock:
            self.absent[sid] = d.absent
        if predates(rec, d.status, asked_at):
            self.log(f"{sid}: {d.status} not recorded: the scheduler was asked before the session reached "
                     f"{rec.get('step')}")
            return
        if d.status == "Failed" and d.status != current:
            words = with_agent_words(self.agent_error(sid, rec), str(rec.get("job_id") or ""), info)
            if words:  # the agent's own explanation wins over the scheduler's generic one
                d = dataclasses.replace(d, message=words)
        # a queued job's new reason (Priority -> Resources) is written too: the user sees why it still waits
        new_reason = d.status == "Queued" == current and d.message != current_message
        if d.status is None or (d.status == current and not d.terminal and not new_reason):
            if d.status is None and d.reason.startswith("job") and "not listed" in d.reason:
                self.log(f"{sid}: {d.reason}")
            elif info is not None and reachable and (watched or (rec_st and doc_st)):
                self._quiet[sid] = Quiet(gen, info, watched, _dirwatch.stamp_of(rec_st) if rec_st else None,
                                         _dirwatch.stamp_of(doc_st) if doc_st else None)
            return
        try:
            # state.json first: a cancel that already ended the session makes this refuse (StateError)
            fields: Dict[str, Any] = {"step": STEP_OF[d.status]}
            if d.terminal:
                fields["error"] = d.message or None
            # a non-terminal move is a compare-and-set against what we read: session_ready may have
            # written Running meanwhile, and Starting must not overwrite it
            cas = not d.terminal
            self.st.update_state(self.root_str, sid, expect_step=rec.get("step") if cas else None, **fields)
            self.sf.update_service_file(service_json, job_status=d.status,
                                        error_message=d.message, expect_status=current if cas else None)
        except ValueError as exc:
            self.log(f"{sid}: not updated: {exc}")
            return
        if d.terminal:  # at once: a cancel reading the end now knows the teardown below is this watcher's, to wait for
            self.note_under_way(sid)
        self.log(f"{sid}: {current or '-'} -> {d.status}" + (f" ({d.message})" if d.message else ""))
        if d.terminal:
            self.forget_ended(sid, undone=False)  # what the teardown below leaves for later is still to be undone
            # the scheduler says the job ended: what it left behind goes, on both sides (the same table as a cancel)
            try:
                said, problems = self.teardown(group_key(rec), sid, rec, skip=("job",))
            except Exception as exc:  # noqa: BLE001 - the note must not stay "under way": the playbook does the rest
                said, problems = "", [f"teardown failed: {type(exc).__name__}: {exc}"]
            self.note_teardown(sid, problems)
            if sid not in self.lingering:
                self.undone.pop(sid, None)
            if said or problems:
                self.log(f"{sid}: cleaned up after the end: {said or 'nothing'}"
                         + (f"; not carried out: {'; '.join(problems)}" if problems else ""))

    # -- the workspace port's listener, every tick, whatever the schedulers answer
    def check_listeners(self, live: Mapping[str, Mapping[str, Any]]) -> None:
        """Judge who listens on each running session's workspace port (one read of /proc/net/tcp for all).

        A scheduled session whose port has no listener is not judged here but after its resource's next answer
        (``judge_unheard``): a job that ends drops its tunnel first, and that end must read ``Completed``, not
        ``Starting`` then ``Completed``. Its own listener and another user's are judged at once, as is a connect
        session's missing tunnel (no scheduler speaks for it).
        """
        running = {sid: rec for sid, rec in live.items() if rec.get("step") == "running"
                   and isinstance((rec.get("ports") or {}).get("workspace"), int)}
        with self._lock:
            for sid in [s for s in self.unheard if s not in running]:
                del self.unheard[sid]
        now = time.monotonic()
        for sid, owner in self.port_owners(running).items():
            rec = running[sid]
            if owner.state == "none" and not is_connect(rec):
                with self._lock:
                    self.unheard.setdefault(sid, now)
                continue
            with self._lock:
                self.unheard.pop(sid, None)
            self.apply_listener(sid, rec, owner)

    def judge_unheard(self, sessions: Mapping[str, Mapping[str, Any]], asked_at: float) -> None:
        """After a resource answered: judge its sessions whose port had no listener before the question was asked.

        The listeners are read again now; a session the answer ended is left alone by ``decide_listener``.
        """
        with self._lock:
            due = [sid for sid in sessions if self.unheard.get(sid, asked_at + 1) <= asked_at]
            for sid in due:
                del self.unheard[sid]
        for sid, owner in self.port_owners({sid: sessions[sid] for sid in due}).items():
            self.apply_listener(sid, sessions[sid], owner)

    def port_owners(self, sessions: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        """Who listens on each session's workspace port (``_listeners.judge_port_owner``), from one read of the
        workspace's listening sockets; {} when there is nothing to judge or they cannot be read (logged)."""
        if not sessions:
            return {}
        try:
            found = _listeners.read_listeners()
        except OSError as exc:
            self.log(f"cannot read the workspace's listening sockets: {exc}")
            return {}
        return {sid: _listeners.judge_port_owner(found, rec["ports"]["workspace"], os.getuid())
                for sid, rec in sessions.items()}

    def apply_listener(self, sid: str, rec: Mapping[str, Any], owner: Any) -> None:
        service_json = self.paths_of(sid).service
        try:
            current = (self.sf.read_service_file(service_json) or {}).get("JOB_STATUS")
        except ValueError:
            return
        d = decide_listener(rec, current, owner)
        if d is None:
            return
        try:
            if d.terminal:
                self.st.update_state(self.root_str, sid, expect_step="running", step="failed", error=d.message)
                self.sf.update_service_file(service_json, job_status=d.status,
                                            error_message=d.message)
            else:  # the step stays running: only what the platform should do with the port changes
                self.sf.update_service_file(service_json, job_status=d.status,
                                            error_message=d.message, expect_status=current)
        except ValueError as exc:
            self.log(f"{sid}: not updated: {exc}")
            return
        self.log(f"{sid}: {current or '-'} -> {d.status} ({d.reason}" + (f": {d.message})" if d.message else ")"))
        if d.terminal:
            self.absent.pop(sid, None)
            # the whole teardown (the job too: its tunnel's end is no longer its own); another user's listener is
            # never signalled, the teardown only stops this user's processes
            self.pool.submit(self._safe_send, group_key(rec), self.claim_cancels({sid: rec}), (sid,))

    def forget_old_ends(self, now: float) -> None:
        """Drop the ends recorded more than ``ENDED_KEEP`` s ago from :attr:`ended`."""
        with self._lock:
            for sid in [sid for sid, at in self.ended.items() if now - at > ENDED_KEEP]:
                del self.ended[sid]

    def tick(self) -> int:
        """One round; returns how many live sessions there are."""
        self.forget_old_ends(time.monotonic())
        live = self.live_sessions()
        self.check_listeners(live)
        self.retry_lingering()
        groups: Dict[Tuple[str, str], Dict[str, Dict[str, Any]]] = {}
        for sid, rec in live.items():
            if not is_connect(rec):
                groups.setdefault(group_key(rec), {})[sid] = rec
        now = time.monotonic()  # poll fast for a while after a cancel was sent, not forever if it never ends
        self.cancelling = any(rec.get("cancel_requested") and now - self.cancel_sent.get(sid, now) < CANCEL_FAST_FOR
                              for sid, rec in live.items())
        self.waiting = any(rec.get("step") in ("submitted", "queued") for rec in live.values())
        for key, sessions in groups.items():
            fut = self.busy.get(key)
            if fut is not None and not fut.done():
                # the previous poll of this resource is still under way: never pile up polls; but cancels asked
                # meanwhile are sent now, beside it (in a burst, the later ones waited for the earlier teardowns)
                asked = self.claim_cancels({sid: rec for sid, rec in sessions.items()
                                            if rec.get("cancel_requested")})
                if asked:
                    self.pool.submit(self._safe_send, key, asked, ())
                continue
            self.busy[key] = self.pool.submit(self._safe_poll, key, sessions)
        return len(live) + len(self.lingering)

    def _safe_send(self, key: Tuple[str, str], todo: Mapping[str, Mapping[str, Any]], ended: Sequence[str]) -> None:
        """:meth:`send_claimed` on the pool, its failure logged (the cancel playbook confirms every step whatever
        happens here; a job whose tunnel is gone ends by itself). ``ended``: sessions whose end is recorded already,
        so no poll's end-of-job clean-up will read what was undone: their bookkeeping goes here."""
        try:
            self.send_claimed(key, todo)
        except Exception as exc:  # noqa: BLE001 - see above
            self.log(f"{', '.join(todo)}: cancel failed: {type(exc).__name__}: {exc}")
        finally:
            for sid in ended:
                self.forget_ended(sid, undone=sid not in self.lingering)

    def _safe_poll(self, key: Tuple[str, str], sessions: Dict[str, Dict[str, Any]]) -> None:
        try:
            self.poll_group(key, sessions)
        except Exception as exc:  # noqa: BLE001 - one resource's trouble must not stop the watcher
            self.log(f"{key[0] or 'workspace'}: poll failed: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        idle_since = time.monotonic()
        while not self.stop.is_set():
            self.wake.clear()  # before the tick: a nudge arriving during it makes the next one come at once
            started = time.monotonic()
            try:
                live = self.tick()
            except Exception as exc:  # noqa: BLE001 - one bad tick (an unreadable directory, ...) must not end the
                # watcher that every waiting start and every fast cancel of the user relies on; the next tick retries
                self.log(f"tick failed: {type(exc).__name__}: {exc}")
                live = 1
            if live:
                idle_since = started
            elif self.idle_exit and started - idle_since > self.idle_exit:
                self.log(f"no live session for {self.idle_exit:.0f} s: exiting")
                break
            interval = min(self.interval, CANCEL_INTERVAL) if self.cancelling else \
                min(self.interval, WAITING_INTERVAL) if self.waiting else self.interval
            self.wake.wait(max(0.0, interval - (time.monotonic() - started)))
        self.close()

    def nudge(self) -> None:
        """Tick now instead of at the end of the interval (``isession cancel`` sends SIGUSR1)."""
        self.wake.set()

    def shutdown(self) -> None:
        self.stop.set()
        self.wake.set()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._tree_lock:
            if self._tree is not None:
                self._tree.close()
                self._tree = None
        for server in self.servers.values():
            server.close()


def write_private(path: Path, text: str) -> None:
    """Write ``path`` atomically, mode 0600 (a temp file in the same directory, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- one per user
def daemonize(root: Path, fd: int) -> bool:
    """Detach (double fork, setsid, output to ``<root>/.watcher.log``). True in the daemon, False in the caller."""
    child = os.fork()
    if child > 0:
        os.close(fd)
        os.waitpid(child, 0)
        return False
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    log = os.open(root / LOGFILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if root.is_absolute():
        # not the caller's directory: a start run's (inside a session dir) must not look like a session process
        os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    return True
