"""HTTP and WebSocket requests to the gateway from inside a bed host; prints one JSON line.

    client.py http METHOD URL [--cookie VALUE] [--header NAME:VALUE]... [--data FORM] [--source ADDR]
    client.py ws URL [--cookie VALUE] [--origin ORIGIN]
    client.py login BASE SECRET [--user NAME]       -> {"cookie": ...}
    client.py rfb URL [--cookie VALUE] [--origin ORIGIN]   -> the RFB handshake as noVNC does it, no password
"""
import argparse
import asyncio
import json
import re

import aiohttp
from yarl import URL


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("kind")
    p.add_argument("rest", nargs="+")
    p.add_argument("--cookie")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--data")
    p.add_argument("--origin")
    p.add_argument("--user")
    p.add_argument("--source")
    return p.parse_args()


async def main(a):
    headers = dict(h.split(":", 1) for h in a.header)
    if a.cookie:
        headers["Cookie"] = f"isession_gateway={a.cookie}"
    conn = aiohttp.TCPConnector(local_addr=(a.source, 0) if a.source else None)  # 127.0.0.2: the "front proxy"
    async with aiohttp.ClientSession(connector=conn, cookie_jar=aiohttp.DummyCookieJar()) as s:
        if a.kind == "http":
            method, url = a.rest
            data = dict(x.split("=", 1) for x in a.data.split("&")) if a.data else None
            target = URL(url, encoded=True)  # sent exactly as given
            async with s.request(method, target, headers=headers, data=data, allow_redirects=False) as r:
                body = await r.text(errors="replace")
                return {"status": r.status, "location": r.headers.get("Location"), "body": body[:20000],
                        "set_cookie": r.headers.getall("Set-Cookie", [])}
        if a.kind == "ws":
            (url,) = a.rest
            if a.origin:
                headers["Origin"] = a.origin
            try:
                async with s.ws_connect(url, headers=headers) as ws:
                    await ws.send_str("ping-through-gateway")
                    msg = await ws.receive(timeout=10)
                    return {"status": 101, "echo": msg.data}
            except aiohttp.WSServerHandshakeError as exc:
                return {"status": exc.status}
        if a.kind == "rfb":
            (url,) = a.rest
            headers["Origin"] = a.origin or ""
            async with s.ws_connect(url, headers=headers, protocols=["binary"]) as ws:
                buf = b""

                async def need(n):
                    nonlocal buf
                    while len(buf) < n:
                        msg = await ws.receive(timeout=10)
                        if msg.type != aiohttp.WSMsgType.BINARY:
                            raise SystemExit(f"unexpected {msg.type}: {msg.data!r} after {buf!r}")
                        buf += msg.data
                    out, buf = buf[:n], buf[n:]
                    return out

                version = await need(12)
                await ws.send_bytes(b"RFB 003.008\n")
                count = (await need(1))[0]
                types = list(await need(count)) if count else []
                result = {"version": version.decode(), "types": types}
                if 1 in types:
                    await ws.send_bytes(bytes([1]))
                    result["result"] = int.from_bytes(await need(4), "big")
                    await ws.send_bytes(bytes([1]))  # ClientInit: shared
                    init = await need(24)
                    name = await need(int.from_bytes(init[20:24], "big"))
                    result.update(width=int.from_bytes(init[0:2], "big"), height=int.from_bytes(init[2:4], "big"),
                                  name=name.decode(errors="replace"))
                return result
        if a.kind == "login":
            base, secret = a.rest
            form = {"secret": secret, "next": "/"}
            if a.user:
                form["user"] = a.user
            async with s.post(base + "/login", data=form, allow_redirects=False) as r:
                m = re.search(r"isession_gateway=([A-Za-z0-9_-]+)", " ".join(r.headers.getall("Set-Cookie", [])))
                return {"status": r.status, "cookie": m.group(1) if m else None,
                        "set_cookie": r.headers.getall("Set-Cookie", [])}
    raise SystemExit(f"unknown kind {a.kind}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))))
