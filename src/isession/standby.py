"""The standby: the next start's play, already started and waiting for its inputs (opt-in).

A cold ``isession start`` spends about 0.6 s before the play's first task: ansible-playbook's imports, its config,
the inventory, the playbook and its roles. With ``ISESSION_STANDBY=SECONDS``, each start leaves behind, once it is
done, one ``ansible-playbook`` of the same start playbook, run by ansible-runner exactly as a start runs it, that
waits before its first task (the ``linear_idle`` strategy, see ``ISESSION_STANDBY_SOCKET`` there) for up to SECONDS.
The next start of the same service with the same inventory, collection and environment hands it its extra vars over
a unix socket (0600, in a 0700 directory, the peer's uid checked) and follows its events; the session's
``logs/runner/artifacts`` is a link to the standby's. When nothing matches, or the standby does not answer, the
start runs its own play as always.

Layout: ``ROOT/.standby/<token>/`` (0700) holds ``standby.json`` (what it is for), ``sock`` (while it waits),
``runner/`` (ansible-runner's private data directory), ``taken`` (the session that took it; made with O_EXCL,
so two starts never take one standby) and ``end`` (it is not wanted any more). A standby that ends untaken removes
its directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from .config import UsageError

DIRNAME = ".standby"
RECORD = "standby.json"
PID = "pid"  # the standby process's pid, written by spawn
SOCKET = "sock"
TAKEN = "taken"
END = "end"  # made by retire: a standby still starting ends as soon as it listens (linear_idle's STANDBY_END)
ENV = "ISESSION_STANDBY"
MAX_SECONDS = 86400.0
CONNECT_TIMEOUT = 1.0  # seconds for the standby's answer to a request
# seconds a start waits for a standby made for it that is still starting (its ansible-playbook not yet listening)
# before it runs its own play: a standby started earlier is ahead of a new play, which would also share the CPU
# with it; one that started STARTING_AT_MOST ago and still does not listen is not waited for
STARTING_WAIT = 3.0
STARTING_AT_MOST = 30.0
FOLLOW_EVERY = 0.02  # seconds between looks at the standby's events
RUNNER_GONE_AFTER = 5.0  # seconds after the play's exit within which its runner records how the run ended
# what a play's behaviour depends on besides its inputs: a standby started under other values is not used
ENV_KEYS = ("PATH", "PYTHONPATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK", "LANG", "LC_ALL", "TMPDIR")


def seconds_from(env: Mapping[str, str]) -> float:
    """How long a standby waits (0: no standby): ``$ISESSION_STANDBY``. A strategy the user chose
    (``$ANSIBLE_STRATEGY``) cannot wait: no standby then."""
    raw: Any = env.get(ENV) or 0
    where = f"${ENV}"
    if env.get("ANSIBLE_STRATEGY"):
        return 0.0
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{where} must be a number of seconds (0: no standby), not {raw!r}") from None
    if not 0 <= value <= MAX_SECONDS:
        raise UsageError(f"{where} must be 0 (no standby) to {MAX_SECONDS:.0f} seconds, not {raw!r}")
    return value


def _stat(path: Optional[Path]) -> Optional[List[Any]]:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_mtime_ns, st.st_size, st.st_ino]


def fingerprint(collection_root: Path, playbook: Path, inventory: Optional[Path],
                env: Mapping[str, str]) -> Dict[str, Any]:
    """What a standby must have been started with to run this start as its own play would: the same playbook file,
    collection, inventory file (and its modification time), interpreter and environment."""
    keys = sorted(k for k in env if (k.startswith(("ANSIBLE_", "ISESSION_")) and not k.startswith(ENV))
                  or k in ENV_KEYS)
    env_hash = hashlib.sha256(json.dumps([[k, env[k]] for k in keys]).encode()).hexdigest()
    return {"collection": _stat(collection_root), "playbook": _stat(playbook),
            "inventory": _stat(inventory), "python": sys.executable, "env": env_hash}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user's process
        return True
    return True


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _request(path: Path, doc: Mapping[str, Any], timeout: float = CONNECT_TIMEOUT) -> Optional[Dict[str, Any]]:
    """Send one request to a waiting standby: its answer, or None when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            # a unix socket's address holds at most 107 bytes: a deep session root is reached through its directory's
            # descriptor (/proc/self/fd/N/sock), as linear_idle binds it
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                conn.connect(f"/proc/self/fd/{fd}/{path.name}")
            finally:
                os.close(fd)
            conn.sendall(json.dumps(doc).encode() + b"\n")
            with conn.makefile("rb") as reader:
                answer = json.loads(reader.readline().decode() or "null")
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def standbys(root: Path) -> List[Path]:
    base = root / DIRNAME
    try:
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def retire(root: Path) -> int:
    """Ask every untaken standby of ``root`` to end without running its play; returns how many were waiting.

    One still starting finds the mark ``end`` once it listens (linear_idle looks for it then); one already waiting
    gets the request. The mark comes first, the look for the socket after it, so neither misses the other."""
    asked = 0
    for directory in standbys(root):
        if (directory / TAKEN).exists():
            continue
        with contextlib.suppress(OSError):
            os.close(os.open(directory / END, os.O_WRONLY | os.O_CREAT, 0o600))
        if (directory / SOCKET).exists():
            asked += _request(directory / SOCKET, {"end": True}) is not None
    return asked


def spawn(root: Path, collection_root: Path, service: str, playbook: Path, *, inventory: Optional[Path],
          seconds: float, env: Optional[Mapping[str, str]] = None) -> Path:
    """Start a standby for ``service`` in the background (after ending the others: at most one waits per root)."""
    env = dict(os.environ if env is None else env)
    retire(root)
    base = root / DIRNAME
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = base / secrets.token_hex(6)
    directory.mkdir(mode=0o700)
    record = {"service": service, "playbook": str(playbook), "inventory": str(inventory) if inventory else None,
              "seconds": seconds, "created": time.time(),
              "fingerprint": fingerprint(collection_root, playbook, inventory, env)}
    fd = os.open(directory / RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    # posix_spawn (vfork): the start's own exit does not wait for a fork of its whole process; a session of its
    # own, /dev/null for its stdio, no other descriptor (Python opens them close-on-exec); not waited for, so it
    # is reaped by init when this command has exited
    devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "isession", "_standby", str(directory)],
                         {**env, "ISESSION_COLLECTIONS": str(collection_root)}, file_actions=devnull, setsid=True)
    # how a start tells a standby still starting from a dead one (take); gone already if the standby ended at once
    with contextlib.suppress(OSError):
        fd = os.open(directory / PID, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{pid}\n")
    return directory


def serve(directory: Path) -> int:
    """The standby's own process (``isession _standby DIR``): run the start playbook, waiting for a start's inputs;
    remove the directory when no start took it."""
    from .collection import active  # noqa: PLC0415
    from .play import standby_run  # noqa: PLC0415

    record = _read(directory / RECORD)
    col = active()
    try:
        if record is None or col is None:
            print(f"isession _standby: {'no ' + RECORD if record is None else 'no collection'} in {directory}",
                  file=sys.stderr)
            return 2
        inventory = Path(record["inventory"]) if record.get("inventory") else None
        standby_run(col, directory / "runner", Path(record["playbook"]), inventory,
                    socket_path=directory / SOCKET, seconds=float(record["seconds"]))
        return 0
    finally:
        if not (directory / TAKEN).exists():
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Taken:
    directory: Path
    playbook_pid: int

    @property
    def runner(self) -> Path:
        return self.directory / "runner"


def _starting(directory: Path, record: Mapping[str, Any], now: float) -> bool:
    """Whether a standby that does not listen yet is still on its way: its process lives (its pid file; a standby
    whose pid is not written yet is only just spawned) and it was made less than STARTING_AT_MOST ago."""
    created = record.get("created")
    if not isinstance(created, (int, float)) or not 0 <= now - created < STARTING_AT_MOST:
        return False
    try:
        pid = int((directory / PID).read_text())
    except FileNotFoundError:
        return now - created < STARTING_WAIT
    except (OSError, ValueError):
        return False
    return _alive(pid)


def take(root: Path, service: str, fp: Mapping[str, Any], extravars: Mapping[str, Any],
         session_dir: Path) -> Optional[Taken]:
    """Hand ``extravars`` to a waiting standby made for this start (same service and fingerprint) and link the
    session's ``logs/runner/artifacts`` to its artifacts; None when there is none (the start then runs its own
    play). One made for it that is still starting is waited for, up to STARTING_WAIT seconds."""
    tried: set = set()
    deadline: Optional[float] = None
    while True:
        starting = False
        for directory in standbys(root):
            record = _read(directory / RECORD)
            if not record or record.get("service") != service or record.get("fingerprint") != dict(fp):
                continue
            if directory in tried or (directory / END).exists():
                continue  # it refused this start already, or it is ended
            if not (directory / SOCKET).exists():
                starting = starting or _starting(directory, record, time.time())
                continue
            tried.add(directory)
            try:
                os.close(os.open(directory / TAKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError:
                continue  # another start took it, or it just ended and its directory is gone
            answer = _request(directory / SOCKET, {"extravars": dict(extravars)})
            if not answer or not answer.get("taken") or not isinstance(answer.get("pid"), int):
                with contextlib.suppress(OSError):
                    os.unlink(directory / TAKEN)
                continue
            (directory / TAKEN).write_text(session_dir.name + "\n")
            os.symlink(directory / "runner" / "artifacts", session_dir / "logs" / "runner" / "artifacts")
            return Taken(directory, answer["pid"])
        now = time.monotonic()
        deadline = now + STARTING_WAIT if deadline is None else deadline
        if not starting or now >= deadline:
            return None
        time.sleep(FOLLOW_EVERY)


def follow(taken: Taken, on_event: Callable[[Dict[str, Any]], Any], cancel: threading.Event,
           stop: Callable[[int], None], ident: str = "start") -> tuple:
    """Feed the taken play's events to ``on_event`` in order until its run ends -> ``(status, rc)``.

    ``cancel`` set: ``stop`` gets the play's pid (once) and the run's end is still waited for. A play that is gone
    without its run's end recorded (the standby's own process died) ends ``("failed", None)``."""
    artifacts = taken.runner / "artifacts" / ident
    events = artifacts / "job_events"
    seen: set = set()
    stopped = False

    def drain() -> None:
        try:
            names = os.listdir(events)
        except OSError:
            return
        fresh = []
        for name in names:
            if name in seen or not name.endswith(".json") or name.endswith("-partial.json"):
                continue
            head = name.split("-", 1)[0]
            if head.isdigit():
                fresh.append((int(head), name))
        for _counter, name in sorted(fresh):
            event = _read(events / name)
            if event is None:
                continue  # pragma: no cover - written by rename, so never partial
            seen.add(name)
            on_event(event)

    gone_at: Optional[float] = None
    while True:
        done = (artifacts / "rc").is_file() and (artifacts / "rc").read_text().strip() != ""
        drain()
        if done:
            break
        if cancel.is_set() and not stopped:
            stopped = True
            stop(taken.playbook_pid)
        if gone_at is None and not _alive(taken.playbook_pid):
            gone_at = time.monotonic()
        elif gone_at is not None and time.monotonic() - gone_at > RUNNER_GONE_AFTER:
            return "failed", None  # the play ended and its runner never said how: the standby's process died
        time.sleep(FOLLOW_EVERY)
    status = (artifacts / "status").read_text().strip() if (artifacts / "status").is_file() else "failed"
    try:
        rc: Optional[int] = int((artifacts / "rc").read_text().strip())
    except (OSError, ValueError):
        rc = None
    return status, rc


def cmd_standby(args: Any) -> int:
    """``isession _standby DIR`` (started by :func:`spawn`)."""
    return serve(Path(args.directory))
