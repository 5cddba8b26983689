"""Paths, inventory resolution, session ids, user inputs and the user's config file (pure, standard library + PyYAML).

The config file (``$ISESSION_CONFIG``, else ``${XDG_CONFIG_HOME:-~/.config}/isession/config.yml``) holds defaults
for ``isession start``; the command line always wins::

    inventory: ~/hpc/inventory.yml      # default --inventory (after $ISESSION_INVENTORY)
    resource: mycluster                 # default --resource
    target: compute                     # default --target
    inputs:                             # role inputs of every start
      session_walltime: "01:00:00"
    services:
      jupyterlab:                       # per service: resource, target, inputs (over the ones above)
        inputs: {session_partition: gpu}
"""
from __future__ import annotations

import json
import os
import re
import string
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional


TARGETS = ("workspace", "controller", "compute")
SERVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Input names that look like secrets: secrets are made on the workspace by a module, never passed as inputs.
SECRET_NAME_RE = re.compile(r"pass(word|wd)?|secret|token|api_?key|credential|private_?key", re.IGNORECASE)
# Inputs the CLI sets itself.
RESERVED_INPUTS = ("session_id", "session_root")


def vocabulary() -> Any:
    """The collection's session vocabulary, imported when first used: this module also serves ``isession --help``
    and shell completion, which work without the collection."""
    from ansible_collections.hpc.interactive.plugins.module_utils import _vocabulary  # noqa: PLC0415

    return _vocabulary


def __getattr__(name: str) -> Any:
    """``TERMINAL_STATUSES`` and ``SESSION_ID_RE`` come from the collection's session vocabulary."""
    if name == "TERMINAL_STATUSES":
        return vocabulary().TERMINAL_STATUSES
    if name == "SESSION_ID_RE":
        return vocabulary().ID_RE
    raise AttributeError(name)


class UsageError(ValueError):
    """A command line or input file the CLI refuses; the message names the culprit."""


CONFIG_KEYS = ("inventory", "resource", "target", "inputs", "services")
SERVICE_CONFIG_KEYS = ("resource", "target", "inputs")


def session_root(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$ISESSION_ROOT``, else ``${XDG_STATE_HOME:-~/.local/state}/isession/sessions`` (docs/design/sessions.md)."""
    env = os.environ if env is None else env
    if env.get("ISESSION_ROOT"):
        return Path(env["ISESSION_ROOT"]).expanduser()
    home = Path(env.get("HOME") or Path.home())
    state = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else home / ".local" / "state"
    return state / "isession" / "sessions"


# what `isession start` notes in a session's directory for the commands that follow (inventory, inputs, the
# collection copy it ran; never a secret)
CLI_RECORD = Path("logs") / "runner" / "cli.json"


def cli_record(session_dir: Path) -> Dict[str, Any]:
    """The session's ``CLI_RECORD``; {} for a session started without the CLI (or an unreadable record)."""
    try:
        data = json.loads((session_dir / CLI_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_inventory(explicit: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                   user_config: Optional[UserConfig] = None) -> Optional[Path]:
    """``--inventory``, else ``$ISESSION_INVENTORY``, else the config file's ``inventory``, else
    ``~/.config/isession/inventory.yml`` if it exists.

    None means: no inventory, only the workspace target (the embedded localhost inventory).
    An explicit path, variable or config setting that does not exist is an error, not a silent fallback.
    """
    env = os.environ if env is None else env
    cfg_inv = user_config.data.get("inventory") if user_config is not None else None
    for source, value in (("--inventory", explicit), ("ISESSION_INVENTORY", env.get("ISESSION_INVENTORY")),
                          (f"{user_config.path if user_config else ''}: inventory", cfg_inv)):
        if value:
            path = Path(value).expanduser()
            if source.endswith(": inventory") and user_config is not None and not path.is_absolute():
                path = user_config.path.parent / path
            if not path.exists():
                raise UsageError(f"{source}: inventory {path} does not exist")
            return path.resolve()
    home = Path(env.get("HOME") or Path.home())
    default = home / ".config" / "isession" / "inventory.yml"
    return default if default.is_file() else None


def config_path(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$ISESSION_CONFIG``, else ``${XDG_CONFIG_HOME:-~/.config}/isession/config.yml``."""
    env = os.environ if env is None else env
    if env.get("ISESSION_CONFIG"):
        return Path(env["ISESSION_CONFIG"]).expanduser()
    home = Path(env.get("HOME") or Path.home())
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return base / "isession" / "config.yml"


@dataclass
class UserConfig:
    """The user's config file, checked (``data`` is empty when the file does not exist)."""

    path: Path
    exists: bool = False
    data: Dict[str, Any] = field(default_factory=dict)

    def service(self, service: str) -> Dict[str, Any]:
        return dict((self.data.get("services") or {}).get(service) or {})


def _check_config(path: Path, data: Any) -> Dict[str, Any]:
    where = str(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: must hold a mapping of settings, not a {type(data).__name__}")

    def check_section(section: Mapping[str, Any], keys: tuple, prefix: str) -> None:
        for key, value in section.items():
            name = f"{prefix}{key}"
            if key not in keys:
                raise UsageError(f"{where}: unknown setting {name!r} (settings: {', '.join(keys)})")
            if key in ("inventory", "resource") and not isinstance(value, str):
                raise UsageError(f"{where}: {name} must be a string")
            if key == "target" and value not in TARGETS:
                raise UsageError(f"{where}: {name} must be one of {', '.join(TARGETS)}, not {value!r}")
            if key == "inputs":
                if not isinstance(value, dict):
                    raise UsageError(f"{where}: {name} must be a mapping of role inputs")
                try:
                    check_inputs(value)
                except UsageError as exc:
                    raise UsageError(f"{where}: {name}: {exc}") from None
                for bad in ("session_target", "session_resource"):
                    if bad in value:
                        raise UsageError(f"{where}: {name}: use the target/resource settings, not {bad}")

    check_section(data, CONFIG_KEYS, "")
    services = data.get("services") or {}
    if not isinstance(services, dict):
        raise UsageError(f"{where}: services must be a mapping of service name -> settings")
    for svc, section in services.items():
        if not isinstance(svc, str) or not SERVICE_RE.match(svc):
            raise UsageError(f"{where}: services: {svc!r} is not a service name")
        if not isinstance(section, dict):
            raise UsageError(f"{where}: services.{svc} must be a mapping (resource, target, inputs)")
        check_section(section, SERVICE_CONFIG_KEYS, f"services.{svc}.")
    return dict(data)


def load_user_config(env: Optional[Mapping[str, str]] = None) -> UserConfig:
    """The config file, checked; a missing file is an empty config, a broken one a UsageError naming it."""
    path = config_path(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserConfig(path=path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    import yaml  # noqa: PLC0415 - only with a config file: a cancel without one starts ~10 ms sooner

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    return UserConfig(path=path, exists=True, data=_check_config(path, data))


@dataclass
class Setting:
    """An effective setting and where it came from."""

    value: Any
    source: str


def start_settings(user_config: UserConfig, service: str, *, target: Optional[str] = None,
                   resource: Optional[str] = None, inputs_file: Optional[Mapping[str, Any]] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The target, resource and inputs of a start, and where each comes from.

    Order (later wins): defaults, the config file's top level, its ``services.<service>`` section, ``--inputs``
    FILE, the command line. Returns ``{"target": Setting, "resource": Setting, "inputs": {name: Setting}}``.
    """
    cfg, svc = user_config.data, user_config.service(service)
    where = str(user_config.path)
    out: Dict[str, Any] = {"target": Setting("workspace", "default"), "resource": Setting(None, "default")}
    for key in ("target", "resource"):
        if cfg.get(key) is not None:
            out[key] = Setting(cfg[key], where)
        if svc.get(key) is not None:
            out[key] = Setting(svc[key], f"{where} (services.{service})")
    if target is not None:
        out["target"] = Setting(target, "--target")
    if resource is not None:
        out["resource"] = Setting(resource, "--resource")
    inputs: Dict[str, Setting] = {}
    for layer, source in ((cfg.get("inputs") or {}, where), (svc.get("inputs") or {}, f"{where} (services.{service})"),
                          (inputs_file or {}, "--inputs"), (extra or {}, "-e")):
        for key, value in layer.items():
            inputs[key] = Setting(value, source)
    out["inputs"] = inputs
    return out


def embedded_inventory() -> str:
    """The inventory used without one: the workspace only (localhost, local connection)."""
    import yaml  # noqa: PLC0415 - see load_config

    return yaml.safe_dump({"all": {"children": {"workspace": {"hosts": {"localhost": {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
    }}}}}}, sort_keys=False)


def new_session_id(service: str, now: Optional[datetime] = None, rand: Optional[str] = None) -> str:
    """``<service>-<UTC yyyymmddHHMMSS>-<6 random>`` (sessions.md); ``_`` becomes ``-`` for host-safe ids."""
    import secrets  # noqa: PLC0415 - only a start makes an id

    now = now or datetime.now(timezone.utc)
    alphabet = string.ascii_lowercase + string.digits
    rand = rand or "".join(secrets.choice(alphabet) for _attempt in range(6))
    return f"{service.replace('_', '-')}-{now.strftime('%Y%m%d%H%M%S')}-{rand}"


def check_service(name: str) -> str:
    if not SERVICE_RE.match(name or ""):
        raise UsageError(f"SERVICE: {name!r} is not a service name (lower case letters, digits, _)")
    return name


def check_session_id(value: str) -> str:
    words = vocabulary()
    if not words.ID_RE.match(value or ""):
        raise UsageError(f"--id: {value!r} is not a session id: it must be {words.ID_RULE}")
    return value


def existing_session_dir(root: Path, session_id: str) -> Path:
    """The directory of session ``session_id`` under ``root``; a UsageError naming the id when it is not a session id
    or no such session exists there."""
    check_session_id(session_id)
    directory = root / session_id
    if not directory.is_dir():
        raise UsageError(f"no session {session_id!r} under {root}")
    return directory


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
    import yaml  # noqa: PLC0415 - see load_config

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
