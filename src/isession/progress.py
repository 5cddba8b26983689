"""Turn ansible-runner events into one progress line per task (pure; no I/O)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Optional

_RESULT_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}
MAX_MSG = 300


def _task_label(data: Dict[str, Any]) -> str:
    task = str(data.get("task") or "").strip()
    role = str(data.get("role") or "").strip()
    if role and task.startswith(f"{role} : "):
        task = task[len(role) + 3:]
    return f"{role}: {task}" if role else task


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
class Progress:
    """Feed events with :meth:`line`; it returns the line to print for that event, or None.

    A line is printed when a task finishes (ok/changed/failed/unreachable), with its duration,
    so a long step (the readiness wait) shows when it ends; skipped tasks and ``ignore_errors``
    failures are only shown with ``verbose``. ``failed`` collects the failures' messages.
    """

    verbose: bool = False
    started: Dict[str, float] = field(default_factory=dict)
    failed: list = field(default_factory=list)
    playbook_pid: Optional[int] = None

    def line(self, event: Dict[str, Any]) -> Optional[str]:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if self.playbook_pid is None and isinstance(event.get("pid"), int):
            self.playbook_pid = event["pid"]
        if kind == "playbook_on_task_start":
            self.started[str(data.get("task_uuid") or data.get("uuid") or "")] = _ts(event)
            return None
        if kind not in _RESULT_EVENTS:
            return None
        status = _RESULT_EVENTS[kind]
        res = data.get("res") or {}
        if status == "ok" and res.get("changed"):
            status = "changed"
        ignored = bool(data.get("ignore_errors"))
        if (status == "skipped" or ignored) and not self.verbose:
            return None
        label = _task_label(data)
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
            if not ignored:
                self.failed.append(f"{label}: {msg}" if msg else label)
            if msg:
                text += f": {msg}"
        return text


def _ts(event: Dict[str, Any]) -> float:
    """Seconds from the event's ``created`` ISO time (0.0 when missing)."""
    created = event.get("created")
    if not created:
        return 0.0
    try:
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
