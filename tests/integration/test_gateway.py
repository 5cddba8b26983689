"""``isession gateway``: who may reach what, logins, the app secret, pinned https backends, idle auto-cancel.

Everything runs in the bed's workspace host as its users: the gateways, the test backends (an HTTP/WebSocket echo
server that logs every TCP connection it accepts) and the clients. Sessions are either written through the
collection's own ``_state``/``_service_file`` (for a test backend) or started with ``isession start`` (idle
auto-cancel, which must go through the real cancel path).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time

import pytest
from cli_support import REPO, Cli
from gateway_support import Backend, GatewayRun, fake_session, install_tools, stop_all, wait_for
from sessions_common import listening

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gw(bed):
    cli = Cli(bed)
    other = Cli(bed, user="cluser")
    for c in (cli, other):
        install_tools(c)
    started = []
    try:
        own = Backend(cli, 9501)
        started.append(own)
        fake_session(cli, "gw-own", 9501)
        gateway = GatewayRun(cli, 9181).start()
        started.append(gateway)
        gateway2 = GatewayRun(other, 9182).start()
        started.append(gateway2)
        yield {"cli": cli, "other": other, "own": own, "gw": gateway, "gw2": gateway2, "started": started}
    finally:
        stop_all(started)


def secret_of(cli: Cli, sid: str) -> str:
    return (cli.root / sid / "secret").read_text().strip()


def test_owner_reaches_own_session_with_the_app_secret_and_without_the_gateway_cookie(gw):
    g, cli = gw["gw"], gw["cli"]
    cookie = g.login()
    res = g.http("GET", "/me/9501/echo?a=1&b=%2Fx", cookie, "--header", "Cookie2:z", "--header",
                 "Authorization:Bearer forged-by-the-browser")
    assert res["status"] == 200, res
    seen = json.loads(res["body"])
    assert seen["raw_path"] == "/me/9501/echo?a=1&b=%2Fx"  # path and query unchanged
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {secret_of(cli, 'gw-own')}"  # the app's secret, supplied
    assert "isession_gateway" not in headers.get("cookie", "")
    assert cookie not in json.dumps(seen)
    ws = g.ws("/me/9501/ws", cookie)
    assert ws == {"status": 101, "echo": "ping-through-gateway"}


def peak_rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))


def test_bodies_stream_through_without_being_held_whole(gw):
    """256 MiB down and 64 MiB up through the gateway: its peak memory grows by far less than either body."""
    g, cli = gw["gw"], gw["cli"]
    cookie = g.login()
    before = peak_rss_kib(g.proc.pid)  # nsenter and setpriv exec: the popen's pid is the gateway's
    size = 256 * 1024 * 1024
    down = cli.bed.run("workspace", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H",
                                     f"Cookie: isession_gateway={cookie}", f"{g.base}/me/9501/big?n={size}"],
                       user=cli.user, timeout=120)
    assert down.stdout.split() == ["200", str(size)], down.stdout + down.stderr
    up = cli.bed.run("workspace", ["bash", "-c", f"head -c {64 * 1024 * 1024} /dev/zero | curl -sf -H "
                                   f"'Cookie: isession_gateway={cookie}' -H 'Content-Type: application/octet-stream' "
                                   f"-T - {g.base}/me/9501/echo"], user=cli.user, timeout=120)
    assert up.returncode == 0 and json.loads(up.stdout)["received"] == 64 * 1024 * 1024, up.stdout + up.stderr
    grown = peak_rss_kib(g.proc.pid) - before
    assert grown < 32 * 1024, f"the gateway's peak memory grew by {grown} KiB"


def test_websocket_from_another_origin_is_refused_without_contacting_the_backend(gw):
    g, own = gw["gw"], gw["own"]
    cookie = g.login()
    before = own.accepts()
    assert g.ws("/me/9501/ws", cookie, origin="http://evil.example")["status"] == 403
    assert own.accepts() == before


def test_second_user_gets_403_on_the_first_users_port_http_and_websocket(gw):
    g2, other, own = gw["gw2"], gw["other"], gw["own"]
    cookie = g2.login()
    before = own.accepts()
    assert g2.http("GET", "/me/9501/echo", cookie)["status"] == 403
    assert g2.ws("/me/9501/ws", cookie, origin=g2.base)["status"] == 403
    # a record of the second user's own claiming the first user's port: the listener is not theirs, still 403
    fake_session(other, "gw-claims-9501", 9501)
    assert g2.http("GET", "/me/9501/echo", cookie)["status"] == 403
    assert g2.ws("/me/9501/ws", cookie, origin=g2.base)["status"] == 403
    assert own.accepts() == before, "the gateway connected to a port that is not the user's"


def test_a_port_no_session_owns_gets_403_and_no_connection(gw):
    g, cli = gw["gw"], gw["cli"]
    listener = Backend(cli, 9502)
    try:
        cookie = g.login()
        assert g.http("GET", "/me/9502/echo", cookie)["status"] == 403
        assert g.http("POST", "/me/9502/echo", cookie, "--data", "x=1")["status"] == 403
        assert g.ws("/me/9502/ws", cookie)["status"] == 403
        assert g.http("GET", "/sme/9501/echo", cookie)["status"] == 403  # /me session asked as /sme
        assert listener.accepts() == 0
    finally:
        listener.stop()


def test_forged_tampered_and_logged_out_cookies_are_refused(gw):
    g, own = gw["gw"], gw["own"]
    before = own.accepts()
    forged = secrets.token_urlsafe(32)
    cookie = g.login()
    tampered = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
    for bad in (forged, tampered, "../../etc/passwd", "x" * 43):
        assert g.http("GET", "/me/9501/echo", bad)["status"] == 401, bad
        assert g.ws("/me/9501/ws", bad)["status"] in (401, 403)
        page = g.http("GET", "/", bad)
        assert page["status"] == 302 and page["location"].startswith("/login")
    assert own.accepts() == before
    # logout (a POST with the page's CSRF token) invalidates the cookie for good
    page = g.http("GET", "/", cookie)
    csrf = re.search(r'name="_csrf" value="([^"]+)"', page["body"]).group(1)
    assert g.http("POST", "/logout", cookie, "--data", "_csrf=wrong")["status"] == 403
    assert g.http("GET", "/me/9501/echo", cookie)["status"] == 200
    assert g.http("POST", "/logout", cookie, "--data", f"_csrf={csrf}")["status"] == 303
    assert g.http("GET", "/me/9501/echo", cookie)["status"] == 401


def test_a_restarted_gateway_keeps_logins_and_sessions(gw):
    cli = gw["cli"]
    first = GatewayRun(cli, 9188).start()
    cookie = first.login()
    assert first.http("GET", "/me/9501/echo", cookie)["status"] == 200
    first.stop()
    again = GatewayRun(cli, 9188).start()  # nothing but the session root and its .gateway directory carried over
    try:
        assert again.http("GET", "/me/9501/echo", cookie)["status"] == 200
        assert "gw-own" in again.http("GET", "/", cookie)["body"]
    finally:
        again.stop()


def test_expired_cookie_is_refused(gw):
    cli = gw["cli"]
    short = GatewayRun(cli, 9183, "--login-ttl", "0.05").start()  # 3 s
    try:
        cookie = short.login()
        assert short.http("GET", "/me/9501/echo", cookie)["status"] == 200
        time.sleep(3.5)
        assert short.http("GET", "/me/9501/echo", cookie)["status"] == 401
    finally:
        short.stop()


def test_login_refuses_wrong_secret_and_open_redirects(gw):
    g = gw["gw"]
    bad = g.tool("client.py", "login", g.base, "not-the-secret-at-all")
    assert bad["status"] == 401 and not bad["cookie"]
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
                             ("javascript:alert(1)", "/"), ("/me/9501/echo?x=1", "/me/9501/echo?x=1")):
        res = g.http("POST", "/login", None, "--data", f"secret={g.secret}&next={target}")
        assert res["status"] == 303 and res["location"] == expected, (target, res)
    assert re.search(r"HttpOnly", " ".join(res["set_cookie"]), re.I)
    assert re.search(r"SameSite=Strict", " ".join(res["set_cookie"]), re.I)


def test_session_owned_secret_file_is_required_mode_0600(gw, tmp_path):
    cli = gw["cli"]
    loose = cli.bed.write_user_file(cli.user, cli.tmp / "loose.secret", "x" * 32 + "\n", mode=0o644)
    cp = cli.bed.run("workspace", [str(cli.bed.venv / "bin" / "python"), "-m", "isession", "gateway", "--listen",
                                   "127.0.0.1:9189", "--secret-file", str(loose)], user=cli.user, env=cli.env)
    assert cp.returncode == 2 and "readable by others" in cp.stderr


def test_https_backend_must_present_the_pinned_certificate(gw):
    g, cli = gw["gw"], gw["cli"]
    certs = {}
    for name in ("good", "other"):
        key, crt = cli.tmp / f"{name}.key", cli.tmp / f"{name}.pem"
        cp = cli.bed.run("workspace", ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                                       "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                         user=cli.user, timeout=60)
        assert cp.returncode == 0, cp.stderr
        certs[name] = (crt, key)
    tls = Backend(cli, 9503, prefix="/sme", tls=[str(certs["good"][0]), str(certs["good"][1])])
    try:
        d = fake_session(cli, "gw-tls", 9503, url="/sme")
        cookie = g.login()
        assert g.http("GET", "/sme/9503/echo", cookie)["status"] == 502  # nothing pinned yet
        pinned = d / "pinned-cert.pem"
        cli.bed.write_user_file(cli.user, pinned, certs["other"][0].read_text())
        assert g.http("GET", "/sme/9503/echo", cookie)["status"] == 502  # another certificate: refused
        cli.bed.write_user_file(cli.user, pinned, certs["good"][0].read_text())
        res = g.http("GET", "/sme/9503/echo", cookie)
        assert res["status"] == 200 and json.loads(res["body"])["path"] == "/sme/9503/echo"
    finally:
        tls.stop()


def test_multi_user_mode_maps_each_login_to_its_own_root(gw):
    cli, other, own = gw["cli"], gw["other"], gw["own"]
    bed = cli.bed
    root_tmp = bed.user_tmpdir(None)
    secrets_ = {}
    for c in (cli, other):
        secrets_[c.user] = bed.write_user_file(None, root_tmp / f"{c.user}.secret",
                                               f"{c.user}-multi-secret-0123456789\n")
    users = root_tmp / "users.yml"
    users.write_text("users:\n" + "".join(f"  {c.user}: {{root: {c.root}, secret_file: {secrets_[c.user]}}}\n"
                                          for c in (cli, other)))
    multi = GatewayRun(cli, 9185, "--users", str(users), "--state-dir", str(root_tmp / "state"), as_root=True)
    header = GatewayRun(cli, 9186, "--users", str(users), "--state-dir", str(root_tmp / "state2"),
                        "--trusted-header", "X-Remote-User", "--trusted-proxy", "127.0.0.2", as_root=True)
    try:
        multi.start()
        header.start()
        before = own.accepts()
        c_other = multi.login(f"{other.user}-multi-secret-0123456789", user=other.user)
        assert multi.http("GET", "/me/9501/echo", c_other)["status"] == 403
        assert multi.ws("/me/9501/ws", c_other)["status"] == 403
        assert own.accepts() == before
        bad = multi.tool("client.py", "login", multi.base, f"{other.user}-multi-secret-0123456789", "--user", cli.user)
        assert bad["status"] == 401  # one user's secret does not log in another
        c_own = multi.login(f"{cli.user}-multi-secret-0123456789", user=cli.user)
        assert multi.http("GET", "/me/9501/echo", c_own)["status"] == 200
        # the front proxy's header counts only from the front proxy's address
        as_user = ["--header", f"X-Remote-User:{cli.user}"]
        assert header.http("GET", "/me/9501/echo", None, *as_user)["status"] == 403
        assert header.http("GET", "/me/9501/echo", None, *as_user, "--source", "127.0.0.2")["status"] == 200
        as_other = ["--header", f"X-Remote-User:{other.user}", "--source", "127.0.0.2"]
        assert header.http("GET", "/me/9501/echo", None, *as_other)["status"] == 403
        unknown = ["--header", "X-Remote-User:nobody-here", "--source", "127.0.0.2"]
        assert header.http("GET", "/", None, *unknown)["status"] == 403
    finally:
        multi.stop()
        header.stop()


def test_idle_auto_cancel_ends_an_unused_session_and_leaves_a_used_one(gw):
    cli = gw["cli"]
    ids = []
    for _i in range(2):
        res = json.loads(cli.run("start", "nginx", "--json", check_rc=0, timeout=300).stdout)
        ids.append(res["id"])
    used, unused = ids
    ports = {sid: cli.service(sid)["PORT"] for sid in ids}
    idle = GatewayRun(cli, 9187, "--idle-timeout", "0.25").start()  # 15 s
    try:
        cookie = idle.login()
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline and cli.service(unused)["JOB_STATUS"] == "Running":
            assert idle.http("GET", f"/me/{ports[used]}/", cookie)["status"] == 200
            time.sleep(2)
        assert wait_for(lambda: cli.service(unused)["JOB_STATUS"] == "Cancelled", 30), cli.service(unused)
        assert cli.service(used)["JOB_STATUS"] == "Running"
        assert cli.state(unused)["cancel_requested"] is True  # the normal cancel path: tombstone first
        assert (cli.root / ".gateway" / "cancels" / f"{unused}.log").exists()
        assert "had no traffic" in idle.log_text()
    finally:
        idle.stop()
        for sid in ids:
            cli.run("cancel", sid, timeout=300)


def _vnc_password_function(bed):
    """The collection's own derivation of a desktop session's VNC password, when the collection has desktops."""
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if str(bed.collections_path) not in sys.path:
        sys.path.insert(0, str(bed.collections_path))
    try:
        return importlib.import_module("ansible_collections.hpc.interactive.plugins.module_utils._desktop").vnc_password
    except ImportError:
        return None


@pytest.mark.skipif(not (REPO / "roles" / "vnc" / "tasks" / "spec.yml").exists(),
                    reason="no desktop service (roles/vnc) in this checkout yet; runs once it lands")
def test_the_gateway_answers_the_vnc_password_so_novnc_needs_none(gw):
    """A real TigerVNC server (VncAuth only) behind websockify: through the gateway, the browser side is offered
    no authentication at all and gets the desktop's ServerInit; straight to websockify, a password is required."""
    cli, g = gw["cli"], gw["gw"]
    derive = _vnc_password_function(cli.bed)
    assert derive is not None, "roles/vnc exists but module_utils/_desktop.vnc_password does not"
    d = fake_session(cli, "gw-vnc", 9510, service="vnc")
    password = derive(secret_of(cli, "gw-vnc"))
    passwd = cli.tmp / "vnc.passwd"
    # vncpasswd -f turns the password on stdin into the server's (binary) password file
    cp = cli.bed.run("workspace", ["bash", "-c", f"umask 077; vncpasswd -f > {passwd}"], user=cli.user,
                     input=password + "\n")
    assert cp.returncode == 0 and passwd.stat().st_size == 8, cp.stderr
    procs = []
    try:
        procs.append(cli.bed.popen("workspace", ["Xvnc", ":77", "-rfbport", "5977", "-localhost", "-SecurityTypes",
                                                 "VncAuth", "-PasswordFile", str(passwd), "-geometry", "800x600",
                                                 "-desktop", "gateway-test-desktop"], user=cli.user,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(cli.bed.popen("workspace", ["websockify", "127.0.0.1:9510", "127.0.0.1:5977"], user=cli.user,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert wait_for(lambda: listening(cli.bed, "workspace", 9510) and listening(cli.bed, "workspace", 5977), 20)
        cookie = g.login()
        direct = g.tool("client.py", "rfb", "ws://127.0.0.1:9510/websockify")
        assert direct["types"] == [2], direct  # the server itself wants the password
        seen = g.tool("client.py", "rfb", f"ws://127.0.0.1:{g.port}/me/9510/websockify", f"--cookie={cookie}",
                      "--origin", g.base)
        assert seen["types"] == [1] and seen["result"] == 0, seen  # the browser side: no authentication asked
        assert (seen["width"], seen["height"]) == (800, 600) and "gateway-test-desktop" in seen["name"]
        assert d.is_dir()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
