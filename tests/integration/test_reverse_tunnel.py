"""reverse_tunnel on the test bed: real ansible-playbook as ``cluser`` on ``compute1`` (local connection),
real ssh to ``wsuser@workspace`` (10.199.77.10), real HTTP through the tunnel.

* A tunnel carries HTTP from a server bound to 127.0.0.1 on compute1 to 127.0.0.1:RPORT on workspace;
  ``present`` again (and in check mode) is ``changed: false``; the supervisor runs detached with
  /usr/bin/python3 from the copied ``_tunnel.py``.
* After its ssh process is killed, HTTP works again within seconds and ``restarts`` is 1.
* A second tunnel to the same busy RPORT fails with ssh's "remote port forwarding failed" and leaves nothing.
* ``absent`` leaves no supervisor, no ssh and no listener on RPORT in workspace; ``absent`` twice is fine.
* Through ``controller`` as jump host (compute1 -> controller -> workspace), checked by the TCP peers of
  compute1.
"""
from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bed

USER = "cluser"
HOST = "compute1"
WS_IP = "10.199.77.10"
CTRL_IP = "10.199.77.20"
MARKER = "hello from compute1 through the tunnel\n"


def _ws_listening(bed, port: int) -> bool:
    out = bed.run("workspace", ["ss", "-Hltn", "sport = :%d" % port], timeout=20)
    assert out.returncode == 0, out.stderr
    return bool(out.stdout.strip())


def _pick_port(bed) -> int:
    for _attempt in range(50):
        port = random.randint(21000, 29999)  # noqa: S311
        if not _ws_listening(bed, port):
            return port
    raise AssertionError("no free port in workspace")


def _curl(bed, port: int, timeout: float = 5):
    return bed.run("workspace", ["curl", "-sS", "--max-time", str(timeout), "http://127.0.0.1:%d/marker.txt" % port],
                   user="wsuser", timeout=timeout + 10)


def _our_processes(state_dir: Path, ports) -> list:
    """Live supervisors of ``state_dir`` and ssh processes forwarding one of ``ports``, as (pid, uid, cmdline)."""
    found = []
    needles = [str(state_dir)] + ["127.0.0.1:%d:" % p for p in ports]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % entry).read_text().rsplit(")", 1)[1].split()
            cmd = Path("/proc/%s/cmdline" % entry).read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uid = os.stat("/proc/%s" % entry).st_uid
        except OSError:
            continue
        ours = "_tunnel.py" in cmd or cmd.startswith("/usr/bin/ssh")
        if stat[0] != "Z" and ours and any(n in cmd for n in needles):
            found.append((int(entry), uid, cmd))
    return found


class Tunnels:
    def __init__(self, bed, root: Path) -> None:
        self.bed, self.root = bed, root
        self.state_dir = root / "state"
        self.inventory = bed.write_user_file(
            USER, root / "inventory.ini",
            "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
        self.rport = _pick_port(bed)
        self.rport2 = _pick_port(bed)
        self.node_port = random.randint(30000, 39999)  # noqa: S311 - compute1's own namespace, empty

    def args(self, **over) -> dict:
        args = {"name": "t1", "state_dir": str(self.state_dir), "remote_port": self.rport,
                "local_port": self.node_port, "dest_host": WS_IP, "dest_user": "wsuser", "timeout": 30}
        args.update(over)
        return {k: v for k, v in args.items() if v is not None}

    def play(self, check: bool = False, diff: bool = False, **over) -> dict:
        text = ("- hosts: localhost\n  gather_facts: false\n  tasks:\n    - name: tunnel\n"
                "      hpc.interactive.reverse_tunnel: %s\n" % json.dumps(self.args(**over)))
        res = self.bed.playbook_json(text, host=HOST, user=USER, inventory=self.inventory, check=check, diff=diff,
                                     timeout=180)
        try:
            return dict(res.task("tunnel", "localhost"), rc=res.rc)
        except KeyError:
            raise AssertionError("no task result: rc=%s\n%s\n%s"
                                 % (res.rc, res.stdout[-3000:], res.stderr[-3000:])) from None

    def status(self, name: str = "t1") -> dict:
        return json.loads((self.state_dir / ("%s.status.json" % name)).read_text())


@pytest.fixture(scope="module")
def tun(bed):
    root = bed.user_tmpdir(USER)
    www = root / "www"
    www.mkdir()
    (www / "marker.txt").write_text(MARKER)
    pw = pwd.getpwnam(USER)
    for p in (www, www / "marker.txt"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    t = Tunnels(bed, root)
    server = bed.popen(HOST, ["/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www),
                              str(t.node_port)], user=USER, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while bed.run(HOST, ["curl", "-sf", "http://127.0.0.1:%d/marker.txt" % t.node_port], user=USER).returncode:
        assert time.monotonic() < deadline and server.poll() is None, "http.server did not start on compute1"
        time.sleep(0.2)
    yield t
    for name in ("t1", "busy", "jump"):
        if t.state_dir.is_dir():
            t.play(state="absent", name=name)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def test_tunnel_carries_http_and_is_idempotent(bed, tun):
    check = tun.play(check=True)
    assert check["changed"] is True and not (tun.state_dir / "t1.pid").exists()
    res = tun.play()
    assert res["rc"] == 0 and res["changed"] is True and res["tunnel_state"] == "up", res
    out = _curl(bed, tun.rport)
    assert out.returncode == 0 and out.stdout == MARKER, out.stderr
    st = tun.status()
    assert st["state"] == "up" and st["restarts"] == 0 and st["pid"] == res["pid"]
    cmd = Path("/proc/%d/cmdline" % st["pid"]).read_bytes().split(b"\0")
    assert cmd[:4] == [b"/usr/bin/python3", b"-I", str(tun.state_dir / "_tunnel.py").encode(), b"run"]  # isolated
    assert os.getsid(st["pid"]) == st["pid"]
    repo_file = Path(__file__).resolve().parents[2] / "plugins" / "module_utils" / "_tunnel.py"
    assert (tun.state_dir / "_tunnel.py").read_text() == repo_file.read_text()   # shipped out of Ansiballz intact
    assert os.readlink("/proc/%d/fd/0" % st["pid"]) == "/dev/null"
    assert os.readlink("/proc/%d/fd/2" % st["pid"]) == str(tun.state_dir / "t1.log")
    assert os.stat("/proc/%d" % st["ssh_pid"]).st_uid == pwd.getpwnam(USER).pw_uid
    assert tun.state_dir.stat().st_mode & 0o777 == 0o700
    again = tun.play()
    assert again["changed"] is False and again["pid"] == res["pid"] and again["ssh_pid"] == res["ssh_pid"]
    assert tun.play(check=True)["changed"] is False


def test_tunnel_comes_back_after_its_ssh_is_killed(bed, tun):
    before = tun.status()
    assert before["state"] == "up"
    os.kill(before["ssh_pid"], signal.SIGKILL)
    start = time.monotonic()
    while True:
        out = _curl(bed, tun.rport, timeout=2)
        st = tun.status()
        if out.returncode == 0 and st["ssh_pid"] not in (None, before["ssh_pid"]):
            break
        assert time.monotonic() - start < 15, "tunnel not back: %r %r" % (out.stderr, st)
        time.sleep(0.2)
    assert out.stdout == MARKER
    assert st["restarts"] == before["restarts"] + 1 and st["pid"] == before["pid"]
    assert "killed by signal 9" in st["last_error"]
    res = tun.play()
    assert res["changed"] is False and res["restarts"] == before["restarts"] + 1


def test_busy_remote_port_fails_clearly_with_nothing_left(bed, tun):
    assert _ws_listening(bed, tun.rport)
    res = tun.play(name="busy")
    assert res["rc"] != 0 and res.get("failed") is True
    assert "remote port forwarding failed for listen port %d" % tun.rport in res["msg"]
    assert not (tun.state_dir / "busy.pid").exists()
    assert json.loads((tun.state_dir / "busy.status.json").read_text())["state"] in ("failed", "stopped")
    assert [p for p in _our_processes(tun.state_dir, []) if "--name busy" in p[2]] == []
    assert _curl(bed, tun.rport).stdout == MARKER   # the healthy tunnel is untouched


def test_absent_leaves_no_process_or_listener(bed, tun):
    assert _our_processes(tun.state_dir, [tun.rport])
    res = tun.play(state="absent")
    assert res["changed"] is True and res["tunnel_state"] == "stopped"
    assert _our_processes(tun.state_dir, [tun.rport]) == []
    assert not _ws_listening(bed, tun.rport)
    assert not (tun.state_dir / "t1.pid").exists()
    assert _curl(bed, tun.rport, timeout=2).returncode != 0
    again = tun.play(state="absent")
    assert again["rc"] == 0 and again["changed"] is False


def test_through_controller_as_jump_host(bed, tun):
    res = tun.play(name="jump", remote_port=tun.rport2, jump_host="%s@%s" % (USER, CTRL_IP))
    assert res["rc"] == 0 and res["changed"] is True, res
    out = _curl(bed, tun.rport2)
    assert out.returncode == 0 and out.stdout == MARKER, out.stderr
    peers = bed.run(HOST, ["ss", "-Htn", "state", "established"], timeout=20).stdout
    assert "%s:22" % CTRL_IP in peers and "%s:22" % WS_IP not in peers   # compute1 talks to controller only
    ctrl_peers = bed.run("controller", ["ss", "-Htn", "state", "established"], timeout=20).stdout
    assert "%s:22" % WS_IP in ctrl_peers   # ... which carries the hop on to workspace
    assert tun.play(name="jump", remote_port=tun.rport2, jump_host="%s@%s" % (USER, CTRL_IP))["changed"] is False
    gone = tun.play(name="jump", state="absent")
    assert gone["changed"] is True
    assert _our_processes(tun.state_dir, [tun.rport2]) == [] and not _ws_listening(bed, tun.rport2)
