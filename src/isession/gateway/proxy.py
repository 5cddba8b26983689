"""Stream one HTTP request or WebSocket to a session's loopback backend, and the answer back.

Bodies go through chunk by chunk in both directions (nothing buffers a whole body), WebSocket frames one by one
(pings and pongs too, so each side's keep-alive reaches the other). Headers are copied except hop-by-hop ones, the
gateway's own cookie, the secret's header and - when a front proxy names the user - that header; the app's secret
is added by the caller. The path and query go unchanged.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Tuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger("isession.gateway")
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "proxy-connection", "host"))
WS_HANDSHAKE = frozenset(("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol", "sec-websocket-accept"))


def strip_cookie(value: str, name: str) -> str:
    """The ``Cookie`` header without the cookie ``name`` ("" when nothing is left)."""
    kept = [part.strip() for part in value.split(";") if part.strip() and part.split("=", 1)[0].strip() != name]
    return "; ".join(kept)


_SKIP: Dict[Tuple[Tuple[str, ...], bool], FrozenSet[str]] = {}


def _skip(drop: Tuple[str, ...], ws: bool) -> FrozenSet[str]:
    """The request headers never forwarded for this ``drop`` list (a few per gateway: made once)."""
    skip = _SKIP.get((drop, ws))
    if skip is None:
        skip = HOP_BY_HOP | {d.lower() for d in drop} | (WS_HANDSHAKE if ws else frozenset()) | {"cookie"}
        if len(_SKIP) < 256:
            _SKIP[(drop, ws)] = skip
    return skip


def request_headers(request: web.Request, *, backend: str, cookie_name: str, drop: Iterable[str] = (),
                    ws: bool = False, add: Optional[dict] = None, extra_cookie: Optional[str] = None) -> CIMultiDict:
    """Headers for the backend request made from the browser's ``request``.

    ``backend`` is ``scheme://127.0.0.1:PORT``. The app sees itself addressed as that, like a browser on the
    workspace would: ``Host`` is the backend's, and an ``Origin`` (the gateway checked it is its own before
    calling this) becomes the backend's origin. Apps that guard against DNS rebinding or cross-origin WebSockets
    (Jupyter, code-server) then accept the request whatever name the gateway is reached by.
    """
    skip = _skip(tuple(drop), ws)
    connection = request.headers.get("Connection")
    if connection:
        skip = skip | {h.strip().lower() for h in connection.split(",")}
    out = CIMultiDict([(k, v) for k, v in request.headers.items() if k.lower() not in skip])
    out["Host"] = backend.split("://", 1)[1]
    if "Origin" in out:
        out["Origin"] = backend
    out["X-Forwarded-Host"] = request.host
    out["X-Forwarded-Proto"] = request.scheme
    cookies = [strip_cookie(v, cookie_name) for v in request.headers.getall("Cookie", [])]
    if extra_cookie:
        cookies.append(extra_cookie)
    cookie = "; ".join(c for c in cookies if c)
    if cookie:
        out["Cookie"] = cookie
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    for key, value in (add or {}).items():
        out[key] = value
    return out


def response_headers(resp: aiohttp.ClientResponse, cookie_name: str, backend: str = "") -> CIMultiDict:
    """The backend's headers for the browser: no hop-by-hop ones, no cookie that would overwrite the gateway's,
    a ``Location`` on the backend's own origin made relative (the browser cannot reach that origin)."""
    named = {h.strip().lower() for h in resp.headers.get("Connection", "").split(",")}
    out = CIMultiDict()
    for key, value in resp.headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named:
            continue
        if low == "set-cookie" and value.split("=", 1)[0].strip() == cookie_name:
            continue
        if low == "location" and backend and value.startswith(backend + "/"):
            out.add(key, value[len(backend):])
            continue
        out.add(key, value)
    return out


class _Coalesced(web.StreamResponse):
    """A streamed answer whose headers go out with its first body bytes (already received: no wait)."""

    _send_headers_immediately = False


async def http(request: web.Request, client: aiohttp.ClientSession, url, headers: CIMultiDict, *, ssl,
               on_traffic: Callable[[], None], cookie_name: str,
               on_answer: Optional[Callable[[aiohttp.ClientResponse], None]] = None) -> web.StreamResponse:
    body = request.content.iter_any() if request.body_exists else None
    async with client.request(request.method, url, headers=headers, data=body, allow_redirects=False, ssl=ssl,
                              auto_decompress=False) as resp:
        if on_answer is not None:
            on_answer(resp)
        headers = response_headers(resp, cookie_name, backend=f"{url.scheme}://{url.raw_authority}")
        # the body bytes that came in with the backend's headers: when there are any (or the body is complete),
        # the browser's headers wait for them and leave in the same write - one send instead of two, no waiting
        first = resp.content.read_nowait()
        coalesce = bool(first) or resp.content.at_eof()
        out = (_Coalesced if coalesce else web.StreamResponse)(status=resp.status, reason=resp.reason, headers=headers)
        await out.prepare(request)
        try:
            if first:
                await out.write(first)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
                on_traffic()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            # the backend went away mid-body: the browser sees a cut response, as it would from the app itself
            request.transport and request.transport.close()
            return out
        await out.write_eof()
        return out


async def websocket(request: web.Request, client: aiohttp.ClientSession, url, headers: CIMultiDict, *, ssl,
                    on_traffic: Callable[[], None], handshake=None) -> web.StreamResponse:
    """Connect to the backend first (its refusal is the browser's answer), then pump frames both ways.

    ``handshake`` (an :class:`~.rfb.Handshake`) sees the binary frames until it is done, and may answer either side
    (the VNC password); from then on frames pass unchanged.
    """
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        back = await client.ws_connect(url, headers=headers, protocols=protocols, ssl=ssl, autoping=False,
                                       max_msg_size=0, autoclose=False)
    except aiohttp.WSServerHandshakeError as exc:
        return web.Response(status=exc.status if exc.status >= 400 else 502,
                            text="the app refused the WebSocket\n")
    front = web.WebSocketResponse(protocols=(back.protocol,) if back.protocol else (), autoping=False,
                                  max_msg_size=0, autoclose=False)
    await front.prepare(request)

    async def binary(src, data: bytes) -> None:
        if handshake is None or handshake.done:
            await (back if src is front else front).send_bytes(data)
            return
        to_front, to_back = handshake.from_client(data) if src is front else handshake.from_server(data)
        if to_front:
            await front.send_bytes(to_front)
        if to_back:
            await back.send_bytes(to_back)
        if handshake.failed:
            raise ConnectionAbortedError(handshake.failed)

    async def pump(src, dst) -> None:
        async for msg in src:
            on_traffic()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await binary(src, msg.data)
            elif msg.type == aiohttp.WSMsgType.PING:
                await dst.ping(msg.data)
            elif msg.type == aiohttp.WSMsgType.PONG:
                await dst.pong(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                break
        await dst.close(code=src.close_code or aiohttp.WSCloseCode.OK)

    tasks = [asyncio.ensure_future(pump(front, back)), asyncio.ensure_future(pump(back, front))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:  # a refused VNC password ends the relay; the browser has been told why
            if task.done() and isinstance(task.exception(), ConnectionAbortedError):
                log.warning("WebSocket to %s closed: %s", url, task.exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await back.close()
        await front.close()
    return front
