# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The session record ``$session_root/<id>/state.json``: schema, validation, merge, atomic writes.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only (Python 3.8+), so the ``session_state``/``session_ready`` modules, the CLI
and the watcher share one implementation (docs/design/sessions.md, "Session record").

Layout of a session directory (0700)::

    <root>/<id>/state.json   the record (0600), written atomically under a lock
    <root>/<id>/secret       the session secret (0600), made once by create(), never returned
    <root>/<id>/logs/        logs (0700)

Rules of the record:

* Steps in order: created, ports_reserved, submitted, queued, starting, running, then one of the
  terminal steps cancelled, completed, failed. A non-terminal step may follow any other (a
  requeued job goes from running back to queued); a terminal step is final: a different step
  after it is refused (:class:`StateError`, field ``step``); the same one again is a no-op.
* Every step change appends ``{step, at}`` to ``history``; entering a terminal step sets ``ended``.
* ``cancel_requested`` is a tombstone: once true it stays true, and only a terminal step may follow
  (a racing start that tries to move on fails and undoes what it did).
* ``ports`` and ``pids`` are merged key by key (a ``None`` value removes the key); other fields
  are replaced. ``updated`` is set on every real change. Unknown fields are refused.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils._service_file import locked, write_atomic
from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import (  # noqa: F401 - re-exported
    ID_RE,
    ID_RULE,
    STEPS,
    TERMINAL_STEPS,
)

SCHEMA = 1
TARGETS = ("workspace", "controller", "compute")
SCHEDULERS = ("slurm", "pbs", "sge", "local")
URLS = ("/me", "/sme")
STATE_FILE = "state.json"
SECRET_FILE = "secret"  # noqa: S105 - a file name, not a secret
LOGS_DIR = "logs"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
MAX_TEXT = 4096
MAX_FILE_BYTES = 1024 * 1024
MAX_HISTORY = 200

# field -> kind; "text" = free single-line-or-more text, "name" = identifier-like string
FIELDS = {
    "service": "name", "target": "target", "resource": "name", "scheduler": "scheduler", "step": "step",
    "job_id": "name", "job_name": "name", "ports": "intmap", "pids": "intmap", "remote_dir": "path",
    "url": "url", "slug": "text", "error": "text", "cancel_requested": "bool",
}
RECORD_KEYS = ("schema", "id", "created", "updated", "ended", "history") + tuple(FIELDS)


class StateError(ValueError):
    """A refused value or an unusable record; ``field`` names the option at fault."""

    def __init__(self, msg: str, field: Optional[str] = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.field = field


def default_root(env: Optional[Mapping[str, str]] = None) -> str:
    """``${XDG_STATE_HOME:-~/.local/state}/isession/sessions``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "isession", "sessions")


def validate_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise StateError("id must be %s, got %r" % (ID_RULE, value), "id")
    return value


def session_paths(root: str, session_id: str) -> Dict[str, str]:
    """Paths of one session's directory and files (nothing touched)."""
    if not root or not os.path.isabs(root):
        raise StateError("root must be an absolute path, got %r" % (root,), "root")
    directory = os.path.join(os.path.normpath(root), validate_id(session_id))
    return {"dir": directory, "state": os.path.join(directory, STATE_FILE),
            "secret": os.path.join(directory, SECRET_FILE), "logs": os.path.join(directory, LOGS_DIR)}


# ---------------------------------------------------------------------------- validation (pure)
def _check_value(field: str, kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise StateError("%s must be a boolean, got %r" % (field, value), field)
        return value
    if kind == "intmap":
        if not isinstance(value, Mapping):
            raise StateError("%s must be a mapping of names to integers, got %r" % (field, value), field)
        out = {}  # type: Dict[str, Optional[int]]
        for key, raw in value.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise StateError("%s key %r must be a short identifier" % (field, key), field)
            num = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
            if num is not None and (isinstance(num, bool) or not isinstance(num, int) or not 0 < num < 1 << 31):
                raise StateError("%s.%s must be a positive integer, got %r" % (field, key, num), field)
            out[key] = num
        return out
    if not isinstance(value, str):
        raise StateError("%s must be a string, got %r" % (field, value), field)
    choices = {"target": TARGETS, "scheduler": SCHEDULERS, "step": STEPS, "url": URLS}.get(kind)
    if choices is not None and value not in choices:
        raise StateError("%s must be one of %s, got %r" % (field, ", ".join(choices), value), field)
    if kind == "name" and not _NAME_RE.match(value):
        raise StateError("%s must be 1-128 characters of [A-Za-z0-9._-], got %r" % (field, value), field)
    if kind in ("text", "path"):
        if len(value) > MAX_TEXT or "\x00" in value:
            raise StateError("%s is longer than %d characters or holds a NUL byte" % (field, MAX_TEXT), field)
        if kind == "path" and any(c in value for c in "\n\r"):
            raise StateError("%s must be a single line" % field, field)
    return value


def validate_updates(updates: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the given fields (None = not given); return the given ones, normalised."""
    out = {}  # type: Dict[str, Any]
    for field, value in updates.items():
        if field not in FIELDS:
            raise StateError("unknown field %r (known: %s)" % (field, ", ".join(sorted(FIELDS))), field)
        checked = _check_value(field, FIELDS[field], value)
        if checked is not None:
            out[field] = checked
    return out


def validate_record(record: Any, path: str = STATE_FILE) -> Dict[str, Any]:
    """Check a record read from disk (its own fields and the known ones); return it."""
    if not isinstance(record, dict):
        raise StateError("%s is not a JSON object" % path, "path")
    if record.get("schema") != SCHEMA:
        raise StateError("%s has schema %r, this code reads schema %d" % (path, record.get("schema"), SCHEMA), "path")
    try:
        validate_id(record.get("id"))
        validate_updates({k: v for k, v in record.items() if k in FIELDS})
    except StateError as exc:
        raise StateError("%s holds an invalid value: %s" % (path, exc.msg), "path") from None
    history = record.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) and h.get("step") in STEPS for h in history):
        raise StateError("%s has an invalid history" % path, "path")
    return record


# ---------------------------------------------------------------------------- merge / render (pure)
def new_record(session_id: str, now: float) -> Dict[str, Any]:
    return {"schema": SCHEMA, "id": validate_id(session_id), "step": "created", "cancel_requested": False,
            "ports": {}, "pids": {}, "created": now, "updated": now, "ended": None,
            "history": [{"step": "created", "at": now}]}


def merge(current: Mapping[str, Any], updates: Mapping[str, Any], now: float) -> Dict[str, Any]:
    """The record after ``updates`` (already validated); ``updated`` moves only on a real change."""
    record = json.loads(json.dumps(current))  # deep copy
    old_step = record.get("step")
    new_step = updates.get("step", old_step)
    if old_step in TERMINAL_STEPS and new_step != old_step:
        raise StateError("session %s already ended (%s); step %s refused" % (record.get("id"), old_step, new_step),
                         "step")
    if record.get("cancel_requested") and new_step != old_step and new_step not in TERMINAL_STEPS:
        raise StateError("session %s is being cancelled; step %s refused" % (record.get("id"), new_step), "step")
    if record.get("cancel_requested") and updates.get("cancel_requested") is False:
        raise StateError("cancel_requested cannot be unset once a cancel was requested", "cancel_requested")
    for field, value in updates.items():
        if FIELDS[field] == "intmap":
            merged = dict(record.get(field) or {})
            for key, num in value.items():
                if num is None:
                    merged.pop(key, None)
                else:
                    merged[key] = num
            record[field] = merged
        else:
            record[field] = value
    if new_step != old_step:
        record["history"] = (list(record.get("history") or []) + [{"step": new_step, "at": now}])[-MAX_HISTORY:]
        if new_step in TERMINAL_STEPS:
            record["ended"] = now
    if record != current:
        record["updated"] = now
    return record


def render(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def public_view(record: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The record as modules return it (there is no secret in it; a copy)."""
    return json.loads(json.dumps(record)) if record else {}


def is_terminal(record: Optional[Mapping[str, Any]]) -> bool:
    return bool(record) and record.get("step") in TERMINAL_STEPS  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- files
def read_text(path: str) -> Optional[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise StateError("%s is not a regular file" % path, "path")
    if st.st_size > MAX_FILE_BYTES:
        raise StateError("%s is larger than %d bytes" % (path, MAX_FILE_BYTES), "path")
    with open(path, encoding="utf-8", errors="strict") as handle:
        return handle.read()


def read_record(path: str) -> Optional[Dict[str, Any]]:
    """The record at ``path``; None when there is none; :class:`StateError` when it is unusable."""
    text = read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError("%s is not valid JSON: %s" % (path, exc), "path") from None
    return validate_record(data, path)


def _check_dir(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateError("%s is not a directory (symlinks are refused)" % path, "root")
    if st.st_uid != os.geteuid():
        raise StateError("%s belongs to uid %d, not to you" % (path, st.st_uid), "root")


def _token() -> str:
    import secrets  # noqa: PLC0415 - its hashlib/OpenSSL import is paid only where a session is made, not per cancel

    return secrets.token_urlsafe(32)


def make_secret(path: str, gen: Callable[[], str] = _token) -> bool:
    """Create the 0600 secret file with exclusive create; False when it already exists (kept as is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise StateError("%s exists but is not a usable secret file" % path, "id") from None
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.chmod(path, 0o600)
        return False
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (gen() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class Plan:
    """What one operation would do: the record before/after and which files/dirs it creates."""

    def __init__(self, paths: Dict[str, str], before: Optional[Dict[str, Any]], after: Optional[Dict[str, Any]],
                 make_dirs: List[str], make_secret: bool) -> None:
        self.paths = paths
        self.before = before
        self.after = after
        self.make_dirs = make_dirs
        self.make_secret = make_secret

    @property
    def before_text(self) -> str:
        return render(self.before) if self.before else ""

    @property
    def after_text(self) -> str:
        return render(self.after) if self.after else ""

    @property
    def record_changed(self) -> bool:
        return self.after is not None and self.after != self.before

    @property
    def changed(self) -> bool:
        return self.record_changed or bool(self.make_dirs) or self.make_secret


def plan(op: str, root: str, session_id: str, updates: Mapping[str, Any], *, now: Optional[float] = None,
         missing_ok: bool = False) -> Plan:
    """Compute an operation without touching anything (check mode uses this alone).

    ``create``: directory, logs, secret and record if missing; an existing record gets ``updates``
    merged but must not be ended or cancelled. ``update``: the record must exist unless
    ``missing_ok``. ``cancel``: sets the tombstone (creating a minimal record when none exists, so a
    start that has not created it yet sees it). ``read``: nothing.
    """
    now = time.time() if now is None else now
    paths = session_paths(root, session_id)
    changes = validate_updates(updates)
    make_dirs = []  # type: List[str]
    for key in ("dir", "logs"):
        if os.path.lexists(paths[key]):
            _check_dir(paths[key])
        elif op in ("create", "cancel"):
            make_dirs.append(paths[key])
    if op in ("create", "cancel") and not os.path.isdir(os.path.dirname(paths["dir"])):
        make_dirs.insert(0, os.path.dirname(paths["dir"]))
    before = None if make_dirs and paths["dir"] in make_dirs else read_record(paths["state"])
    if before is not None and before.get("id") != session_id:
        raise StateError("%s belongs to session %r" % (paths["state"], before.get("id")), "id")
    if op == "read":
        return Plan(paths, before, before, [], False)
    if op == "create":
        if before is not None and before.get("cancel_requested"):
            raise StateError("session %s was cancelled; not starting it" % session_id, "id")
        if before is not None and is_terminal(before):
            raise StateError("session %s already ended (%s); use a new id" % (session_id, before["step"]), "id")
        after = merge(before or new_record(session_id, now), changes, now)
        return Plan(paths, before, after, make_dirs, not os.path.lexists(paths["secret"]))
    if op == "cancel":
        changes = dict(changes, cancel_requested=True)
        after = merge(before or new_record(session_id, now), changes, now)
        return Plan(paths, before, after, make_dirs, False)
    if op == "update":
        if before is None:
            if missing_ok:
                return Plan(paths, None, None, [], False)
            raise StateError("session %s has no record at %s" % (session_id, paths["state"]), "id")
        if before.get("step") in TERMINAL_STEPS and changes.get("step") not in (None, before["step"]):
            merge(before, changes, now)  # raises the clear message
        return Plan(paths, before, merge(before, changes, now), [], False)
    raise StateError("op must be one of create, update, cancel, read, got %r" % (op,), "op")


def apply(p: Plan, secret_gen: Optional[Callable[[], str]] = None) -> None:
    for directory in p.make_dirs:
        try:
            os.makedirs(directory, mode=0o700)
        except FileExistsError:
            _check_dir(directory)
    if p.make_secret:
        if secret_gen is None:
            make_secret(p.paths["secret"])
        else:
            make_secret(p.paths["secret"], secret_gen)
    if p.record_changed and p.after is not None:
        write_atomic(p.paths["state"], render(p.after), 0o600)


def run_op(op: str, root: str, session_id: str, updates: Optional[Mapping[str, Any]] = None, *,
           check: bool = False, now: Optional[float] = None, missing_ok: bool = False,
           expect_step: Optional[str] = None) -> Plan:
    """Plan and (unless ``check``) apply one operation under the session directory's lock.

    ``expect_step`` makes an update a compare-and-set: it is refused (StateError) when the record's
    step is no longer that one, so a writer that read an older step cannot undo a newer one.
    """
    paths = session_paths(root, session_id)
    if check or op == "read":
        return plan(op, root, session_id, updates or {}, now=now, missing_ok=missing_ok)
    if op in ("create", "cancel") and not os.path.isdir(paths["dir"]):
        first = plan(op, root, session_id, {}, now=now, missing_ok=missing_ok)  # validates before making anything
        apply(Plan(paths, None, None, first.make_dirs, False))
    with locked(paths["state"]):
        p = plan(op, root, session_id, updates or {}, now=now, missing_ok=missing_ok)
        if expect_step is not None and p.before is not None and p.before.get("step") != expect_step:
            raise StateError("session %s moved to step %s meanwhile (expected %s); not updated"
                             % (session_id, p.before.get("step"), expect_step), "step")
        apply(p)
    return p


def update_state(root: str, session_id: str, expect_step: Optional[str] = None,
                 **updates: Any) -> Tuple[bool, Dict[str, Any]]:
    """One update for the CLI and the watcher; returns ``(changed, record)``.

    With ``expect_step`` the update only happens while the record is still at that step.
    """
    p = run_op("update", root, session_id, updates, expect_step=expect_step)
    return p.changed, public_view(p.after)


# ---------------------------------------------------------------------------- the watcher's note
WATCH_FILE = "watch.json"


def write_watch(directory: str, data: Mapping[str, Any], *, check: bool = False) -> bool:
    """Write ``<directory>/watch.json`` (0600, atomically) unless it already holds ``data``; True when it changed."""
    text = json.dumps(dict(data), sort_keys=True) + "\n"
    path = os.path.join(directory, WATCH_FILE)
    if read_text(path) == text:
        return False
    if not check:
        write_atomic(path, text, 0o600)
    return True
