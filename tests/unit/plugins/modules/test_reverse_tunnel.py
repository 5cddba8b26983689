"""Run the reverse_tunnel module for real (``python -m ...reverse_tunnel args.json``) against a real sshd that
the test starts on 127.0.0.1 (a random port, temp host key, temp authorized key, as root), with real ssh and
a local HTTP server behind the tunnel. Only loopback traffic."""
from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _tunnel as T

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ME = pwd.getpwuid(os.getuid()).pw_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nothing listens on %d" % port)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def http_get(port: int, path: str = "/marker.txt", timeout: float = 5.0) -> str:
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as resp:  # noqa: S310
        return resp.read().decode()


def http_eventually(port: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return http_get(port, timeout=2)
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError("no HTTP on %d: %s" % (port, last))


def tunnel_processes(state_dir: str, name: str):
    """Live supervisor or ssh processes that belong to ``name`` in ``state_dir`` (found by cmdline)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not T.proc_token(int(entry)):
            continue
        args = T.proc_cmdline(int(entry))
        text = " ".join(args)
        if ("--state-dir %s --name %s " % (state_dir, name)) in text + " " or (
                args and os.path.basename(args[0]) == "ssh" and "-R" in args and name in text):
            found.append((int(entry), args))
    return found


def _die_with_parent() -> None:
    """Popen preexec: the daemon gets SIGTERM when the process that started it ends. ansible-test runs each test in
    a fork of its own, which exits without a module fixture's teardown; without this the daemons would outlive it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK) or not shutil.which("ssh-keygen"):
        pytest.skip("needs root, sshd and ssh-keygen to run a loopback sshd")
    d = tmp_path_factory.mktemp("sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey %s" % (d / "host"), "PidFile %s" % (d / "sshd.pid"),
        "AuthorizedKeysFile %s" % (d / "authorized_keys"), "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes", "GatewayPorts no", "LogLevel VERBOSE", ""]))
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"), preexec_fn=_die_with_parent)  # noqa: SIM115, PLW1509
    try:
        wait_port(port)
        host_pub = (d / "host.pub").read_text().split()
        (d / "known_hosts").write_text("[127.0.0.1]:%d %s %s\n" % (port, host_pub[0], host_pub[1]))
        yield {"port": port, "identity": str(d / "id"), "known_hosts": str(d / "known_hosts"), "dir": d}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("www")
    (d / "marker.txt").write_text("hello through the tunnel\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(d),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)  # noqa: PLW1509
    wait_port(port)
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def tunnel(sshd, web, tmp_path):
    state_dir = str(tmp_path / "state")
    args = {"name": "t1", "state_dir": state_dir, "remote_port": free_port(), "local_port": web,
            "dest_host": "127.0.0.1", "dest_port": sshd["port"], "dest_user": ME, "identity_file": sshd["identity"],
            "known_hosts_file": sshd["known_hosts"], "timeout": 20}
    yield args
    for name in ("t1", "t2", "busy", "jump", "alloc"):
        if os.path.isdir(state_dir):
            T.stop_tunnel(state_dir, name, 1.0)


def test_present_carries_http_and_is_idempotent(run_module, tunnel):
    res = run_module("reverse_tunnel", tunnel)
    assert res.get("failed") is not True, res
    assert res["changed"] is True and res["tunnel_state"] == "up" and res["port"] == tunnel["remote_port"]
    assert http_get(tunnel["remote_port"]) == "hello through the tunnel\n"
    st = res["status"]
    assert T.is_supervisor(st["pid"], st["token"], os.path.realpath(tunnel["state_dir"]), "t1")
    assert T.is_alive(st["ssh_pid"], st["ssh_token"]) and res["ssh_pid"] == st["ssh_pid"]
    assert os.getsid(st["pid"]) == st["pid"]   # detached in its own session
    assert os.stat(tunnel["state_dir"]).st_mode & 0o777 == 0o700
    for f in Path(tunnel["state_dir"]).iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    argv = res["ssh_argv"]
    assert "ExitOnForwardFailure=yes" in argv and "BatchMode=yes" in argv and "ServerAliveInterval=15" in argv
    assert "127.0.0.1:%d:127.0.0.1:%d" % (tunnel["remote_port"], tunnel["local_port"]) in argv

    again = run_module("reverse_tunnel", tunnel)
    assert again["changed"] is False and again["pid"] == st["pid"] and again["ssh_pid"] == st["ssh_pid"]

    check = run_module("reverse_tunnel", dict(tunnel, server_alive_interval=20), check=True, diff=True)
    assert check["changed"] is True
    assert '"server_alive_interval": 15' in check["diff"]["before"]
    assert '"server_alive_interval": 20' in check["diff"]["after"]
    assert T.probe(os.path.realpath(tunnel["state_dir"]), "t1")["status"]["pid"] == st["pid"]  # nothing restarted

    changed = run_module("reverse_tunnel", dict(tunnel, server_alive_interval=20))
    assert changed["changed"] is True and changed["pid"] != st["pid"]
    assert not T.is_alive(st["pid"], st["token"]) and not T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert "ServerAliveInterval=20" in changed["ssh_argv"]
    assert http_get(tunnel["remote_port"]) == "hello through the tunnel\n"


def test_comes_back_after_ssh_is_killed(run_module, tunnel):
    res = run_module("reverse_tunnel", tunnel)
    assert res["changed"] is True, res
    os.kill(res["ssh_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    state_dir = os.path.realpath(tunnel["state_dir"])
    while time.monotonic() < deadline:
        st = T.probe(state_dir, "t1")
        if st["healthy"] and st["status"]["ssh_pid"] != res["ssh_pid"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("not back: %r" % T.probe(state_dir, "t1"))
    assert st["status"]["restarts"] == 1 and st["status"]["pid"] == res["pid"]
    assert http_eventually(tunnel["remote_port"]) == "hello through the tunnel\n"
    again = run_module("reverse_tunnel", tunnel)
    assert again["changed"] is False and again["restarts"] == 1


def test_busy_remote_port_fails_clearly_and_leaves_nothing(run_module, tunnel, web):
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", tunnel["remote_port"]))
    holder.listen(1)
    try:
        res = run_module("reverse_tunnel", dict(tunnel, name="busy"))
        assert res["failed"] is True and res["tunnel_state"] == "failed"
        assert "remote port forwarding failed for listen port %d" % tunnel["remote_port"] in res["msg"]
        state_dir = os.path.realpath(tunnel["state_dir"])
        assert not os.path.exists(T.tunnel_paths(state_dir, "busy")["pid"])
        assert tunnel_processes(state_dir, "busy") == []
        assert "remote port forwarding failed" in res["log_tail"]
    finally:
        holder.close()


def test_absent_leaves_no_process_or_listener_and_is_idempotent(run_module, tunnel):
    res = run_module("reverse_tunnel", tunnel)
    assert res["changed"] is True and listening(tunnel["remote_port"])
    state_dir = os.path.realpath(tunnel["state_dir"])
    assert tunnel_processes(state_dir, "t1")
    absent = {"name": "t1", "state_dir": tunnel["state_dir"], "state": "absent"}
    check = run_module("reverse_tunnel", absent, check=True)
    assert check["changed"] is True and T.probe(state_dir, "t1")["healthy"]   # check mode stopped nothing
    gone = run_module("reverse_tunnel", absent)
    assert gone["changed"] is True and gone["tunnel_state"] == "stopped"
    assert tunnel_processes(state_dir, "t1") == []
    assert not T.is_alive(res["pid"], res["status"]["token"])
    assert not listening(tunnel["remote_port"])
    assert not os.path.exists(T.tunnel_paths(state_dir, "t1")["pid"])
    assert gone["status"]["state"] == "stopped"
    again = run_module("reverse_tunnel", absent)
    assert again["changed"] is False and "failed" not in again
    assert run_module("reverse_tunnel", absent, check=True)["changed"] is False
    missing = run_module("reverse_tunnel", dict(absent, state_dir=tunnel["state_dir"] + "-never"))
    assert missing["changed"] is False and not os.path.exists(tunnel["state_dir"] + "-never")


def test_through_a_jump_host(run_module, tunnel, sshd):
    jump = "%s@127.0.0.1:%d" % (ME, sshd["port"])
    log = sshd["dir"] / "sshd.log"
    before = log.read_text().count("Accepted publickey for %s" % ME)
    res = run_module("reverse_tunnel", dict(tunnel, name="jump", jump_host=jump))
    assert res.get("failed") is not True, res
    pc = [a for a in res["ssh_argv"] if a.startswith("ProxyCommand=")]
    assert pc and "-W" in pc[0] and "IdentityFile=%s" % sshd["identity"] in pc[0]
    assert http_get(tunnel["remote_port"]) == "hello through the tunnel\n"
    # the hop really ran: sshd logged two logins (the hop, then the destination through it)
    assert log.read_text().count("Accepted publickey for %s" % ME) - before == 2
    assert run_module("reverse_tunnel", dict(tunnel, name="jump", jump_host=jump))["changed"] is False


def test_remote_port_zero_returns_the_allocated_port(run_module, tunnel):
    res = run_module("reverse_tunnel", dict(tunnel, name="alloc", remote_port=0))
    assert res.get("failed") is not True, res
    assert res["port"] > 0 and res["status"]["allocated_port"] == res["port"]
    assert http_get(res["port"]) == "hello through the tunnel\n"


def test_unknown_host_key_is_refused_under_strict_policy(run_module, tunnel, sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    res = run_module("reverse_tunnel", dict(tunnel, name="t2", known_hosts_file=str(empty)))
    assert res["failed"] is True and "Host key verification failed" in res["msg"]
    assert tunnel_processes(os.path.realpath(tunnel["state_dir"]), "t2") == []
    ok = run_module("reverse_tunnel",
                    dict(tunnel, name="t2", known_hosts_file=str(empty), known_hosts_policy="accept-new"))
    assert ok.get("failed") is not True, ok
    host_key = (sshd["dir"] / "host.pub").read_text().split()[1]
    assert host_key in empty.read_text()   # accept-new recorded the key


# ---------------------------------------------------------------- refused input (no sshd needed)

@pytest.mark.parametrize("field,value", [
    ("dest_host", "$(touch /tmp/pwned)"), ("dest_host", "-oProxyCommand=id"), ("dest_user", "a;b"),
    ("dest_host", "a\nb"), ("jump_host", "`id`@h"), ("local_host", "a b"), ("identity_file", "/x/a;b"),
    ("known_hosts_file", "/x/a b"),
])
def test_hostile_values_fail_naming_the_field(run_module, tmp_path, field, value):
    state_dir = tmp_path / "never"
    args = {"name": "t", "state_dir": str(state_dir), "remote_port": 5000, "local_port": 5001,
            "dest_host": "h", "ssh_executable": "/bin/true"}
    args[field] = value
    res = run_module("reverse_tunnel", args)
    assert res["failed"] is True and res["field"] == field and field in res["msg"]
    assert not state_dir.exists()   # nothing was created or started


def test_bad_name_and_missing_options(run_module, tmp_path):
    res = run_module("reverse_tunnel", {"name": "../x", "state_dir": str(tmp_path / "s"), "state": "absent"})
    assert res["failed"] is True and res["field"] == "name"
    res = run_module("reverse_tunnel", {"name": "t", "state_dir": str(tmp_path / "s"), "remote_port": 5000})
    assert res["failed"] is True and "local_port" in res["msg"] and "dest_host" in res["msg"]
    res = run_module("reverse_tunnel", {"name": "t", "state_dir": str(tmp_path / "s"), "remote_port": 5000,
                                        "local_port": 1, "dest_host": "h", "jump_user": "u"})
    assert res["failed"] is True and "jump_host" in res["msg"]


def test_check_mode_starts_nothing(run_module, tmp_path):
    state_dir = tmp_path / "s"
    res = run_module("reverse_tunnel", {"name": "t", "state_dir": str(state_dir), "remote_port": 5000,
                                        "local_port": 5001, "dest_host": "h", "ssh_executable": "/bin/true"},
                     check=True)
    assert res["changed"] is True and res["tunnel_state"] == "up"
    assert not state_dir.exists()


# ---------------------------------------------------------------- the local end must be the user's listener
def test_local_owner_check_lets_the_users_own_listener_through(run_module, tunnel):
    res = run_module("reverse_tunnel", dict(tunnel, local_owner_timeout=5))
    assert res.get("failed") is not True and res["tunnel_state"] == "up", res
    assert http_get(tunnel["remote_port"]) == "hello through the tunnel\n"


def test_local_owner_check_refuses_another_users_listener(run_module, tunnel):
    """A second user (nobody) holds the local port: no tunnel, no ssh, nothing forwarded to it."""
    port = free_port()
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                              "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", "/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    try:
        wait_port(port)
        res = run_module("reverse_tunnel", dict(tunnel, local_port=port, local_owner_timeout=30))
    finally:
        other.terminate()
        other.wait(10)
    assert res.get("failed") is True and res["tunnel_state"] == "refused" and res["field"] == "local_port", res
    assert "is held by another user (uid 65534 (nobody))" in res["msg"] and "not opened" in res["msg"]
    assert tunnel_processes(os.path.realpath(tunnel["state_dir"]), "t1") == []
    assert not listening(tunnel["remote_port"])


def test_local_owner_check_stops_waiting_when_the_server_is_gone(run_module, tunnel):
    dead = subprocess.Popen(["true"])
    dead.wait()
    started = time.monotonic()
    res = run_module("reverse_tunnel",
                     dict(tunnel, local_port=free_port(), local_owner_timeout=60, local_owner_pid=dead.pid))
    assert res.get("failed") is True and "nothing listens" in res["msg"] and "is gone" in res["msg"], res
    assert time.monotonic() - started < 20 and not listening(tunnel["remote_port"])
