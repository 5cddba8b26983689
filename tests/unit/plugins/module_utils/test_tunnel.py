"""Unit tests for the tunnel supervisor: argv building, validation, status, liveness and the real supervisor
loop run as a plain script with the system python against a fake ``ssh`` (a script that behaves like ssh's
output and exit codes), so restart, give-up, stop and lock logic run for real."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _tunnel as T

SCRIPT = Path(T.__file__).resolve()
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

BASE = {"remote_port": 56321, "local_port": 8888, "dest_host": "workspace", "dest_user": "wsuser"}

FAKE_SSH = r'''#!/usr/bin/env python3
"""Fake ssh: behaves per attempt as FAKE_SSH_PLAN says (comma list; the last entry repeats)."""
import json, os, sys, time
d = os.environ["FAKE_SSH_DIR"]
plan = os.environ.get("FAKE_SSH_PLAN", "up").split(",")
cnt = os.path.join(d, "count")
if "-O" in sys.argv:  # a client of the master: "-O forward" as FAKE_SSH_FORWARD says
    with open(os.path.join(d, "forwards"), "a") as fh:
        fh.write(json.dumps(sys.argv) + "\n")
    if os.environ.get("FAKE_SSH_FORWARD", "ok") == "busy":
        sys.stderr.write("mux_client_forward: forwarding request failed: remote port forwarding failed for listen "
                         "port 56321\n")
        sys.exit(255)
    sys.exit(0)
n = int(open(cnt).read()) if os.path.exists(cnt) else 0
open(cnt, "w").write(str(n + 1))
json.dump(sys.argv, open(os.path.join(d, "argv.%d.json" % n), "w"))
mode = plan[min(n, len(plan) - 1)]
err = sys.stderr
err.write("debug1: Reading configuration data /etc/ssh/ssh_config\n")
err.write("debug1: Connecting to workspace [10.0.0.1] port 22.\n")
if mode == "busy":
    err.write("Error: remote port forwarding failed for listen port 56321\n"); err.flush(); sys.exit(255)
if mode == "refused":
    err.write("ssh: connect to host workspace port 22: Connection refused\n"); err.flush(); sys.exit(255)
if mode == "silent":
    err.flush(); time.sleep(3600)
if "ControlMaster=yes" in sys.argv:  # a master without a forward: its socket once "authenticated"
    err.write("Authenticated to workspace ([10.0.0.1]:22) using \"publickey\".\n")
    open([a.split("=", 1)[1] for a in sys.argv if a.startswith("ControlPath=")][0], "w").close()
elif mode == "alloc":
    err.write("Allocated port 45678 for remote forward to 127.0.0.1:8888\n")
else:
    err.write("debug1: remote forward success for: listen 127.0.0.1:56321, connect 127.0.0.1:8888\n")
err.write("debug1: channel 0: new [client-session]\n")
err.flush()
if mode == "flap":
    time.sleep(0.3); sys.exit(255)
time.sleep(3600)
'''


# ---------------------------------------------------------------- argv and validation

def opts(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]


def test_argv_basic_exact():
    argv = T.build_ssh_argv(T.validate_spec(dict(BASE, ssh_bin="/usr/bin/ssh")))
    assert argv[:6] == ["/usr/bin/ssh", "-N", "-T", "-v", "-o", "ExitOnForwardFailure=yes"]
    assert argv[-6:] == ["-p", "22", "-l", "wsuser", "--", "workspace"]
    assert ["-R", "127.0.0.1:56321:127.0.0.1:8888"] == argv[argv.index("-R"):argv.index("-R") + 2]
    o = opts(argv)
    for want in ("BatchMode=yes", "ExitOnForwardFailure=yes", "ServerAliveInterval=15", "ServerAliveCountMax=3",
                 "ConnectTimeout=10", "StrictHostKeyChecking=yes", "ControlMaster=no", "ControlPath=none"):
        assert want in o
    assert not any(x.startswith(("UserKnownHostsFile", "IdentityFile", "ProxyCommand")) for x in o)
    assert "-J" not in argv


def test_argv_options_follow_spec():
    spec = T.validate_spec(dict(BASE, dest_port=2222, dest_user=None, local_host="10.1.2.3", server_alive_interval=5,
                                server_alive_count_max=7, connect_timeout=4, remote_port=0))
    argv = T.build_ssh_argv(spec)
    o = opts(argv)
    assert {"ServerAliveInterval=5", "ServerAliveCountMax=7", "ConnectTimeout=4"} <= set(o)
    assert "127.0.0.1:0:10.1.2.3:8888" in argv
    assert argv[-4:] == ["-p", "2222", "--", "workspace"] and "-l" not in argv


def test_ipv6_local_host_is_bracketed():
    argv = T.build_ssh_argv(T.validate_spec(dict(BASE, local_host="::1")))
    assert "127.0.0.1:56321:[::1]:8888" in argv


@pytest.mark.parametrize("policy,file,want,absent", [
    ("strict", None, ["StrictHostKeyChecking=yes"], ["UserKnownHostsFile=/dev/null"]),
    ("accept-new", None, ["StrictHostKeyChecking=accept-new"], ["UserKnownHostsFile=/dev/null"]),
    ("no", None, ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null"], []),
    ("no", "/k/hosts", ["StrictHostKeyChecking=no", "UserKnownHostsFile=/k/hosts"], ["UserKnownHostsFile=/dev/null"]),
    ("strict", "~/.ssh/kh", ["StrictHostKeyChecking=yes", "UserKnownHostsFile=~/.ssh/kh"], []),
])
def test_known_hosts_policies(policy, file, want, absent):
    o = opts(T.build_ssh_argv(T.validate_spec(dict(BASE, known_hosts_policy=policy, known_hosts_file=file))))
    for w in want:
        assert w in o
    for a in absent:
        assert a not in o
    assert sum(x.startswith("StrictHostKeyChecking=") for x in o) == 1


def test_identity_file():
    o = opts(T.build_ssh_argv(T.validate_spec(dict(BASE, identity_file="/home/u/.ssh/id_ed25519"))))
    assert "IdentityFile=/home/u/.ssh/id_ed25519" in o and "IdentitiesOnly=yes" in o


def _proxy(argv):
    pc = [x for x in opts(argv) if x.startswith("ProxyCommand=")]
    assert len(pc) == 1
    return shlex.split(pc[0][len("ProxyCommand="):])


def test_jump_host_string_becomes_proxycommand_with_same_options():
    spec = T.validate_spec(dict(BASE, jump_host="cluser@10.199.77.20:2222", identity_file="/id/key",
                                known_hosts_policy="accept-new", known_hosts_file="/kh", ssh_bin="/usr/bin/ssh"))
    assert (spec["jump_user"], spec["jump_host"], spec["jump_port"]) == ("cluser", "10.199.77.20", 2222)
    argv = T.build_ssh_argv(spec)
    hop = _proxy(argv)
    assert hop[:3] == ["/usr/bin/ssh", "-W", "[%h]:%p"]
    assert hop[-5:] == ["2222", "-l", "cluser", "--", "10.199.77.20"] and hop[-6] == "-p"
    hop_o = opts(hop)
    for w in ("BatchMode=yes", "IdentityFile=/id/key", "IdentitiesOnly=yes", "StrictHostKeyChecking=accept-new",
              "UserKnownHostsFile=/kh", "ServerAliveInterval=15", "LogLevel=ERROR"):
        assert w in hop_o
    assert "-R" not in hop and "ExitOnForwardFailure=yes" not in hop_o
    assert "-J" not in argv and argv[-1] == "workspace"


@pytest.mark.parametrize("raw,want", [
    ({"jump_host": "login1"}, (None, "login1", 22)),
    ({"jump_host": "login1", "jump_user": "bob", "jump_port": 2200}, ("bob", "login1", 2200)),
    ({"jump_host": "bob@login1", "jump_user": "bob"}, ("bob", "login1", 22)),
    ({"jump_host": "[fd00::1]:23"}, (None, "fd00::1", 23)),
    ({"jump_host": "a@[fd00::1]"}, ("a", "fd00::1", 22)),
])
def test_jump_forms(raw, want):
    spec = T.validate_spec(dict(BASE, **raw))
    assert (spec["jump_user"], spec["jump_host"], spec["jump_port"]) == want
    hop = _proxy(T.build_ssh_argv(spec))
    assert hop[-1] == want[1] and hop[hop.index("-p") + 1] == str(want[2])


@pytest.mark.parametrize("raw,field", [
    ({"jump_host": "bob@login1", "jump_user": "alice"}, "jump_user"),
    ({"jump_host": "login1:22", "jump_port": 23}, "jump_port"),
    ({"jump_user": "bob"}, "jump_user"),
    ({"jump_port": 22}, "jump_port"),
    ({"jump_host": "a,b"}, "jump_host"),
    ({"jump_host": "login1:99999"}, "jump_host"),
    ({"jump_host": "@login1"}, "jump_host"),
    ({"jump_host": "[fd00::1"}, "jump_host"),
])
def test_jump_refused(raw, field):
    with pytest.raises(T.TunnelError) as exc:
        T.validate_spec(dict(BASE, **raw))
    assert exc.value.field == field


HOSTILE = ["a\nb", "a;b", "$(id)", "`id`", "-oProxyCommand=x", "a b", "a'b", 'a"b', "a|b", "a&b", "a\x00b", ""]


@pytest.mark.parametrize("field,value", [
    (f, v) for f in ("dest_host", "local_host", "dest_user", "jump_host", "jump_user") for v in HOSTILE
    if v or f in ("dest_host", "local_host")   # for optional fields "" means "not given"
])
def test_hostile_hosts_and_users_refused(field, value):
    raw = dict(BASE, **{field: value})
    if field == "jump_user":
        raw["jump_host"] = "login1"
    with pytest.raises(T.TunnelError) as exc:
        T.validate_spec(raw)
    assert exc.value.field == field


@pytest.mark.parametrize("field", ["identity_file", "known_hosts_file", "ssh_bin"])
@pytest.mark.parametrize("value", [v for v in HOSTILE if v] + ["/a/%d", "-i/x", "/a\tb"])
def test_hostile_paths_refused(field, value):
    with pytest.raises(T.TunnelError) as exc:
        T.validate_spec(dict(BASE, **{field: value}))
    assert exc.value.field == field


@pytest.mark.parametrize("value", HOSTILE + ["../x", ".hidden", "a/b", "x" * 65, None, 5])
def test_hostile_names_refused(value):
    with pytest.raises(T.TunnelError) as exc:
        T.validate_name(value)
    assert exc.value.field == "name"


@pytest.mark.parametrize("field,value", [
    ("remote_port", 65536), ("remote_port", -1), ("remote_port", True), ("remote_port", "80x"), ("local_port", 0),
    ("local_port", None), ("dest_port", 0), ("server_alive_interval", 0), ("connect_timeout", 1.5),
    ("known_hosts_policy", "yes"), ("known_hosts_policy", "maybe"), ("dest_host", None), ("bogus", 1),
])
def test_bad_values_refused(field, value):
    raw = dict(BASE)
    raw[field] = value
    if value is None:
        raw.pop(field)
    with pytest.raises(T.TunnelError) as exc:
        T.validate_spec(raw)
    assert exc.value.field == field


def test_valid_names_and_hosts_pass():
    assert T.validate_name("s1.tunnel-A_2") == "s1.tunnel-A_2"
    spec = T.validate_spec(dict(BASE, dest_host="node-1.cluster.example", dest_user="u.s_er", remote_port="8080"))
    assert spec["remote_port"] == 8080 and spec["dest_host"] == "node-1.cluster.example"


def test_spec_hash_tracks_parameters():
    a = T.validate_spec(BASE)
    p = T.validate_policy()
    assert T.spec_hash(a, p) == T.spec_hash(T.validate_spec(dict(BASE)), T.validate_policy({}))
    assert T.spec_hash(a, p) != T.spec_hash(T.validate_spec(dict(BASE, server_alive_interval=16)), p)
    assert T.spec_hash(a, p) != T.spec_hash(a, T.validate_policy({"max_failures": 3}))


@pytest.mark.parametrize("raw", [{"max_failures": 0}, {"backoff_max": -1}, {"nope": 1}, {"failure_window": "x"}])
def test_bad_policy_refused(raw):
    with pytest.raises(T.TunnelError):
        T.validate_policy(raw)


# ---------------------------------------------------------------- restart decisions

POL = dict(T.DEFAULT_POLICY, backoff_initial=1.0, backoff_max=8.0, max_failures=4, failure_window=60.0,
           stable_after=30.0)


@pytest.mark.parametrize("history,now,want", [
    ([(0, 1, 0)], 1, (False, 1.0)),                                     # first failure: initial backoff
    ([(0, 1, 0), (2, 3, 0)], 3, (False, 2.0)),                          # doubles
    ([(0, 1, 0), (2, 3, 0), (5, 6, 0)], 6, (False, 4.0)),
    ([(0, 1, 0), (2, 3, 0), (5, 6, 0), (10, 11, 0)], 11, (True, 0.0)),  # 4 consecutive within 60 s: give up
    ([(0, 100, 90), (100, 101, 0)], 101, (False, 1.0)),                 # a stable run resets the count
    ([(0, 100, 90), (100, 101, 0), (102, 103, 0), (104, 105, 0), (106, 107, 0)], 107, (True, 0.0)),
    ([(0, 1, 0), (2, 3, 0), (5, 6, 0), (100, 101, 0)], 101, (False, 1.0)),  # old failures left the window
    ([(0, 1, 0)] * 3 + [(9, 10, 5)], 10, (True, 0.0)),                  # up 5 s < stable_after: still a failure
])
def test_next_action(history, now, want):
    assert T.next_action(history, now, POL) == want


def test_backoff_is_capped():
    hist = [(i, i + 0.5, 0) for i in range(3)]
    assert T.next_action(hist, 3, dict(POL, max_failures=100, backoff_max=3.0)) == (False, 3.0)


def test_fatal_and_summary():
    lines = ["debug1: x", "Warning: Permanently added 'h' to the list of known hosts.",
             "Error: remote port forwarding failed for listen port 56321"]
    assert T.is_fatal(lines)
    assert not T.is_fatal(["ssh: connect to host h port 22: Connection refused"])
    assert T.is_fatal(["u@h: Permission denied (publickey)."])
    assert T.summarize_error(lines, 255) == (
        "ssh exited with status 255: Error: remote port forwarding failed for listen port 56321")
    assert T.summarize_error([], -9) == "ssh killed by signal 9"
    info = ["OpenSSH_9.2p1 Debian", 'Authenticated to h ([h]:22) using "publickey".', "Transferred: sent 1, received 2",
            "Bytes per second: sent 1.0, received 2.0", "debug1: Exit status 0"]
    assert T.summarize_error(info, 0) == "ssh exited with status 0"   # informational lines are not errors


# ---------------------------------------------------------------- status files and processes

def test_parse_status():
    good = {"state": "up", "pid": 5, "ssh_pid": 6, "restarts": 0}
    assert T.parse_status(json.dumps(good)) == good
    for bad in ('{"state": "dancing"}', "[]", '{"state": "up", "pid": "5"}', '{"state": "up", "restarts": true}',
                "{not json"):
        with pytest.raises(ValueError):
            T.parse_status(bad)


def test_read_status_and_pid_tolerate_missing_and_garbage(tmp_path):
    assert T.read_status(str(tmp_path / "none")) is None
    (tmp_path / "s").write_text("garbage")
    assert T.read_status(str(tmp_path / "s")) is None
    (tmp_path / "p").write_text("12x\n")
    assert T.read_pid(str(tmp_path / "p")) is None
    (tmp_path / "p").write_text("123\n")
    assert T.read_pid(str(tmp_path / "p")) == 123


def test_write_private(tmp_path):
    path = str(tmp_path / "f")
    assert T.write_private(path, "a") is True
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert T.write_private(path, "a") is False
    os.chmod(path, 0o644)
    assert T.write_private(path, "a") is True and os.stat(path).st_mode & 0o777 == 0o600


def test_is_alive_uses_start_time_token():
    me = os.getpid()
    token = T.proc_token(me)
    assert token and T.is_alive(me, token)
    assert not T.is_alive(me, str(int(token) + 1))   # same pid, other start time: a reused pid is not ours
    assert not T.is_alive(me, None)
    assert not T.is_alive(None, token)


def test_dead_and_zombie_processes_are_not_alive():
    proc = subprocess.Popen(["/bin/sleep", "30"])
    token = T.proc_token(proc.pid)
    assert T.is_alive(proc.pid, token)
    proc.kill()
    deadline = time.monotonic() + 5
    while T.proc_token(proc.pid) is not None and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.02)
    assert not T.is_alive(proc.pid, token)
    proc.wait()
    assert not T.is_alive(proc.pid, token)


def test_is_supervisor_checks_cmdline(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "run", "--state-dir", str(tmp_path),
                             "--name", "x"])
    try:
        deadline = time.monotonic() + 10
        while not T.proc_cmdline(proc.pid) and time.monotonic() < deadline:  # empty while exec is under way
            time.sleep(0.01)
        token = T.proc_token(proc.pid)
        assert T.is_supervisor(proc.pid, token, str(tmp_path), "x")
        assert not T.is_supervisor(proc.pid, token, str(tmp_path), "y")
        assert not T.is_supervisor(proc.pid, token, "/elsewhere", "x")
        assert not T.is_supervisor(os.getpid(), T.proc_token(os.getpid()), str(tmp_path), "x")
    finally:
        proc.kill()
        proc.wait()


def _import_roots(path: Path) -> set:
    import ast  # noqa: PLC0415

    tree = ast.parse(path.read_text(), feature_version=(3, 8))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return roots | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_script_is_stdlib_only_and_python38_syntax():
    # the batch job runs this file with its own copy of _proc.py next to it, and nothing else of the collection
    assert _import_roots(SCRIPT) - set(sys.stdlib_module_names) == {"ansible_collections"}
    assert _import_roots(SCRIPT.parent / "_proc.py") - set(sys.stdlib_module_names) == set(), \
        "only the standard library: the batch job runs _proc.py next to this file"


def test_supervisor_source_is_this_file():
    assert T.supervisor_source() == SCRIPT.read_text()


class _BytesLoader:
    """What ansible-core's collection loader does: ``get_source`` returns the file's bytes."""

    def get_source(self, _name):
        return SCRIPT.read_bytes()


def test_supervisor_source_is_text_under_a_loader_that_gives_bytes(tmp_path, monkeypatch):
    monkeypatch.setitem(T.supervisor_source.__globals__, "__loader__", _BytesLoader())
    src = T.supervisor_source()
    assert isinstance(src, str) and src == SCRIPT.read_text()
    # the tunnel's script file is written from it (write_private wants text)
    assert T.write_private(str(tmp_path / "_tunnel.py"), src) is True
    assert (tmp_path / "_tunnel.py").read_text() == SCRIPT.read_text()


# ---------------------------------------------------------------- the supervisor, run for real

@pytest.fixture
def fake(tmp_path, monkeypatch):
    d = tmp_path / "fake"
    d.mkdir()
    ssh = d / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    monkeypatch.setenv("FAKE_SSH_DIR", str(d))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    procs = []

    class Fake:
        dir = d
        path = str(ssh)
        state_dir = str(state)

        @staticmethod
        def plan(text):
            monkeypatch.setenv("FAKE_SSH_PLAN", text)

        @staticmethod
        def spec_file(name="t", **policy):
            pol = dict(backoff_initial=0.1, backoff_max=0.2, max_failures=4, failure_window=60.0)
            pol.update(policy)
            spec = T.validate_spec(dict(BASE, ssh_bin=str(ssh)))
            path = d / ("%s.in.json" % name)
            path.write_text(T.spec_document(name, spec, T.validate_policy(pol)))
            return str(path)

        @staticmethod
        def run(name="t", *extra, state_dir=None, **policy):
            argv = [SYSTEM_PYTHON, "-I", str(SCRIPT), "run", "--state-dir", str(state_dir or state), "--name", name,
                    "--spec", Fake.spec_file(name, **policy), *extra]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            return proc

        @staticmethod
        def status(name="t", state_dir=None):
            return T.read_status(T.tunnel_paths(str(state_dir or state), name)["status"]) or {}

        @staticmethod
        def wait(pred, name="t", timeout=30.0, state_dir=None):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st = Fake.status(name, state_dir)
                if pred(st):
                    return st
                time.sleep(0.05)
            pytest.fail("timed out; status=%r log=%s" % (Fake.status(name, state_dir),
                                                         T.log_tail(str(state_dir or state), name)))

    yield Fake
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in {p.name.split(".")[0] for p in state.glob("*.status.json")}:
        T.stop_tunnel(str(state), name, 1.0)


def fake_ssh_pids(fake):
    """Live processes running the fake ssh."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and fake.path in T.proc_cmdline(int(entry)) and T.proc_token(int(entry)):
            pids.append(int(entry))
    return pids


def test_supervisor_marks_up_and_restarts_a_killed_ssh(fake):
    fake.plan("up")
    proc = fake.run()
    st = fake.wait(lambda s: s.get("state") == "up")
    assert st["restarts"] == 0 and st["pid"] == proc.pid and T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert T.read_pid(T.tunnel_paths(fake.state_dir, "t")["pid"]) == proc.pid
    argv = json.loads((fake.dir / "argv.0.json").read_text())
    assert "127.0.0.1:56321:127.0.0.1:8888" in argv and argv[-1] == "workspace"
    first = st["ssh_pid"]
    os.kill(first, signal.SIGKILL)
    st = fake.wait(lambda s: s.get("state") == "up" and s.get("ssh_pid") not in (None, first))
    assert st["restarts"] == 1 and st["attempts"] == 2
    assert "killed by signal 9" in st["last_error"]
    assert T.probe(fake.state_dir, "t")["healthy"]
    log = Path(st["log"]).read_text()
    assert "remote forward success" in log and "Reading configuration data" not in log  # debug noise filtered
    assert "channel 0: new" not in log


def test_fatal_first_error_gives_up_at_once(fake):
    fake.plan("busy")
    proc = fake.run()
    assert proc.wait(30) == 1
    st = fake.status()
    assert st["state"] == "failed" and st["attempts"] == 1 and st["ssh_pid"] is None
    assert "remote port forwarding failed for listen port 56321" in st["last_error"]
    assert not os.path.exists(T.tunnel_paths(fake.state_dir, "t")["pid"])
    assert fake_ssh_pids(fake) == []


def test_gives_up_after_consecutive_failures(fake):
    fake.plan("refused")
    proc = fake.run(max_failures=3)
    assert proc.wait(40) == 1
    st = fake.status()
    assert st["state"] == "failed" and st["attempts"] == 3 and st["restarts"] == 2
    assert st["last_error"].startswith("gave up after 3 failures within 60.0s")
    assert "Connection refused" in st["last_error"]
    assert int((fake.dir / "count").read_text()) == 3


def test_flapping_after_up_is_retried_not_fatal(fake):
    fake.plan("flap,busy,up")   # up then dies; then busy port (fatal only before first up); then up
    fake.run()
    st = fake.wait(lambda s: s.get("state") == "up" and s.get("attempts") == 3)
    assert st["restarts"] == 2


def test_term_stops_ssh_and_removes_pid_file(fake):
    fake.plan("up")
    proc = fake.run()
    st = fake.wait(lambda s: s.get("state") == "up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert fake.status()["state"] == "stopped"
    assert not os.path.exists(T.tunnel_paths(fake.state_dir, "t")["pid"])
    assert fake_ssh_pids(fake) == []


def test_stop_file_stops_it(fake, tmp_path):
    fake.plan("up")
    stop = tmp_path / "stop-now"
    proc = fake.run("t", "--stop-file", str(stop))
    fake.wait(lambda s: s.get("state") == "up")
    stop.touch()
    assert proc.wait(30) == 0
    assert fake.status()["state"] == "stopped" and fake_ssh_pids(fake) == []


def test_second_supervisor_with_same_name_is_refused(fake):
    fake.plan("up")
    first = fake.run()
    fake.wait(lambda s: s.get("state") == "up")
    second = fake.run()
    assert second.wait(30) == 3
    assert "another supervisor" in second.stderr.read()
    assert first.poll() is None and fake.status()["pid"] == first.pid


def test_allocated_port_is_recorded(fake):
    fake.plan("alloc")
    fake.run()
    st = fake.wait(lambda s: s.get("state") == "up")
    assert st["allocated_port"] == 45678


def test_raw_argv_mode_with_up_after(fake):
    fake.plan("silent")   # prints no success line: only --up-after marks it up
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SCRIPT), "run", "--state-dir", fake.state_dir, "--name", "raw",
                             "--up-after", "0.5", "--", fake.path, "-N", "x"])
    try:
        st = fake.wait(lambda s: s.get("state") == "up", name="raw")
        assert st["argv"] == [fake.path, "-N", "x"] and st["spec_hash"] is None
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_cli_start_is_detached_and_stop_leaves_nothing(fake):
    fake.plan("up")
    out = subprocess.run([SYSTEM_PYTHON, str(SCRIPT), "start", "--state-dir", fake.state_dir, "--name", "d",
                          "--spec", fake.spec_file("d"), "--timeout", "30"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["state"] == "up"
    pid = st["pid"]
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid   # setsid: own session and process group
    assert os.readlink("/proc/%d/fd/0" % pid) == "/dev/null"
    assert T.probe(fake.state_dir, "d")["healthy"]
    assert Path(fake.state_dir, "_tunnel.py").read_text() == SCRIPT.read_text()
    assert Path(fake.state_dir, "_proc.py").read_text() == (SCRIPT.parent / "_proc.py").read_text()
    assert os.stat(fake.state_dir, follow_symlinks=True).st_mode & 0o777 == 0o700
    for f in Path(fake.state_dir).iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    stop = subprocess.run([SYSTEM_PYTHON, str(SCRIPT), "stop", "--state-dir", fake.state_dir, "--name", "d"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert json.loads(stop.stdout) == {"stopped": True}
    assert not T.is_alive(pid, st["token"]) and not T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert fake_ssh_pids(fake) == []
    again = subprocess.run([SYSTEM_PYTHON, str(SCRIPT), "stop", "--state-dir", fake.state_dir, "--name", "d"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert json.loads(again.stdout) == {"stopped": False}


def test_cli_start_failure_leaves_nothing(fake):
    fake.plan("busy")
    out = subprocess.run([SYSTEM_PYTHON, str(SCRIPT), "start", "--state-dir", fake.state_dir, "--name", "d",
                          "--spec", fake.spec_file("d"), "--timeout", "30"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 1
    assert "remote port forwarding failed" in json.loads(out.stdout)["last_error"]
    assert not T.probe(fake.state_dir, "d")["running"] and fake_ssh_pids(fake) == []


def test_stop_kills_an_orphaned_ssh_after_the_supervisor_was_killed(fake):
    fake.plan("up")
    proc = fake.run()
    st = fake.wait(lambda s: s.get("state") == "up")
    proc.kill()
    proc.wait()
    assert T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert not T.probe(fake.state_dir, "t")["running"]
    assert T.stop_tunnel(fake.state_dir, "t", 2.0) is True
    assert not T.is_alive(st["ssh_pid"], st["ssh_token"])
    assert not os.path.exists(T.tunnel_paths(fake.state_dir, "t")["pid"])


def test_stop_finds_the_supervisor_without_its_pid_file(fake):
    fake.plan("up")
    proc = fake.run()
    st = fake.wait(lambda s: s.get("state") == "up")
    os.unlink(T.tunnel_paths(fake.state_dir, "t")["pid"])
    assert not T.probe(fake.state_dir, "t")["running"]
    assert T.stop_tunnel(fake.state_dir, "t", 5.0) is True
    assert proc.wait(30) == 0 and not T.is_alive(st["ssh_pid"], st["ssh_token"])


def test_stop_never_signals_a_reused_pid(fake):
    victim = subprocess.Popen(["/bin/sleep", "30"])
    try:
        paths = T.tunnel_paths(fake.state_dir, "t")
        Path(paths["pid"]).write_text("%d\n" % victim.pid)
        Path(paths["status"]).write_text(json.dumps({"state": "up", "pid": victim.pid, "token": "1",
                                                     "ssh_pid": victim.pid, "ssh_token": "1"}))
        assert not T.probe(fake.state_dir, "t")["running"]
        T.stop_tunnel(fake.state_dir, "t", 0.5)
        assert victim.poll() is None   # a pid with another start time is left alone
        assert not os.path.exists(paths["pid"])
    finally:
        victim.kill()
        victim.wait()


def test_cli_refuses_bad_input(fake):
    for args in (["run", "--state-dir", fake.state_dir, "--name", "a;b", "--", "x"],
                 ["run", "--state-dir", fake.state_dir, "--name", "ok"],
                 ["run", "--state-dir", fake.state_dir, "--name", "ok", "--spec", "/nonexistent"]):
        out = subprocess.run([SYSTEM_PYTHON, str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                             check=False)
        assert out.returncode == 2, args
        assert "_tunnel.py:" in out.stderr


# ---------------------------------------------------------------- --forward-after: connect first, forward on the word

def test_master_argv_has_no_forward_and_its_own_socket():
    spec = T.validate_spec(dict(BASE, jump_host="ctl"))
    argv = T.build_ssh_argv(spec, "/s/t.cm")
    o = opts(argv)
    assert "-R" not in argv and argv[-2:] == ["--", "workspace"]
    # ssh keeps an option's first value: no ControlMaster=no / ControlPath=none before these
    assert [x for x in o if x.startswith("Control")][:3] == ["ControlMaster=yes", "ControlPath=/s/t.cm",
                                                             "ControlPersist=no"]
    assert "ControlPath=none" in _proxy(argv)  # the jump hop never shares it
    assert T.build_forward_argv(spec, "/s/t.cm") == [
        "ssh", "-o", "ControlPath=/s/t.cm", "-O", "forward", "-R", "127.0.0.1:56321:127.0.0.1:8888", "--",
        "workspace"]


@pytest.mark.parametrize(("state_dir", "ok"), [
    ("/home/u/.isession/sessions/jupyterlab-20261205203000-abc123/tunnel", True),
    ("/home/u/" + "d" * 80, False),  # no room for ssh's temporary name of the socket
    ("/home/u/my sessions", False), ("/home/u/100%", False),  # ssh would split or expand them
])
def test_control_path_only_where_ssh_can_bind_it(state_dir, ok):
    path = T.control_path_for(state_dir, "isession")
    assert (path == state_dir + "/isession.cm") if ok else path is None


@pytest.fixture
def short_state():
    path = Path(tempfile.mkdtemp(prefix="tun-", dir="/tmp"))  # noqa: S108 - short: a socket path has ~107 bytes
    yield path
    T.stop_tunnel(str(path), "t", 1.0)
    shutil.rmtree(path, ignore_errors=True)


def test_forward_after_connects_first_and_forwards_on_the_word(fake, short_state):
    fake.plan("up")
    go, cm = short_state / "go", short_state / "t.cm"
    proc = fake.run("t", "--forward-after", str(go), state_dir=short_state)
    try:
        fake.wait(lambda st: cm.exists(), state_dir=short_state)  # the master's socket
        assert fake.status(state_dir=short_state)["state"] == "connecting"  # connected, and no forward asked for
        assert not (fake.dir / "forwards").exists()
        master = json.loads((fake.dir / "argv.0.json").read_text())
        assert "-R" not in master and "ControlMaster=yes" in master and "ControlPath=%s" % cm in master
        go.touch()
        fake.wait(lambda st: st.get("state") == "up", state_dir=short_state)
        forwards = [json.loads(x) for x in (fake.dir / "forwards").read_text().splitlines()]
        assert [f[f.index("-O"):] for f in forwards] == [
            ["-O", "forward", "-R", "127.0.0.1:56321:127.0.0.1:8888", "--", "workspace"]]
        # a new connection (the old one dropped) asks for the forward again, at once
        first = fake.status(state_dir=short_state)["ssh_pid"]
        os.kill(first, signal.SIGKILL)
        st = fake.wait(lambda st: st.get("state") == "up" and st["ssh_pid"] != first, state_dir=short_state)
        assert len((fake.dir / "forwards").read_text().splitlines()) == 2 and st["restarts"] == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert fake_ssh_pids(fake) == [] and fake.status(state_dir=short_state)["state"] == "stopped"


def test_a_refused_forward_fails_at_once_with_its_words(fake, short_state, monkeypatch):
    fake.plan("up")
    monkeypatch.setenv("FAKE_SSH_FORWARD", "busy")
    go = short_state / "go"
    go.touch()
    proc = fake.run("t", "--forward-after", str(go), state_dir=short_state)
    assert proc.wait(30) == 1
    st = fake.status(state_dir=short_state)
    assert st["state"] == "failed" and st["attempts"] == 1
    assert st["last_error"].startswith("ssh exited with status 255")
    assert "remote port forwarding failed for listen port 56321" in st["last_error"]
    assert fake_ssh_pids(fake) == []


def test_forward_after_without_room_for_a_socket_starts_ssh_only_on_the_word(fake, tmp_path):
    fake.plan("up")
    state = tmp_path / ("s" * 90)
    state.mkdir(mode=0o700)
    go = state / "go"
    proc = fake.run("t", "--forward-after", str(go), state_dir=state)
    try:
        fake.wait(lambda st: st.get("state") == "starting", state_dir=state)
        time.sleep(0.5)  # time for a wrong supervisor to start its ssh anyway
        assert fake.status(state_dir=state)["state"] == "starting" and not (fake.dir / "count").exists()  # no ssh yet
        go.touch()
        fake.wait(lambda st: st.get("state") == "up", state_dir=state)
        argv = json.loads((fake.dir / "argv.0.json").read_text())
        assert "127.0.0.1:56321:127.0.0.1:8888" in argv and "ControlMaster=no" in argv
        assert not (fake.dir / "forwards").exists()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert fake_ssh_pids(fake) == []
