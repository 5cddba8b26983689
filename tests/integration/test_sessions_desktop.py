"""Desktop sessions on the bed: VNC (Xvnc + xfce4 + websockify/noVNC) and desktop_app, seen through a real browser.

As wsuser through the collection's playbooks. Debian's Chromium (Playwright, ``browser.py``) runs inside the
workspace's network namespace, opens ``http://127.0.0.1:PORT/me/PORT/`` + SLUG through the session's tunnel, logs in
to noVNC with the session's VNC password and takes a screenshot; the assertions are on its pixels (xfce's light
panel along the top, its dark-blue wallpaper below; the app's colour filling the screen). Screenshots are kept in
``tests/output/screenshots/`` (git-ignored). After a cancel, each bed host is checked: no process of the session
(found by its environment, command line or directories, per network namespace), no listener on its ports, the
display's X lock and socket gone, no port or display reservation left, nothing in the queue.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from browser import artifact, browser, colours, share
from desktop_common import provision_vnc
from sessions_common import (
    WS_USER,
    assert_no_secret_in_argv,
    cluster_inventory,
    failure_text,
    listening,
    queue,
    read_json,
    reservations,
    run_playbook,
    wait_until,
)
from test_matrix import server_location, session_processes_by_host
from test_sessions_sge import jobs_named, sge_inventory

from ansible_collections.hpc.interactive.plugins.module_utils._desktop import (
    lock_path,
    lock_pid,
    socket_path,
    vnc_password,
)
from ansible_collections.hpc.interactive.plugins.module_utils._ports import pid_alive

pytestmark = pytest.mark.bed

DISPLAYS_DIR = Path("/tmp/isession-displays")
CLUSTER_USER = "cluser"
APP_RED = "#7a1f1f"  # xterm's background in the desktop_app tests: (122, 31, 31)


@pytest.fixture
def desktop_bed(bed):
    """The bed with the VNC desktop provisioned by the vnc role's install entry point (desktop_common.py)."""
    provision_vnc(bed)
    return bed


@pytest.fixture
def root(desktop_bed):
    return desktop_bed.user_tmpdir(WS_USER) / "sessions"


def display_records(owner: str) -> list:
    """The displays reserved for ``owner`` (claim files are 0600: read as root)."""
    out = []
    for f in DISPLAYS_DIR.glob("port-*") if DISPLAYS_DIR.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("owner") == owner:
            out.append(rec["port"])
    return out


def start(bed, root: Path, service: str, sid: str, *, target: str = "compute", inv=None, **extra):
    args = dict(session_id=sid, session_root=str(root), session_target=target, session_start_timeout=90,
                session_queue_timeout=60)
    args.update(extra)
    if target != "workspace":
        args["session_resource"] = "controller"
    return run_playbook(bed, f"hpc.interactive.start_{service}", args, inventory=inv)


def session_facts(root: Path, sid: str) -> Dict[str, object]:
    sdir = root / sid
    svc, state = read_json(sdir / "service.json"), read_json(sdir / "state.json")
    rdir = Path(state["remote_dir"]) if state.get("remote_dir") else sdir
    host, node_port = server_location(state)
    display = int((rdir / "vnc" / "display").read_text())
    return dict(sdir=sdir, rdir=rdir, svc=svc, state=state, host=host, node_port=node_port, display=display,
                port=int(svc["PORT"]), secret=(sdir / "secret").read_text().strip())


def open_desktop(bed, port: int, slug: str, password: Optional[str], shot: str, *, settle: float = 4.0,
                 after=None) -> bytes:
    """Load the session's URL in Chromium inside the workspace namespace, log in if noVNC asks, screenshot."""
    with browser(str(bed.netns_path("workspace"))) as b:
        page = b.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"http://127.0.0.1:{port}/me/{port}/{slug}", timeout=30000)
        if password is not None:
            page.wait_for_selector("#noVNC_password_input", state="visible", timeout=30000)
            page.fill("#noVNC_password_input", password)
            page.click("#noVNC_credentials_button")
        page.wait_for_function("document.documentElement.classList.contains('noVNC_connected')", timeout=30000)
        assert "resize=scale" in page.url and "reconnect=true" in page.url, page.url
        assert "password" not in page.url.split("#")[0], "the password reached the URL's query"
        time.sleep(settle)
        png = page.screenshot(path=str(artifact(shot)))
        if after:
            after(page)
    return png


def assert_xfce_desktop(png: bytes) -> None:
    """xfce's panel (light grey) along the top, its dark-blue wallpaper filling the middle."""
    panel = share(png, (0, 2, 1280, 22), lambda p: min(p) >= 200)
    wallpaper = share(png, (200, 150, 1080, 650), lambda p: p[2] > p[0] + 15 and max(p) < 120)
    assert panel > 0.5, f"no xfce panel along the top ({panel:.0%}): {colours(png, (0, 2, 1280, 22))}"
    assert wallpaper > 0.6, f"no xfce wallpaper ({wallpaper:.0%}): {colours(png, (200, 150, 1080, 650))}"


def end_logs(rdir: Path) -> str:
    """What the session's end said (the agent's, the fragment's and its stop helper's logs), for a failure."""
    out = []
    for name in ("server.log", "xvnc.log", "desktop-stop.log"):
        path = rdir / "logs" / name
        lines = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else ["(none)"]
        out.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(out)


def assert_nothing_left(bed, facts, sid: str) -> None:
    """Per host: no process, no listener, no X lock/socket of the display, no reservation, no job."""
    host, display = facts["host"], facts["display"]
    markers = (str(facts["sdir"]), str(facts["rdir"]))
    assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 15), queue(bed, f"isession-{sid}")
    assert wait_until(lambda: not session_processes_by_host(bed, sid, markers), 15), \
        session_processes_by_host(bed, sid, markers)
    assert not listening(bed, "workspace", facts["port"])
    assert wait_until(lambda: not listening(bed, host, facts["node_port"]), 10)
    for path in (lock_path(display), socket_path(display)):
        assert wait_until(lambda p=path: not os.path.lexists(p), 10), \
            f"{path} left behind on {host}\n{end_logs(facts['rdir'])}"
    assert wait_until(lambda: reservations(sid) == [] and display_records(sid) == [], 10), \
        (reservations(sid), display_records(sid))


def cancel(bed, root: Path, sid: str, inv):
    res = run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)), inventory=inv)
    assert res.rc == 0, failure_text(res)
    return res


# ---------------------------------------------------------------- VNC desktop on Slurm compute


def test_vnc_on_slurm_compute_shows_the_desktop_then_cancel_leaves_nothing(desktop_bed, root):
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    sid = f"vnc-slurm-{int(time.time())}"
    res = start(bed, root, "vnc", sid, inv=inv)
    try:
        assert res.rc == 0, failure_text(res)
        f = session_facts(root, sid)
        assert f["svc"]["JOB_STATUS"] == "Running" and f["svc"]["SLUG"] == "", f["svc"]
        assert f["host"] in ("compute1", "compute2")
        host, display = f["host"], f["display"]
        # Xvnc listens on no TCP port; the display's lock names the live Xvnc
        assert not listening(bed, host, 5900 + display) and not listening(bed, host, 6000 + display)
        assert os.path.exists(lock_path(display)) and display_records(sid) == [display]
        password = vnc_password(f["secret"])
        for where in (f["rdir"] / "vnc" / "password",):
            assert oct(where.stat().st_mode & 0o777) == "0o600"
        png = open_desktop(bed, f["port"], f["svc"]["SLUG"], password, "vnc-slurm.png")
        assert_xfce_desktop(png)
        # neither the secret nor the VNC password in any argv, job script, log or the playbook's output
        assert_no_secret_in_argv(f["secret"])
        assert_no_secret_in_argv(password)
        assert password not in res.stdout and f["secret"] not in res.stdout
        for log in list((f["rdir"] / "logs").glob("*")) + [f["rdir"] / "agent.sh", f["rdir"] / "job.out"]:
            text = log.read_text(errors="replace") if log.is_file() else ""
            assert password not in text and f["secret"] not in text, log
    finally:
        cancel(bed, root, sid, inv)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
    assert_nothing_left(bed, f, sid)


def test_password_in_url_opt_in_connects_without_a_prompt(desktop_bed, root):
    """vnc_password_in_url: the SLUG is #password=..., a URL fragment that never reaches a server or a log."""
    bed = desktop_bed
    sid = f"vnc-urlpw-{int(time.time())}"
    res = start(bed, root, "vnc", sid, target="workspace", vnc_password_in_url=True)
    try:
        assert res.rc == 0, failure_text(res)
        f = session_facts(root, sid)
        password = vnc_password(f["secret"])
        assert f["svc"]["SLUG"] == f"#password={password}"
        assert password not in res.stdout
        png = open_desktop(bed, f["port"], f["svc"]["SLUG"], None, "vnc-password-in-url.png")
        assert_xfce_desktop(png)
        ws_log = (f["sdir"] / "logs" / "websockify.log").read_text()
        assert "connecting to unix socket" in ws_log and password not in ws_log
    finally:
        cancel(bed, root, sid, None)
    assert_nothing_left(bed, f, sid)


@pytest.mark.parametrize("where", ["controller", "pbs", "sge"])
def test_vnc_on_the_other_targets_shows_the_desktop_then_cancel_leaves_nothing(desktop_bed, root, where):
    """The controller target (detached agent, reverse_tunnel) and compute through PBS (via the controller) and SGE."""
    bed = desktop_bed
    if where == "sge":
        inv, target = sge_inventory(bed), "compute"
    else:
        inv = cluster_inventory(bed, "slurm" if where == "controller" else "pbs",
                                "direct" if where == "controller" else "controller")
        target = "controller" if where == "controller" else "compute"
    sid = f"vnc-{where}-{int(time.time())}"
    res = start(bed, root, "vnc", sid, target=target, inv=inv)
    try:
        assert res.rc == 0, failure_text(res)
        f = session_facts(root, sid)
        assert f["svc"]["JOB_STATUS"] == "Running", f["svc"]
        assert f["host"] == ("controller" if where == "controller" else f["host"]) and f["host"] != "workspace"
        png = open_desktop(bed, f["port"], "", vnc_password(f["secret"]), f"vnc-{where}.png")
        assert_xfce_desktop(png)
        if where == "sge":
            # a site's Grid Engine may send its warning (SIGUSR2, -notify) to every process of the job: Xvnc would
            # die of it without removing its lock; it ignores it, and the session's end stops it with TERM
            xvnc = lock_pid(f["display"])
            assert xvnc and xvnc > 0, f"no Xvnc lock for display :{f['display']}"
            os.kill(xvnc, signal.SIGUSR2)
            time.sleep(1)
            assert pid_alive(xvnc), "Xvnc died of SIGUSR2"
            assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Running"
    finally:
        cancel(bed, root, sid, inv)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
    assert_nothing_left(bed, f, sid)
    if where == "sge":
        assert wait_until(lambda: jobs_named(bed, f"isession-{sid}") == {}, 15), jobs_named(bed, f"isession-{sid}")


# ---------------------------------------------------------------- desktop_app


def test_desktop_app_xterm_maximised_and_closing_it_completes_the_session(desktop_bed, root):
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    sid = f"dapp-slurm-{int(time.time())}"
    res = start(bed, root, "desktop_app", sid, inv=inv, desktop_app_command=["xterm", "-bg", APP_RED, "-fg", "white"])
    try:
        assert res.rc == 0, failure_text(res)
        f = session_facts(root, sid)

        def close_the_app(page) -> None:
            page.click("canvas", position={"x": 640, "y": 400})
            page.keyboard.type("exit\n", delay=30)

        png = open_desktop(bed, f["port"], "", vnc_password(f["secret"]), "desktop-app-xterm.png",
                           after=close_the_app)
        red = share(png, (0, 0, 1280, 800), lambda p: abs(p[0] - 122) < 12 and p[1] < 45 and p[2] < 45)
        assert red > 0.8, f"the xterm does not fill the screen ({red:.0%}): {colours(png, (0, 0, 1280, 800))}"
        sfile = root / sid / "service.json"
        assert wait_until(lambda: read_json(sfile)["JOB_STATUS"] == "Completed", 30), read_json(sfile)
        assert read_json(root / sid / "state.json")["step"] == "completed"
    finally:
        cancel(bed, root, sid, inv)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Completed"
    assert_nothing_left(bed, f, sid)


# ---------------------------------------------------------------- two desktops on one node


def test_two_desktops_started_together_on_one_node(desktop_bed, root):
    """Partition small is compute2 alone: both jobs land there, started at the same moment."""
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    sids = [f"vnc-two{i}-{int(time.time())}" for i in (1, 2)]
    results: Dict[str, object] = {}

    def one(sid: str) -> None:
        results[sid] = start(bed, root, "vnc", sid, inv=inv, session_partition="small")

    threads = [threading.Thread(target=one, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    facts = {}
    try:
        for s in sids:
            assert results[s].rc == 0, failure_text(results[s])
            facts[s] = session_facts(root, s)
            assert facts[s]["host"] == "compute2"
        one, two = (facts[s] for s in sids)
        assert one["display"] != two["display"] and one["port"] != two["port"]
        assert one["node_port"] != two["node_port"]
        for s in sids:
            png = open_desktop(bed, facts[s]["port"], "", vnc_password(facts[s]["secret"]), f"{s[:8]}-two.png")
            assert_xfce_desktop(png)
    finally:
        for s in sids:
            cancel(bed, root, s, inv)
    for s in sids:
        assert_nothing_left(bed, facts[s], s)


# ---------------------------------------------------------------- cancel while queued and while starting


def test_cancel_while_starting_leaves_nothing(desktop_bed, root):
    """The cancel lands while the job runs but the desktop does not answer yet (Starting)."""
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    sid = f"vnc-starting-{int(time.time())}"
    box = {}
    starter = threading.Thread(target=lambda: box.update(res=start(bed, root, "vnc", sid, inv=inv)))
    starter.start()
    sfile = root / sid / "state.json"
    assert wait_until(lambda: sfile.exists() and read_json(sfile).get("remote_dir")
                      and (Path(read_json(sfile)["remote_dir"]) / "agent.json").exists(), 60)
    cancel(bed, root, sid, inv)
    starter.join(120)
    state = read_json(sfile)
    rdir = Path(state["remote_dir"])
    agent = read_json(rdir / "agent.json")
    display_file = rdir / "vnc" / "display"
    facts = dict(sdir=root / sid, rdir=rdir, host=agent["host"], node_port=agent["node_port"],
                 port=int(state["ports"]["workspace"]),
                 display=int(display_file.read_text()) if display_file.exists() else 0)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
    assert_nothing_left(bed, facts, sid)


def test_cancel_while_queued_leaves_nothing(desktop_bed, root):
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    blockers = [bed.slurm(["sbatch", "--parsable", "-p", "small", "-c", "1", "-J", "isession-test-blocker",
                           "--wrap", "sleep 300"], user=CLUSTER_USER).stdout.strip().split(";")[0] for _i in range(2)]
    try:
        assert wait_until(lambda: all("RUNNING" in bed.slurm(["squeue", "-h", "-j", b, "-o", "%T"]).stdout
                                      for b in blockers), 30)
        sid = f"vnc-queued-{int(time.time())}"
        box = {}
        starter = threading.Thread(target=lambda: box.update(res=start(bed, root, "vnc", sid, inv=inv,
                                                                       session_partition="small")))
        starter.start()
        sfile = root / sid / "service.json"
        assert wait_until(lambda: sfile.exists() and read_json(sfile)["JOB_STATUS"] == "Queued", 60)
        cancel(bed, root, sid, inv)
        starter.join(120)
        assert box["res"].rc != 0 and read_json(sfile)["JOB_STATUS"] == "Cancelled"
        assert queue(bed, f"isession-{sid}") == "" and reservations(sid) == [] and display_records(sid) == []
        assert not session_processes_by_host(bed, sid, (str(root / sid),))
    finally:
        bed.slurm(["scancel", *blockers], check=False)


# ---------------------------------------------------------------- bad input


def _failed(bed, root, sid, inv, service="vnc", **extra) -> Tuple[str, object]:
    # the job fails at once: the start must see it then (through the user's watcher, which asks the scheduler),
    # not when session_start_timeout runs out
    began = time.monotonic()
    res = start(bed, root, service, sid, inv=inv, session_start_timeout=240, **extra)
    took = time.monotonic() - began
    assert res.rc != 0
    assert took < 120, f"the start took {took:.0f} s to see a job that failed at once"
    svc = read_json(root / sid / "service.json")
    assert svc["JOB_STATUS"] == "Failed", svc
    assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 15)
    assert wait_until(lambda: not session_processes_by_host(bed, sid, (str(root / sid),)), 15), \
        session_processes_by_host(bed, sid, (str(root / sid),))
    assert wait_until(lambda: reservations(sid) == [] and display_records(sid) == [], 10)
    return svc["ERROR_MESSAGE"], res


@pytest.mark.parametrize("field,value,words", [
    ("vnc_geometry", "1280x800; touch /tmp/pwned", "vnc_geometry must be WIDTHxHEIGHT"),
    ("vnc_geometry", "99999x1", "vnc_geometry must be WIDTHxHEIGHT"),
    ("desktop_app_command", ["xterm", "-e", "$(touch /tmp/pwned)"], "desktop_app_command must be"),
    ("desktop_app_command", ["-rf", "x"], "desktop_app_command must be"),
    ("desktop_app_command", ["xterm", "a\nb"], "desktop_app_command must be"),
])
def test_hostile_input_is_failed_naming_the_field_and_nothing_is_submitted(desktop_bed, root, field, value, words):
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    sid = f"vnc-bad-{field.split('_')[-1]}-{time.monotonic_ns() % 10**8}"
    extra = {field: value}
    if field != "desktop_app_command":
        extra["desktop_app_command"] = ["xterm"]
    message, res = _failed(bed, root, sid, inv, service="desktop_app", **extra)
    assert message.startswith(words), message
    assert "pwned" not in message and "pwned" not in json.dumps(read_json(root / sid / "state.json"))
    assert not Path("/tmp/pwned").exists()
    assert not [t for t in res.tasks() if t["task"]["name"] == "Submit the agent as a batch job"]


def test_missing_desktop_binary_and_unwritable_home_are_failed_naming_the_host(desktop_bed, root):
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    node = r"compute[12]"
    cases = [
        (dict(vnc_desktops=["mate", "lxqt"]), rf"no desktop of vnc_desktops \(mate, lxqt\) is installed on {node}"),
        (dict(vnc_xvnc_executable="/nonexistent/Xvnc"), rf"/nonexistent/Xvnc not found on {node}"),
    ]
    for i, (extra, pattern) in enumerate(cases):
        message, _unused = _failed(bed, root, f"vnc-miss{i}-{int(time.time())}", inv, **extra)
        assert re.fullmatch(pattern, message), message
    home = Path(os.path.expanduser(f"~{CLUSTER_USER}"))
    mode = home.stat().st_mode & 0o7777
    os.chmod(home, 0o500)
    try:
        message, _unused = _failed(bed, root, f"vnc-home-{int(time.time())}", inv)
    finally:
        os.chmod(home, mode)
    assert re.fullmatch(rf"the home directory {home} is not writable on {node} \(.*\)", message), message


def test_display_in_use_is_failed_and_a_dead_servers_files_are_reclaimed(desktop_bed, root):
    """A live X server's display is refused (its files untouched); a dead one's lock and socket are taken over."""
    bed = desktop_bed
    inv = cluster_inventory(bed, "slurm")
    display = 97
    lock, sock = Path(lock_path(display)), Path(socket_path(display))
    live = subprocess.Popen(["sleep", "300"])
    try:
        lock.write_text(f"{live.pid:10d}\n")
        message, _unused = _failed(bed, root, f"vnc-inuse-{int(time.time())}", inv, vnc_display=display)
        assert message.startswith(f"vnc_display: display :{display} is in use on compute"), message
        assert lock.read_text().strip() == str(live.pid)
    finally:
        live.kill()
        live.wait()
        lock.unlink(missing_ok=True)
    # the files of a dead server of the same user: the session reclaims them
    bind = f"import socket; s = socket.socket(socket.AF_UNIX); s.bind('{sock}')"
    bed.run("compute1", ["sh", "-c", f"printf '%10d\\n' 999999 > {lock}; python3 -c \"{bind}\""],
            user=CLUSTER_USER, check=True)
    assert lock.exists() and sock.exists() and lock.stat().st_uid != 0
    sid = f"vnc-stale-{int(time.time())}"
    res = start(bed, root, "vnc", sid, inv=inv, vnc_display=display)
    try:
        assert res.rc == 0, failure_text(res)
        f = session_facts(root, sid)
        assert f["display"] == display
        assert lock.read_text().strip() != "999999"
    finally:
        cancel(bed, root, sid, inv)
    assert_nothing_left(bed, f, sid)
