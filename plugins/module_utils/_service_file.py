# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read, validate, merge, render and atomically write the seed's ``service.json``.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only, so the ``service_json`` module, the CLI and the watcher share it.

The file is one JSON object::

    {
        "URL": "/me",            # "/me" (http backend) or "/sme" (https backend)
        "PORT": "56321",         # workspace-side port, a string of digits
        "SLUG": "lab",           # URL tail after <URL>/<PORT>/, "" when none
        "JOB_STATUS": "Running", # one of JOB_STATUSES
        "ERROR_MESSAGE": "",     # words for the user, "" when none
        "EXTRA_KEY": ...         # extra keys, sorted, any JSON value
    }

Decisions (documented in the module too):

* Output: standard keys in the order above, then extras sorted by key; ``indent=4``;
  UTF-8 (``ensure_ascii=False``); one trailing newline. ``URL``/``PORT``/``JOB_STATUS``
  are written only once known; ``SLUG`` and ``ERROR_MESSAGE`` are always written (``""``).
* ``SLUG`` is a relative URL tail made of URL characters only (letters, digits and
  ``- . _ ~ / ? # = & % + : @ ,``): no whitespace, control characters, quotes, ``;``, ``$``,
  backticks, parentheses or backslashes; no leading ``/`` or ``-``; no ``.``/``..`` path
  segment (also when percent-encoded); ``%`` only as ``%XX``. A ``?query`` or ``#fragment``
  is allowed for app options (noVNC's ``vnc.html?autoconnect=1``, code-server's ``?folder=``)
  but parameters named like secrets (password, token, secret, api key, auth, credential,
  signature) are refused: secrets never go into URLs.
* ``ERROR_MESSAGE`` keeps newlines; ``\\r\\n``/``\\r`` become ``\\n``, a tab becomes a space,
  any other control character is escaped visibly as ``\\xNN`` (scheduler text is reported,
  never refused); longer than ``MAX_MESSAGE`` characters is cut with `` [truncated]``.
* Changing ``JOB_STATUS`` without giving ``ERROR_MESSAGE`` resets the message to ``""``
  (a message belongs to the status it explains); every other key not given is kept.
* An extra whose value is ``None`` removes that extra key.
* ``JOB_STATUS`` ``Running`` needs ``URL`` and ``PORT`` (given or already in the file).
* An existing file that is not a JSON object, or holds invalid standard values, is an error
  (:class:`ServiceFileError`); ``force=True`` rebuilds it from the given values only.
* Writers hold :func:`locked` (``flock`` on the file's directory) around read-merge-write, so
  concurrent writers never lose updates. ``path`` being a symlink is replaced by a regular file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from urllib.parse import unquote

from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import JOB_STATUSES  # noqa: F401 - re-exported

URLS = ("/me", "/sme")
STANDARD_KEYS = ("URL", "PORT", "SLUG", "JOB_STATUS", "ERROR_MESSAGE")
FIELD_OF_KEY = {"URL": "url", "PORT": "port", "SLUG": "slug", "JOB_STATUS": "job_status",
                "ERROR_MESSAGE": "error_message"}
MAX_SLUG = 2048
MAX_MESSAGE = 4096
MAX_FILE_BYTES = 1024 * 1024
TRUNCATED = " [truncated]"

_PORT_RE = re.compile(r"[0-9]{1,5}")
_SLUG_RE = re.compile(r"[A-Za-z0-9._~/?#=&%+:@,-]*")
_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SECRET_PARAM_RE = re.compile(r"pass|pwd|token|secret|api[_-]?key|auth|credential|signature", re.IGNORECASE)
_MODE_RE = re.compile(r"0?[0-7]{3,4}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_KEY_BAD_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ServiceFileError(ValueError):
    """A value or a file that cannot become a valid service.json; ``field`` names the culprit."""

    def __init__(self, msg: str, field: Optional[str] = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.field = field


# ---------------------------------------------------------------------------- validation
def validate_url(value: Any) -> str:
    if not isinstance(value, str) or value not in URLS:
        raise ServiceFileError(f"url must be one of {', '.join(URLS)}, got {value!r}", "url")
    return value


def validate_port(value: Any) -> str:
    """Return the port as a string of digits; accept an int or a digit string in 1..65535."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ServiceFileError(f"port must be an integer or a string of digits, got {value!r}", "port")
    text = str(value)
    if not _PORT_RE.fullmatch(text):
        raise ServiceFileError(f"port must be a string of digits (1..65535), got {value!r}", "port")
    number = int(text)
    if not 1 <= number <= 65535:
        raise ServiceFileError(f"port must be in 1..65535, got {value!r}", "port")
    return str(number)


# The one secret a SLUG may hold, and only in its fragment (browsers never send a fragment to a server): the VNC
# password noVNC reads from ``#password=...``, 8 characters derived from the session secret (_desktop.vnc_password),
# put there only when a desktop session opts in (vnc_password_in_url) for platforms without the gateway.
_FRAGMENT_PASSWORD_RE = re.compile(r"password=[A-Za-z0-9_-]{8}")


def _fragment_params(fragment: str) -> List[str]:
    return fragment.split("&") if fragment else []


def validate_slug(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ServiceFileError(f"slug must be a string, got {value!r}", "slug")
    if len(value) > MAX_SLUG:
        raise ServiceFileError(f"slug is longer than {MAX_SLUG} characters", "slug")
    if not _SLUG_RE.fullmatch(value):
        bad = sorted({c for c in value if not _SLUG_RE.fullmatch(c)})
        raise ServiceFileError(f"slug contains characters not allowed in a URL tail: {''.join(bad)!r}", "slug")
    if value.startswith(("/", "-")):
        raise ServiceFileError(f"slug must not start with {value[0]!r} (it is a tail after <URL>/<PORT>/)", "slug")
    if _PCT_RE.search(value):
        raise ServiceFileError("slug has a percent sign that is not followed by two hex digits", "slug")
    before_fragment, fragment = (value.split("#", 1) + [""])[:2]
    path, query = (before_fragment.split("?", 1) + [""])[:2]
    decoded_path = unquote(path)
    if _CONTROL_RE.search(decoded_path) or "\n" in decoded_path or "\t" in decoded_path or "\\" in decoded_path:
        raise ServiceFileError("slug encodes a control character or backslash", "slug")
    if any(seg in (".", "..") for seg in decoded_path.split("/")):
        raise ServiceFileError("slug must not contain '.' or '..' path segments", "slug")
    if decoded_path.startswith("/"):
        raise ServiceFileError("slug must not start with an encoded '/'", "slug")
    for param in re.split(r"[?#&]", query + "&" + fragment):
        name = unquote(param.split("=", 1)[0])
        if param in _fragment_params(fragment) and _FRAGMENT_PASSWORD_RE.fullmatch(param):
            continue  # a desktop's VNC password in the fragment, the opt-in of docs/design/desktops.md
        if name and _SECRET_PARAM_RE.search(name):
            raise ServiceFileError(
                f"slug parameter {name!r} looks like a secret; secrets never go into URLs", "slug")
    return value


def validate_job_status(value: Any) -> str:
    if not isinstance(value, str) or value not in JOB_STATUSES:
        raise ServiceFileError(
            f"job_status must be one of {', '.join(JOB_STATUSES)}, got {value!r}", "job_status")
    return value


def clean_message(value: Any) -> str:
    """Normalise ERROR_MESSAGE: keep newlines, escape other control characters, cap the length."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ServiceFileError(f"error_message must be a string, got {value!r}", "error_message")
    _check_encodable(value, "error_message")
    text = value.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - len(TRUNCATED)] + TRUNCATED
    return text


def validate_extra(extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Check extra keys (no clash with the standard keys, any case) and JSON-able values."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ServiceFileError(f"extra must be a dictionary, got {type(extra).__name__!r}", "extra")
    upper = {k.upper() for k in STANDARD_KEYS}
    out = {}  # type: Dict[str, Any]
    for key, value in extra.items():
        if not isinstance(key, str) or not key or _KEY_BAD_RE.search(key):
            raise ServiceFileError(f"extra key {key!r} must be a non-empty string without control characters",
                                   "extra")
        if key.upper() in upper:
            raise ServiceFileError(f"extra key {key!r} collides with the standard key {key.upper()}", "extra")
        if value is not None:
            try:
                json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError) as exc:
                raise ServiceFileError(f"extra key {key!r} has a value that is not JSON-serialisable: {exc}",
                                       "extra") from None
        out[key] = value
    return out


def validate(*, url: Any = None, port: Any = None, slug: Any = None, job_status: Any = None,
             error_message: Any = None, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Validate the given fields; return the updates (file keys -> normalised values), None = not given."""
    updates = OrderedDict()  # type: Dict[str, Any]
    if url is not None:
        updates["URL"] = validate_url(url)
    if port is not None:
        updates["PORT"] = validate_port(port)
    if slug is not None:
        updates["SLUG"] = validate_slug(slug)
    if job_status is not None:
        updates["JOB_STATUS"] = validate_job_status(job_status)
    if error_message is not None:
        updates["ERROR_MESSAGE"] = clean_message(error_message)
    updates.update(validate_extra(extra))
    return updates


def validate_content(content: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate a whole service.json object (e.g. one read from disk); return it normalised."""
    checks = {"URL": validate_url, "PORT": validate_port, "SLUG": validate_slug,
              "JOB_STATUS": validate_job_status, "ERROR_MESSAGE": clean_message}
    out = {}  # type: Dict[str, Any]
    extras = {}  # type: Dict[str, Any]
    for key, value in content.items():
        if key in checks:
            out[key] = checks[key](value)
        else:
            extras[key] = value
    out.update(validate_extra(extras))
    if out.get("JOB_STATUS") == "Running":
        missing = [FIELD_OF_KEY[k] for k in ("URL", "PORT") if k not in out]
        if missing:
            needed = " and ".join(missing)
            raise ServiceFileError(f"job_status Running needs {needed} (given now or already in the file)", missing[0])
    return dict(ordered(out))


# ---------------------------------------------------------------------------- merge / render
def merge(current: Optional[Mapping[str, Any]], updates: Mapping[str, Any]) -> Dict[str, Any]:
    """The new content: ``current`` with ``updates`` applied, validated and with defaults filled in."""
    merged = dict(current or {})
    status_changes = "JOB_STATUS" in updates and updates["JOB_STATUS"] != merged.get("JOB_STATUS")
    if status_changes and "ERROR_MESSAGE" not in updates:
        merged["ERROR_MESSAGE"] = ""
    for key, value in updates.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    merged.setdefault("SLUG", "")
    merged.setdefault("ERROR_MESSAGE", "")
    return validate_content(merged)


def ordered(content: Mapping[str, Any]) -> OrderedDict[str, Any]:
    out = OrderedDict()  # type: OrderedDict[str, Any]
    for key in STANDARD_KEYS:
        if key in content:
            out[key] = content[key]
    for key in sorted(k for k in content if k not in STANDARD_KEYS):
        out[key] = content[key]
    return out


def render(content: Mapping[str, Any]) -> str:
    """Stable text: standard keys in order, extras sorted, indent 4, trailing newline."""
    return json.dumps(ordered(content), indent=4, ensure_ascii=False, allow_nan=False) + "\n"


def parse(text: str, path: str = "service.json") -> Dict[str, Any]:
    """Parse file text into a dict; a non-object or broken JSON is a :class:`ServiceFileError`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ServiceFileError(f"{path} is not valid JSON ({exc}); use force to rebuild it", "path") from None
    if not isinstance(data, dict):
        raise ServiceFileError(f"{path} holds a JSON {type(data).__name__}, not an object; use force to rebuild it",
                               "path")
    return data


# ---------------------------------------------------------------------------- file I/O
def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ServiceFileError(f"path {path} is a directory", "path") from None
    except OSError as exc:
        raise ServiceFileError(f"cannot read {path}: {exc.strerror or exc}", "path") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ServiceFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes; use force to rebuild it", "path")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceFileError(f"{path} is not UTF-8 text; use force to rebuild it", "path") from None


def read_service_file(path: str) -> Optional[Dict[str, Any]]:
    """The parsed, validated content, or None when the file does not exist."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return validate_content(parse(text, path))
    except ServiceFileError as exc:
        if exc.field == "path":
            raise
        raise ServiceFileError(f"{path} holds an invalid value: {exc.msg}; use force to rebuild it",
                               "path") from None


def parse_mode(value: Any) -> int:
    """A file mode from an int (already octal, as YAML ``0600`` gives) or an octal string like '0600'."""
    if isinstance(value, bool):
        raise ServiceFileError(f"mode must be an octal string like '0600', got {value!r}", "mode")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _MODE_RE.fullmatch(value):
        number = int(value, 8)
    else:
        raise ServiceFileError(
            f"mode must be an octal string like '0600' (symbolic modes are not supported), got {value!r}", "mode")
    if not 0 <= number <= 0o7777:
        raise ServiceFileError(f"mode {value!r} is out of range", "mode")
    if number & 0o600 != 0o600:
        raise ServiceFileError(f"mode {oct(number)} must let the owner read and write the file", "mode")
    return number


def file_mode(path: str) -> Optional[int]:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to a temp file in the same directory, fsync, rename over ``path``, fsync the dir.

    Readers see either the old or the new complete file, never a partial one.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise ServiceFileError(f"directory {directory} does not exist", "path")
    if os.path.isdir(path):
        raise ServiceFileError(f"path {path} is a directory", "path")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def remove(path: str) -> bool:
    """Remove the file; True if it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(os.path.dirname(os.path.abspath(path)) or ".")
    return True


@contextmanager
def locked(path: str) -> Iterator[None]:
    """Serialise read-merge-write cycles on ``path`` (flock on its directory: no lock file left behind).

    Writers that go through this (the module, the CLI, the watcher) never lose each other's updates;
    readers need no lock because every write is an atomic rename.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:  # nothing to serialise: planning reports the missing directory
        yield
        return
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(dfd)  # closing the descriptor releases the lock


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(dfd)


def _check_encodable(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceFileError(f"{field} is not valid Unicode text (lone surrogate)", field) from None


# ---------------------------------------------------------------------------- one update, planned then applied
@dataclass(frozen=True)
class Plan:
    """What an update would do: texts before/after, the new content and what changes."""

    path: str
    before_text: Optional[str]
    after_text: Optional[str]
    content: Dict[str, Any]
    mode: Optional[int]
    old_mode: Optional[int]
    content_changed: bool
    mode_changed: bool

    @property
    def changed(self) -> bool:
        return self.content_changed or self.mode_changed


def plan_present(path: str, updates: Mapping[str, Any], mode: int = 0o600, force: bool = False) -> Plan:
    """Compute the new file without touching anything (check mode uses this alone)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise ServiceFileError(f"directory {directory} does not exist (path {path})", "path")
    before = read_text(path)
    current = None  # type: Optional[Dict[str, Any]]
    if before is not None and not force:
        current = parse(before, path)
        try:
            current = validate_content(current)
        except ServiceFileError as exc:
            raise ServiceFileError(f"{path} holds an invalid value: {exc.msg}; use force to rebuild it",
                                   "path") from None
    content = merge(current, updates)
    after = render(content)
    old_mode = file_mode(path) if before is not None else None
    return Plan(path, before, after, content, mode, old_mode, after != before, before is not None and old_mode != mode)


def plan_absent(path: str) -> Plan:
    if os.path.isdir(path):
        raise ServiceFileError(f"path {path} is a directory", "path")
    exists = os.path.lexists(path)
    try:
        before = read_text(path) if exists else None
    except ServiceFileError:
        before = ""  # unreadable or corrupt: still removed, shown as empty in the diff
    return Plan(path, before, None, {}, None, None, exists, False)


def apply(plan: Plan) -> None:
    """Carry out a plan made by :func:`plan_present` or :func:`plan_absent`."""
    if plan.after_text is None:
        if plan.content_changed:
            remove(plan.path)
        return
    mode = 0o600 if plan.mode is None else plan.mode
    if plan.content_changed:
        write_atomic(plan.path, plan.after_text, mode)
    elif plan.mode_changed:
        os.chmod(plan.path, mode)


def update_service_file(path: str, mode: int = 0o600, force: bool = False, expect_status: Optional[str] = None,
                        **fields: Any) -> Tuple[bool, Dict[str, Any]]:
    """Validate ``fields`` (url, port, slug, job_status, error_message, extra), merge, write if changed.

    The one call the CLI and the watcher need; returns ``(changed, content)``. ``expect_status``
    makes it a compare-and-set: refused (ServiceFileError) when ``JOB_STATUS`` is no longer that value.
    """
    updates = validate(**fields)
    with locked(path):
        plan = plan_present(path, updates, mode=mode, force=force)
        if expect_status is not None and plan.before_text is not None:
            now = parse(plan.before_text, path).get("JOB_STATUS")
            if now != expect_status:
                raise ServiceFileError("JOB_STATUS changed to %s meanwhile (expected %s); not updated"
                                       % (now, expect_status), "job_status")
        apply(plan)
    return plan.changed, plan.content
