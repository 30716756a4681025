"""Real origin servers from well-kept libraries, for the relay to sit in front of.

- :class:`WebsocketsOrigin` (websockets): echoes messages; ``/headers`` sends the
  request line and headers it received as JSON; ``/close/<code>`` closes with that
  code; ``/flood/<n>`` sends n deterministic 1 MiB binary messages; records
  every request it saw.
- :class:`AiohttpOrigin` (aiohttp): WebSocket echo on ``/ws`` and the plain HTTP
  routes the fallback tests use.
- :class:`SilentOrigin`: accepts TCP and never answers (for 504).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import websockets
from websockets.asyncio.server import serve
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

from tests.support.relay import LoopThread

MiB = 1 << 20


def flood_payload(i: int) -> bytes:
    return random.Random(i).randbytes(MiB)


def flood_digest(n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        h.update(flood_payload(i))
    return h.hexdigest()


def _pick_subprotocol(_connection, offered):
    for proto in offered:
        if proto in ("chat", "superchat"):
            return proto
    return None


class WebsocketsOrigin:
    def __init__(self, lt: LoopThread):
        self.lt = lt
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.server = None
        self.port = 0

    async def _handler(self, ws) -> None:
        path = ws.request.path
        if path.startswith("/headers"):
            await ws.send(json.dumps({"path": path, "headers": list(ws.request.headers.raw_items())}))
            async for msg in ws:
                await ws.send(msg)
            return
        if path.startswith("/close/"):
            code = int(path.rsplit("/", 1)[1])
            await ws.close(code, "origin says bye")
            return
        if path.startswith("/flood/"):
            n = int(path.rsplit("/", 1)[1])
            for i in range(n):
                await ws.send(flood_payload(i))
            await ws.wait_closed()
            return
        try:
            async for msg in ws:
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass

    def _record(self, connection, request):
        self.requests.append((request.path, dict(request.headers.raw_items())))
        return None

    async def _start(self) -> None:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, max_size=None, max_queue=None,
            select_subprotocol=_pick_subprotocol, process_request=self._record,
            extensions=[ServerPerMessageDeflateFactory()], compression=None,
            ping_interval=None)
        self.port = self.server.sockets[0].getsockname()[1]

    def start(self) -> "WebsocketsOrigin":
        self.lt.run(self._start())
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def _stop():
            self.server.close()
            await self.server.wait_closed()
        self.lt.run(_stop())


class AiohttpOrigin:
    def __init__(self, lt: LoopThread):
        self.lt = lt
        self.port = 0
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def _app(self):
        from aiohttp import web

        async def ws(request):
            resp = web.WebSocketResponse(protocols=("chat",), max_msg_size=0)
            await resp.prepare(request)
            async for msg in resp:
                if msg.type == web.WSMsgType.TEXT:
                    await resp.send_str(msg.data)
                elif msg.type == web.WSMsgType.BINARY:
                    await resp.send_bytes(msg.data)
            return resp

        async def echo(request):
            body = await request.read()
            self.seen.append((request.method, request.path_qs, dict(request.headers), body))
            return web.Response(body=body, headers={"X-Echo-Method": request.method,
                                                    "X-Echo-Len": str(len(body))})

        async def chunked(request):
            body = await request.read()
            self.seen.append((request.method, request.path_qs, dict(request.headers), body))
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"part %d;" % i)
            await resp.write(body)
            await resp.write_eof()
            return resp

        async def poll(request):
            delay = float(request.query.get("delay", "0"))
            await asyncio.sleep(delay)
            return web.Response(text=f"polled after {delay}")

        async def big(request):
            n = int(request.query.get("mib", "1"))
            resp = web.StreamResponse()
            resp.content_length = n * MiB
            await resp.prepare(request)
            for i in range(n):
                await resp.write(flood_payload(i))
            await resp.write_eof()
            return resp

        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/ws", ws)
        app.router.add_get("/poll", poll)
        app.router.add_get("/big", big)
        app.router.add_route("*", "/chunked", chunked)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app

    async def _start(self) -> None:
        from aiohttp import web

        self.runner = web.AppRunner(self._app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "AiohttpOrigin":
        self.lt.run(self._start())
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.lt.run(self.runner.cleanup())


class SilentOrigin:
    """Accepts connections, reads, never answers."""

    def __init__(self, lt: LoopThread):
        self.lt = lt
        self.port = 0
        self.writers = []

    async def _start(self) -> None:
        async def handle(reader, writer):
            self.writers.append(writer)
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def start(self) -> "SilentOrigin":
        self.lt.run(self._start())
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def _stop():
            for w in self.writers:
                w.close()
            self.server.close()
        self.lt.run(_stop())
