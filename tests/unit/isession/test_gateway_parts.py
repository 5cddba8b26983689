"""The gateway's pure parts: redirects, login tokens, secrets, socket owners, header rules, the start form."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from isession import config
from isession.gateway import auth, ownership, parse_listen, proxy
from isession.gateway.appauth import AppAuth
from isession.gateway.server import form_inputs

from ansible_collections.hpc.interactive.plugins.module_utils import _listeners

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("given", "expected"), [
    ("/me/1234/lab?x=1", "/me/1234/lab?x=1"), ("/", "/"), (None, "/"), ("", "/"),
    ("//evil.example/x", "/"), ("/\\evil.example", "/"), ("https://evil.example/", "/"), ("javascript:x", "/"),
    ("/ok\\back", "/"), ("/a b", "/"), ("/a\nb", "/"), ("relative", "/"),
])
def test_safe_next_only_keeps_local_paths(given, expected):
    assert auth.safe_next(given) == expected


def test_logins_issue_lookup_revoke_expire(tmp_path):
    logins = auth.Logins(tmp_path / "logins", ttl=60)
    token = logins.issue("alice", now=1000.0)
    files = list((tmp_path / "logins").iterdir())
    assert len(files) == 1 and token not in files[0].name and token not in files[0].read_text()
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert logins.lookup(token, now=1001.0).user == "alice"
    # a restarted gateway (a new object) knows the login from its file
    again = auth.Logins(tmp_path / "logins", ttl=60)
    assert again.lookup(token, now=1001.0).csrf == logins.lookup(token, now=1001.0).csrf
    assert again.lookup(token[:-1] + ("A" if token[-1] != "A" else "B"), now=1001.0) is None
    assert again.lookup("../../etc/passwd") is None and again.lookup(None) is None
    assert again.lookup(token, now=1061.0) is None  # expired, and removed
    assert not list((tmp_path / "logins").iterdir())
    other = logins.issue("bob")
    logins.revoke(other)
    assert auth.Logins(tmp_path / "logins", ttl=60).lookup(other) is None


def test_login_secret_file_rules(tmp_path):
    path = tmp_path / "cfg" / "gateway.secret"
    assert auth.ensure_secret(path) and not auth.ensure_secret(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(auth.read_secret(path)) >= 16
    os.chmod(path, 0o640)
    with pytest.raises(auth.AuthError, match="readable by others"):
        auth.read_secret(path)
    os.chmod(path, 0o600)
    user = auth.User("me", tmp_path, os.getuid(), os.getgid(), path, tmp_path / "state")
    assert auth.check_password(user, auth.read_secret(path))
    assert not auth.check_password(user, "wrong") and not auth.check_password(user, "")


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 11 1 0 100 0 0 10 0
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 12 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  2000        0 13 1 0 20 4 30 10 -1
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  2000        0 14 1 0 100 0 0 10 0
"""  # noqa: E501 - the kernel's own line length


def test_listener_owners_come_from_the_socket_tables(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    (tmp_path / "net" / "tcp6").write_text(TCP6)
    proc = str(tmp_path)
    assert ownership.listener_belongs_to_user(8080, 1000, proc)
    assert not ownership.listener_belongs_to_user(8080, 2000, proc)  # an established socket is no listener
    assert not ownership.listener_belongs_to_user(9999, 1000, proc)  # nothing listens
    cache = ownership.OwnershipCache(read=lambda: _listeners.read_listeners(proc))
    assert cache.ok(8080, 1000) and not cache.ok(8080, 2000)


def test_ownership_cache_reads_once_per_ttl_and_rechecks_a_refusal():
    reads = []
    table = {8080: 1000}

    def read():
        reads.append(1)
        return [_listeners.Listener("127.0.0.1", port, uid, 1) for port, uid in table.items()]

    cache = ownership.OwnershipCache(ttl=1.0, recheck=0.1, read=read)
    assert cache.ok(8080, 1000, now=10.0) and cache.ok(8080, 1000, now=10.5) and len(reads) == 1
    table[8080] = 2000  # the port changed hands: seen at the next read, at most ttl later
    assert cache.ok(8080, 1000, now=10.9) and not cache.ok(8080, 1000, now=11.1) and len(reads) == 2
    table[9090] = 1000  # a listener that just came up is seen after `recheck`
    assert not cache.ok(9090, 1000, now=11.15) and cache.ok(9090, 1000, now=11.3)


def test_ownership_cache_refuses_every_port_when_the_tables_cannot_be_read():
    def read():
        raise OSError("no /proc")

    assert not ownership.OwnershipCache(read=read).ok(8080, 1000)


def test_strip_cookie_removes_only_the_gateways():
    assert proxy.strip_cookie("a=1; isession_gateway=XYZ; _xsrf=2", auth.COOKIE) == "a=1; _xsrf=2"
    assert proxy.strip_cookie("isession_gateway=XYZ", auth.COOKIE) == ""
    assert proxy.strip_cookie("isession_gateway_other=1", auth.COOKIE) == "isession_gateway_other=1"


@pytest.mark.slow
def test_app_auth_entries_come_from_running_the_service_roles():
    app = AppAuth(REPO / ".cache" / "collections")  # the checkout as ansible_collections.hpc.interactive
    for service in ("jupyterlab", "nginx", "code_server"):
        app.load(service)
    assert app.header("jupyterlab", "S") == ("Authorization", "token S")
    assert app.header("nginx", "S") == ("Authorization", "Bearer S")
    assert app.header("code_server", "S") is None and app.spec("code_server")["type"] == "form"
    assert "x-isession-token" in app.drop_headers("nginx")
    assert app.load("no_such_service") == {} and app.header("no_such_service", "S") is None


def info(**over):
    base = {"service": "jupyterlab", "service_inputs": [
        {"name": "jupyterlab_root_dir", "type": "str", "default": "", "choices": None, "required": False},
        {"name": "jupyterlab_extra_args", "type": "list", "default": [], "choices": None, "required": False}],
        "session_inputs": [
        {"name": "session_cpus", "type": "int", "default": 1, "choices": None, "required": False},
        {"name": "session_url", "type": "str", "default": "/me", "choices": ["/me", "/sme"], "required": False},
        {"name": "session_root", "type": "str", "default": "", "choices": None, "required": False}]}
    base.update(over)
    return base


def test_form_inputs_keep_what_differs_from_the_defaults():
    form = {"target": "compute", "resource": "cl", "in_jupyterlab_root_dir": "  ~/work ",
            "in_jupyterlab_extra_args": "--a\n\n--b=1 2\n", "in_session_cpus": "1", "in_session_url": "/me",
            "in_session_root": "/tmp/evil", "idle_timeout": "1.5"}
    target, resource, inputs, idle = form_inputs(info(), form, ["cl"])
    assert (target, resource, idle) == ("compute", "cl", 90.0)
    assert inputs == {"jupyterlab_root_dir": "~/work", "jupyterlab_extra_args": ["--a", "--b=1 2"]}


@pytest.mark.parametrize(("form", "message"), [
    ({"target": "mars"}, "target"), ({"target": "compute", "resource": "nope"}, "resource"),
    ({"in_session_cpus": "two"}, "session_cpus"), ({"in_session_url": "/x"}, "session_url"),
    ({"idle_timeout": "-1"}, "idle_timeout"), ({"idle_timeout": "soon"}, "idle_timeout"),
])
def test_form_inputs_refuse_bad_values_naming_the_field(form, message):
    with pytest.raises(config.UsageError, match=message):
        form_inputs(info(), form, ["cl"])


def test_listen_address():
    assert parse_listen("127.0.0.1:8181") == ("127.0.0.1", 8181)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8181", "host:", "host:99999", ":80"):
        with pytest.raises(config.UsageError, match="--listen"):
            parse_listen(bad)


def test_logins_sweep_removes_only_expired(tmp_path):
    logins = auth.Logins(tmp_path, ttl=10)
    old = logins.issue("a", now=time.time() - 100)
    new = logins.issue("b")
    assert logins.sweep() == 1
    assert logins.lookup(new) is not None and logins.lookup(old) is None


def rfb_exchange(password: str, chunk: int):
    """Drive rfb.Handshake with a scripted VNC server and browser, the bytes cut into ``chunk``-sized frames."""
    from isession.gateway import rfb  # noqa: PLC0415

    hs = rfb.Handshake(password)
    challenge = bytes(range(16))
    to_client, to_server = b"", b""

    def feed(side: str, data: bytes) -> None:
        nonlocal to_client, to_server
        for i in range(0, len(data), chunk):
            a, b = (hs.from_server if side == "server" else hs.from_client)(data[i:i + chunk])
            to_client, to_server = to_client + a, to_server + b

    feed("server", b"RFB 003.008\n")
    feed("client", b"RFB 003.008\n")
    feed("server", bytes([2, 16, 2]) + challenge)  # types Tight(16) and VncAuth(2), then the challenge
    assert to_server == b"RFB 003.008\n" + bytes([2]) + rfb.vnc_response(password, challenge)
    feed("server", b"\0\0\0\0")  # SecurityResult OK
    feed("client", bytes([1, 1]))  # the browser picks None, then ClientInit (shared)
    assert hs.done and not hs.failed
    return to_client, to_server, hs


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_rfb_handshake_answers_the_password_and_offers_the_browser_none(chunk):
    to_client, to_server, _rest = rfb_exchange("pa55word", chunk)
    assert to_client == b"RFB 003.008\n" + bytes([1, 1]) + b"\0\0\0\0"
    assert to_server.endswith(bytes([1]))  # the ClientInit went on to the server


def test_rfb_response_depends_on_the_password_and_is_des():
    from isession.gateway import rfb  # noqa: PLC0415

    challenge = bytes(range(16))
    one, two = rfb.vnc_response("secret12", challenge), rfb.vnc_response("secret13", challenge)
    assert len(one) == 16 and one != two and one[:8] != one[8:]
    assert rfb.vnc_response("secret12" + "ignored", challenge) == one  # VNC reads 8 characters


def test_rfb_refused_password_is_told_to_the_browser():
    from isession.gateway import rfb  # noqa: PLC0415

    hs = rfb.Handshake("wrong")
    hs.from_server(b"RFB 003.008\n")
    hs.from_client(b"RFB 003.008\n")
    hs.from_server(bytes([1, 2]) + bytes(16))
    to_client, _rest = hs.from_server(b"\0\0\0\1")
    assert hs.failed and to_client[0] == 0 and b"refused" in to_client


def test_rfb_server_without_vnc_auth_is_passed_through():
    from isession.gateway import rfb  # noqa: PLC0415

    hs = rfb.Handshake("x")
    assert hs.from_server(b"RFB 003.008\n") == (b"RFB 003.008\n", b"")
    assert hs.from_client(b"RFB 003.008\n") == (b"", b"RFB 003.008\n")
    assert hs.from_server(bytes([1, 1])) == (bytes([1, 1]), b"") and hs.done


def test_form_login_cookie_is_forgotten_when_the_app_asks_for_a_login_again(tmp_path):
    app = AppAuth(None, {"code_server": {"type": "form", "path": "login", "field": "password"}})
    key = (str(tmp_path), "S")
    app._form_cookies[key] = "code-server-session=abc"
    app.check_answer(tmp_path, "code_server", 200, "")
    app.check_answer(tmp_path, "code_server", 302, "./?folder=x")
    assert key in app._form_cookies
    app.check_answer(tmp_path, "code_server", 302, "/me/1234/login?to=%2F")
    assert key not in app._form_cookies
