"""The demo origin of ``wsrelay demo``, on picows: one loopback port that serves

- an upgrade on any path: WebSocket echo (each frame sent back as it came);
- ``/``: the demo page, which opens a WebSocket through the relay and falls
  back to plain-HTTP polling when the upgrade is refused;
- ``/poll/send?client=C&msg=M`` and ``/poll/recv?client=C&since=N``: the
  polling fallback — ``recv`` answers at once with the client's echoed
  messages and a server tick every 2 s since message N (the page polls again
  at once when it got something, after 0.5 s when not).

picows answers a plain HTTP request from its (synchronous) listener factory,
with ``Connection: close``: fine for a page and for polls, but no request can
be held open, so the fallback polls instead of long-polling.
"""

from __future__ import annotations

import asyncio
import json
import socket
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from picows import (WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, WSUpgradeResponse,
                    WSUpgradeResponseWithListener, ws_create_server)

TICK_SECONDS = 2.0
KEEP = 200  # messages kept per polling client
MAX_CLIENTS = 1000  # polling clients remembered (the oldest is forgotten)


class Mailboxes:
    """Per-client message lists for the polling fallback, each bounded."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[str]] = {}
        self.dropped: dict[str, int] = {}  # messages trimmed off the front of each box

    def _box(self, client: str) -> list[str]:
        box = self.boxes.get(client)
        if box is None:
            if len(self.boxes) >= MAX_CLIENTS:
                oldest = next(iter(self.boxes))
                del self.boxes[oldest]
                self.dropped.pop(oldest, None)
            box = self.boxes[client] = []
        return box

    def put(self, client: str | None, text: str) -> None:
        """To one client's box, or (``None``) to every box."""
        targets = list(self.boxes.items()) if client is None else [(client, self._box(client))]
        for name, box in targets:
            box.append(text)
            if len(box) > KEEP:
                self.dropped[name] = self.dropped.get(name, 0) + len(box) - KEEP
                del box[:-KEEP]

    def since(self, client: str, n: int) -> tuple[list[str], int]:
        """Messages numbered ``n`` and later, and the number of the next one."""
        box = self._box(client)
        first = self.dropped.get(client, 0)
        return box[max(0, n - first):], first + len(box)


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            transport.send(frame.msg_type, frame.get_payload_as_bytes(), frame.fin)


def _json(value: object) -> WSUpgradeResponseWithListener:
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(
        json.dumps(value).encode(), {"Content-Type": "application/json", "Cache-Control": "no-store"}), None)


def router(page: bytes, boxes: Mailboxes):
    """picows' listener factory: a WebSocket, or a plain HTTP answer."""

    def route(request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return Echo()
        url = urlsplit(request.path.decode("latin-1"))
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(
                page, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}), None)
        if url.path == "/poll/send" and q.get("client"):
            boxes.put(q["client"], q.get("msg", ""))
            return _json({"ok": True})
        if url.path == "/poll/recv" and q.get("client"):
            try:
                n = max(0, int(q.get("since", "0")))
            except ValueError:
                n = 0
            messages, nxt = boxes.since(q["client"], n)
            return _json({"messages": messages, "next": nxt})
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
            404, b"unknown path: try / or a WebSocket upgrade\n"), None)

    return route


async def serve_demo(sock: socket.socket) -> None:
    """Serve on the listening ``sock`` until cancelled."""
    page = resources.files("relay").joinpath("demo_page.html").read_bytes()
    boxes = Mailboxes()
    server = await ws_create_server(router(page, boxes), sock=sock, max_frame_size=64 << 20,
                                    websocket_handshake_timeout=10)
    n = 0
    try:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            n += 1
            boxes.put(None, f"server tick {n}")
    finally:
        server.close()
