# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reverse SSH tunnel: argv building, validation and a small supervisor that keeps ``ssh -N -R`` up.

Private to the hpc.interactive collection. Standard library (and the collection's ``_proc.py``, itself standard
library only) and Python 3.8+ so that the very same file runs three ways: imported by the ``reverse_tunnel``
module, copied into a state directory and run by the module as a detached supervisor, and run by a batch job on a
compute node::

    python3 -I _tunnel.py run    --state-dir D --name N --spec D/N.spec.json [--forward-after F]  # batch job
    python3 -I _tunnel.py run    --state-dir D --name N [--up-after 3] -- ssh -N -R ...   # raw argv
    python3 -I _tunnel.py start  --state-dir D --name N --spec FILE [--timeout 30]  # detached, waits for up
    python3 -I _tunnel.py stop   --state-dir D --name N [--grace 5]
    python3 -I _tunnel.py status --state-dir D --name N

Files in the state directory (0700; files 0600): ``N.pid`` (supervisor pid, removed on exit),
``N.status.json`` (pid, token, ssh_pid, started, restarts, last_error, state, ...), ``N.spec.json``,
``N.log`` (supervisor events and ssh's non-debug output), ``N.lock`` (flock held by the supervisor).
ssh runs with ``-v`` and its output goes through a pipe to the supervisor, which marks the tunnel
``up`` when ssh reports ``remote forward success`` (or ``Allocated port N`` for a port 0) and writes
only the useful lines to the log. With ``--forward-after F`` (the batch job's agent) ssh connects at once as a
master on ``N.cm`` in the state directory, without the forward, and the forward is asked of that master
(``ssh -O forward``) only once F exists: the agent creates F when its server holds the port, so no request is ever
forwarded to a port another user might hold, and the handshake happens while the server starts instead of after
it. The tunnel is ``up`` when the master says the far side accepted the forward. A process is recognised by pid
*and* its start time in ``/proc/PID/stat`` (the token, read by ``_proc``), so a reused pid is never mistaken for
ours. Where this file runs as a plain script, ``_proc.py`` is written next to it (``start_detached``, the agent
script).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

if __package__:
    from ansible_collections.hpc.interactive.plugins.module_utils import _proc
else:
    # A plain script (the batch job, the detached supervisor), run with ``python3 -I``, which keeps the script's
    # directory off sys.path: the copy of _proc.py written next to this file (same private directory) is loaded by
    # its path, so nothing else on the host can stand in for it.
    import importlib.util

    sys.dont_write_bytecode = True  # no __pycache__ in the private directory
    _PROC_SPEC = importlib.util.spec_from_file_location(
        "_proc", os.path.join(os.path.dirname(os.path.realpath(__file__)), "_proc.py"))
    _proc = importlib.util.module_from_spec(_PROC_SPEC)  # type: ignore[arg-type]
    _PROC_SPEC.loader.exec_module(_proc)  # type: ignore[union-attr]

SCRIPT_NAME = "_tunnel.py"
PROC_NAME = "_proc.py"
KNOWN_HOSTS_POLICIES = ("strict", "accept-new", "no")
STATES = ("starting", "connecting", "up", "retrying", "failed", "stopped")
_STRICT = {"strict": "yes", "accept-new": "accept-new", "no": "no"}
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "LANGUAGE": "C"}

DEFAULT_SPEC: Dict[str, Any] = {
    "remote_port": None, "local_host": "127.0.0.1", "local_port": None,
    "dest_host": None, "dest_user": None, "dest_port": 22,
    "jump_host": None, "jump_user": None, "jump_port": None,
    "identity_file": None, "known_hosts_policy": "strict", "known_hosts_file": None,
    "server_alive_interval": 15, "server_alive_count_max": 3, "connect_timeout": 10, "ssh_bin": "ssh",
}
DEFAULT_POLICY: Dict[str, Any] = {
    "backoff_initial": 1.0, "backoff_max": 30.0, "max_failures": 8, "failure_window": 300.0,
    "stable_after": 30.0, "fail_fast": True, "up_after": 0.0,
}

MAX_CONTROL_PATH = 90
GO_POLL = 0.02  # seconds between looks for the forward_after file (only until the forward is asked for)
FORWARD_TIMEOUT = 15
_CONTROL_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@,=-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_PATH_RE = re.compile(r"[A-Za-z0-9_./~+@:,=-]{1,4096}")
# "remote forward success for: listen HOST:PORT, ..."; for port 0 wait for "Allocated port N", printed after it
_UP_RE = re.compile(r"remote forward success for: listen \S*:(?!0,)\d+,|Allocated port (\d+) for remote forward")
_FATAL_RE = re.compile(
    r"remote port forwarding failed|Permission denied|Host key verification failed|"
    r"REMOTE HOST IDENTIFICATION HAS CHANGED|No such file or directory|Could not resolve hostname|"
    r"Bad configuration option|Too many authentication failures|Bad port|Bad remote forwarding")
_NOISE_RE = re.compile(r"debug\d?:|OpenSSH_|Authenticated to|Transferred:|Bytes per second|Warning: Permanently added")
_LOG_DEBUG_RE = re.compile(r"remote forward|Connecting to|Connection established|Authenticated to|"
                           r"connect_to|open failed|Exit status|Killed by signal")


class TunnelError(ValueError):
    """A refused tunnel parameter; ``field`` names it."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__("%s: %s" % (field, msg))
        self.field = field


# ---------------------------------------------------------------- validation and argv (pure)

def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise TunnelError("name", "must be 1-64 letters, digits, '_', '.', '-' starting with a letter or digit, "
                          "got %r" % (name,))
    return name


def _host(field: str, value: Any) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOST_RE.fullmatch(value):
                return value
    raise TunnelError(field, "must be a host name or IP address (letters, digits, '.', '_', '-'; not starting "
                      "with '-'), got %r" % (value,))


def _user(field: str, value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, str) and _USER_RE.fullmatch(value):
        return value
    raise TunnelError(field, "must be a user name (letters, digits, '.', '_', '-'; not starting with '-'), "
                      "got %r" % (value,))


def _path(field: str, value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, str) and _PATH_RE.fullmatch(value) and not value.startswith("-"):
        return value
    raise TunnelError(field, "must be a path of letters, digits and '_ . / ~ + @ : , = -' (no whitespace, "
                      "quotes, '%%', '$' or control characters; not starting with '-'), got %r" % (value,))


def _int(field: str, value: Any, low: int, high: int, default: Optional[int] = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TunnelError(field, "must be an integer in %d..%d, got %r" % (low, high, value))
    return value


def parse_jump(text: str) -> Tuple[Optional[str], str, Optional[int]]:
    """``[user@]host[:port]`` (IPv6 as ``[addr]``) -> (user, host, port). Values are validated."""
    if not isinstance(text, str) or not text:
        raise TunnelError("jump_host", "must be [user@]host[:port], got %r" % (text,))
    user: Optional[str] = None
    rest = text
    if "@" in text:
        user, rest = text.rsplit("@", 1)
        user = _user("jump_host", user) or _fail("jump_host", "empty user in %r" % text)
    port: Optional[int] = None
    if rest.startswith("["):
        addr, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise TunnelError("jump_host", "bad bracketed address in %r" % text)
        rest, tail = addr, tail[1:] if tail else ""
        port = _int("jump_host", tail, 1, 65535) if tail else None
    elif rest.count(":") == 1:
        rest, tail = rest.split(":")
        port = _int("jump_host", tail, 1, 65535)
    return user, _host("jump_host", rest), port


def _fail(field: str, msg: str) -> Any:
    raise TunnelError(field, msg)


def validate_spec(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Check every tunnel parameter and return the normalised spec (defaults filled in)."""
    unknown = sorted(set(raw) - set(DEFAULT_SPEC))
    if unknown:
        raise TunnelError(unknown[0], "unknown tunnel parameter")
    spec = dict(DEFAULT_SPEC)
    spec.update({k: v for k, v in raw.items() if v is not None})
    out: Dict[str, Any] = {}
    out["remote_port"] = _int("remote_port", spec["remote_port"], 0, 65535)
    out["local_host"] = _host("local_host", spec["local_host"])
    out["local_port"] = _int("local_port", spec["local_port"], 1, 65535)
    out["dest_host"] = _host("dest_host", spec["dest_host"])
    out["dest_user"] = _user("dest_user", spec["dest_user"])
    out["dest_port"] = _int("dest_port", spec["dest_port"], 1, 65535)
    juser: Optional[str] = None
    jhost: Optional[str] = None
    jport: Optional[int] = None
    if spec["jump_host"]:
        juser, jhost, jport = parse_jump(spec["jump_host"])
    for field, parsed, given in (("jump_user", juser, _user("jump_user", spec["jump_user"])),
                                 ("jump_port", jport, spec["jump_port"])):
        if given is not None and not jhost:
            raise TunnelError(field, "needs jump_host")
        if given is not None and parsed is not None and str(given) != str(parsed):
            raise TunnelError(field, "conflicts with the value in jump_host %r" % spec["jump_host"])
    out["jump_host"] = jhost
    out["jump_user"] = juser or _user("jump_user", spec["jump_user"])
    out["jump_port"] = (jport or _int("jump_port", spec["jump_port"], 1, 65535, default=22)) if jhost else None
    out["identity_file"] = _path("identity_file", spec["identity_file"])
    if spec["known_hosts_policy"] not in KNOWN_HOSTS_POLICIES:
        raise TunnelError("known_hosts_policy", "must be one of %s, got %r"
                          % (", ".join(KNOWN_HOSTS_POLICIES), spec["known_hosts_policy"]))
    out["known_hosts_policy"] = spec["known_hosts_policy"]
    out["known_hosts_file"] = _path("known_hosts_file", spec["known_hosts_file"])
    out["server_alive_interval"] = _int("server_alive_interval", spec["server_alive_interval"], 1, 3600)
    out["server_alive_count_max"] = _int("server_alive_count_max", spec["server_alive_count_max"], 1, 100)
    out["connect_timeout"] = _int("connect_timeout", spec["connect_timeout"], 1, 600)
    out["ssh_bin"] = _path("ssh_bin", spec["ssh_bin"]) or "ssh"
    return out


def _common_options(spec: Mapping[str, Any], loglevel: Optional[str], control_path: Optional[str] = None) -> List[str]:
    # ssh keeps the first value it is given for an option: the control settings are chosen here, not appended
    control = (["ControlMaster=yes", "ControlPath=%s" % control_path, "ControlPersist=no"] if control_path
               else ["ControlMaster=no", "ControlPath=none"])
    opts = ["BatchMode=yes", "StrictHostKeyChecking=%s" % _STRICT[spec["known_hosts_policy"]],
            "ConnectTimeout=%d" % spec["connect_timeout"],
            "ServerAliveInterval=%d" % spec["server_alive_interval"],
            "ServerAliveCountMax=%d" % spec["server_alive_count_max"],
            *control, "PermitLocalCommand=no", "ForwardAgent=no", "ForwardX11=no"]
    if spec["known_hosts_file"]:
        opts.append("UserKnownHostsFile=%s" % spec["known_hosts_file"])
    elif spec["known_hosts_policy"] == "no":
        opts += ["UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null"]
    if spec["identity_file"]:
        opts += ["IdentityFile=%s" % spec["identity_file"], "IdentitiesOnly=yes"]
    if loglevel:
        opts.append("LogLevel=%s" % loglevel)
    argv: List[str] = []
    for opt in opts:
        argv += ["-o", opt]
    return argv


def _bracket(host: str) -> str:
    return "[%s]" % host if ":" in host else host


def _forward(spec: Mapping[str, Any]) -> str:
    return "127.0.0.1:%d:%s:%d" % (spec["remote_port"], _bracket(spec["local_host"]), spec["local_port"])


def build_ssh_argv(spec: Mapping[str, Any], control_path: Optional[str] = None) -> List[str]:
    """The ssh argv for a validated spec. A jump host becomes a ProxyCommand running the same ssh with
    the same options (``-J`` would not pass ``-o``/``-i`` to the jump hop), quoted with shlex.

    With ``control_path``, the connection alone: a master on that socket and no ``-R``, which
    :func:`build_forward_argv` asks the master for once the forward is wanted."""
    argv = [spec["ssh_bin"], "-N", "-T", "-v", "-o", "ExitOnForwardFailure=yes"] + _common_options(
        spec, None, control_path)
    if not control_path:
        argv += ["-R", _forward(spec)]
    if spec.get("jump_host"):
        hop = [spec["ssh_bin"], "-W", "[%h]:%p"] + _common_options(spec, "ERROR")
        hop += ["-p", str(spec["jump_port"] or 22)]
        if spec.get("jump_user"):
            hop += ["-l", spec["jump_user"]]
        hop += ["--", spec["jump_host"]]
        argv += ["-o", "ProxyCommand=" + " ".join(shlex.quote(a) for a in hop)]
    argv += ["-p", str(spec["dest_port"])]
    if spec.get("dest_user"):
        argv += ["-l", spec["dest_user"]]
    return argv + ["--", spec["dest_host"]]


def build_forward_argv(spec: Mapping[str, Any], control_path: str) -> List[str]:
    """Ask the master on ``control_path`` for the spec's remote forward. ssh answers only once the far side has
    accepted or refused it, and exits non-zero with the refusal ("remote port forwarding failed ...")."""
    return [spec["ssh_bin"], "-o", "ControlPath=%s" % control_path, "-O", "forward", "-R", _forward(spec),
            "--", spec["dest_host"]]


def control_path_for(state_dir: str, name: str) -> Optional[str]:
    """The master's socket for tunnel ``name``, or None where ssh could not use it: a socket path has room for
    about 107 bytes and ssh first binds it under a name 17 bytes longer; ssh would read ``%`` and blanks in it."""
    path = os.path.join(state_dir, name + ".cm")
    if len(path.encode()) > MAX_CONTROL_PATH or not _CONTROL_PATH_RE.fullmatch(path):
        return None
    return path


def validate_policy(raw: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    policy = dict(DEFAULT_POLICY)
    for key, value in (raw or {}).items():
        if key not in DEFAULT_POLICY:
            raise TunnelError(key, "unknown supervisor setting")
        if key == "fail_fast":
            policy[key] = bool(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TunnelError(key, "must be a number >= 0, got %r" % (value,))
        policy[key] = int(value) if key == "max_failures" else float(value)
    if policy["max_failures"] < 1:
        raise TunnelError("max_failures", "must be >= 1")
    return policy


def spec_hash(spec: Mapping[str, Any], policy: Mapping[str, Any]) -> str:
    text = json.dumps({"spec": spec, "policy": policy}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def next_action(history: Sequence[Tuple[float, float, float]], now: float,
                policy: Mapping[str, Any]) -> Tuple[bool, float]:
    """After an ssh exit: (give_up, delay). ``history`` holds (start, end, seconds_up) per attempt.

    A failure is an attempt that was not up for ``stable_after`` seconds. Give up when the trailing run of
    failures that ended within ``failure_window`` reaches ``max_failures``; otherwise wait
    ``backoff_initial * 2**(k-1)`` (k = trailing failures) capped at ``backoff_max``."""
    k = 0
    for _start, end, up in reversed(history):
        if up >= policy["stable_after"] or end < now - policy["failure_window"]:
            break
        k += 1
    if k >= policy["max_failures"]:
        return True, 0.0
    return False, min(policy["backoff_max"], policy["backoff_initial"] * (2 ** max(0, k - 1)))


def is_fatal(lines: Sequence[str]) -> bool:
    return any(_FATAL_RE.search(line) for line in lines)


def summarize_error(lines: Sequence[str], rc: Optional[int]) -> str:
    useful = [ln for ln in lines if ln.strip() and not _NOISE_RE.match(ln)]
    head = "ssh exited with status %s" % rc if rc is not None and rc >= 0 else "ssh killed by signal %s" % (
        -rc if rc is not None else "?")
    return head + (": " + " | ".join(useful[-4:]) if useful else "")


# ---------------------------------------------------------------- files and processes

def tunnel_paths(state_dir: str, name: str) -> Dict[str, str]:
    base = os.path.join(state_dir, name)
    return {"pid": base + ".pid", "status": base + ".status.json", "spec": base + ".spec.json",
            "log": base + ".log", "lock": base + ".lock", "script": os.path.join(state_dir, SCRIPT_NAME)}


def write_private(path: str, text: str) -> bool:
    """Write ``text`` atomically with mode 0600 unless the file already holds it. True when written."""
    try:
        with open(path) as fh:
            if fh.read() == text and (os.stat(path).st_mode & 0o777) == 0o600:
                return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return True


def parse_status(text: str) -> Dict[str, Any]:
    """Parse a status file; ValueError when it is not one of ours."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("state") not in STATES:
        raise ValueError("not a tunnel status: %r" % (text[:200],))
    for key in ("pid", "ssh_pid", "restarts"):
        if data.get(key) is not None and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise ValueError("%s is not an integer" % key)
    return data


def read_status(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as fh:
            return parse_status(fh.read())
    except (OSError, ValueError):
        return None


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def proc_token(pid: Optional[int]) -> Optional[str]:
    """The start time of a live (non-zombie) process, or None."""
    if not pid or pid <= 0:
        return None
    return _proc.start_time(pid)


def is_alive(pid: Optional[int], token: Optional[str]) -> bool:
    """True when ``pid`` runs and is the process that had start-time ``token`` (not a reused pid)."""
    return token is not None and proc_token(pid) == token


def proc_cmdline(pid: int) -> List[str]:
    return _proc.cmdline(pid)


def is_supervisor(pid: Optional[int], token: Optional[str], state_dir: str, name: str) -> bool:
    """Alive, same start time, and its command line says it is the supervisor of ``state_dir``/``name``."""
    if not is_alive(pid, token):
        return False
    args = proc_cmdline(pid or 0)
    pairs = {(args[i], args[i + 1]) for i in range(len(args) - 1)}
    return "run" in args and ("--name", name) in pairs and ("--state-dir", state_dir) in pairs


def probe(state_dir: str, name: str) -> Dict[str, Any]:
    """What runs now: {'running', 'healthy', 'status', 'pid'}; healthy = our supervisor + live ssh + up."""
    paths = tunnel_paths(state_dir, name)
    status = read_status(paths["status"])
    pid = read_pid(paths["pid"])
    running = bool(status and pid and status.get("pid") == pid
                   and is_supervisor(pid, status.get("token"), state_dir, name))
    healthy = bool(running and status and status.get("state") == "up"
                   and is_alive(status.get("ssh_pid"), status.get("ssh_token")))
    return {"running": running, "healthy": healthy, "status": status, "pid": pid}


def _signal(pid: Optional[int], token: Optional[str], sig: int, group: bool) -> None:
    if not is_alive(pid, token):
        return
    try:
        if group and os.getpgid(pid or 0) == pid:
            os.killpg(pid or 0, sig)
        else:
            os.kill(pid or 0, sig)
    except OSError:
        pass


def stop_tunnel(state_dir: str, name: str, grace: float = 5.0) -> bool:
    """TERM the supervisor's process group (and its ssh), KILL after ``grace``; remove the pid file.
    Returns True when something was running or a pid file was removed. Safe to call twice."""
    paths = tunnel_paths(state_dir, name)
    status = read_status(paths["status"]) or {}
    ours = is_supervisor(status.get("pid"), status.get("token"), state_dir, name)  # even if the pid file is gone
    sup = (status.get("pid"), status.get("token")) if ours else (None, None)
    ssh = (status.get("ssh_pid"), status.get("ssh_token"))
    targets = [t for t in (sup, ssh) if is_alive(*t)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, token in targets:
            _signal(pid, token, sig, group=True)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(is_alive(*t) for t in targets):
            time.sleep(0.05)
        if not any(is_alive(*t) for t in targets):
            break
    removed = os.path.exists(paths["pid"])
    for path in (paths["pid"],):
        try:
            os.unlink(path)
        except OSError:
            pass
    if status and status.get("state") not in ("stopped", "failed"):
        status.update(state="stopped", ssh_pid=None, ssh_token=None, updated=_now_iso())
        write_private(paths["status"], json.dumps(status, indent=2, sort_keys=True) + "\n")
    return bool(targets) or removed


def supervisor_source() -> str:
    """This file's source text, also when it is loaded from a zip (AnsiballZ) or by the collection loader."""
    return _proc.source_of(sys.modules[__name__])


def start_detached(python: str, state_dir: str, name: str, spec_file: str,
                   env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Start ``python -I <state_dir>/_tunnel.py run ...`` in a new session, stdin /dev/null, output to the log.

    ``-I``: isolated from the environment (``PYTHON*``), the user's site directory and the script's directory.
    """
    paths = tunnel_paths(state_dir, name)
    write_private(paths["script"], supervisor_source())
    write_private(os.path.join(state_dir, PROC_NAME), _proc.source_of(_proc))  # what the script imports
    log_fd = os.open(paths["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            [python, "-I", paths["script"], "run", "--state-dir", state_dir, "--name", name, "--spec", spec_file],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, close_fds=True, cwd=state_dir,
            start_new_session=True, env=_env(env))
    finally:
        os.close(log_fd)


def wait_until_up(state_dir: str, name: str, pid: int, timeout: float,
                  proc: Optional[subprocess.Popen] = None) -> Dict[str, Any]:
    """Poll the status of supervisor ``pid`` until up, failed/exited or ``timeout``; return the last status."""
    paths = tunnel_paths(state_dir, name)
    deadline = time.monotonic() + timeout
    status: Dict[str, Any] = {}
    while True:
        status = read_status(paths["status"]) or {}
        mine = status.get("pid") == pid
        if mine and status.get("state") == "up" and is_alive(status.get("ssh_pid"), status.get("ssh_token")):
            return status
        exited = proc.poll() is not None if proc is not None else proc_token(pid) is None
        if (mine and status.get("state") in ("failed", "stopped")) or exited:
            if not mine or status.get("state") not in ("failed", "stopped"):
                status = dict(status, state="failed", last_error=status.get("last_error") or _log_tail(paths["log"]))
            return status
        if time.monotonic() >= deadline:
            err = status.get("last_error") if mine else None
            return dict(status, state="timeout", last_error="not up after %ss%s" % (
                timeout, ("; last error: %s" % err) if err else ""))
        time.sleep(0.1)


def log_tail(state_dir: str, name: str, lines: int = 20) -> str:
    return _log_tail(tunnel_paths(state_dir, name)["log"], lines)


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(C_LOCALE)
    env.update(extra or {})
    return env


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- the supervisor

class Supervisor:
    """Keep ``argv`` (an ``ssh -N -R`` command) running; see the module docstring."""

    def __init__(self, argv: Sequence[str], state_dir: str, name: str, policy: Mapping[str, Any], *,
                 digest: Optional[str] = None, stop_file: Optional[str] = None, forward_after: Optional[str] = None,
                 forward_argv: Optional[Sequence[str]] = None, control_path: Optional[str] = None) -> None:
        """``forward_after``: a file whose appearance says the forward is wanted (the agent creates it once its
        server holds the port). With ``forward_argv`` and ``control_path``, ``argv`` is a master connection without
        the forward, opened at once, and ``forward_argv`` asks it for the forward when the file appears; without
        them, ``argv`` (with its ``-R``) is started only when the file appears."""
        self.argv = list(argv)
        self.state_dir, self.name, self.policy = state_dir, name, dict(policy)
        self.paths = tunnel_paths(state_dir, name)
        self.stop_file = stop_file
        self.forward_after = forward_after
        self.forward_argv = list(forward_argv) if forward_argv and control_path and forward_after else None
        self.control_path = control_path if self.forward_argv else None
        self.stop_signal = 0
        self.child: Optional[subprocess.Popen] = None
        self.log: Any = None
        self.status: Dict[str, Any] = {
            "version": 1, "name": name, "pid": os.getpid(), "token": proc_token(os.getpid()),
            "pgid": os.getpgid(0), "ssh_pid": None, "ssh_token": None, "started": _now_iso(),
            "updated": _now_iso(), "restarts": 0, "attempts": 0, "last_error": None, "last_exit": None,
            "state": "starting", "up_since": None, "spec_hash": digest, "allocated_port": None,
            "log": self.paths["log"], "argv": self.argv}

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log.write("%s %s\n" % (_now_iso(), msg))
            self.log.flush()

    def save(self, **changes: Any) -> None:
        self.status.update(changes, updated=_now_iso())
        write_private(self.paths["status"], json.dumps(self.status, indent=2, sort_keys=True) + "\n")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.terminate()
            except OSError:
                pass

    def stopping(self) -> bool:
        return bool(self.stop_signal) or bool(self.stop_file and os.path.exists(self.stop_file))

    def run(self) -> int:
        os.umask(0o077)
        lock = os.open(self.paths["lock"], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.stderr.write("tunnel %s: another supervisor holds %s\n" % (self.name, self.paths["lock"]))
            os.close(lock)
            return 3
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.log = open(self.paths["log"], "a")  # noqa: SIM115 - lives as long as the supervisor
        write_private(self.paths["pid"], "%d\n" % os.getpid())
        self.save()
        self.say("[supervisor] pid %d started for tunnel %s" % (os.getpid(), self.name))
        try:
            return self._loop()
        finally:
            self._kill_child()
            if read_pid(self.paths["pid"]) == os.getpid():
                os.unlink(self.paths["pid"])
            if self.status["state"] not in ("failed", "stopped"):
                self.status["state"] = "stopped"
            self.save(ssh_pid=None, ssh_token=None)
            self.say("[supervisor] exiting: %s" % self.status["state"])
            self.log.close()
            os.close(lock)

    def _loop(self) -> int:
        history: List[Tuple[float, float, float]] = []
        ever_up = False
        while not self.stopping():
            if not self._wait_for_go():
                break
            start = time.monotonic()
            rc, lines, up_at = self._attempt()
            end = time.monotonic()
            history.append((start, end, end - up_at if up_at else 0.0))
            ever_up = ever_up or bool(up_at)
            if self.stopping():
                break
            error = summarize_error(lines, rc)
            self.say("[supervisor] %s" % error)
            if self.policy["fail_fast"] and not ever_up and is_fatal(lines):
                self.save(state="failed", last_error=error, last_exit=rc, ssh_pid=None, ssh_token=None)
                return 1
            give_up, delay = next_action(history, end, self.policy)
            if give_up:
                self.save(state="failed", last_exit=rc, ssh_pid=None, ssh_token=None,
                          last_error="gave up after %d failures within %ss; last: %s"
                          % (self.policy["max_failures"], self.policy["failure_window"], error))
                return 1
            self.save(state="retrying", last_error=error, last_exit=rc, ssh_pid=None, ssh_token=None, up_since=None)
            self.say("[supervisor] restarting ssh in %.1fs" % delay)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.stopping():
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if not self.stopping():
                self.status["restarts"] += 1
        self.save(state="stopped")
        return 0

    def _go(self) -> bool:
        return not self.forward_after or os.path.exists(self.forward_after)

    def _wait_for_go(self) -> bool:
        """Without a master to open early, hold the ssh (and its forward) until it is wanted; False when stopping."""
        while self.forward_argv is None and not self._go():
            if self.stopping():
                return False
            time.sleep(GO_POLL)
        return True

    def _ask_forward(self) -> Tuple[int, List[str]]:
        """Ask the connected master for the forward; (exit status, output lines)."""
        try:
            done = subprocess.run(self.forward_argv or [], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, close_fds=True, env=_env(), timeout=FORWARD_TIMEOUT,
                                  check=False)
        except subprocess.TimeoutExpired:
            return 124, ["ssh -O forward: no answer from the master within %d s" % FORWARD_TIMEOUT]
        except OSError as exc:
            return 127, ["%s: %s" % ((self.forward_argv or ["ssh"])[0], exc.strerror or exc)]
        return done.returncode, done.stdout.decode("utf-8", "replace").splitlines()

    def _attempt(self) -> Tuple[Optional[int], List[str], float]:
        """Run ssh once; return (rc, its output lines, monotonic time it came up or 0)."""
        tail: Deque[str] = deque(maxlen=40)
        self.status["attempts"] += 1
        if self.control_path:
            try:  # a master that was killed leaves its socket, and a new one would then run without any
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        try:
            self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, close_fds=True, env=_env())
        except OSError as exc:
            return 127, ["%s: %s" % (self.argv[0], exc.strerror or exc)], 0.0
        child = self.child
        self.save(state="connecting", ssh_pid=child.pid, ssh_token=proc_token(child.pid))
        self.say("[supervisor] ssh pid %d started (attempt %d)" % (child.pid, self.status["attempts"]))
        if child.stdout is None:  # pragma: no cover - stdout=PIPE always gives one
            raise RuntimeError("ssh has no stdout pipe")
        fd = child.stdout.fileno()
        os.set_blocking(fd, False)
        partial, eof, exited_at, up_at, started, term_at = b"", False, 0.0, 0.0, time.monotonic(), 0.0
        to_forward, refused = bool(self.forward_argv), 0
        while True:
            ready = select.select([] if eof else [fd], [], [], GO_POLL if to_forward else 0.2)[0]
            if ready:
                try:
                    data: Optional[bytes] = os.read(fd, 65536)
                except BlockingIOError:
                    data = None
                if data == b"":
                    eof = True
                elif data:
                    chunks = (partial + data).split(b"\n")
                    partial = chunks.pop()
                    for raw in chunks:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        tail.append(line)
                        up_at = self._line(line, up_at)
            now = time.monotonic()
            # the master is connected once its socket exists (ssh binds it after authentication)
            if to_forward and child.poll() is None and not self.stopping() and self._go() \
                    and os.path.exists(self.control_path or ""):
                to_forward = False
                rc, lines = self._ask_forward()
                for line in lines:
                    tail.append(line)
                    self.say("[ssh -O forward] " + line)
                if rc == 0:
                    up_at = up_at or time.monotonic()
                    self.save(state="up", up_since=_now_iso())
                else:  # refused (the port is taken on the far side...): the attempt ends with the refusal's words
                    refused = rc
            if not up_at and self.policy["up_after"] and now - started >= self.policy["up_after"] \
                    and child.poll() is None:
                up_at = now
                self.save(state="up", up_since=_now_iso())
            if (refused or self.stopping()) and child.poll() is None:
                if not term_at:
                    term_at = now
                    child.terminate()
                elif now - term_at > 3:
                    child.kill()
            if child.poll() is not None:
                exited_at = exited_at or now
                if eof or now - exited_at > 0.5:
                    break
        if partial:
            tail.append(partial.decode("utf-8", "replace"))
        child.stdout.close()
        self.child = None
        return refused or child.returncode, list(tail), up_at

    def _line(self, line: str, up_at: float) -> float:
        if not line.startswith("debug") or _LOG_DEBUG_RE.search(line):
            self.say("[ssh] " + line)
        match = _UP_RE.search(line)
        if match and not up_at:
            if match.group(1):
                self.status["allocated_port"] = int(match.group(1))
            self.save(state="up", up_since=_now_iso())
            return time.monotonic()
        return up_at

    def _kill_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(3)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ---------------------------------------------------------------- command line

def load_spec_file(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("ssh"), dict):
        raise TunnelError("spec", "%s holds no 'ssh' object" % path)
    return validate_spec(data["ssh"]), validate_policy(data.get("policy"))


def spec_document(name: str, spec: Mapping[str, Any], policy: Mapping[str, Any]) -> str:
    doc = {"version": 1, "name": name, "ssh": dict(spec), "policy": dict(policy),
           "hash": spec_hash(spec, policy), "argv": build_ssh_argv(spec)}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=SCRIPT_NAME, description="Keep a reverse SSH tunnel up.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "start", "stop", "status"):
        p = sub.add_parser(cmd)
        p.add_argument("--state-dir", required=True)
        p.add_argument("--name", required=True)
        if cmd in ("run", "start"):
            p.add_argument("--spec", help="JSON file with 'ssh' (tunnel parameters) and optional 'policy'")
        if cmd == "run":
            p.add_argument("--stop-file", help="exit when this file appears")
            p.add_argument("--forward-after", help="connect at once but ask for the forward only when this file "
                           "appears (with --spec; without room for a master socket, start ssh only then)")
            p.add_argument("--up-after", type=float, default=None, help="raw argv: up after N seconds alive")
            p.add_argument("ssh_argv", nargs=argparse.REMAINDER, help="-- ssh argv (instead of --spec)")
        if cmd == "start":
            p.add_argument("--timeout", type=float, default=30.0)
        if cmd == "stop":
            p.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        name = validate_name(args.name)
        state_dir = os.path.realpath(args.state_dir)
        if args.cmd == "status":
            _out(json.dumps(probe(state_dir, name), indent=2, sort_keys=True))
            return 0
        if args.cmd == "stop":
            _out(json.dumps({"stopped": stop_tunnel(state_dir, name, args.grace)}))
            return 0
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        if args.cmd == "start":
            spec, policy = load_spec_file(args.spec)
            spec_path = tunnel_paths(state_dir, name)["spec"]
            write_private(spec_path, spec_document(name, spec, policy))
            stop_tunnel(state_dir, name)
            proc = start_detached(sys.executable, state_dir, name, spec_path)
            status = wait_until_up(state_dir, name, proc.pid, args.timeout, proc)
            if status.get("state") != "up":
                stop_tunnel(state_dir, name)
            _out(json.dumps(status, indent=2, sort_keys=True))
            return 0 if status.get("state") == "up" else 1
        raw = list(args.ssh_argv or [])
        if raw and raw[0] == "--":
            raw = raw[1:]
        if args.spec and raw:
            raise TunnelError("spec", "give either --spec or an ssh argv, not both")
        control_path, forward_argv = None, None
        if args.spec:
            spec, policy = load_spec_file(args.spec)
            if args.forward_after:
                control_path = control_path_for(state_dir, name)
            if control_path:
                forward_argv = build_forward_argv(spec, control_path)
            ssh_argv, digest = build_ssh_argv(spec, control_path), spec_hash(spec, policy)
        elif raw:
            policy, ssh_argv, digest = validate_policy(), list(raw), None
        else:
            raise TunnelError("spec", "give --spec FILE or -- ssh argv")
        if args.up_after is not None:
            policy["up_after"] = args.up_after
        return Supervisor(ssh_argv, state_dir, name, policy, digest=digest, stop_file=args.stop_file,
                          forward_after=args.forward_after, forward_argv=forward_argv,
                          control_path=control_path).run()
    except (TunnelError, OSError, ValueError) as exc:
        sys.stderr.write("%s: %s\n" % (SCRIPT_NAME, exc))
        return 2


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
