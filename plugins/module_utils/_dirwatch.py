# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sleep until a file in a directory changes (Linux inotify), for waits that may last hours; tell a changed file
from an unchanged one by its stat stamp.

Private to the hpc.interactive collection. A session's record is rewritten by renaming a new file over it, which
inotify reports on the directory as ``IN_MOVED_TO``; waiting on that costs nothing until it happens. Where inotify
is not available (another kernel, a limit reached) :meth:`Changes.wait` simply sleeps, and the caller goes back to
checking the file's modification time at its own pace.
"""
from __future__ import annotations

import ctypes
import os
import select
import time
from typing import Optional, Sequence, Tuple

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCHED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
RECENT_NS = 2_000_000_000  # a file modified less than this ago is read again even when its stamp is unchanged

Stamp = Tuple[int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    """A file's stat stamp: mtime, size and inode (every writer of a session file replaces it by a rename)."""
    return st.st_mtime_ns, st.st_size, st.st_ino


def unchanged(st: os.stat_result, seen: Optional[Stamp]) -> bool:
    """True when the file whose stat is ``st`` is still what was read under the stamp ``seen``.

    A file modified in the last ``RECENT_NS`` counts as changed whatever its stamp (git's "racy clean" rule): mtimes
    have the kernel clock's coarse granularity and a freed inode number comes back, so two rewrites in one clock tick
    can look alike.
    """
    return seen is not None and stamp_of(st) == seen and time.time_ns() - st.st_mtime_ns >= RECENT_NS


class Changes:
    """Changes to the files of one directory; a context manager that closes the inotify descriptor."""

    def __init__(self, directory: str, libc: Optional[ctypes.CDLL] = None) -> None:
        self.fd = -1
        try:
            lib = libc if libc is not None else ctypes.CDLL(None, use_errno=True)
            fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return
            if lib.inotify_add_watch(fd, os.fsencode(directory), WATCHED) < 0:
                os.close(fd)
                return
            self.fd = fd
        except (OSError, AttributeError, TypeError):
            self.fd = -1

    @property
    def active(self) -> bool:
        """True when changes are reported (inotify); False when :meth:`wait` only sleeps."""
        return self.fd >= 0

    def wait(self, timeout: float, also: Sequence[int] = ()) -> bool:
        """Wait until something in the directory changes, one of the descriptors ``also`` becomes readable, or
        ``timeout`` seconds pass; True when something came."""
        watched = ([self.fd] if self.fd >= 0 else []) + list(also)
        if not watched:
            time.sleep(max(0.0, timeout))
            return False
        ready, _w, _x = select.select(watched, [], [], max(0.0, timeout))
        if self.fd not in ready:
            return bool(ready)
        while True:  # drain every pending event: one wake-up per burst of writes
            try:
                if not os.read(self.fd, 65536):
                    break
            except BlockingIOError:
                break
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Changes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
