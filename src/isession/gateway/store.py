"""What the gateway knows about sessions: read from the session root, never kept only in memory.

* Sessions come from ``isession.sessions`` (``state.json`` through ``_state``, ``service.json`` through
  ``_service_file``). A port is looked up through a small index that is re-validated on every request by two
  ``stat`` calls, so a session that ends is refused from the next request on. The list of all sessions reads a
  session's files again only when their ``stat`` changed.
* The gateway's own per-session facts live in the user's gateway directory (``<session root>/.gateway`` in
  single-user mode): ``sessions/<id>.json`` (the idle timeout chosen in the start form) and ``activity/<id>``
  (the last time traffic went through the gateway, written at most every ``FLUSH_EVERY`` seconds). A restarted
  gateway reads both back.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils import _directives, _service_file

from .. import config, sessions
from .auth import User

FLUSH_EVERY = 5.0
RESCAN_EVERY = 0.5  # an unknown port rescans the root at most this often
_STATUS_LIVE = ("Submitting", "Queued", "Starting", "Running")


def _stamp_of(path: str) -> Tuple[int, int]:
    """A record file's (mtime, inode): a rewrite (atomic: a new inode) or a touch changes it; 0s when missing."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_ino)


def is_live(sess: sessions.Session) -> bool:
    return sess.status in _STATUS_LIVE and sess.record.get("step") not in ("cancelled", "completed", "failed")


@dataclass
class _Entry:
    sess: sessions.Session
    stamp: Tuple[Tuple[int, int], Tuple[int, int]]
    paths: Tuple[str, str]  # service.json, state.json: plain strings, stat'd on every request


class UserSessions:
    """The sessions of one user, by id and by workspace port."""

    def __init__(self, user: User) -> None:
        self.user = user
        self._by_port: Dict[int, _Entry] = {}
        self._last_scan = 0.0
        self._loaded: Dict[str, Tuple[Any, sessions.Session]] = {}  # id -> (its files' stamps, as last read)

    def _paths(self, sid: str) -> Tuple[str, str]:
        d = os.path.join(str(self.user.root), sid)
        return os.path.join(d, "service.json"), os.path.join(d, "state.json")

    @staticmethod
    def _stamp(paths: Tuple[str, str]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        return _stamp_of(paths[0]), _stamp_of(paths[1])

    def all(self) -> List[sessions.Session]:
        """Every session, as :func:`isession.sessions.all_sessions` reads them (oldest first), each read again only
        when its directory, ``service.json`` or ``state.json`` changed (``lstat``/``stat``: inode and mtime).

        The idle loop asks every 2 s; reading every record each time was most of its work (10 ms for 50 sessions,
        the event loop waiting on the interpreter lock meanwhile)."""
        root = str(self.user.root)
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            self._loaded = {}
            return []
        loaded: Dict[str, Tuple[Any, sessions.Session]] = {}
        for name in names:
            if name.startswith("."):
                continue
            try:
                st = os.lstat(os.path.join(root, name))
                here: Any = (st.st_ino, st.st_mode)
            except OSError:
                continue
            stamp = (here, self._stamp(self._paths(name)))
            hit = self._loaded.get(name)
            if hit is not None and hit[0] == stamp:
                loaded[name] = hit
                continue
            sess = sessions.load(self.user.root, name)
            if sess is not None:
                loaded[name] = (stamp, sess)
        self._loaded = loaded
        out = [sess for _key, sess in loaded.values()]
        out.sort(key=lambda s: (s.record.get("created") or 0, s.id))
        return out

    def get(self, sid: str) -> Optional[sessions.Session]:
        try:
            config.check_session_id(sid)
        except config.UsageError:
            return None
        return sessions.load(self.user.root, sid)

    def _rescan(self) -> None:
        index: Dict[int, _Entry] = {}
        for sess in self.all():
            port = str(sess.service.get("PORT") or "")
            if port.isdigit() and is_live(sess):
                paths = self._paths(sess.id)
                index[int(port)] = _Entry(sess, self._stamp(paths), paths)
        self._by_port = index
        self._last_scan = time.monotonic()

    def by_port(self, port: int) -> Optional[sessions.Session]:
        """The live session whose service.json PORT is ``port``, or None."""
        entry = self._by_port.get(port)
        if entry is not None:
            stamp = self._stamp(entry.paths)
            if stamp != entry.stamp:
                sess = sessions.load(self.user.root, entry.sess.id)
                if sess is None:
                    self._by_port.pop(port, None)
                    return None
                entry = _Entry(sess, stamp, entry.paths)
                self._by_port[port] = entry
            if is_live(entry.sess) and str(entry.sess.service.get("PORT")) == str(port):
                return entry.sess
            # ended or moved: forgotten, so a later session given the same port is found by the next rescan
            self._by_port.pop(port, None)
            return None
        if time.monotonic() - self._last_scan >= RESCAN_EVERY:
            self._rescan()
            entry = self._by_port.get(port)
            return entry.sess if entry else None
        return None


# ---------------------------------------------------------------------------- the gateway's own per-session files
def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _service_file.write_atomic(str(path), json.dumps(data, sort_keys=True) + "\n", 0o600)


def session_prefs(user: User, sid: str) -> Dict[str, Any]:
    return _read_json(user.state / "sessions" / f"{sid}.json")


def set_session_prefs(user: User, sid: str, **values: Any) -> None:
    _write_json(user.state / "sessions" / f"{sid}.json", dict(session_prefs(user, sid), **values))


class Activity:
    """Last traffic per session: noted in memory on every request or frame (a dict write, nothing else on the
    proxy's path), written to disk by :meth:`flush` from the idle loop's thread (an fsync'd file per session)."""

    def __init__(self) -> None:
        self._seen: Dict[Tuple[str, str], float] = {}
        self._flushed: Dict[Tuple[str, str], float] = {}

    def note(self, user: User, sid: str, now: Optional[float] = None) -> None:
        self._seen[(user.name, sid)] = time.time() if now is None else now

    @staticmethod
    def _write(user: User, sid: str, at: float) -> None:
        path = user.state / "activity" / f"{sid}.json"
        on_disk = _read_json(path).get("last")
        if isinstance(on_disk, (int, float)) and on_disk >= at:
            return  # another worker saw later traffic
        try:
            _write_json(path, {"last": at})
        except OSError:
            pass  # a full disk must not break the proxy; the in-memory time still counts

    def last(self, user: User, sid: str) -> Optional[float]:
        mem = self._seen.get((user.name, sid))
        disk = _read_json(user.state / "activity" / f"{sid}.json").get("last")
        times = [t for t in (mem, disk) if isinstance(t, (int, float))]
        return max(times) if times else None

    def flush(self, users: Dict[str, User], *, force: bool = False) -> None:
        """Write each session's last traffic when it moved by ``FLUSH_EVERY`` s or more since the last write."""
        every = 0.0 if force else FLUSH_EVERY
        for (name, sid), at in list(self._seen.items()):
            if at - self._flushed.get((name, sid), 0.0) > every and name in users:
                self._flushed[(name, sid)] = at
                self._write(users[name], sid, at)


# ---------------------------------------------------------------------------- times
def step_time(sess: sessions.Session, step: str) -> Optional[float]:
    """When the session's record first entered ``step`` (its history), or None."""
    for item in sess.record.get("history") or []:
        if item.get("step") == step and isinstance(item.get("at"), (int, float)):
            return float(item["at"])
    return None


def walltime_seconds(sess: sessions.Session) -> Optional[int]:
    """The walltime the session asked for, in seconds (the CLI's recorded inputs, else the play's watch.json)."""
    value = None
    try:
        inputs = json.loads((sess.dir / "logs" / "runner" / "cli.json").read_text()).get("inputs") or {}
        value = inputs.get("session_walltime")
    except (OSError, ValueError, AttributeError):
        pass
    if not value:
        value = _read_json(sess.dir / "watch.json").get("walltime")
    if not value:
        return None
    try:
        return int(_directives.parse_walltime("session_walltime", value))
    except Exception:  # noqa: BLE001 - text the scheduler may read but we cannot: no time left shown
        return None


def time_left(sess: sessions.Session, now: Optional[float] = None) -> Optional[float]:
    """Seconds until the walltime ends (from the job's start), None when there is no walltime or no start yet."""
    wall = walltime_seconds(sess)
    start = step_time(sess, "starting") or step_time(sess, "running")
    if wall is None or start is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, start + wall - now)


def idle_left(user: User, sess: sessions.Session, activity: Activity, default_timeout: float,
              now: Optional[float] = None) -> Optional[float]:
    """Seconds until idle auto-cancel, None when the session has no idle timeout or is not running."""
    timeout = session_prefs(user, sess.id).get("idle_timeout", default_timeout)
    if not isinstance(timeout, (int, float)) or timeout <= 0 or sess.status != "Running":
        return None
    now = time.time() if now is None else now
    since = max(t for t in (activity.last(user, sess.id), step_time(sess, "running"), sess.record.get("created"), 0)
                if isinstance(t, (int, float)))
    return max(0.0, since + timeout - now)


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min"
    return f"{s} s"
