"""Read session records for ``status``, ``list`` and ``logs`` (no writes here)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state, _vocabulary

LOG_SUFFIXES = (".log", ".out", ".err", ".error")
NEVER_SHOWN = ("secret",)  # file names never printed by `logs`


@dataclass
class Session:
    id: str
    dir: Path
    record: Dict[str, Any] = field(default_factory=dict)
    service: Dict[str, Any] = field(default_factory=dict)
    problem: str = ""

    @property
    def status(self) -> str:
        return str(self.service.get("JOB_STATUS") or _step_status().get(self.record.get("step", ""), "Unknown"))

    @property
    def message(self) -> str:
        return str(self.service.get("ERROR_MESSAGE") or self.record.get("error") or "")

    @property
    def url(self) -> str:
        return service_url(self.service)

    @property
    def service_json(self) -> Path:
        return self.dir / "service.json"

    def as_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "status": self.status, "message": self.message, "url": self.url,
                "service_json": str(self.service_json), "dir": str(self.dir), "service": self.record.get("service"),
                "target": self.record.get("target"), "resource": self.record.get("resource"),
                "job_id": self.record.get("job_id"), "step": self.record.get("step"),
                "created": self.record.get("created"), "ended": self.record.get("ended"),
                "problem": self.problem}


# What a record's step means when service.json is not written yet.
def _step_status() -> Dict[str, str]:
    return _vocabulary.STATUS_OF_STEP


def service_url(service: Dict[str, Any], host: str = "127.0.0.1") -> str:
    """``http://127.0.0.1:PORT<URL>/<PORT>/<SLUG>`` from service.json, "" until the port is known."""
    port, url = service.get("PORT"), service.get("URL")
    if not port or not url:
        return ""
    return f"http://{host}:{port}{url}/{port}/{service.get('SLUG') or ''}"


def load(root: Path, session_id: str) -> Optional[Session]:
    """One session, or None when ``root/<id>`` is not a session directory."""
    directory = root / session_id
    if not directory.is_dir() or directory.is_symlink():
        return None
    sess = Session(id=session_id, dir=directory)
    try:
        sess.record = _state.read_record(str(directory / "state.json")) or {}
    except (ValueError, OSError) as exc:
        sess.problem = f"state.json: {exc}"
    try:
        sess.service = _service_file.read_service_file(str(sess.service_json)) or {}
    except (ValueError, OSError) as exc:
        sess.problem = (sess.problem + "; " if sess.problem else "") + f"service.json: {exc}"
    if not sess.record and not sess.service and not sess.problem:
        return None
    return sess


def all_sessions(root: Path) -> List[Session]:
    """Every session under ``root``, oldest first."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = [s for s in (load(root, n) for n in names if not n.startswith(".")) if s is not None]
    out.sort(key=lambda s: (s.record.get("created") or 0, s.id))
    return out


def latest(root: Path) -> Optional[Session]:
    sessions = all_sessions(root)
    return sessions[-1] if sessions else None


def _age(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    secs = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def format_table(sessions: List[Session], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    rows = [("ID", "SERVICE", "TARGET", "STATUS", "AGE", "URL")]
    for s in sessions:
        target = s.record.get("target") or "-"
        if s.record.get("resource") and target != "workspace":
            target = f"{target}@{s.record['resource']}"
        rows.append((s.id, str(s.record.get("service") or "-"), target, s.status,
                     _age(s.record.get("created"), now), s.url or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows)


def format_status(s: Session) -> str:
    lines = [f"session   {s.id}", f"status    {s.status}"]
    if s.message:
        lines.append(f"message   {s.message}")
    rec = s.record
    for key, label in (("service", "service"), ("target", "target"), ("resource", "resource"),
                       ("scheduler", "scheduler"), ("job_id", "job"), ("step", "step")):
        if rec.get(key):
            lines.append(f"{label:<9} {rec[key]}")
    if s.url:
        lines.append(f"url       {s.url}")
    lines.append(f"file      {s.service_json}")
    if s.problem:
        lines.append(f"problem   {s.problem}")
    return "\n".join(lines)


def local_logs(directory: Path) -> List[Path]:
    """Log files of a session on the workspace: ``logs/**`` and the runner's stdout per run."""
    out: List[Path] = []
    logs = directory / "logs"
    for base, dirs, files in os.walk(logs):  # links to directories are not followed
        if base == str(logs):
            dirs[:] = [d for d in dirs if d != "runner"]  # its thousands of event files are never shown
        for name in files:
            path = Path(base, name)
            if name not in NEVER_SHOWN and not path.is_symlink() and path.is_file():
                out.append(path)
    # the runner's own record: artifacts/<ident>/stdout (events are JSON; `logs --events` is not offered); a start a
    # standby ran has artifacts/ as a link to the standby's, read here: the walk above skips logs/runner
    out = sorted(out + [p for p in (logs / "runner").glob("artifacts/*/stdout") if p.is_file()])
    for name in os.listdir(directory) if directory.is_dir() else []:
        path = directory / name
        if path.is_file() and name.endswith(LOG_SUFFIXES) and name not in NEVER_SHOWN:
            out.append(path)
    return out


def tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read: {exc.strerror or exc})"
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else text
