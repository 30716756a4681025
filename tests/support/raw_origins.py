"""Origins written on raw asyncio streams, for the tests that need an origin to
misbehave on purpose (tests/system/relay/test_hostile.py, tests/system/relay/test_faults.py) or to
record the exact bytes it received.

``RawOrigin(loop_thread, behaviour)`` listens on 127.0.0.1 port 0 and runs
``behaviour(conn)`` for every connection; ``conn`` is a :class:`RawConn` with
the request head already read. It counts connections and keeps every head.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct

from tests.support.relay import LoopThread

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


def switching(head: bytes, accept: bytes | None = None) -> bytes:
    key = header(head, b"sec-websocket-key") or b""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + (accept_for(key) if accept is None else accept) + b"\r\n\r\n")


def mask_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """A client-to-server frame (masked), RFC 6455 §5.2."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """One unmasked server frame from a blocking socket: (opcode, payload, rest)."""
    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-frame")
            buf += chunk

    need(2)
    opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
    pos = 2
    if n == 126:
        need(4)
        n = struct.unpack("!H", buf[2:4])[0]
        pos = 4
    elif n == 127:
        need(10)
        n = struct.unpack("!Q", buf[2:10])[0]
        pos = 10
    need(pos + n)
    return opcode, buf[pos:pos + n], buf[pos + n:]


def rst(writer: asyncio.StreamWriter) -> None:
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class RawConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, rest: bytes):
        self.reader = reader
        self.writer = writer
        self.head = head
        self.rest = rest


class RawOrigin:
    def __init__(self, lt: LoopThread, behaviour=None, read_head: bool = True):
        self.lt = lt
        self.behaviour = behaviour or echo_after_101
        self.read_head = read_head
        self.connections = 0
        self.heads: list[bytes] = []
        self.received = bytearray()  # what tunnels sent after the head, all connections
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        head, rest = b"", b""
        try:
            if self.read_head:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                head += b"\r\n\r\n"
                self.heads.append(head)
            await self.behaviour(self, RawConn(reader, writer, head, rest))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def start(self) -> "RawOrigin":
        self.lt.run(self._start())
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Close the listener and abort every connection (an origin killed)."""
        async def _stop():
            self.server.close()
            for w in self.writers:
                rst(w)
            self.writers.clear()
        self.lt.run(_stop())

    def kill_connections(self) -> None:
        async def _kill():
            for w in self.writers:
                rst(w)
            self.writers.clear()
        self.lt.run(_kill())

    def __enter__(self) -> "RawOrigin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- behaviours --------------------------------------------------------------------

async def echo_after_101(origin: RawOrigin, c: RawConn) -> None:
    """A well-behaved origin that echoes raw bytes after its 101, untouched."""
    c.writer.write(switching(c.head))
    if c.rest:
        origin.received += c.rest
        c.writer.write(c.rest)
    while True:
        data = await c.reader.read(65536)
        if not data:
            break
        origin.received += data
        c.writer.write(data)
        await c.writer.drain()


async def count_only(origin: RawOrigin, c: RawConn) -> None:
    """A victim: nothing but a connection count; closes at once."""
    c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nvictim")


def answer(data: bytes, then: str = "close"):
    """Send ``data`` (bytes, or a function of the head), then close, reset or hang."""
    async def behave(origin: RawOrigin, c: RawConn) -> None:
        c.writer.write(data(c.head) if callable(data) else data)
        await c.writer.drain()
        if then == "reset":
            rst(c.writer)
        elif then == "hang":
            while await c.reader.read(65536):
                pass
    return behave


RESPONSE_HOP = (b"Keep-Alive: timeout=5, max=100\r\nConnection: keep-alive, X-Origin-Secret\r\n"
                b"X-Origin-Secret: s\r\nProxy-Connection: keep-alive\r\nX-Origin-Kept: k\r\n")

async def keepalive_http(origin: RawOrigin, c) -> None:
    """Serves requests (Content-Length bodies) on one connection until told to close.

    The body names the origin connection that answered (``conn=N``). ``/close``
    answers with ``Connection: close`` and closes; ``/close-linger`` answers with
    ``Connection: close`` but keeps the socket open (a relay must still not
    reuse it)."""
    number = origin.connections
    head, buf = c.head, c.rest
    while True:
        n = int(header(head, b"content-length") or 0)
        while len(buf) < n:
            chunk = await c.reader.read(65536)
            if not chunk:
                return
            buf += chunk
        buf = buf[n:]
        path = head.split(b" ", 2)[1]
        body = b"conn=%d" % number
        close = path in (b"/close", b"/close-linger")
        c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
                       + (b"Connection: close\r\n" if close else RESPONSE_HOP) + b"\r\n" + body)
        await c.writer.drain()
        if path == b"/close":
            return
        if path == b"/close-linger":
            while await c.reader.read(65536):
                pass
            return
        while b"\r\n\r\n" not in buf:
            chunk = await c.reader.read(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        origin.heads.append(head)
