# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether the user's watcher runs: the lock on its pid file under the session root, and a descriptor that becomes
readable when that watcher exits.

Private to the hpc.interactive collection. The watcher (``isession watch``) holds an exclusive ``flock`` on
``<root>/.watcher.pid`` for as long as it runs and writes its pid there; the lock, not the file's text, says whether
it runs (a killed watcher leaves the file and its pid behind, and the kernel drops the lock). A start waiting in the
queue depends on the watcher to learn that its job runs, so it watches the watcher too (``session_wait``).
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

PIDFILE = ".watcher.pid"


def watcher_pid(root: str) -> Optional[int]:
    """The pid of the watcher that runs on session root ``root``; -1 when one runs but its pid is not written yet;
    None when none runs."""
    try:
        fd = os.open(os.path.join(root, PIDFILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def exit_fd(root: str) -> Optional[int]:
    """A pidfd of the running watcher (readable once it exits), or None: no watcher, its pid not yet written, or no
    pidfd on this system (the caller then checks :func:`watcher_pid` at its own pace). The caller closes it.

    The lock is checked again after the pidfd is opened: the pid was the watcher's while the lock was held, so the
    descriptor cannot name another process that reused the pid.
    """
    pid = watcher_pid(root)
    if not pid or pid < 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if watcher_pid(root) != pid:
        os.close(fd)
        return None
    return fd
