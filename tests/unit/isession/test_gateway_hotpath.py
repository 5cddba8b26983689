"""The gateway's proxy path and its caches: a real gateway application and a real backend on loopback.

What is cached on the proxy's path must never outlive what it stands for: a session that ends, a login that is
revoked (by this process or another worker), a record that is rewritten, a port that changes hands. Each test
changes the files (or sockets) the way the rest of the system does and checks the very next request.
"""
from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from isession.gateway import auth, ownership, store
from isession.gateway.server import Gateway, Settings

from ansible_collections.hpc.interactive.plugins.module_utils import _listeners, _service_file, _state

NGINX_AUTH = {"type": "header", "header": "Authorization", "format": "Bearer {secret}"}


def make_session(root: Path, sid: str, port: int) -> str:
    """A running session record as a start writes it (``_state`` and ``_service_file``); returns its app secret."""
    _state.run_op("create", str(root), sid, {"service": "nginx", "target": "workspace", "url": "/me",
                                             "ports": {"workspace": port}})
    _state.run_op("update", str(root), sid, {"step": "running"})
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=str(port), slug="",
                                      job_status="Running")
    return (root / sid / "secret").read_text().strip()  # made by the create, 0600


def user(name: str, root: Path, state: Path) -> auth.User:
    return auth.User(name, root, os.getuid(), os.getgid(), None, state / "users" / name)


class Rig:
    """A gateway (no idle cancel, no watcher: ``primary=False``) and one backend counting what reaches it."""

    def __init__(self, tmp: Path, names=("alice",)) -> None:
        self.tmp = tmp
        self.roots = {n: tmp / n / "sessions" for n in names}
        for root in self.roots.values():
            root.mkdir(parents=True, mode=0o700)
        state = tmp / "state"
        self.users = {n: user(n, r, state) for n, r in self.roots.items()}
        self.gw = Gateway(Settings(users=self.users, multi=len(names) > 1, state_dir=state, primary=False))
        self.gw.appauth.specs["nginx"] = dict(NGINX_AUTH)  # the nginx role's entry, without running its play
        self.seen = []  # (path, headers) of every request the backend got

    async def _backend(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers)))
        return web.Response(text="hello from the app\n")

    async def __aenter__(self) -> Rig:
        back = web.Application()
        back.router.add_route("*", "/{tail:.*}", self._backend)
        self.back = web.AppRunner(back)
        await self.back.setup()
        site = web.TCPSite(self.back, "127.0.0.1", 0)
        await site.start()
        self.port = self.back.addresses[0][1]
        self.front = web.AppRunner(self.gw.app())
        await self.front.setup()
        site = web.TCPSite(self.front, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.front.addresses[0][1]}"
        self.client = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.front.cleanup()
        await self.back.cleanup()

    def login(self, name: str) -> str:
        return self.gw.logins.issue(name)

    async def get(self, path: str, token: str, **headers) -> tuple:
        headers["Cookie"] = f"a=1; {auth.COOKIE}={token}; b=2"
        async with self.client.get(self.base + path, headers=headers, allow_redirects=False) as resp:
            return resp.status, await resp.text()


def run(coro):
    return asyncio.run(coro)


def test_proxied_request_gets_the_secret_and_never_the_gateway_cookie(tmp_path):
    async def go():
        async with Rig(tmp_path) as rig:
            secret = make_session(rig.roots["alice"], "nginx-1", rig.port)
            assert secret
            status, text = await rig.get(f"/me/{rig.port}/x?y=1", rig.login("alice"))
            assert (status, text) == (200, "hello from the app\n")
            path, headers = rig.seen[-1]
            assert path == f"/me/{rig.port}/x"
            assert headers["Authorization"] == f"Bearer {secret}"
            assert headers["Cookie"] == "a=1; b=2" and auth.COOKIE not in headers["Cookie"]

    run(go())


def test_an_ended_session_is_refused_from_the_next_request_without_contacting_the_app(tmp_path):
    async def go():
        async with Rig(tmp_path) as rig:
            root = rig.roots["alice"]
            make_session(root, "nginx-1", rig.port)
            token = rig.login("alice")
            assert (await rig.get(f"/me/{rig.port}/", token))[0] == 200
            reached = len(rig.seen)
            # the watcher (or a cancel) records the end: the next request, not a later one, is refused
            _state.run_op("update", str(root), "nginx-1", {"step": "cancelled"})
            _service_file.update_service_file(str(root / "nginx-1" / "service.json"), job_status="Cancelled")
            status, _body = await rig.get(f"/me/{rig.port}/", token)
            assert status == 403 and len(rig.seen) == reached
            # a session directory removed by hand: refused as well
            make_session(root, "nginx-2", rig.port)
            await asyncio.sleep(store.RESCAN_EVERY)  # a port nobody owned is looked up again after this
            assert (await rig.get(f"/me/{rig.port}/", token))[0] == 200
            reached = len(rig.seen)
            for name in os.listdir(root / "nginx-2"):
                path = root / "nginx-2" / name
                if path.is_file():
                    path.unlink()
            status, _body = await rig.get(f"/me/{rig.port}/", token)
            assert status == 403 and len(rig.seen) == reached

    run(go())


def test_another_users_port_stays_forbidden(tmp_path):
    async def go():
        async with Rig(tmp_path, names=("alice", "bob")) as rig:
            make_session(rig.roots["alice"], "nginx-1", rig.port)
            alice, bob = rig.login("alice"), rig.login("bob")
            assert (await rig.get(f"/me/{rig.port}/", alice))[0] == 200
            reached = len(rig.seen)
            for _i in range(3):  # alice's session is in every cache now; bob still gets nothing
                assert (await rig.get(f"/me/{rig.port}/", bob))[0] == 403
                ws = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": rig.base}
                assert (await rig.get(f"/me/{rig.port}/ws", bob, **ws))[0] == 403
            assert len(rig.seen) == reached

    run(go())


def test_a_revoked_login_is_refused_at_once_even_by_another_worker(tmp_path):
    async def go():
        async with Rig(tmp_path) as rig:
            make_session(rig.roots["alice"], "nginx-1", rig.port)
            token = rig.login("alice")
            assert (await rig.get(f"/me/{rig.port}/", token))[0] == 200
            reached = len(rig.seen)
            # another worker's logout removes the login's file; this process still has the login in its cache
            (rig.gw.logins.dir / auth.Logins._key(token)).unlink()
            status, _body = await rig.get(f"/me/{rig.port}/", token)
            assert status == 401 and len(rig.seen) == reached
            # this process's own logout
            other = rig.login("alice")
            assert (await rig.get(f"/me/{rig.port}/", other))[0] == 200
            rig.gw.logins.revoke(other)
            assert (await rig.get(f"/me/{rig.port}/", other))[0] == 401

    run(go())


def test_a_rewritten_record_moves_the_port(tmp_path):
    root = tmp_path / "sessions"
    root.mkdir(mode=0o700)
    make_session(root, "nginx-1", 9001)
    index = store.UserSessions(user("alice", root, tmp_path))
    assert index.by_port(9001).id == "nginx-1"
    _service_file.update_service_file(str(root / "nginx-1" / "service.json"), port="9002")
    assert index.by_port(9001) is None  # the cached entry is re-validated by its files' stat, not trusted
    index._last_scan = 0.0  # past RESCAN_EVERY
    assert index.by_port(9002).id == "nginx-1"


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("a=1", None), (f"{auth.COOKIE}=T", "T"), (f"a=1; {auth.COOKIE}=T; b=2", "T"),
    (f"x_{auth.COOKIE}=T", None), (f"{auth.COOKIE}_x=T", None), (f"{auth.COOKIE}=A; {auth.COOKIE}=B", "B"),
])
def test_login_cookie_is_found_in_the_cookie_header(header, expected):
    assert auth.cookie_token(header) == expected


def test_netlink_listeners_are_the_proc_tables_ones():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        mine = _listeners.Listener("127.0.0.1", port, os.geteuid(), os.fstat(sock.fileno()).st_ino)
        assert mine in ownership.dump_listening() and mine in ownership.read_listening()
        for _i in range(5):  # other processes open and close listeners meanwhile: equal on one of a few tries
            if set(ownership.dump_listening()) == set(ownership.read_listening()):
                break
        else:
            pytest.fail("netlink and /proc/net/tcp disagree on the listening sockets")
        cache = ownership.OwnershipCache()
        assert cache.ok(port, os.geteuid()) and not cache.ok(port, os.geteuid() + 1)
    assert mine not in ownership.dump_listening()


def test_the_session_list_is_read_again_where_a_record_changed(tmp_path):
    from isession import sessions  # noqa: PLC0415

    root = tmp_path / "sessions"
    root.mkdir(mode=0o700)
    for i in range(3):
        make_session(root, f"nginx-{i}", 9001 + i)
    index = store.UserSessions(user("alice", root, tmp_path))

    def same():  # what the CLI reads from the same files
        return [(s.id, s.status, s.record.get("step")) for s in index.all()] == \
            [(s.id, s.status, s.record.get("step")) for s in sessions.all_sessions(root)]

    assert [s.id for s in index.all()] == ["nginx-0", "nginx-1", "nginx-2"] and same()
    _state.run_op("update", str(root), "nginx-1", {"step": "cancelled"})
    _service_file.update_service_file(str(root / "nginx-1" / "service.json"), job_status="Cancelled")
    assert not store.is_live(next(s for s in index.all() if s.id == "nginx-1")) and same()
    for name in os.listdir(root / "nginx-2"):
        if (root / "nginx-2" / name).is_file():
            (root / "nginx-2" / name).unlink()
    assert [s.id for s in index.all()] == ["nginx-0", "nginx-1"] and same()
    make_session(root, "nginx-3", 9004)
    assert [s.id for s in index.all()] == ["nginx-0", "nginx-1", "nginx-3"] and same()
