"""``isession gateway``: the aiohttp application - login, pages, the proxy, idle auto-cancel.

Request flow for ``/me/<PORT>/...`` and ``/sme/<PORT>/...`` (HTTP and WebSocket alike), each step answering
without contacting any backend when it fails:

1. who is it: the login cookie (or the trusted front proxy's header) -> a :class:`~.auth.User`; none -> login;
2. whose port: a live session of that user whose service.json has this URL and PORT -> else 403;
3. whose listener: every socket listening on the port belongs to the session's user -> else 403
   (:mod:`.ownership`);
4. WebSocket upgrades: the Origin is the gateway's own -> else 403;
5. forward to ``http(s)://127.0.0.1:<PORT><same path and query>`` with the app's secret added and the gateway's
   cookie removed; ``/sme`` backends must present exactly the certificate the session pinned.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
import yarl
from aiohttp import web

from .. import config
from ..collection import active, find_collection
from ..describe import describe, services
from . import actions, appauth, auth, ownership, pages, proxy, rfb, store

log = logging.getLogger("isession.gateway")
STATIC = Path(__file__).resolve().parent / "static"
PINNED_CERT = "pinned-cert.pem"  # an https (/sme) session's certificate, pinned in its session dir
WARN_BEFORE = 600.0  # warn this many seconds before the walltime ends
IDLE_TICK = 2.0
GC_YOUNG = 50_000  # allocations between two young-generation collections (Python's default: 700)
LOGIN_FAIL_DELAY = 0.5
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8181
    users: Dict[str, auth.User] = field(default_factory=dict)
    multi: bool = False
    state_dir: Path = Path(".")
    trusted_header: Optional[str] = None
    trusted_proxies: Tuple[str, ...] = ()
    public_origin: Optional[str] = None
    login_ttl: float = 12 * 3600.0
    idle_timeout: float = 0.0  # seconds; the start form's default, and the timeout of sessions started elsewhere
    inventory: Optional[Path] = None
    cookie_secure: Optional[bool] = None  # None: when the request came over https
    ownership_ttl: float = 1.0
    workers: int = 1
    primary: bool = True  # the worker that runs idle auto-cancel and starts watchers (the others flush activity)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.logins = auth.Logins(settings.state_dir / "logins", settings.login_ttl)
        self.index = {name: store.UserSessions(u) for name, u in settings.users.items()}
        self.activity = store.Activity()
        self.owned = ownership.OwnershipCache(settings.ownership_ttl)
        self.col = active() or find_collection()
        self.appauth = appauth.AppAuth(self.col.root)
        self.children: List[subprocess.Popen] = []
        self.idle_cancelled: Dict[Tuple[str, str], float] = {}
        self._secrets: Dict[str, Tuple[int, str]] = {}
        self._fingerprints: Dict[str, Tuple[int, Any]] = {}
        self._resources: Optional[List[str]] = None
        self.client: Optional[aiohttp.ClientSession] = None

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application()  # no middleware: each one is two more coroutines on every proxied request
        app.router.add_get("/", self.list_page)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/start/{service}", self.start_form)
        app.router.add_post("/start/{service}", self.start)
        app.router.add_get("/session/{sid}", self.session_page)
        app.router.add_post("/session/{sid}/cancel", self.cancel)
        app.router.add_get("/api/sessions/{sid}", self.session_json)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        for prefix in ("me", "sme"):
            app.router.add_route("*", f"/{prefix}/{{port:[0-9]{{1,5}}}}{{tail:(/.*)?}}", self.proxy)
        app.on_response_prepare.append(self.page_headers)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        # one pooled client for every backend; no cookie jar (cookies pass through), nothing added or decompressed
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None, force_close=False),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        if self.s.primary:
            self.logins.sweep()  # the idle loop's first round starts the watcher of every user with live sessions
        app["idle"] = asyncio.ensure_future(self.idle_loop())
        # The cycle collector, tuned for a proxy. What start-up made (aiohttp, Ansible's module_utils, the
        # collection) lives as long as the process: frozen, out of the full passes that would walk it all. Each
        # young-generation pass walks every object of the requests in flight, whatever the threshold; Python's
        # default (700 allocations) ran one every ~20 requests, 12% of the gateway's CPU under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])

    async def _cleanup(self, app: web.Application) -> None:
        app["idle"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app["idle"]
        self.activity.flush(self.s.users, force=True)
        if self.client:
            await self.client.close()

    def _spawned(self, proc: Optional[subprocess.Popen]) -> None:
        if proc is not None:
            self.children.append(proc)

    async def page_headers(self, request: web.Request, resp: web.StreamResponse) -> None:
        """The gateway's own pages (not the apps' answers) get the strict headers, error pages included."""
        if not request.path.startswith(("/me/", "/sme/")):
            for key, value in PAGE_HEADERS.items():
                resp.headers.setdefault(key, value)

    # ------------------------------------------------------------------ who
    def origins(self, request: web.Request) -> Tuple[str, ...]:
        if self.s.public_origin:
            return (self.s.public_origin.rstrip("/"),)
        return (f"{request.scheme}://{request.host}",)

    def same_origin(self, request: web.Request, *, required: bool) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return not required
        return origin.rstrip("/") in self.origins(request)

    def who(self, request: web.Request) -> Tuple[Optional[auth.User], Optional[auth.Login], Optional[str]]:
        """``(user, login, token_to_set)``; ``user`` None = not logged in. Raises 403 for an untrusted header."""
        token = auth.cookie_token(request.headers.get("Cookie"))
        login = self.logins.lookup(token)
        if self.s.trusted_header:
            if request.remote not in self.s.trusted_proxies:
                raise web.HTTPForbidden(text="this gateway is reached through its front proxy only\n")
            name = request.headers.get(self.s.trusted_header, "")
            user = self.s.users.get(name)
            if user is None:
                raise web.HTTPForbidden(text="the front proxy named no user this gateway knows\n")
            if login is None or login.user != name:
                token = self.logins.issue(name)
                return user, self.logins.lookup(token), token
            return user, login, None
        if login is None or login.user not in self.s.users:
            return None, None, None
        return self.s.users[login.user], login, None

    def _set_cookie(self, request: web.Request, resp: web.StreamResponse, token: str) -> None:
        secure = request.secure if self.s.cookie_secure is None else self.s.cookie_secure
        resp.set_cookie(auth.COOKIE, token, path="/", httponly=True, samesite="Strict", secure=secure,
                        max_age=int(self.s.login_ttl))

    def _need_login(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/login?next=" + _quote(request.path_qs))
        raise web.HTTPUnauthorized(text="log in first\n")

    async def _page_user(self, request: web.Request) -> Tuple[auth.User, auth.Login, Optional[str]]:
        user, login, token = self.who(request)
        if user is None or login is None:
            raise web.HTTPFound("/login?next=" + _quote(request.path_qs))
        return user, login, token

    def _html(self, request: web.Request, text: str, token: Optional[str], status: int = 200) -> web.Response:
        resp = web.Response(text=text, content_type="text/html", status=status)
        if token:
            self._set_cookie(request, resp, token)
        return resp

    async def _form(self, request: web.Request, login: auth.Login) -> Dict[str, str]:
        if not self.same_origin(request, required=False):
            raise web.HTTPForbidden(text="cross-origin form refused\n")
        form = await request.post()
        if not auth.csrf_ok(login, form.get("_csrf")):
            raise web.HTTPForbidden(text="the form's CSRF token is missing or wrong; reload the page\n")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    # ------------------------------------------------------------------ login
    async def login_form(self, request: web.Request) -> web.Response:
        if self.s.trusted_header:
            raise web.HTTPFound("/")
        nxt = auth.safe_next(request.query.get("next"))
        return self._html(request, pages.login_page(nxt, multi=self.s.multi), None)

    async def login(self, request: web.Request) -> web.Response:
        if self.s.trusted_header:
            raise web.HTTPForbidden(text="logins come from the front proxy\n")
        if not self.same_origin(request, required=False):
            raise web.HTTPForbidden(text="cross-origin login refused\n")
        form = await request.post()
        nxt = auth.safe_next(str(form.get("next") or ""))
        name = str(form.get("user") or "") if self.s.multi else next(iter(self.s.users))
        user = self.s.users.get(name)
        if user is None or not auth.check_password(user, str(form.get("secret") or "")):
            await asyncio.sleep(LOGIN_FAIL_DELAY)
            return self._html(request, pages.login_page(nxt, multi=self.s.multi, error="Wrong user name or secret."),
                              None, status=401)
        old = request.cookies.get(auth.COOKIE)
        self.logins.revoke(old)
        resp = web.HTTPSeeOther(nxt)
        self._set_cookie(request, resp, self.logins.issue(user.name))
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        user, login, _token = self.who(request)
        if user is None or login is None:
            raise web.HTTPSeeOther("/login")
        await self._form(request, login)
        self.logins.revoke(request.cookies.get(auth.COOKIE))
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(auth.COOKIE, path="/")
        raise resp

    # ------------------------------------------------------------------ pages
    def _row(self, user: auth.User, sess, now: float) -> Dict[str, Any]:
        left = store.time_left(sess, now) if store.is_live(sess) else None
        idle = store.idle_left(user, sess, self.activity, self.s.idle_timeout, now) if store.is_live(sess) else None
        return {"sess": sess, "live": store.is_live(sess), "time_left": store.fmt_duration(left),
                "idle_left": store.fmt_duration(idle), "warn": left is not None and left <= WARN_BEFORE,
                "warning": _warning(left, idle)}

    async def list_page(self, request: web.Request) -> web.Response:
        user, login, token = await self._page_user(request)
        now = time.time()
        found = await asyncio.to_thread(self.index[user.name].all)
        rows = [self._row(user, s, now) for s in reversed(found)]
        return self._html(request, pages.list_page(rows, services(self.col.path), login.csrf, user.name), token)

    def _describe(self, service: str) -> Dict[str, Any]:
        try:
            return describe(self.col.path, config.check_service(service))
        except (LookupError, config.UsageError):
            raise web.HTTPNotFound(text=f"no service {service!r}\n") from None

    async def _resource_list(self) -> List[str]:
        if self._resources is None:
            self._resources = await asyncio.to_thread(actions.resources, self.s.inventory)
        return self._resources

    async def start_form(self, request: web.Request) -> web.Response:
        user, login, token = await self._page_user(request)
        info = self._describe(request.match_info["service"])
        return self._html(request, pages.start_page(info, await self._resource_list(), login.csrf, user.name,
                                                    idle_default_min=self.s.idle_timeout / 60), token)

    async def start(self, request: web.Request) -> web.Response:
        user, login, _token = await self._page_user(request)
        form = await self._form(request, login)
        info = self._describe(request.match_info["service"])
        try:
            target, resource, inputs, idle = form_inputs(info, form, await self._resource_list())
        except config.UsageError as exc:
            page = pages.start_page(info, await self._resource_list(), login.csrf, user.name,
                                    idle_default_min=self.s.idle_timeout / 60, error=str(exc))
            return self._html(request, page, None, status=400)
        sid = config.new_session_id(info["service"])
        user.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        store.set_session_prefs(user, sid, idle_timeout=idle, service=info["service"], requested=time.time())
        self._spawned(actions.start(user, sid, info["service"], target=target, resource=resource, inputs=inputs,
                                    inventory=self.s.inventory))
        log.info("user %s started %s session %s on %s", user.name, info["service"], sid, target)
        raise web.HTTPSeeOther(f"/session/{sid}")

    def _session_view(self, user: auth.User, sid: str) -> Dict[str, Any]:
        sess = self.index[user.name].get(sid)
        prefs = store.session_prefs(user, sid)
        if sess is None and not prefs:
            raise web.HTTPNotFound(text="no such session\n")
        now = time.time()
        row = self._row(user, sess, now) if sess else {"live": False, "time_left": "-", "idle_left": "-",
                                                       "warning": ""}
        pending = sess is None and self._start_running(user, sid)
        start_log = ""
        if sess is None and not pending:
            start_log = _tail(actions.start_log(user, sid))
        return {"sess": sess, "row": row, "pending": pending, "start_log": start_log}

    def _start_running(self, user: auth.User, sid: str) -> bool:
        requested = store.session_prefs(user, sid).get("requested", 0)
        running = any(p.poll() is None and f"{sid}.inputs.yml" in " ".join(map(str, p.args)) for p in self.children)
        return running or (isinstance(requested, (int, float)) and time.time() - requested < 30)

    async def session_page(self, request: web.Request) -> web.Response:
        user, login, token = await self._page_user(request)
        sid = request.match_info["sid"]
        v = await asyncio.to_thread(self._session_view, user, sid)
        sess, row = v["sess"], v["row"]
        live = row["live"] or v["pending"]
        return self._html(request, pages.session_page(sess, sid, login.csrf, user.name, live=live,
                                                      time_left=row["time_left"], idle_left=row["idle_left"],
                                                      warn=row["warning"], start_log=v["start_log"],
                                                      pending=v["pending"]), token)

    async def session_json(self, request: web.Request) -> web.Response:
        user, _login, _token = self.who(request)
        if user is None:
            raise web.HTTPUnauthorized(text="log in first\n")
        v = await asyncio.to_thread(self._session_view, user, request.match_info["sid"])
        sess, row = v["sess"], v["row"]
        status = sess.status if sess else ("Submitting" if v["pending"] else "Failed")
        message = sess.message if sess else ("" if v["pending"] else "the start ended before the session existed")
        app = pages.app_path(sess) if sess is not None and status == "Running" else ""
        return web.json_response({"id": request.match_info["sid"], "status": status, "message": message,
                                  "app": app, "time_left": row["time_left"], "idle_left": row["idle_left"],
                                  "warning": row["warning"]}, headers={"Cache-Control": "no-store"})

    async def cancel(self, request: web.Request) -> web.Response:
        user, login, _token = await self._page_user(request)
        await self._form(request, login)
        sid = request.match_info["sid"]
        try:
            config.check_session_id(sid)
        except config.UsageError:
            raise web.HTTPNotFound(text="no such session\n") from None
        if not (user.root / sid).is_dir():
            raise web.HTTPNotFound(text="no such session\n")
        self._spawned(actions.cancel(user, sid, self.s.inventory))
        log.info("user %s cancelled session %s", user.name, sid)
        raise web.HTTPSeeOther(f"/session/{sid}")

    # ------------------------------------------------------------------ proxy
    def _secret(self, sess) -> Optional[str]:
        path = os.path.join(str(sess.dir), appauth.SECRET_FILE)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        cached = self._secrets.get(str(sess.dir))
        if cached and cached[0] == mtime:
            return cached[1]
        value = appauth.read_session_secret(sess.dir)
        if value:
            self._secrets[str(sess.dir)] = (mtime, value)
        return value

    def _backend_ssl(self, sess) -> Any:
        """For /sme: the exact certificate the session pinned (its SHA-256), nothing else."""
        path = sess.dir / PINNED_CERT
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        cached = self._fingerprints.get(str(sess.dir))
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            der = ssl.PEM_cert_to_DER_cert(path.read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None
        fp = aiohttp.Fingerprint(hashlib.sha256(der).digest())
        self._fingerprints[str(sess.dir)] = (mtime, fp)
        return fp

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        user, login, _token = self.who(request)
        if user is None:
            return self._need_login(request)
        scheme_url = "/" + request.path.split("/", 2)[1]  # "/me" or "/sme"
        port = int(request.match_info["port"])
        sess = self.index[user.name].by_port(port) if 0 < port < 65536 else None
        if sess is None or sess.service.get("URL") != scheme_url:
            raise web.HTTPForbidden(text="no live session of yours has this port\n")
        if not self.owned.ok(port, user.uid):
            raise web.HTTPForbidden(text="the listener on this port is not your session's\n")
        ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if ws and not self.same_origin(request, required=True):
            raise web.HTTPForbidden(text="WebSocket from another origin refused\n")
        ssl_arg: Any = None
        if scheme_url == "/sme":
            ssl_arg = self._backend_ssl(sess)
            if ssl_arg is None:
                raise web.HTTPBadGateway(text="the session pinned no certificate for its https backend\n")
        backend = f"{'https' if scheme_url == '/sme' else 'http'}://127.0.0.1:{port}"
        secret = self._secret(sess)
        service = sess.record.get("service")
        if not self.appauth.known(service):
            await self.appauth.ensure(service)
        add: Dict[str, str] = {}
        extra_cookie = None
        if secret:
            hdr = self.appauth.header(service, secret)
            if hdr:
                add[hdr[0]] = hdr[1]
            if self.appauth.is_form(service):
                extra_cookie = await self.appauth.form_cookie(
                    self.client, sess.dir, f"{backend}{scheme_url}/{port}/", service=service, secret=secret,
                    ssl=ssl_arg)
        drop = self.appauth.drop_headers(service) + ((self.s.trusted_header,) if self.s.trusted_header else ())
        headers = proxy.request_headers(request, backend=backend, cookie_name=auth.COOKIE, drop=drop, ws=ws, add=add,
                                        extra_cookie=extra_cookie)
        url = yarl.URL(backend + request.raw_path, encoded=True)  # the path and query exactly as the browser sent them

        def traffic() -> None:
            self.activity.note(user, sess.id)

        traffic()
        try:
            if ws:
                password = self.appauth.vnc_password(service, secret) if secret else None
                return await proxy.websocket(request, self.client, url, headers, ssl=ssl_arg, on_traffic=traffic,
                                             handshake=rfb.Handshake(password) if password else None)
            return await proxy.http(request, self.client, url, headers, ssl=ssl_arg, on_traffic=traffic,
                                    cookie_name=auth.COOKIE,
                                    on_answer=lambda r: self.appauth.check_answer(
                                        sess.dir, service, r.status, r.headers.get("Location", "")))
        except aiohttp.ServerFingerprintMismatch:
            raise web.HTTPBadGateway(text="the backend's certificate is not the one the session pinned\n") from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            self.owned.forget(port)
            raise web.HTTPBadGateway(text=f"the session's app did not answer ({type(exc).__name__})\n") from None

    # ------------------------------------------------------------------ idle auto-cancel, watcher
    def idle_round(self, now: Optional[float] = None) -> List[Tuple[str, str]]:
        """Cancel (through ``isession cancel``) every running session idle for its timeout; returns them."""
        now = time.time() if now is None else now
        done = []
        self.children = [p for p in self.children if p.poll() is None]
        for service in services(self.col.path):  # read each service's auth entry before a request waits for it
            if not self.appauth.known(service):
                self.appauth.load(service)
                break  # one per round: a round stays short
        for user in self.s.users.values():
            live = [s for s in self.index[user.name].all() if store.is_live(s)]
            if live:
                self._spawned(actions.ensure_watcher(user, self.s.inventory))
            for sess in live:
                left = store.idle_left(user, sess, self.activity, self.s.idle_timeout, now)
                key = (user.name, sess.id)
                if left is None or left > 0 or key in self.idle_cancelled:
                    continue
                self.idle_cancelled[key] = now
                log.info("session %s of %s had no traffic for its idle timeout: cancelling", sess.id, user.name)
                store.set_session_prefs(user, sess.id, idle_cancelled=now)
                self._spawned(actions.cancel(user, sess.id, self.s.inventory))
                done.append(key)
        self.activity.flush(self.s.users)
        return done

    async def idle_loop(self) -> None:
        while True:
            try:
                if self.s.primary:
                    await asyncio.to_thread(self.idle_round)
                else:
                    await asyncio.to_thread(self.activity.flush, self.s.users)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad session directory
                log.exception("idle round failed")
            await asyncio.sleep(IDLE_TICK)


def _quote(path: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415

    return quote(path, safe="")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return ""


def _warning(left: Optional[float], idle: Optional[float]) -> str:
    bits = []
    if left is not None and left <= WARN_BEFORE:
        bits.append(f"The walltime ends in {store.fmt_duration(left)}: save your work.")
    if idle is not None and idle <= WARN_BEFORE:
        bits.append(f"Idle: cancelled in {store.fmt_duration(idle)} unless you use it.")
    return " ".join(bits)


def form_inputs(info: Dict[str, Any], form: Dict[str, str], resources: List[str]
                ) -> Tuple[str, str, Dict[str, Any], float]:
    """The start form as ``(target, resource, role inputs, idle timeout in seconds)``.

    Only inputs that differ from their default are passed on; types are converted here so a wrong value is named
    before anything starts (the roles' argument specs check them again).
    """
    target = form.get("target", "workspace")
    if target not in config.TARGETS:
        raise config.UsageError(f"target: {target!r} is not one of {', '.join(config.TARGETS)}")
    resource = form.get("resource", "")
    if target != "workspace" and resource not in resources:
        raise config.UsageError(f"resource: choose one of {', '.join(resources) or '(none in the inventory)'} "
                                f"for the {target} target")
    if target == "workspace":
        resource = ""
    inputs: Dict[str, Any] = {}
    for row in info["service_inputs"] + info["session_inputs"]:
        name = row["name"]
        if name in pages.HIDDEN_INPUTS or f"in_{name}" not in form:
            continue
        raw = form[f"in_{name}"]
        kind = row["type"]
        if kind == "bool":
            value: Any = raw == "true"
        elif kind == "int":
            if raw.strip() == "":
                continue
            try:
                value = int(raw)
            except ValueError:
                raise config.UsageError(f"{name}: {raw!r} is not a whole number") from None
        elif kind == "list":
            value = [line.strip() for line in raw.splitlines() if line.strip()]
        else:
            value = raw.strip()
        if row.get("choices") and value not in row["choices"]:
            raise config.UsageError(f"{name}: {value!r} is not one of {row['choices']}")
        if value == row.get("default") or (value in ("", []) and row.get("default") in (None, "", [])):
            continue
        inputs[name] = value
    config.check_inputs(inputs)
    try:
        idle = float(form.get("idle_timeout") or 0) * 60
    except ValueError:
        raise config.UsageError("idle_timeout: not a number of minutes") from None
    if idle < 0:
        raise config.UsageError("idle_timeout: must be 0 (never) or more minutes")
    return target, resource, inputs, idle
