"""Paths, inventory resolution, session ids and user inputs (pure, standard library + PyYAML)."""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from . import mu

TARGETS = ("workspace", "controller", "compute")
SERVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Input names that look like secrets: secrets are made on the workspace by a module, never passed as inputs.
SECRET_NAME_RE = re.compile(r"pass(word|wd)?|secret|token|api_?key|credential|private_?key", re.IGNORECASE)
# Inputs the CLI sets itself.
RESERVED_INPUTS = ("session_id", "session_root")


def __getattr__(name: str) -> Any:
    """``TERMINAL_STATUSES`` and ``SESSION_ID_RE``: the collection's session vocabulary, read when first used
    (``isession --version`` and ``--help`` work without a collection)."""
    if name == "TERMINAL_STATUSES":
        return mu.load("_vocabulary").TERMINAL_STATUSES
    if name == "SESSION_ID_RE":
        return mu.load("_vocabulary").ID_RE
    raise AttributeError(name)


class UsageError(ValueError):
    """A command line or input file the CLI refuses; the message names the culprit."""


def session_root(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$ISESSION_ROOT``, else ``${XDG_STATE_HOME:-~/.local/state}/isession/sessions`` (docs/design/sessions.md)."""
    env = os.environ if env is None else env
    if env.get("ISESSION_ROOT"):
        return Path(env["ISESSION_ROOT"]).expanduser()
    home = Path(env.get("HOME") or Path.home())
    state = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else home / ".local" / "state"
    return state / "isession" / "sessions"


def find_inventory(explicit: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """``--inventory``, else ``$ISESSION_INVENTORY``, else ``~/.config/isession/inventory.yml`` if it exists.

    None means: no inventory, only the workspace target (the embedded localhost inventory).
    An explicit path or variable that does not exist is an error, not a silent fallback.
    """
    env = os.environ if env is None else env
    for source, value in (("--inventory", explicit), ("ISESSION_INVENTORY", env.get("ISESSION_INVENTORY"))):
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise UsageError(f"{source}: inventory {path} does not exist")
            return path.resolve()
    home = Path(env.get("HOME") or Path.home())
    default = home / ".config" / "isession" / "inventory.yml"
    return default if default.is_file() else None


def embedded_inventory() -> str:
    """The inventory used without one: the workspace only (localhost, local connection)."""
    return yaml.safe_dump({"all": {"children": {"workspace": {"hosts": {"localhost": {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
    }}}}}}, sort_keys=False)


def new_session_id(service: str, now: Optional[datetime] = None, rand: Optional[str] = None) -> str:
    """``<service>-<UTC yyyymmddHHMMSS>-<6 random>`` (sessions.md); ``_`` becomes ``-`` for host-safe ids."""
    now = now or datetime.now(timezone.utc)
    alphabet = string.ascii_lowercase + string.digits
    rand = rand or "".join(secrets.choice(alphabet) for _ in range(6))
    return f"{service.replace('_', '-')}-{now.strftime('%Y%m%d%H%M%S')}-{rand}"


def check_service(name: str) -> str:
    if not SERVICE_RE.match(name or ""):
        raise UsageError(f"SERVICE: {name!r} is not a service name (lower case letters, digits, _)")
    return name


def check_session_id(value: str) -> str:
    if not mu.load("_vocabulary").ID_RE.match(value or ""):
        raise UsageError(f"--id: {value!r} is not a session id: it must be {mu.load('_vocabulary').ID_RULE}")
    return value


def parse_value(text: str) -> Any:
    """A ``-e`` value: JSON when it looks like a list/object/quoted string, else the text itself.

    Plain words stay strings on purpose: YAML would turn ``00:05:00`` into 300 and ``no`` into False.
    The roles' argument specs convert strings to their declared types.
    """
    stripped = text.strip()
    if stripped[:1] in ("[", "{", '"'):
        try:
            return json.loads(stripped)
        except ValueError as exc:
            raise UsageError(f"-e: {text!r} looks like JSON but is not valid ({exc})") from None
    return text


def parse_extra(pairs: list) -> dict:
    """``-e key=value`` pairs into a dict (later wins)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"-e: {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def load_inputs(path: str) -> dict:
    """``--inputs FILE``: a YAML (or JSON) mapping of role inputs."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--inputs: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--inputs: {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--inputs: {path} must hold a mapping of inputs, not a {type(data).__name__}")
    return data


def check_inputs(inputs: Mapping[str, Any]) -> dict:
    """Refuse input names that are not variables, that the CLI sets itself, or that look like secrets."""
    for key in inputs:
        if not isinstance(key, str) or not VAR_RE.match(key):
            raise UsageError(f"input {key!r} is not a valid variable name")
        if key in RESERVED_INPUTS:
            raise UsageError(f"input {key!r} is set by isession itself (use --id / ISESSION_ROOT)")
        if SECRET_NAME_RE.search(key):
            raise UsageError(f"input {key!r} looks like a secret: secrets are generated on the workspace, "
                             "never passed as inputs (they would land in extravars and runner artifacts)")
    return dict(inputs)


def build_extravars(service: str, session_id: str, root: Path, *, target: str, resource: Optional[str],
                    inputs: Mapping[str, Any]) -> dict:
    """The extravars of a start run. Never holds a secret (``check_inputs`` refuses secret-like names)."""
    if target not in TARGETS:
        raise UsageError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
    if target != "workspace" and not resource:
        raise UsageError(f"--target {target} needs --resource (the controller's inventory host)")
    extravars = check_inputs(inputs)
    for key in ("session_target", "session_resource"):
        if key in extravars:
            raise UsageError(f"input {key!r}: use --target/--resource instead")
    # the CLI ensures the user's watcher itself once the play has ended (cli.ensure_watcher): the play need not
    extravars.update({"session_id": session_id, "session_root": str(root), "session_target": target,
                      "session_watcher": False})
    if resource:
        extravars["session_resource"] = resource
    return extravars
