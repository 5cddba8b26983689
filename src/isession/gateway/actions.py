"""What the gateway does for a user: start, cancel, ensure the watcher - through the ``isession`` commands.

Each action is the CLI itself (``python -m isession start|cancel|watch``) run as the user whose sessions it
touches, with that user's session root: the gateway has no second copy of the start play, the cancel path (fast
cancel, then the cancel playbook) or the watcher's start. A gateway running as root for several users drops to the
session root's owner for these commands.
"""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from .auth import User


def _env(user: User, inventory: Optional[Path]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ISESSION_ROOT", "ISESSION_INVENTORY")}
    env["ISESSION_ROOT"] = str(user.root)
    if inventory:
        env["ISESSION_INVENTORY"] = str(inventory)
    if user.uid != os.getuid():
        pw = pwd.getpwuid(user.uid)
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return env


def spawn(user: User, args: List[str], inventory: Optional[Path], log: Path) -> subprocess.Popen:
    """Start ``isession ARGS`` as ``user`` in the background, output to ``log`` (0600)."""
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if user.uid != os.getuid():
        os.fchown(fd, user.uid, user.gid)
    try:
        extra = {}
        if user.uid != os.getuid():
            extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
        return subprocess.Popen([sys.executable, "-m", "isession", *args], stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=subprocess.STDOUT, env=_env(user, inventory), cwd="/",
                                start_new_session=True, **extra)
    finally:
        os.close(fd)


def write_inputs(user: User, sid: str, inputs: Dict[str, object]) -> Path:
    """The start's inputs as a 0600 YAML file for ``--inputs`` (values with spaces or newlines stay intact)."""
    path = user.state / "starts" / f"{sid}.inputs.yml"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(inputs, fh, sort_keys=True)
    if user.uid != os.getuid():
        os.chown(path, user.uid, user.gid)
    return path


def start(user: User, sid: str, service: str, *, target: str, resource: str, inputs: Dict[str, object],
          inventory: Optional[Path]) -> subprocess.Popen:
    args = ["start", service, "--id", sid, "--target", target, "--json",
            "--inputs", str(write_inputs(user, sid, inputs))]
    if resource:
        args += ["--resource", resource]
    if inventory:
        args += ["--inventory", str(inventory)]
    return spawn(user, args, inventory, start_log(user, sid))


def start_log(user: User, sid: str) -> Path:
    return user.state / "starts" / f"{sid}.log"


def cancel(user: User, sid: str, inventory: Optional[Path]) -> subprocess.Popen:
    """``isession cancel ID``: the one teardown (tombstone + watcher's fast cancel, then the cancel playbook)."""
    args = ["cancel", sid] + (["--inventory", str(inventory)] if inventory else [])
    return spawn(user, args, inventory, user.state / "cancels" / f"{sid}.log")


def ensure_watcher(user: User, inventory: Optional[Path]) -> Optional[subprocess.Popen]:
    """Start the user's watcher when none runs (``isession watch --daemon`` is itself idempotent)."""
    from ..watchfiles import running_pid  # noqa: PLC0415

    if not user.root.is_dir() or running_pid(user.root):
        return None
    args = ["watch", "--daemon"] + (["--inventory", str(inventory)] if inventory else [])
    return spawn(user, args, inventory, user.state / "watcher-start.log")


def resources(inventory: Optional[Path]) -> List[str]:
    """Inventory hosts that describe a resource (they set ``isession_scheduler``), for the start form."""
    if inventory is None:
        return []
    exe = Path(sys.executable).with_name("ansible-inventory")
    try:
        cp = subprocess.run([str(exe) if exe.exists() else "ansible-inventory", "-i", str(inventory), "--list"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"})
        data = yaml.safe_load(cp.stdout) if cp.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return []
    hostvars = ((data or {}).get("_meta") or {}).get("hostvars") or {}
    return sorted(h for h, v in hostvars.items() if isinstance(v, dict) and v.get("isession_scheduler"))
