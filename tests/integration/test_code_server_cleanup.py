"""code_server's socket directory under /tmp goes with the session.

A unix socket path is limited to 108 bytes, so when the session directory is deep the code_server fragment puts
code-server's sockets in a private ``/tmp/isession-cs.*`` directory (recorded in ``code-server/socket-dir``). As
wsuser, through the collection's playbooks on the workspace target: start with a deep session root -> Running
through nginx and that socket -> the directory exists (0700, wsuser's, holding the socket nginx forwards to) ->
cancel (or code-server dying on its own) -> the directory is gone and no process of the session is left. With a
short session root the sockets stay in the session directory and no /tmp directory is made.
"""
from __future__ import annotations

import os
import pwd
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    failure_text,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    stop_watcher,
    wait_until,
)

pytestmark = pytest.mark.bed

SOCKET_PATH_MAX = 100  # the fragment moves the sockets to /tmp when <session dir>/code-server/app.sock is longer


def _session_root(bed, deep: bool) -> Path:
    """A session root owned by wsuser; a deep one makes <root>/<id>/code-server/app.sock longer than a socket may be."""
    top = bed.user_tmpdir(WS_USER)
    if not deep:
        return top / "s"
    root = top / ("deep-" + "d" * 50) / ("deeper-" + "e" * 30)
    bed.run("workspace", ["mkdir", "-p", "-m", "0700", str(root)], user=WS_USER, check=True)
    return root


def _start(bed, root: Path, sid: str):
    extra = dict(session_id=sid, session_root=str(root), session_target="workspace", session_start_timeout=120)
    res = run_playbook(bed, "hpc.interactive.start_code_server", extra)
    assert res.rc == 0, failure_text(res)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Running"
    return res


def _cancel(bed, root: Path, sid: str) -> None:
    res = run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)))
    assert res.rc == 0, failure_text(res)


def _socket_tmpdir(sdir: Path) -> Path:
    """The /tmp socket directory the session records, checked to be the one nginx forwards to and private."""
    record = sdir / "code-server" / "socket-dir"
    assert record.is_file(), f"no {record}: the deep session did not move its sockets"
    tmp = Path(record.read_text().strip())
    assert tmp.parent == Path("/tmp") and tmp.name.startswith("isession-cs."), tmp
    st = os.lstat(tmp)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == pwd.getpwnam(WS_USER).pw_uid
    assert stat.S_ISSOCK(os.lstat(tmp / "app.sock").st_mode)
    assert f"http://unix:{tmp}/app.sock:/" in (sdir / "code-server" / "nginx.conf").read_text()
    return tmp


@pytest.fixture
def installed(apps):
    """code-server, installed through its role's install entry point (the session fixture ``apps``)."""
    return apps["code_server"]


def test_deep_session_root_socket_dir_removed_on_cancel(bed, installed):
    root = _session_root(bed, deep=True)
    sid = f"cs-clean-{os.getpid()}-{int(time.time()) % 100000}"
    sdir = root / sid
    assert len(str(sdir / "code-server" / "app.sock")) > SOCKET_PATH_MAX
    cancelled = False
    try:
        _start(bed, root, sid)
        tmp = _socket_tmpdir(sdir)
        _cancel(bed, root, sid)
        cancelled = True
        assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
        assert wait_until(lambda: not session_processes(sid), 15), session_processes(sid)
        assert not os.path.lexists(tmp), f"{tmp} is left after cancel: {sorted(os.listdir(tmp))}"
        assert reservations(sid) == []
    finally:
        if not cancelled:
            _cancel(bed, root, sid)
        stop_watcher(root)


def test_deep_session_root_socket_dir_removed_when_code_server_dies(bed, installed):
    """code-server ending on its own (here: SIGKILL to it alone) ends the fragment, which removes the directory."""
    root = _session_root(bed, deep=True)
    sid = f"cs-die-{os.getpid()}-{int(time.time()) % 100000}"
    sdir = root / sid
    try:
        _start(bed, root, sid)
        tmp = _socket_tmpdir(sdir)
        node = [pid for pid, desc in session_processes(str(sdir)).items()
                if "code-server" in desc and "entry.js" in desc]
        assert node, session_processes(str(sdir))
        for pid in node:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not os.path.lexists(tmp), 15), f"{tmp} is left after code-server died"
        assert wait_until((sdir / "agent.error").is_file, 15)
        assert "code_server server exited" in (sdir / "agent.error").read_text()
        assert wait_until(lambda: not session_processes(sid), 15), session_processes(sid)
    finally:
        _cancel(bed, root, sid)
        stop_watcher(root)


def test_short_session_root_keeps_sockets_in_the_session_dir(bed, installed):
    root = _session_root(bed, deep=False)
    sid = f"cs-short-{os.getpid() % 1000}"
    sdir = root / sid
    assert len(str(sdir / "code-server" / "app.sock")) <= SOCKET_PATH_MAX
    cancelled = False
    try:
        _start(bed, root, sid)
        assert not (sdir / "code-server" / "socket-dir").exists()
        assert stat.S_ISSOCK(os.lstat(sdir / "code-server" / "app.sock").st_mode)
        _cancel(bed, root, sid)
        cancelled = True
        assert wait_until(lambda: not session_processes(sid), 15), session_processes(sid)
    finally:
        if not cancelled:
            _cancel(bed, root, sid)
        stop_watcher(root)
