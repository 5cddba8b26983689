"""_dirwatch: a wait that sleeps until a file of the directory changes, as a session record changes (a rename)."""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

from ansible_collections.hpc.interactive.plugins.module_utils import _dirwatch
from ansible_collections.hpc.interactive.plugins.module_utils._dirwatch import Changes
from ansible_collections.hpc.interactive.plugins.module_utils._service_file import write_atomic


def _later(seconds, action):
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_a_record_renamed_into_the_directory_wakes_the_wait(tmp_path):
    with Changes(str(tmp_path)) as changes:
        assert changes.active
        writer = _later(0.2, lambda: write_atomic(str(tmp_path / "state.json"), "{}\n", 0o600))
        assert changes.wait(60) is True  # woken by the write, not by the 60 s timeout
        writer.join()
        changes.wait(0)  # the write's last events (the temporary file, then the rename)
        assert changes.wait(0.05) is False  # drained: nothing more comes while nothing changes
    assert changes.fd == -1


def test_a_change_made_before_the_wait_is_not_missed(tmp_path):
    with Changes(str(tmp_path)) as changes:
        (tmp_path / "queue.json").write_text("{}")
        assert changes.wait(60) is True


def test_changes_elsewhere_do_not_wake_it(tmp_path):
    (tmp_path / "watched").mkdir()
    with Changes(str(tmp_path / "watched")) as changes:
        (tmp_path / "other.json").write_text("{}")
        assert changes.wait(0.2) is False


def test_without_inotify_the_wait_sleeps(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(_dirwatch.time, "sleep", slept.append)

    class NoInotify:
        def inotify_init1(self, flags):
            return -1

    changes = Changes(str(tmp_path), libc=NoInotify())
    assert not changes.active
    assert changes.wait(0.3) is False and slept == [0.3]
    missing = Changes(str(tmp_path / "missing"))  # the watch cannot be set: it sleeps too, and leaks no descriptor
    assert not missing.active and missing.fd == -1
    before = len(os.listdir("/proc/self/fd"))
    for _attempt in range(20):
        Changes(str(tmp_path / "missing")).close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_stamp_is_trusted_only_for_a_file_not_modified_in_the_last_moments(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(str(path), "{}\n", 0o600)
    st = os.stat(path)
    seen = _dirwatch.stamp_of(st)
    assert seen == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert not _dirwatch.unchanged(st, seen)  # just written: read again whatever the stamp says
    old = st.st_mtime_ns - 2 * _dirwatch.RECENT_NS
    os.utime(path, ns=(old, old))
    st = os.stat(path)
    assert _dirwatch.unchanged(st, _dirwatch.stamp_of(st))
    assert not _dirwatch.unchanged(st, None)  # never read
    write_atomic(str(path), "{}\n", 0o600)
    os.utime(path, ns=(old, old))  # same size and mtime: the rename gave it another inode
    assert not _dirwatch.unchanged(os.stat(path), _dirwatch.stamp_of(st))


def _tree(root, libc=None):
    return _dirwatch.Tree(str(root), ("state.json", "service.json"), libc=libc)


def test_a_tree_reports_the_directories_whose_watched_files_changed(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    tree = _tree(tmp_path)
    try:
        assert tree.active
        assert tree.changed() is None  # nothing looked at yet: the caller looks at everything first
        for name in ("a", "b", "c"):
            assert tree.add(name)
        assert tree.changed() == set()
        write_atomic(str(tmp_path / "a" / "state.json"), "{}\n", 0o600)  # a rename, as every record writer does
        with open(tmp_path / "b" / "service.json", "w", encoding="utf-8") as handle:  # a write in place
            handle.write("{}")
        write_atomic(str(tmp_path / "c" / "queue.json"), "{}\n", 0o600)  # not a watched file
        assert tree.changed() == {"a", "b"}
        assert tree.changed() == set()  # each change once
        (tmp_path / "d").mkdir()  # a new session directory: named by the root's watch
        assert tree.changed() == {"d"}
        os.unlink(tmp_path / "a" / "state.json")
        os.rmdir(tmp_path / "a")  # a directory that goes: named, and its watch forgotten
        assert tree.changed() == {"a"}
        assert "a" not in tree.watched and tree.watched.keys() == {"b", "c"}
    finally:
        tree.close()
    assert tree.fd == -1


def test_a_directory_replaced_under_the_same_name_is_watched_anew(tmp_path):
    (tmp_path / "a").mkdir()
    tree = _tree(tmp_path)
    try:
        tree.changed()
        tree.add("a")
        os.rename(tmp_path / "a", tmp_path / ".old")
        (tmp_path / "a").mkdir()
        assert "a" in tree.changed()
        assert tree.add("a")
        write_atomic(str(tmp_path / "a" / "state.json"), "{}\n", 0o600)
        write_atomic(str(tmp_path / ".old" / "state.json"), "{}\n", 0o600)  # the old directory: not this session
        assert tree.changed() == {"a"}
    finally:
        tree.close()


def test_a_tree_whose_root_goes_asks_for_a_full_look_and_stops(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    tree = _tree(root)
    try:
        tree.changed()
        os.rmdir(root)
        assert tree.changed() is None
        assert not tree.active
    finally:
        tree.close()


class _WatchLimit:
    """The real libc, except that a session directory's watch fails as at the user's inotify watch limit."""

    def __init__(self, root):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.root = os.fsencode(str(root))

    def inotify_init1(self, flags):
        return self.libc.inotify_init1(flags)

    def inotify_add_watch(self, fd, path, mask):
        if path == self.root:
            return self.libc.inotify_add_watch(fd, path, mask)
        ctypes.set_errno(errno.ENOSPC)
        return -1


def test_a_watch_that_cannot_be_added_asks_for_a_full_look(tmp_path):
    (tmp_path / "a").mkdir()
    tree = _tree(tmp_path, libc=_WatchLimit(tmp_path))
    try:
        assert tree.active
        tree.changed()
        assert tree.add("a") is False
        assert tree.changed() is None  # the caller looks at everything, by stat, at that tick
    finally:
        tree.close()


def test_a_directory_gone_before_its_watch_or_a_plain_file_needs_no_full_look(tmp_path):
    (tmp_path / "gone").mkdir()
    (tmp_path / "file").write_text("")
    tree = _tree(tmp_path)
    try:
        tree.changed()
        os.rmdir(tmp_path / "gone")  # a session removed between the root's news and the watch
        assert tree.add("gone") is False
        assert tree.add("file") is False  # not a directory: nothing in it to watch
        assert tree.changed() == {"gone"}  # the root's own news, not "look at everything"
        (tmp_path / "gone").mkdir()  # one that comes back is named by the root's watch, and watched then
        assert tree.changed() == {"gone"}
        assert tree.add("gone")
        write_atomic(str(tmp_path / "gone" / "state.json"), "{}\n", 0o600)
        assert tree.changed() == {"gone"}
    finally:
        tree.close()


def test_without_inotify_a_tree_is_inactive_and_always_asks_for_a_full_look(tmp_path):
    class NoInotify:
        @staticmethod
        def inotify_init1(_flags):
            return -1

    tree = _tree(tmp_path, libc=NoInotify())
    assert not tree.active
    assert tree.add("a") is False
    assert tree.changed() is None
    tree.close()
