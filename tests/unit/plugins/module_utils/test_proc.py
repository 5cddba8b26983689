"""The one /proc reader: stat fields after a command name with spaces and parentheses, zombies, start times,
socket holders - against real processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from ansible_collections.hpc.interactive.plugins.module_utils import _proc as P


def test_alive_and_start_time_of_this_process_and_of_none():
    assert P.alive(os.getpid()) and P.start_time(os.getpid()) is not None
    assert not P.alive(2 ** 22 + 1) and P.start_time(2 ** 22 + 1) is None
    assert P.stat_fields("self")[2] == str(os.getpgrp())


def test_a_command_name_with_spaces_and_parentheses_is_read_past(tmp_path):
    fake = tmp_path / "proc" / "4242"
    fake.mkdir(parents=True)
    rest = " ".join(["S", "1", "4242", "4242"] + ["0"] * 15 + ["987654"] + ["0"] * 10)
    (fake / "stat").write_text(f"4242 (a) b (c) {rest}\n")
    assert P.stat_fields(4242, str(tmp_path / "proc"))[:4] == ["S", "1", "4242", "4242"]
    assert P.start_time(4242, str(tmp_path / "proc")) == "987654"


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and P.alive(child.pid):
        time.sleep(0.02)  # exited, not reaped yet: a zombie
    assert not P.alive(child.pid) and os.path.exists(f"/proc/{child.pid}")
    child.wait()


def test_socket_holders_finds_the_process_holding_a_socket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        inode = os.fstat(s.fileno()).st_ino
        assert os.getpid() in P.socket_holders([inode])
    assert P.socket_holders([]) == []
