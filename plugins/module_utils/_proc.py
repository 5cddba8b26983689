# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Process inspection through ``/proc``: the one reader of ``/proc/PID/stat`` and of socket owners.

Private to the hpc.interactive collection; standard library only and Python 3.8+, because the scripts a batch job
runs (``_tunnel.py``) import it from the file next to them. A process is identified by its pid *and* its start time
(field 22 of ``/proc/PID/stat``, clock ticks after boot), so a pid the kernel reused for another process is never
taken for ours. A zombie (exited, not yet reaped) counts as gone.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Iterable, List, Optional


def stat_fields(pid: object, proc_root: str = "/proc") -> Optional[List[str]]:
    """``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...), or None when gone or a zombie.

    The command name is in parentheses and may itself hold spaces and ``)``: the fields start after the last ``)``.
    """
    try:
        with open(os.path.join(proc_root, str(pid), "stat"), encoding="utf-8", errors="replace") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields


def start_time(pid: object, proc_root: str = "/proc") -> Optional[str]:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks), or None when the pid is gone."""
    fields = stat_fields(pid, proc_root)
    return None if fields is None else fields[19]


def alive(pid: object, proc_root: str = "/proc") -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return stat_fields(pid, proc_root) is not None


def cmdline(pid: object, proc_root: str = "/proc") -> List[str]:
    """The arguments of ``pid`` (empty when gone or unreadable)."""
    try:
        with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as fh:
            return [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def socket_holders(inodes: Iterable[object], proc_root: str = "/proc") -> List[int]:
    """Pids holding a descriptor on one of the sockets ``inodes`` (processes of other users are not readable)."""
    wanted = {str(i) for i in inodes}
    pids = []  # type: List[int]
    if not wanted:
        return pids
    for pid in (p for p in os.listdir(proc_root) if p.isdigit()):
        fd_dir = os.path.join(proc_root, pid, "fd")
        try:
            for fd in os.listdir(fd_dir):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target.startswith("socket:[") and target[8:-1] in wanted:
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    return sorted(pids)


def source_of(module: ModuleType) -> str:
    """A module's source text, to write it where a plain ``python3`` runs it (the tunnel supervisor, the watcher's
    server): also when it was loaded from a zip (AnsiballZ) or by ansible-core's collection loader, whose
    ``get_source`` gives bytes."""
    loader = getattr(module, "__loader__", None)
    try:
        src = loader.get_source(module.__name__) if loader is not None else None
    except Exception:  # noqa: BLE001 - any loader problem: fall back to the file
        src = None
    if isinstance(src, bytes):
        src = src.decode("utf-8")
    if src:
        return src
    with open(module.__file__ or "", encoding="utf-8") as fh:
        return fh.read()
