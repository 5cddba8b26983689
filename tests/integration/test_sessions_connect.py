"""Connect mode (session_mode: connect) against a VNC server the test starts itself on a compute host.

The test runs, as cluser on compute1, Xvnc with its own VNC password, an xterm filling the display, and websockify
serving noVNC under /me/WP/ on compute1's address - a server that was there before the session. start_vnc in connect
mode then runs no job and no server: only the tunnel from the controller to the workspace port WP, the readiness
wait and service.json. Chromium in the workspace logs in with the server's own password and sees the xterm. A cancel
stops the tunnel and releases WP - and leaves the server, which the session did not make, running.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from browser import colours, share
from desktop_common import provision_vnc
from sessions_common import (
    WS_USER,
    cluster_inventory,
    failure_text,
    listening,
    queue,
    read_json,
    reservations,
    run_playbook,
    wait_until,
)
from test_sessions_desktop import open_desktop

pytestmark = pytest.mark.bed

CLUSTER_USER = "cluser"
PASSWORD = "conn3ct!"
SERVER = r"""
set -eu
d=$1 wp=$2 np=$3 addr=$4 display=$5
cd "$d"
umask 077
printf '%s\n' "$PASSWORD" | vncpasswd -f >passwd
Xvnc ":$display" -geometry 1280x800 -rfbunixpath "$d/rfb.sock" -rfbport -1 -SecurityTypes VncAuth \
  -PasswordFile "$d/passwd" -nolisten tcp >xvnc.log 2>&1 &
for _i in $(seq 100); do [ -S rfb.sock ] && break; sleep 0.1; done
DISPLAY=":$display" xterm -bg '#7a1f1f' -geometry 300x100+0+0 >xterm.log 2>&1 &
mkdir -p "web/me/$wp"
ln -s /usr/share/novnc/* "web/me/$wp/"
# set up for the session's base path, like the vnc role's own page: <URL>/<PORT>/ opens noVNC connected
page='<script>location.replace("vnc.html?autoconnect=true&resize=scale&reconnect=true&path=me%%2F%s%%2Fwebsockify"'
printf "$page + location.hash)</script>\n" "$wp" >"web/me/$wp/index.html"
exec websockify --web "$d/web" --unix-target="$d/rfb.sock" "$addr:$np" >websockify.log 2>&1
"""


def processes_in(directory: Path) -> list:
    """Pids of the processes working in ``directory`` (the test's own server: Xvnc, xterm, websockify)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
                if cwd == str(directory) or cwd.startswith(f"{directory}/"):  # websockify works in web/
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def free_port_in(bed, host: str) -> int:
    for _i in range(200):
        port = random.randint(20000, 30000)
        if not listening(bed, host, port):
            return port
    raise AssertionError(f"no free port on {host}")


def test_connect_mode_tunnels_to_a_running_vnc_server_and_cancel_leaves_it(bed):
    provision_vnc(bed)
    inv = cluster_inventory(bed, "slurm")
    root = bed.user_tmpdir(WS_USER) / "sessions"
    work = bed.user_tmpdir(CLUSTER_USER)
    wp, np_, display = free_port_in(bed, "workspace"), free_port_in(bed, "compute1"), 96
    server = bed.popen("compute1", ["bash", "-c", SERVER, "server", str(work), str(wp), str(np_), bed.ip("compute1"),
                                    str(display)], user=CLUSTER_USER, env={"PASSWORD": PASSWORD})
    sid = f"vnc-connect-{int(time.time())}"
    try:
        assert wait_until(lambda: listening(bed, "compute1", np_), 20), (work / "websockify.log").read_text()
        res = run_playbook(bed, "hpc.interactive.start_vnc",
                           dict(session_id=sid, session_root=str(root), session_target="compute",
                                session_resource="controller", session_mode="connect", session_connect_host="compute1",
                                session_connect_port=np_, session_workspace_port=wp, session_start_timeout=30),
                           inventory=inv)
        assert res.rc == 0, failure_text(res)
        svc, state = read_json(root / sid / "service.json"), read_json(root / sid / "state.json")
        assert svc["JOB_STATUS"] == "Running" and int(svc["PORT"]) == wp, svc
        assert "job_id" not in state and queue(bed, f"isession-{sid}") == ""
        assert not [t for t in res.tasks() if t["task"]["name"] == "Submit the agent as a batch job"]
        png = open_desktop(bed, wp, svc["SLUG"], PASSWORD, "vnc-connect.png")
        red = share(png, (0, 0, 1280, 800), lambda p: abs(p[0] - 122) < 12 and p[1] < 45 and p[2] < 45)
        assert red > 0.8, f"not the test's server ({red:.0%}): {colours(png, (0, 0, 1280, 800))}"
        tunnel_dir = Path(state["remote_dir"]) / "tunnel"
        assert (tunnel_dir / f"isession-{sid}.pid").exists()

        cancel = run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)),
                              inventory=inv)
        assert cancel.rc == 0, failure_text(cancel)
        assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
        assert wait_until(lambda: not listening(bed, "workspace", wp), 10)
        assert not (tunnel_dir / f"isession-{sid}.pid").exists()
        assert reservations(sid) == []
        # what the session did not make is still there
        assert server.poll() is None and listening(bed, "compute1", np_)
        assert Path(f"/tmp/.X{display}-lock").exists()
    finally:
        for pid in processes_in(work):
            os.kill(pid, signal.SIGTERM)
        server.wait(10)
        assert wait_until(lambda: not processes_in(work), 10), processes_in(work)


def test_connect_mode_refuses_the_workspace_target(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = f"vnc-connect-ws-{int(time.time())}"
    res = run_playbook(bed, "hpc.interactive.start_vnc",
                       dict(session_id=sid, session_root=str(root), session_mode="connect", session_connect_port=5901))
    assert res.rc != 0
    svc = read_json(root / sid / "service.json")
    assert svc["JOB_STATUS"] == "Failed" and "session_mode connect needs session_target controller or compute" \
        in svc["ERROR_MESSAGE"], svc
    assert reservations(sid) == []
