"""A test backend for the gateway (run inside a bed host as a user): HTTP echo + WebSocket echo; logs each accept.

    backend.py PORT ACCEPT_LOG [--prefix /me [CERT KEY]]   (CERT and KEY: serve https)

``GET <prefix>/<PORT>/echo`` answers JSON with the path, query and headers it received; ``<prefix>/<PORT>/ws`` echoes
every WebSocket message; ``<prefix>/<PORT>/big?n=N`` streams N bytes. Every TCP connection accepted is one line in
ACCEPT_LOG, so a test can prove the gateway made none.
"""
import asyncio
import ssl
import sys

from aiohttp import web


async def echo(request):
    received = 0
    async for chunk in request.content.iter_any():  # a body, read as it comes
        received += len(chunk)
    return web.json_response({"path": request.path, "raw_path": request.raw_path, "received": received,
                              "headers": dict(request.headers.items())})


async def big(request):
    n = int(request.query.get("n", "0"))
    resp = web.StreamResponse()
    resp.content_length = n
    await resp.prepare(request)
    chunk = b"x" * 65536
    while n > 0:
        await resp.write(chunk[:n])
        n -= 65536
    return resp


async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == web.WSMsgType.TEXT:
            await sock.send_str(msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def main(port, log_path, prefix, tls):
    app = web.Application()
    base = f"{prefix}/{port}"
    app.router.add_get(f"{base}/echo", echo)
    app.router.add_post(f"{base}/echo", echo)
    app.router.add_put(f"{base}/echo", echo)
    app.router.add_get(f"{base}/big", big)
    app.router.add_get(f"{base}/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def factory():
        log.write("accept\n")
        return runner.server()

    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port, ssl=context)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    prefix = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--prefix" else "/me"
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], prefix, sys.argv[5:7]))
