"""The demo origin of ``wsrelay demo``: one loopback port that serves

- ``/ws`` (and every other path, for upgrades): WebSocket echo;
- ``/``: the demo page, which opens a WebSocket through the relay and falls
  back to long polling when the upgrade is refused;
- ``/lp/send?client=C&msg=M`` and ``/lp/poll?client=C&since=N``: the
  long-polling fallback — a poll waits up to 20 s for the client's echoed
  messages and a server tick every 2 s.

Built on websockets (sans-I/O core, no dependencies): its ``process_request``
hook may await, which a long poll needs; picows answers plain HTTP only
synchronously.
"""

from __future__ import annotations

import asyncio
import json
import socket
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

POLL_SECONDS = 20.0
TICK_SECONDS = 2.0
KEEP = 200  # messages kept per long-polling client


class Mailboxes:
    """Per-client message lists for the long-polling fallback."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[str]] = {}
        self.changed = asyncio.Condition()

    async def put(self, client: str | None, text: str) -> None:
        async with self.changed:
            if client is not None:
                self.boxes.setdefault(client, [])  # a send may come before the first poll
            for name, box in self.boxes.items():
                if client is None or name == client:
                    box.append(text)
                    del box[:-KEEP]
            self.changed.notify_all()

    async def poll(self, client: str, since: int) -> tuple[list[str], int]:
        box = self.boxes.setdefault(client, [])
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: len(box) > since), POLL_SECONDS)
            except TimeoutError:
                pass
        return box[since:], len(box)


def _response(status: int, body: bytes, ctype: str) -> Response:
    reason = {200: "OK", 400: "Bad Request"}.get(status, "OK")
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(status, reason, headers, body)


async def serve_demo(sock: socket.socket) -> None:
    page = resources.files("relay").joinpath("demo_page.html").read_bytes()
    boxes = Mailboxes()

    async def ticker() -> None:
        n = 0
        while True:
            await asyncio.sleep(TICK_SECONDS)
            n += 1
            await boxes.put(None, f"server tick {n}")

    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # a WebSocket: go on with the handshake
        url = urlsplit(request.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            return _response(200, page, "text/html; charset=utf-8")
        if url.path == "/lp/send" and q.get("client"):
            await boxes.put(q["client"], q.get("msg", ""))
            return _response(200, b'{"ok": true}', "application/json")
        if url.path == "/lp/poll" and q.get("client"):
            try:
                since = max(0, int(q.get("since", "0")))
            except ValueError:
                since = 0
            messages, nxt = await boxes.poll(q["client"], since)
            return _response(200, json.dumps({"messages": messages, "next": nxt}).encode(), "application/json")
        return _response(400, b"unknown path: try / or /ws\n", "text/plain")

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    tick = asyncio.ensure_future(ticker())
    try:
        async with serve(echo, sock=sock, process_request=process_request, max_size=None,
                         compression="deflate", ping_interval=None) as server:
            await server.serve_forever()
    finally:
        tick.cancel()
