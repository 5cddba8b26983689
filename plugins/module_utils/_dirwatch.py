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
import errno
import os
import select
import struct
import time
from typing import Dict, FrozenSet, Optional, Sequence, Set, Tuple

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCHED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
# a directory of directories (a session root): entries that come, go or are renamed, and the root itself going
ROOT_WATCHED = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# one of its directories: files written, replaced by a rename, removed; the directory itself going
ENTRY_WATCHED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF \
    | IN_ONLYDIR
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
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


class Tree:
    """Which directories of a root changed: the root's entries (inotify on the root) and, in each directory added with
    :meth:`add`, the files named in ``files`` (inotify on each).

    :meth:`changed` returns the names of the directories with news since the last call, or None when the caller must
    look at everything: inotify is not available, a watch could not be added (the user's limit), the kernel's event
    queue overflowed, or the root itself went. A caller that gets None looks at every directory (and adds them again);
    after an event it reads the files (an event is queued before the change can be read, so a read after the drain
    never misses it). Not thread-safe: one caller drains.
    """

    def __init__(self, root: str, files: Sequence[str], libc: Optional[ctypes.CDLL] = None) -> None:
        self.root = root
        self.files: FrozenSet[bytes] = frozenset(os.fsencode(f) for f in files)
        self.fd = -1
        self.lib = None
        self.root_wd = -1
        self.entries: Dict[int, str] = {}  # watch descriptor -> directory name
        self.watched: Dict[str, int] = {}  # directory name -> watch descriptor
        self.lost = True  # the next changed() says None: nothing has been looked at yet
        self.dead = False  # the root went or was moved: make a new Tree
        try:
            lib = libc if libc is not None else ctypes.CDLL(None, use_errno=True)
            fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return
            wd = lib.inotify_add_watch(fd, os.fsencode(root), ROOT_WATCHED)
            if wd < 0:
                os.close(fd)
                return
            self.fd, self.lib, self.root_wd = fd, lib, wd
        except (OSError, AttributeError, TypeError):
            self.fd = -1

    @property
    def active(self) -> bool:
        """True while changes are reported (inotify on a root that is still there)."""
        return self.fd >= 0 and not self.dead

    def add(self, name: str) -> bool:
        """Watch directory ``name`` of the root (again: a directory replaced under the same name gets a new watch);
        False when it cannot be watched: gone already or not a directory (the root's watch names one that comes), or
        a failure that may hide changes (the user's watch limit), after which the next :meth:`changed` says None."""
        if self.fd < 0 or self.lib is None:
            return False
        wd = self.lib.inotify_add_watch(self.fd, os.fsencode(os.path.join(self.root, name)), ENTRY_WATCHED)
        if wd < 0:
            # gone already, or not a directory: nothing to watch, and the root's watch reports one that comes (back);
            # any other failure (the user's watch limit) means changes may go unreported
            if ctypes.get_errno() not in (errno.ENOENT, errno.ENOTDIR):
                self.lost = True
            return False
        old = self.watched.get(name)
        if old is not None and old != wd:
            self.entries.pop(old, None)
        self.watched[name] = wd
        self.entries[wd] = name
        return True

    def changed(self) -> Optional[Set[str]]:
        """The directories with news since the last call (see the class); None: look at everything."""
        if self.fd < 0:
            return None
        out: Set[str] = set()
        everything = self.lost
        self.lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                everything = True
                break
            if not data:
                break
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0")
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    everything = True
                elif wd == self.root_wd:
                    if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                        everything = self.dead = True  # the root went: this tree reports nothing more
                    elif name:
                        out.add(os.fsdecode(name))
                else:
                    entry = self.entries.get(wd)
                    if entry is None:
                        continue
                    if mask & IN_IGNORED:  # its directory went (or was replaced): forget the watch
                        self.entries.pop(wd, None)
                        if self.watched.get(entry) == wd:
                            del self.watched[entry]
                        out.add(entry)
                    elif mask & (IN_DELETE_SELF | IN_MOVE_SELF) or name in self.files:
                        out.add(entry)
        return None if everything else out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
