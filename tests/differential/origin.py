"""The recording origin: one raw asyncio server per proxy, on 127.0.0.1 port 0.

Each proxy has its own listener, so every origin connection is attributed to
the proxy that opened it (they pool connections, so nothing in the bytes
could tell). For the case being run, a listener keeps, per connection, the
ordered events ``("in", bytes)`` / ``("out", bytes)`` that
:func:`tests.differential.normalise.origin_conn_view` reads, and answers
from the case's script: each request is parsed as it arrives (the same
lenient parser the normaliser uses) and its "head" and "request" events
take the next scripted answer. Between cases every connection still open
is half-closed and its proxy given time to close it, so no pooled
connection carries one case into the next; a connection accepted while no
case runs is counted as stray.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import socket
import struct

from tests.differential.case import DEFAULT_RESPONSE, Answer
from tests.differential.normalise import parse_requests

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


class Activity:
    """When anything last happened for one proxy (the runner waits for quiet)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.changed = asyncio.Event()

    def touch(self) -> None:
        self.last = self.loop.time()
        self.changed.set()


class OriginConnection:
    def __init__(self, listener: "Listener", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.events: list[tuple[str, bytes]] = []
        self.buf = b""
        self.heads = 0
        self.requests = 0
        self.mode = "http"  # http, echo, ignore
        #: requests that got a final answer (a 1xx is not one)
        self.answered: set[int] = set()
        self.eof_sent = False
        self.done = asyncio.Event()

    def _send(self, data: bytes) -> None:
        if data and not self.writer.transport.is_closing() and not self.eof_sent:
            self.events.append(("out", data))
            self.writer.write(data)
            self.listener.activity.touch()

    def answer(self, ans: Answer, msg_index: int | None) -> None:
        data = ans.send
        if b"{accept}" in data:
            key = b""
            if msg_index is not None:
                parsed = parse_requests(self.buf)
                if msg_index < len(parsed.messages):
                    key = dict(parsed.messages[msg_index].headers).get(b"sec-websocket-key", b"")
            data = data.replace(b"{accept}", accept_for(key))
        self._send(data)
        statuses = [int(m.group(1)) for m in _STATUS_LINE.finditer(data)]
        if msg_index is not None and any(s == 101 or s >= 200 for s in statuses):
            self.answered.add(msg_index)
        upgraded = 101 in statuses
        then = ans.then
        if upgraded and then == "keep":
            then = "echo"
        if then == "echo" and msg_index is not None:
            parsed = parse_requests(self.buf, stop_after=msg_index + 1)
            self.mode = "echo"
            self._send(parsed.leftover)  # bytes that came after the upgrade request
        elif then == "ignore":
            self.mode = "ignore"
        elif then in ("close", "reset", "shutdown"):
            # a server that has decided to close answers nothing more on this connection
            self.mode = "ignore" if then != "shutdown" else self.mode
            if ans.close_after:
                asyncio.get_running_loop().call_later(ans.close_after, self._end, then)
            else:
                self._end(then)

    def _end(self, how: str) -> None:
        t = self.writer.transport
        if t.is_closing():
            return
        if how == "shutdown":
            if t.can_write_eof() and not self.eof_sent:
                self.eof_sent = True
                t.write_eof()
        elif how == "reset":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            t.abort()
        else:
            t.close()
        self.listener.activity.touch()

    def received(self, data: bytes) -> None:
        self.events.append(("in", data))
        if self.mode == "echo":
            self._send(data)
            return
        if self.mode == "ignore":
            return
        self.buf += data
        parsed = parse_requests(self.buf)
        for i, m in enumerate(parsed.messages):
            if i >= self.heads:
                self.heads = i + 1
                self._event("head", i)
                if self.mode != "http":
                    return
            if m.complete and i >= self.requests:
                self.requests = i + 1
                self._event("request", i)
                if self.mode != "http":
                    return

    def _event(self, kind: str, index: int) -> None:
        listener = self.listener
        if kind == "head":
            listener.heads += 1
        else:
            listener.requests += 1
        ans = listener.take(kind)
        if ans is None and kind == "request" and index not in self.answered:
            ans = Answer("request", DEFAULT_RESPONSE)
            parsed = parse_requests(self.buf)
            if parsed.messages[index].method == b"HEAD":
                ans = Answer("request", DEFAULT_RESPONSE[:-len(b"default")])
        if ans is not None:
            self.answer(ans, index)
        listener.activity.touch()

    async def run(self) -> None:
        listener = self.listener
        try:
            ans = listener.take("connect")
            if ans is not None:
                self.answer(ans, None)
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.events.append(("fin", b""))
                    break
                self.received(data)
        except (ConnectionError, OSError):
            self.events.append(("reset", b""))
        finally:
            listener.activity.touch()
            if not self.writer.transport.is_closing():
                self.writer.close()
            self.done.set()


class Listener:
    """The origin one proxy talks to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.script: list[Answer] = []
        self.active = False
        self.connections: list[OriginConnection] = []
        self.stray = 0
        #: the inputs after which a stray connection came
        self.stray_names: list[str] = []
        self.case_name = ""
        self.heads = 0
        self.requests = 0
        self.activity: Activity | None = None

    async def start(self) -> None:
        self.activity = Activity()
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = OriginConnection(self, reader, writer)
        if not self.active:
            # opened after the input ended: it would leak into the next one
            self.stray += 1
            self.stray_names.append(self.case_name)
        self.connections.append(conn)
        self.activity.touch()
        await conn.run()

    def take(self, kind: str) -> Answer | None:
        if self.script and self.script[0].on == kind:
            return self.script.pop(0)
        return None

    def begin(self, script: list[Answer], name: str = "") -> None:
        self.case_name = name
        self.script = list(script)
        self.connections = []
        self.heads = self.requests = 0
        self.active = True
        self.activity.touch()

    def open_connections(self) -> int:
        return sum(not c.done.is_set() for c in self.connections)

    def recordings(self) -> list[list[tuple[str, bytes]]]:
        return [c.events for c in self.connections]

    async def end(self, timeout: float = 2.0) -> int:
        """Half-close every open connection and wait (bounded) for the proxy to
        close it, so nothing pooled survives into the next case; returns how
        many had to be aborted."""
        self.active = False
        pending = [c for c in self.connections if not c.done.is_set()]
        for c in pending:
            t = c.writer.transport
            if not t.is_closing() and t.can_write_eof() and not c.eof_sent:
                c.eof_sent = True
                try:
                    t.write_eof()
                except OSError:
                    pass
        aborted = 0
        if pending:
            _done, still = await asyncio.wait([asyncio.ensure_future(c.done.wait()) for c in pending],
                                              timeout=timeout)
            for c in pending:
                if not c.done.is_set():
                    c.writer.transport.abort()
                    aborted += 1
            for f in still:
                f.cancel()
        return aborted

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.connections:
            c.writer.transport.abort()
