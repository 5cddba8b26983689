"""Follow a playbook run through ansible-runner's events: the step under way, the queue, the failures.

:class:`Progress` is fed every event. It keeps what a progress view shows (the current step and since when, the
queue wait's scheduler reason, position and estimated start) and returns, for ``verbose`` plain output, one line
per finished task. Tasks that only check arguments or set variables never become "the current step".

While the start waits on the user's watcher for its queued job (the ``session_wait`` task) no scheduler answer comes
through the events; the queue is then what the watcher keeps in the session's ``queue.json`` (``queue_source``, read
by :func:`read_queue_file`, the one reader of a file here; all else is pure).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional

QUEUE_FILE = "queue.json"  # in the session directory, written by the watcher while the session's job is queued
WAIT_ACTIONS = frozenset({"session_wait", "hpc.interactive.session_wait"})  # the start waits on the watcher

_RESULT_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}
MAX_MSG = 300
# task actions that are bookkeeping, not a step a user waits for
QUIET_ACTIONS = frozenset({
    "validate_argument_spec", "ansible.builtin.validate_argument_spec", "set_fact", "ansible.builtin.set_fact",
    "include_tasks", "ansible.builtin.include_tasks", "import_tasks", "ansible.builtin.import_tasks",
    "include_role", "ansible.builtin.include_role", "import_role", "ansible.builtin.import_role",
    "meta", "ansible.builtin.meta", "debug", "ansible.builtin.debug", "assert", "ansible.builtin.assert",
})


def _task_label(data: Dict[str, Any]) -> str:
    task = str(data.get("task") or "").strip()
    role = str(data.get("role") or "").strip()
    if role and task.startswith(f"{role} : "):
        task = task[len(role) + 3:]
    return f"{role}: {task}" if role else task


def _step_label(data: Dict[str, Any]) -> str:
    """The task's own name, without the role prefix (what the user reads as the step)."""
    task = str(data.get("task") or "").strip()
    role = str(data.get("role") or "").strip()
    return task[len(role) + 3:] if role and task.startswith(f"{role} : ") else task


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MSG else line[: MAX_MSG - 3] + "..."


def result_message(res: Dict[str, Any]) -> str:
    """The words a failed task gave (``msg``, else stderr's last line); censored results stay censored."""
    if res.get("censored"):
        return str(res["censored"])
    msg = res.get("msg")
    if msg:
        return _one_line(msg)
    for key in ("stderr", "stdout"):
        text = str(res.get(key) or "").strip()
        if text:
            return _one_line(text.splitlines()[-1])
    return ""


@dataclass
class QueueInfo:
    """A queued job as the scheduler describes it (``scheduler_job_info`` with ``queue_details``)."""

    job_id: str
    reason: str = ""
    position: Optional[int] = None  # 1 = next to start in its partition/queue
    pending: Optional[int] = None  # jobs waiting there in all
    start_time: Optional[float] = None  # the scheduler's estimate, epoch seconds

    def describe(self, now: Optional[float] = None) -> str:
        """``queued (job 42): Resources, position 2 of 3, estimated start 14:05:00 (in 3m 10s)``."""
        bits = [self.reason or "waiting"]
        if self.position:
            bits.append(f"position {self.position}" + (f" of {self.pending}" if self.pending else ""))
        if self.start_time:
            now = time.time() if now is None else now
            when = datetime.fromtimestamp(self.start_time).strftime("%H:%M:%S")
            wait = f" (in {duration(self.start_time - now)})" if self.start_time > now else ""
            bits.append(f"estimated start {when}{wait}")
        return f"queued (job {self.job_id}): " + ", ".join(bits)


def queue_info(res: Dict[str, Any]) -> Optional[QueueInfo]:
    """The queued job in a ``scheduler_job_info`` result, None when no job there is queued."""
    jobs = res.get("jobs")
    if not isinstance(jobs, dict):
        return None
    for job_id, info in jobs.items():
        if isinstance(info, dict) and info.get("state") == "queued":
            return QueueInfo(job_id=str(job_id), reason=str(info.get("reason") or ""),
                             position=_int(info.get("queue_position")), pending=_int(info.get("queue_pending")),
                             start_time=_float(info.get("start_time")))
    return None


def read_queue_file(path: Any) -> Optional[QueueInfo]:
    """The watcher's ``queue.json`` of a queued session as a :class:`QueueInfo`; None when absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("job_id"):
        return None
    return QueueInfo(job_id=str(doc["job_id"]), reason=str(doc.get("reason") or ""),
                     position=_int(doc.get("queue_position")), pending=_int(doc.get("queue_pending")),
                     start_time=_float(doc.get("start_time")))


def duration(seconds: float) -> str:
    """``4s``, ``3m 10s``, ``1h 02m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@dataclass
class Progress:
    """Feed events with :meth:`line`; it keeps the state a view draws and returns the plain line for that event.

    A plain line is returned when a task finishes (ok/changed/failed/unreachable), with its duration; with
    ``verbose`` also skipped tasks and ``ignore_errors`` failures; bookkeeping tasks (argument checks, facts) never.
    ``failed`` collects the failures' messages. ``clock`` gives the time the view measures elapsed time with.
    """

    verbose: bool = False
    clock: Callable[[], float] = time.monotonic
    started: Dict[str, float] = field(default_factory=dict)
    failed: List[str] = field(default_factory=list)
    playbook_pid: Optional[int] = None
    step: str = ""
    step_since: Optional[float] = None
    queue: Optional[QueueInfo] = None
    began: Optional[float] = None
    queue_source: Optional[Callable[[], Optional[QueueInfo]]] = None  # the watcher's queue.json of this session
    on_watcher: bool = False  # a session_wait task runs: the queue comes from queue_source

    def current_queue(self) -> Optional[QueueInfo]:
        """What a view shows of the queue now: the watcher's word while the start waits on it, else the events'."""
        if self.on_watcher and self.queue_source is not None:
            return self.queue_source() or self.queue
        return self.queue

    def line(self, event: Dict[str, Any]) -> Optional[str]:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if self.began is None:
            self.began = self.clock()
        if self.playbook_pid is None and isinstance(event.get("pid"), int):
            self.playbook_pid = event["pid"]
        action = str(data.get("task_action") or "")
        quiet = action in QUIET_ACTIONS
        if kind == "playbook_on_task_start":
            self.on_watcher = action in WAIT_ACTIONS
            self.started[str(data.get("task_uuid") or data.get("uuid") or "")] = _ts(event)
            if not quiet and _step_label(data):
                self.step, self.step_since = _step_label(data), self.clock()
            return None
        if kind == "runner_retry":
            self._note_queue(data.get("res") or {})
            return None
        if kind not in _RESULT_EVENTS:
            return None
        status = _RESULT_EVENTS[kind]
        res = data.get("res") or {}
        if status == "ok":
            self._note_queue(res)
        if action in WAIT_ACTIONS:  # the job left the queue (or the wait failed): nothing waits any more
            self.on_watcher, self.queue = False, None
        if status == "ok" and res.get("changed"):
            status = "changed"
        ignored = bool(data.get("ignore_errors"))
        label = _task_label(data)
        if status in ("failed", "unreachable") and not ignored:
            msg = result_message(res)
            self.failed.append(f"{label}: {msg}" if msg else label)
        if quiet and status not in ("failed", "unreachable"):
            return None
        if (status == "skipped" or ignored) and not self.verbose:
            return None
        start = self.started.get(str(data.get("task_uuid") or ""))
        took = ""
        if isinstance(data.get("duration"), (int, float)):
            took = f" ({data['duration']:.1f}s)"
        elif start is not None and _ts(event) >= start:
            took = f" ({_ts(event) - start:.1f}s)"
        host = data.get("host") or ""
        where = f" [{host}]" if host and host not in ("localhost", "workspace") else ""
        text = f"  {status:<8}{label}{where}{took}"
        if status in ("failed", "unreachable"):
            msg = result_message(res)
            if msg:
                text += f": {msg}"
        return text

    def _note_queue(self, res: Dict[str, Any]) -> None:
        if isinstance(res.get("jobs"), dict):
            self.queue = queue_info(res)

    def step_elapsed(self) -> float:
        return 0.0 if self.step_since is None else self.clock() - self.step_since

    def elapsed(self) -> float:
        return 0.0 if self.began is None else self.clock() - self.began


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _float(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def _ts(event: Dict[str, Any]) -> float:
    """Seconds from the event's ``created`` ISO time (0.0 when missing)."""
    created = event.get("created")
    if not created:
        return 0.0
    try:
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
