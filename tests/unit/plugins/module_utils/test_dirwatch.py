"""_dirwatch: a wait that sleeps until a file of the directory changes, as a session record changes (a rename)."""
from __future__ import annotations

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
