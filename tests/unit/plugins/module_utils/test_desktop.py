"""Unit tests for X display reservations and the VNC password (plugins/module_utils/_desktop.py)."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _desktop, _ports, _proc
from ansible_collections.hpc.interactive.plugins.module_utils._desktop import (
    DisplayDir,
    DisplayError,
    display_state,
    lock_path,
    parse_display_range,
    reclaim_x_files,
    release_displays,
    socket_path,
    vnc_password,
)

SCRIPT = Path(_desktop.__file__).resolve()
D = 931  # display numbers far from any real X server (TCP 6931 must be bindable)


@pytest.fixture
def xtmp(tmp_path):
    (tmp_path / ".X11-unix").mkdir()
    return str(tmp_path)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- the VNC password


def test_vnc_password_is_8_urlsafe_characters_derived_from_the_secret():
    pw = vnc_password("s3cret-token")
    assert len(pw) == 8 and set(pw) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert vnc_password("s3cret-token\n") == pw  # the secret file's trailing newline does not count
    assert vnc_password("s3cret-tokeN") != pw
    assert pw not in "s3cret-token"


def test_vnc_password_is_the_documented_derivation():
    digest = hashlib.sha256(b"hpc.interactive vnc password\nabc").digest()
    assert vnc_password("abc") == base64.urlsafe_b64encode(digest).decode()[:8]


def test_vnc_password_refuses_an_empty_secret():
    with pytest.raises(DisplayError) as err:
        vnc_password(" \n")
    assert err.value.field == "secret"


def test_password_command_writes_a_0600_file_and_prints_no_password(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("abc\n")
    out = tmp_path / "pw"
    cp = subprocess.run([sys.executable, str(SCRIPT), "password", "--secret-file", str(secret), "--out", str(out)],
                        capture_output=True, text=True, check=True)
    assert out.read_text() == vnc_password("abc") + "\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert vnc_password("abc") not in cp.stdout + cp.stderr


# ---------------------------------------------------------------- input


@pytest.mark.parametrize("value,expected", [("1-99", (1, 99)), ("5", (5, 5)), ([3, 7], (3, 7)), (12, (12, 12))])
def test_parse_display_range(value, expected):
    assert parse_display_range(value) == expected


@pytest.mark.parametrize("value", ["0-5", "5-1", "1-1000", "a-b", "1-2-3", True, "-3"])
def test_parse_display_range_refuses(value):
    with pytest.raises(DisplayError) as err:
        parse_display_range(value)
    assert err.value.field == "display_range"


# ---------------------------------------------------------------- the X server's files


def test_a_display_without_files_is_free(xtmp):
    assert display_state(D, xtmp=xtmp) == "free"


def test_a_live_servers_lock_makes_it_busy_and_is_never_reclaimed(xtmp):
    Path(lock_path(D, xtmp)).write_text(f"{os.getpid():10d}\n")
    assert display_state(D, xtmp=xtmp) == "busy"
    assert reclaim_x_files(D, xtmp=xtmp) == []
    assert os.path.exists(lock_path(D, xtmp))


def test_a_garbled_lock_is_busy(xtmp):
    Path(lock_path(D, xtmp)).write_text("junk\n")
    assert display_state(D, xtmp=xtmp) == "busy"
    assert reclaim_x_files(D, xtmp=xtmp) == []


def test_a_dead_servers_lock_and_socket_are_stale_and_reclaimed(xtmp):
    Path(lock_path(D, xtmp)).write_text(f"{dead_pid():10d}\n")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(socket_path(D, xtmp))
    sock.close()  # the file stays, nobody listens
    assert display_state(D, xtmp=xtmp) == "stale"
    assert sorted(reclaim_x_files(D, xtmp=xtmp)) == sorted([lock_path(D, xtmp), socket_path(D, xtmp)])
    assert display_state(D, xtmp=xtmp) == "free"


def _zombie_child() -> subprocess.Popen:
    """A child that has exited and that this process has not reaped: what a killed X server is to its agent shell
    until the shell gets to it."""
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while _proc.alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _ports.pid_alive(proc.pid), "the child must still be a zombie, not reaped"
    return proc


def test_a_zombie_servers_lock_is_stale_and_reclaimed(xtmp):
    proc = _zombie_child()
    try:
        Path(lock_path(D, xtmp)).write_text(f"{proc.pid:10d}\n")
        assert display_state(D, xtmp=xtmp) == "stale"
        assert reclaim_x_files(D, xtmp=xtmp) == [lock_path(D, xtmp)]
    finally:
        proc.wait()


def test_a_listening_socket_makes_it_busy(xtmp):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(socket_path(D, xtmp))
    sock.listen(1)
    try:
        assert display_state(D, xtmp=xtmp) == "busy"
        assert reclaim_x_files(D, xtmp=xtmp) == []
        assert os.path.exists(socket_path(D, xtmp))
    finally:
        sock.close()


def test_another_users_dead_lock_is_busy_for_us(xtmp):
    Path(lock_path(D, xtmp)).write_text(f"{dead_pid():10d}\n")
    other = os.geteuid() + 1
    assert display_state(D, uid=other, xtmp=xtmp) == "busy"
    assert reclaim_x_files(D, uid=other, xtmp=xtmp) == []


# ---------------------------------------------------------------- reservations


def ddir(path, xtmp, **kw) -> DisplayDir:
    return DisplayDir(str(path), xtmp=xtmp, **kw)


def test_reserve_is_idempotent_per_owner_with_the_ports_scheme(tmp_path, xtmp):
    res_dir = tmp_path / "res"
    d = ddir(res_dir, xtmp)
    first, reclaimed = d.reserve_display("sess-a", pid=os.getpid(), display_range="900-905")
    again, _unused = d.reserve_display("sess-a", pid=os.getpid(), display_range="900-905")
    assert first == again and 900 <= first <= 905 and reclaimed == []
    claim = res_dir / f"port-{first}"  # a claim of the ports' scheme, in the displays' own directory
    assert claim.is_file() and stat.S_IMODE(claim.stat().st_mode) == 0o600
    assert d.ports_on_disk() == [first] and [r.port for r in d.held("sess-a")] == [first]
    assert _desktop.DISPLAYS_DIR != _ports.DEFAULT_DIR


def test_a_requested_display_in_use_is_refused_naming_it(tmp_path, xtmp):
    Path(lock_path(D, xtmp)).write_text(f"{os.getpid():10d}\n")
    with pytest.raises(DisplayError) as err:
        ddir(tmp_path / "res", xtmp).reserve_display("sess-a", display=D)
    assert err.value.field == "display" and f"display :{D} is in use on" in str(err.value)


def test_a_requested_display_held_by_another_session_is_refused(tmp_path, xtmp):
    d = ddir(tmp_path / "res", xtmp)
    d.reserve_display("sess-a", pid=os.getpid(), display=D)
    with pytest.raises(DisplayError):
        d.reserve_display("sess-b", pid=os.getpid(), display=D)


def test_no_free_display_names_the_range(tmp_path, xtmp):
    for n in (900, 901):
        Path(lock_path(n, xtmp)).write_text(f"{os.getpid():10d}\n")
    with pytest.raises(DisplayError) as err:
        ddir(tmp_path / "res", xtmp).reserve_display("sess-a", display_range="900-901")
    assert err.value.field == "display_range" and ":900-:901" in str(err.value)


def test_a_dead_servers_files_are_reclaimed_once_the_display_is_reserved(tmp_path, xtmp):
    Path(lock_path(D, xtmp)).write_text(f"{dead_pid():10d}\n")
    display, reclaimed = ddir(tmp_path / "res", xtmp).reserve_display("sess-a", pid=os.getpid(), display=D)
    assert display == D and reclaimed == [lock_path(D, xtmp)]
    assert not os.path.exists(lock_path(D, xtmp))


def test_a_reservation_of_a_dead_session_is_reclaimed(tmp_path, xtmp):
    d = ddir(tmp_path / "res", xtmp)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        d.reserve_display("sess-a", pid=proc.pid, display=D)
        with pytest.raises(DisplayError):
            d.reserve_display("sess-b", pid=os.getpid(), display=D)
    finally:
        proc.kill()
        proc.wait()
    assert d.reserve_display("sess-b", pid=os.getpid(), display=D)[0] == D


def _reserve_in_process(args):
    path, xtmp, owner = args
    return DisplayDir(path, xtmp=xtmp).reserve_display(owner, display_range="900-919")[0]


def test_concurrent_reservers_never_share_a_display(tmp_path, xtmp):
    path = str(tmp_path / "res")
    with ProcessPoolExecutor(8) as pool:
        got = list(pool.map(_reserve_in_process, [(path, xtmp, f"s{i}") for i in range(16)]))
    assert len(set(got)) == 16, got


def test_release_removes_the_records_and_a_dead_servers_files(tmp_path, xtmp):
    path = str(tmp_path / "res")
    d = ddir(path, xtmp)
    display, _unused = d.reserve_display("sess-a", pid=os.getpid(), display_range="900-905")
    Path(lock_path(display, xtmp)).write_text(f"{dead_pid():10d}\n")
    out = release_displays("sess-a", path, xtmp=xtmp)
    assert out == {"released": [display], "removed": [lock_path(display, xtmp)]}
    assert release_displays("sess-a", path, xtmp=xtmp) == {"released": [], "removed": []}


# ---------------------------------------------------------------- the desktop's processes


def test_marked_processes_finds_escaped_children_but_not_the_caller():
    marker = f"ISESSION_DESKTOP=unit-{os.getpid()}"
    env = dict(os.environ, ISESSION_DESKTOP=marker.split("=", 1)[1])
    # a daemon that left the process group (setsid), as ssh-agent does
    proc = subprocess.Popen(["setsid", "sleep", "30"], env=env)
    try:
        # until the child has exec'd, its /proc environ is still this process's (no marker); and while setsid execs
        # sleep, its environ reads empty for a moment: wait until it is sleep
        deadline = time.monotonic() + 5
        found = _desktop.marked_processes(marker)
        while (proc.pid not in found or _proc.cmdline(proc.pid)[:1] != ["sleep"]) and time.monotonic() < deadline:
            time.sleep(0.01)
            found = _desktop.marked_processes(marker)
        assert proc.pid in found and os.getpid() not in found
        assert _desktop.stop_marked(marker, grace=2) == found
        proc.wait(5)
        assert _desktop.marked_processes(marker) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_ignores_term_is_killed_and_its_lock_released_at_once(tmp_path, xtmp):
    """The desktop's end (``_desktop.py stop``): an X server that does not exit on TERM within the grace is KILLed,
    and the display's release right after finds it dead (gone or an unreaped zombie) and removes its lock."""
    marker = f"ISESSION_DESKTOP=unit-kill-{os.getpid()}"
    env = dict(os.environ, ISESSION_DESKTOP=marker.split("=", 1)[1])
    path = str(tmp_path / "res")
    display, _unused = ddir(path, xtmp).reserve_display("sess-k", pid=os.getpid(), display_range="900-905")
    lock = Path(lock_path(display, xtmp))
    # a stand-in X server: writes its lock, ignores TERM; a child of this process, which does not reap it
    server = subprocess.Popen(["bash", "-c", f"trap '' TERM; printf '%10d\\n' $$ > {lock}; exec sleep 60"], env=env)
    try:
        deadline = time.monotonic() + 5
        while server.pid not in _desktop.marked_processes(marker) or not lock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _desktop.stop_marked(marker, grace=0.2) == [server.pid]
        out = release_displays("sess-k", path, xtmp=xtmp)
        assert out == {"released": [display], "removed": [str(lock)]}, out
    finally:
        server.kill()
        server.wait()


def test_reserve_command_prints_the_display_and_errors_as_json(tmp_path):
    res_dir = tmp_path / "res"
    cp = subprocess.run([sys.executable, str(SCRIPT), "reserve", "--owner", "cli-test", "--pid", str(os.getpid()),
                         "--range", "900-905", "--dir", str(res_dir)], capture_output=True, text=True, check=True)
    display = json.loads(cp.stdout)["display"]
    assert 900 <= display <= 905
    bad = subprocess.run([sys.executable, str(SCRIPT), "reserve", "--owner", "cli-test", "--range", "0-5",
                          "--dir", str(res_dir)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and json.loads(bad.stderr)["field"] == "display_range"
    rel = subprocess.run([sys.executable, str(SCRIPT), "release", "--owner", "cli-test", "--dir", str(res_dir)],
                         capture_output=True, text=True, check=True)
    assert json.loads(rel.stdout)["released"] == [display]


def test_reserve_also_writes_the_password_in_the_same_process(tmp_path):
    """One interpreter start on the job's way to Running: the display, then the 0600 password file."""
    res_dir, secret, out = tmp_path / "res", tmp_path / "secret", tmp_path / "password"
    secret.write_text("abc\n")
    out.write_text("an old one\n")  # made anew
    cmd = [sys.executable, str(SCRIPT), "reserve", "--owner", "cli-pw", "--pid", str(os.getpid()), "--range",
           "906-910", "--dir", str(res_dir)]
    cp = subprocess.run(cmd + ["--password-from", str(secret), "--password-out", str(out)], capture_output=True,
                        text=True, check=True)
    doc = json.loads(cp.stdout)
    assert 906 <= doc["display"] <= 910 and doc["password_written"] == str(out)
    assert out.read_text() == vnc_password("abc") + "\n" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert vnc_password("abc") not in cp.stdout + cp.stderr
    # no password to derive: exit 3, the display named so that the caller's end releases it
    bad = subprocess.run(cmd + ["--password-from", str(tmp_path / "none"), "--password-out", str(out)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 3 and json.loads(bad.stderr) == {
        "error": f"{tmp_path / 'none'}: No such file or directory", "field": "password", "display": doc["display"]}
    # the two options go together
    half = subprocess.run(cmd + ["--password-from", str(secret)], capture_output=True, text=True, check=False)
    assert half.returncode == 2 and "--password-from and --password-out go together" in half.stderr
    subprocess.run([sys.executable, str(SCRIPT), "release", "--owner", "cli-pw", "--dir", str(res_dir)], check=True,
                   capture_output=True)


# ---------------------------------------------------------------- the subreaper


def _reap(tmp_path, script: str) -> subprocess.Popen:
    (tmp_path / "run.sh").write_text(script)
    return subprocess.Popen([sys.executable, str(SCRIPT), "reap", "--grace", "1", "--", "bash",
                             str(tmp_path / "run.sh")], start_new_session=True)


def _alive(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    return _proc.alive(pid)


def _wait_file(path: Path) -> None:
    for _i in range(100):
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} not written")


def test_reap_ends_a_daemon_that_left_the_process_group_when_the_command_exits(tmp_path):
    # the daemon double-forks and calls setsid, like ssh-agent; the command then exits 3
    proc = _reap(tmp_path, f"setsid sh -c 'echo $$ > {tmp_path}/daemon; exec sleep 60' &\n"
                           f"while [ ! -s {tmp_path}/daemon ]; do sleep 0.05; done\nexit 3\n")
    assert proc.wait(10) == 3
    assert not _alive(tmp_path / "daemon")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_reap_ends_everything_below_it_on_a_stop_signal(tmp_path, sig):
    proc = _reap(tmp_path, f"setsid sh -c 'echo $$ > {tmp_path}/daemon; exec sleep 60' &\n"
                           f"echo $$ > {tmp_path}/command\nsleep 60\n")
    _wait_file(tmp_path / "daemon")
    _wait_file(tmp_path / "command")
    assert _alive(tmp_path / "daemon") and _alive(tmp_path / "command")
    proc.send_signal(sig)
    assert proc.wait(10) == 143
    assert not _alive(tmp_path / "daemon") and not _alive(tmp_path / "command")


def test_reap_ends_everything_below_it_when_a_second_stop_signal_follows_the_first():
    """A cancel signals the job's process group, then the agent signals the reaper again, microseconds apart; a
    second signal must not end the reaper before it ended what is below it (it did: ssh-agent outlived a session).
    Rounds with gaps from 0 to 1 ms between the two signals: the old handler-based reaper lost the daemon in about
    half of the rounds with a gap near 0.2 ms."""
    escaped = []
    for gap_us in [0, 20, 50, 100, 150, 200, 250, 300, 400, 600, 800, 1000] * 2:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            proc = _reap(tmp_path, f"setsid sh -c 'echo $$ > {tmp_path}/daemon; exec sleep 60' &\n"
                                   f"echo $$ > {tmp_path}/command\nsleep 60\n")
            _wait_file(tmp_path / "daemon")
            _wait_file(tmp_path / "command")
            time.sleep(0.05)  # the reaper waits for signals by now
            proc.send_signal(signal.SIGTERM)
            until = time.perf_counter_ns() + gap_us * 1000
            while time.perf_counter_ns() < until:
                pass
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(10)
            daemon = int((tmp_path / "daemon").read_text())
            if _proc.alive(daemon):
                escaped.append((gap_us, rc))
                os.kill(daemon, signal.SIGKILL)
    assert not escaped, f"daemons left running (gap in us, reaper's exit status): {escaped}"
