"""The files through which other commands deal with the user's watcher: its pid file and its teardown notes.

Kept apart from :mod:`isession.watcher` so that ``isession cancel``, which only sets a tombstone, wakes the watcher
and waits for its note, does not import the watcher's scheduler and tunnel code (twenty cancels at once pay every
import on the cores that run the sessions).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, Optional

# under the session root; flock'ed by the one watcher of the user
from ansible_collections.hpc.interactive.plugins.module_utils import _state
from ansible_collections.hpc.interactive.plugins.module_utils._watcher_pid import PIDFILE, watcher_pid

# what the watcher's teardown of an ended session came to, in its directory; `isession cancel` reads it
TEARDOWN_FILE = "teardown.json"
# the key of a note written while the teardown is under way: the pid of the watcher doing it (its final note has none)
UNDER_WAY = "under_way"


def lock_pidfile(root: Path) -> Optional[int]:
    """Take the watcher lock (flock on ``<root>/.watcher.pid``); the fd, or None if another watcher holds it."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / PIDFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def read_teardown(directory: Path) -> Optional[Dict[str, Any]]:
    """The watcher's note on an ended session's teardown (``teardown.json``), or None when there is none."""
    try:
        doc = json.loads((directory / TEARDOWN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def running_pid(root: Path) -> Optional[int]:
    """The pid of the running watcher, or None (the lock, not the file's text, decides)."""
    return watcher_pid(str(root))


def note_pending(note: Optional[Dict[str, Any]], watcher_pid: Optional[int]) -> Optional[bool]:
    """Of a watcher's ``teardown.json``: None when it is final (or there is none), True when the teardown of the
    running watcher (``watcher_pid``, from :func:`running_pid`) is under way, False when it was under way for a
    watcher that no longer runs."""
    if not note or not note.get(UNDER_WAY):
        return None
    return note.get(UNDER_WAY) == watcher_pid


def request_fast_cancel(root: Path, session_id: str) -> bool:
    """Set the cancel tombstone now and wake the user's watcher, which cancels the job over the connection it holds.

    The tombstone is the cancel playbook's first step (``session_state`` op cancel, the same ``_state`` call), done
    here ~1 s earlier than ansible-playbook could, and by ``isession cancel`` before it imports the rest of its
    code (:func:`isession.cli.main`). True when a running watcher was woken (then
    :func:`isession.commands.watcher_cancelled` tells whether it undid everything). Any trouble here only means the
    playbook does all the work.
    """
    try:
        _state.run_op("cancel", str(root), session_id, {})
        pid = running_pid(root)
        if pid and pid > 0:
            os.kill(pid, signal.SIGUSR1)
            return True
    except (OSError, ValueError):
        pass
    return False
