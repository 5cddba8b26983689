"""Unit tests for who listens on a loopback port (plugins/module_utils/_listeners.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _listeners
from ansible_collections.hpc.interactive.plugins.module_utils._listeners import Listener, PortOwner

SCRIPT = Path(_listeners.__file__).resolve()
NOBODY = 65534
ANY4 = "0.0.0.0"  # noqa: S104 - an address compared, never bound
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")

HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
# recorded shapes of /proc/net/tcp and tcp6 rows (x86_64: words in little-endian order)
TCP = HEAD + (
    "   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 111 1 0 100 0 0 10 0\n"
    "   1: 00000000:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 112 1 0 100 0 0 10 0\n"
    "   2: 0100007F:4E22 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1003        0 113 1 0 20 4 30 10 -1\n"
    "   3: 0200007F:4E23 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1004        0 114 1 0 100 0 0 10 0\n"
    "   4: garbage\n"
)
TCP6 = HEAD + (
    "   0: 00000000000000000000000001000000:4E20 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1005        0 121 1 0 100 0 0 10 0\n"
    "   1: 00000000000000000000000000000000:4E24 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1006        0 122 1 0 100 0 0 10 0\n"
    "   2: 0000000000000000FFFF00000100007F:4E25 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1007        0 123 1 0 100 0 0 10 0\n"
)


def test_parse_tcp_tables():
    v4 = _listeners.parse_tcp_table(TCP, ipv6=False, byteorder="little")
    assert v4 == [Listener("127.0.0.1", 20000, 1001, 111), Listener(ANY4, 20001, 1002, 112),
                  Listener("127.0.0.2", 20003, 1004, 114)]  # the ESTABLISHED row and junk are left out
    v6 = _listeners.parse_tcp_table(TCP6, ipv6=True, byteorder="little")
    assert v6 == [Listener("::1", 20000, 1005, 121), Listener("::", 20004, 1006, 122),
                  Listener("::ffff:127.0.0.1", 20005, 1007, 123)]


def test_parse_big_endian_rows():
    row = HEAD + "   0: 7F000001:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000  7  0 9 1\n"
    assert _listeners.parse_tcp_table(row, ipv6=False, byteorder="big") == [Listener("127.0.0.1", 20000, 7, 9)]


def lst(address, uid, port=20000):
    return Listener(address, port, uid, 1)


@pytest.mark.parametrize("listeners, address, reached", [
    ([lst("127.0.0.1", 1)], "127.0.0.1", [1]),
    ([lst(ANY4, 1)], "127.0.0.1", [1]),
    ([lst("127.0.0.2", 1)], "127.0.0.1", []),                      # another loopback address: not reached
    ([lst("127.0.0.1", 1, port=20001)], "127.0.0.1", []),           # another port
    ([lst("::", 2)], "127.0.0.1", [2]),                             # dual stack, no IPv4 socket on the port
    ([lst("::ffff:127.0.0.1", 2)], "127.0.0.1", [2]),
    ([lst("127.0.0.1", 1), lst("::", 2)], "127.0.0.1", [1]),        # with an IPv4 socket, :: is IPV6_V6ONLY
    ([lst("::1", 3)], "127.0.0.1", []),                             # only for clients of ::1
    ([lst("127.0.0.1", 1), lst(ANY4, 4)], "127.0.0.1", [1, 4]),  # SO_REUSEPORT: both count
    ([lst("::1", 3), lst("::", 2)], "::1", [3]),
    ([lst("::", 2)], "::1", [2]),
    ([lst("127.0.0.1", 1)], "::1", []),
])
def test_reachable_listeners(listeners, address, reached):
    assert sorted(x.uid for x in _listeners.reachable_listeners(listeners, 20000, address)) == reached


def test_reachable_listeners_refuses_other_addresses():
    with pytest.raises(ValueError, match="address"):
        _listeners.reachable_listeners([], 20000, "10.0.0.1")


def label(uid):
    return f"u{uid}"


def test_judge_port_owner():
    own = _listeners.judge_port_owner([lst("127.0.0.1", 7)], 20000, 7, label=label)
    assert own == PortOwner(20000, "own", (7,), "") and own.ok
    none = _listeners.judge_port_owner([lst("127.0.0.1", 7, port=1)], 20000, 7, label=label)
    assert none.state == "none" and not none.ok and none.message == "nothing listens on 127.0.0.1 port 20000"
    foreign = _listeners.judge_port_owner([lst("127.0.0.1", 8)], 20000, 7, label=label)
    assert foreign.state == "foreign" and foreign.uids == (8,) and not foreign.ok
    assert foreign.message == "127.0.0.1 port 20000 is held by another user (u8), not by u7"
    mixed = _listeners.judge_port_owner([lst("127.0.0.1", 7), lst(ANY4, 8)], 20000, 7, label=label)
    assert mixed.state == "foreign" and mixed.uids == (7, 8)
    # the dual-stack socket of another user counts when the session's own IPv4 socket is gone
    gone = _listeners.judge_port_owner([lst("::", 8)], 20000, 7, label=label)
    assert gone.state == "foreign"


def test_user_label_names_known_users():
    assert _listeners.user_label(0) == "uid 0 (root)"
    assert _listeners.user_label(4_000_000_000) == "uid 4000000000"


def listening_socket(address="127.0.0.1", family=socket.AF_INET):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen()
    return sock


def test_check_port_owner_sees_a_real_listener():
    sock = listening_socket()
    port = sock.getsockname()[1]
    try:
        got = _listeners.check_port_owner(port, os.geteuid())
        assert got.ok and got.uids == (os.geteuid(),), got
        other = _listeners.check_port_owner(port, os.geteuid() + 1)
        assert other.state == "foreign" and other.uids == (os.geteuid(),)
    finally:
        sock.close()
    assert _listeners.check_port_owner(port, os.geteuid()).state == "none"


def test_check_port_owner_without_proc(tmp_path):
    got = _listeners.check_port_owner(20000, 0, proc=str(tmp_path))
    assert got.state == "unknown" and not got.ok and "cannot tell who listens on port 20000" in got.message


def test_check_port_owner_reads_a_proc_copy(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    got = _listeners.check_port_owner(20000, 1001, proc=str(tmp_path))  # no tcp6: a host without IPv6
    assert got.ok if sys.byteorder == "little" else got.state == "none"


def test_wait_port_owner_polls_until_an_answer():
    answers = iter([PortOwner(1, "none"), PortOwner(1, "none"), PortOwner(1, "own", (5,))])
    now = [0.0]
    slept = []
    got = _listeners.wait_port_owner(1, 5, 10, check=lambda p, u: next(answers), clock=lambda: now[0],
                                     sleep=slept.append)
    assert got.ok and len(slept) == 2
    # gives up at the deadline, or as soon as the watched server is gone, with the last answer
    now[0] = 0.0

    def late(_p, _u):
        now[0] += 1.0
        return PortOwner(1, "none")

    assert _listeners.wait_port_owner(1, 5, 3, check=late, clock=lambda: now[0], sleep=lambda s: None).state == "none"
    assert now[0] == 3.0
    calls = []
    got = _listeners.wait_port_owner(1, 5, 100, check=lambda p, u: calls.append(p) or PortOwner(1, "none"),
                                     still=lambda: False, clock=lambda: 0.0, sleep=lambda s: None)
    assert got.state == "none" and len(calls) == 1
    # another user's listener ends the wait at once
    assert _listeners.wait_port_owner(1, 5, 100, check=lambda p, u: PortOwner(1, "foreign", (6,)),
                                      clock=lambda: 0.0, sleep=pytest.fail).state == "foreign"


# ---------------------------------------------------------------- the plain script (what the batch job runs)


@pytest.fixture(scope="module")
def script():
    """A world-readable copy of _listeners.py, run with python3 -I as the batch job runs it."""
    d = Path(tempfile.mkdtemp(prefix="lst-script-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - the second user reads the script
    copy = d / "_listeners.py"
    shutil.copy(SCRIPT, copy)
    os.chmod(copy, 0o644)
    yield copy
    shutil.rmtree(d, ignore_errors=True)


def run_script(script, *args, user=None):
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run(pre + ["/usr/bin/python3", "-I", str(script), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, check=False)


def test_script_says_own_none_and_bad_port(script):
    sock = listening_socket()
    port = sock.getsockname()[1]
    try:
        res = run_script(script, "wait", "--port", str(port))
        assert res.returncode == 0 and json.loads(res.stdout) == {"state": "own", "uids": [os.geteuid()],
                                                                  "message": ""}
    finally:
        sock.close()
    started = time.monotonic()
    res = run_script(script, "wait", "--port", str(port), "--timeout", "0.3")
    assert res.returncode == 4 and json.loads(res.stdout)["state"] == "none"
    assert time.monotonic() - started >= 0.3
    dead = subprocess.Popen(["true"])
    dead.wait()
    started = time.monotonic()
    res = run_script(script, "wait", "--port", str(port), "--timeout", "30", "--pid", str(dead.pid))
    assert res.returncode == 4 and time.monotonic() - started < 10  # the watched server is gone: no long wait
    assert run_script(script, "wait", "--port", "0").returncode == 2


@as_root
def test_script_as_a_second_user_sees_another_users_listener(script):
    sock = listening_socket()  # root's
    port = sock.getsockname()[1]
    try:
        res = run_script(script, "wait", "--port", str(port), "--timeout", "5", user=NOBODY)
        assert res.returncode == 3, res.stderr
        out = json.loads(res.stdout)
        assert out["state"] == "foreign" and out["uids"] == [0] and "another user (uid 0 (root))" in out["message"]
    finally:
        sock.close()


def test_a_zombie_server_is_not_alive():
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while not open(f"/proc/{proc.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not _listeners._pid_alive(proc.pid)  # exited, not yet reaped by its parent (this test)
    assert _listeners._pid_alive(os.getpid())
    proc.wait()
    assert not _listeners._pid_alive(proc.pid)
