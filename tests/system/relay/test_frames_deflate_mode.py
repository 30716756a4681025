"""The message limit on compressed messages through the real relay (issue 13):
``RELAY_MODE=frames``, ``RELAY_MAX_MESSAGE_BYTES=1000``, real websockets
clients and origins with permessage-deflate negotiated end to end (the
default of both, as of browsers), raw sockets where the bytes must be
chosen. The limit counts what a message inflates to."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import zlib

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.raw_origins import RawOrigin, switching
from tests.support.relay import Relay, run, wait_for
from tests.system.relay.test_frames_mode import close_code

LIMIT = 1000
ENV = {"RELAY_MODE": "frames", "RELAY_MAX_MESSAGE_BYTES": str(LIMIT)}
PMD_HEADER = b"Sec-WebSocket-Extensions: permessage-deflate"


class DeflateOrigin:
    """A websockets origin with its default permessage-deflate (12-bit windows
    unless the client asks for less): echoes; ``big:<n>`` makes it send n
    letters instead. Records what it received and how each connection closed."""

    def __init__(self, lt):
        self.lt = lt
        self.received: list[str | bytes] = []
        self.codes: list[int | None] = []

    async def _handler(self, ws):
        try:
            async for m in ws:
                self.received.append(m)
                if isinstance(m, str) and m.startswith("big:"):
                    await ws.send("y" * int(m[4:]))
                else:
                    await ws.send(m)
        except ConnectionClosed:
            pass
        self.codes.append(ws.close_code)

    def __enter__(self):
        async def start():
            self.server = await serve(self._handler, "127.0.0.1", 0, ping_interval=None)
            return self.server.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{self.lt.run(start())}"
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        self.lt.run(stop())


@pytest.fixture(scope="module")
def origin(loop_thread):
    with DeflateOrigin(loop_thread) as o:
        yield o


@pytest.fixture(scope="module")
def relay(origin):
    with Relay(origin.addr, workers=1, env=ENV) as r:
        yield r


def fresh(origin: DeflateOrigin) -> None:
    """Forget what the module's earlier tests left in the shared origin."""
    origin.received.clear()
    origin.codes.clear()


async def refused(ws) -> int | None:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


# -- the case, both ways --------------------------------------------------------------

def test_compressed_message_over_the_limit_gets_1009_and_never_reaches_the_origin(relay, origin):
    fresh(origin)

    async def go():
        async with connect(relay.url + "/") as ws:  # compression on: the default
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            text = "abc" * 300  # 900 bytes, ~20 compressed: passes
            await ws.send(text)
            assert await ws.recv() == text
            await ws.send("x" * 5000)  # ~40 bytes compressed, 5,000 inflated
            return await refused(ws)
    assert run(go()) == 1009
    wait_for(lambda: origin.codes == [1001], 10, what="the origin told 1001")
    assert origin.received == ["abc" * 300]  # never the 5,000


def test_origin_sending_over_the_limit_gets_1009_and_the_client_1001(relay, origin):
    fresh(origin)

    async def go():
        async with connect(relay.url + "/") as ws:
            await ws.send("big:900")
            assert await ws.recv() == "y" * 900
            await ws.send("big:5000")
            return await refused(ws)
    assert run(go()) == 1001
    wait_for(lambda: origin.codes == [1009], 10, what="the origin told 1009")


# -- what the 101 agreed, honoured across messages ---------------------------------------------

VARIANTS = {
    "client_no_context_takeover": (dict(client_no_context_takeover=True), "client_no_context_takeover"),
    "server_no_context_takeover": (dict(server_no_context_takeover=True), "server_no_context_takeover"),
    "max_window_bits": (dict(server_max_window_bits=9, client_max_window_bits=10), "server_max_window_bits=9"),
    # (8 bits cannot be had from websockets, whose zlib cannot deflate with 8; tests/unit/test_frames_deflate.py)
    "no_takeover_9_bits": (dict(server_no_context_takeover=True, client_no_context_takeover=True,
                                server_max_window_bits=9, client_max_window_bits=9), "client_max_window_bits=9"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_negotiated_parameters_measure_every_message(relay, origin, name):
    """Several messages, each but the first mostly references into the ones
    before (context takeover) or not (no takeover), each ~900 bytes: all pass,
    both ways; then one inflating past 1,000 is refused."""
    factory_args, expect = VARIANTS[name]
    fresh(origin)

    async def go():
        ext = ClientPerMessageDeflateFactory(**factory_args)
        async with connect(relay.url + "/", extensions=[ext], compression=None) as ws:
            agreed = ws.response.headers["Sec-WebSocket-Extensions"]
            assert expect in agreed, agreed
            base = "".join(f"line {i:04d} of the shared text;" for i in range(30))[:880]
            for i in range(6):
                text = base[i * 7:] + base[:i * 7] + f"#{i:03d}"  # ~884 bytes, same words
                await ws.send(text)
                assert await ws.recv() == text
            await ws.send("big:1000")  # exactly the limit, from the origin
            assert await ws.recv() == "y" * 1000
            await ws.send(base + "z" * 200)
            return await refused(ws)
    assert run(go()) == 1009
    wait_for(lambda: origin.codes == [1001], 10, what="the origin told 1001")
    assert len(origin.received) == 7


def test_fragmented_compressed_message_counts_all_its_fragments(relay, origin):
    """websockets compresses a fragmented message as one deflate stream, RSV1
    on the first frame only (RFC 7692 §6.1)."""
    fresh(origin)

    async def go():
        async with connect(relay.url + "/") as ws:
            await ws.send(["a" * 400, "b" * 500])
            assert await ws.recv() == "a" * 400 + "b" * 500
            await ws.send(["c" * 600, "d" * 600])
            return await refused(ws)
    assert run(go()) == 1009
    wait_for(lambda: origin.codes == [1001], 10, what="the origin told 1001")
    assert origin.received == ["a" * 400 + "b" * 500]


# -- raw clients: corrupt data, a frame cut across reads ------------------------------------------

class DeflateClient:
    """A raw client that offers permessage-deflate and sends frames by hand."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.sendall(upgrade_request("/", extra=PMD_HEADER.decode() + "\r\n"))
        head, self.buf = read_head(self.s)
        assert status_of(head) == 101, head
        assert b"permessage-deflate" in head.lower()

    @staticmethod
    def frame(payload: bytes, rsv1: bool = True, opcode: int = 0x1) -> bytes:
        key = os.urandom(4)
        n = len(payload)
        b0 = 0x80 | (0x40 if rsv1 else 0) | opcode
        head = struct.pack("!BB", b0, 0x80 | n) if n < 126 else (
            struct.pack("!BBH", b0, 0x80 | 126, n) if n < 65536 else struct.pack("!BBQ", b0, 0x80 | 127, n))
        k = (key * (n // 4 + 1))[:n]
        return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")

    def close_frame(self, timeout: float = 10) -> int | None:
        """The code of the next Close from the relay (skipping data frames); None if it just closed."""
        deadline = time.monotonic() + timeout
        data = bytes(self.buf)
        while True:
            while len(data) >= 2:
                n, off = data[1] & 0x7F, 2
                if n == 126:
                    n, off = int.from_bytes(data[2:4], "big"), 4
                elif n == 127:
                    n, off = int.from_bytes(data[2:10], "big"), 10
                if len(data) < off + n:
                    break
                if data[0] & 0x0F == 0x8:
                    return close_code(data[off:off + n])
                data = data[off + n:]
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            data += chunk


def deflate_101(head: bytes) -> bytes:
    return switching(head)[:-2] + PMD_HEADER + b"\r\n\r\n"


def test_corrupt_deflate_data_gets_1002_and_never_reaches_the_origin(relay, origin):
    """Invalid deflate data (BTYPE=11, reserved) from a client: 1002, as
    websockets and Chromium answer it; the origin is told 1001 and never
    sees the frame (it would have closed with its own 1002)."""
    fresh(origin)
    c = DeflateClient(relay.port)
    c.s.sendall(c.frame(b"\xff\xff\xff\xff"))
    assert c.close_frame() == 1002
    c.s.close()
    wait_for(lambda: origin.codes == [1001], 10, what="the origin told 1001")
    assert origin.received == []


def test_frame_over_the_limit_after_part_of_it_passed_is_cut(loop_thread):
    """A compressed frame whose first part reached the origin before the rest
    arrived: the rest is held back, the client gets 1009, and the origin's
    connection is closed (it cannot be sent a Close inside a frame). What the
    origin got of the frame inflates to at most the limit."""
    got = bytearray()
    ended = []

    async def recording(origin, c):
        c.writer.write(deflate_101(c.head))
        while data := await c.reader.read(65536):
            got.extend(data)
        ended.append(True)

    limit = 20_000
    payload = zlib.compressobj(wbits=-15)
    text = os.urandom(12_000) + os.urandom(12_000)
    compressed = payload.compress(text) + payload.flush(zlib.Z_SYNC_FLUSH)
    raw = DeflateClient.frame(compressed[:-4], opcode=0x2)
    with RawOrigin(loop_thread, recording) as o, \
            Relay(o.addr, workers=1, env={"RELAY_MODE": "frames", "RELAY_MAX_MESSAGE_BYTES": str(limit)}) as r:
        c = DeflateClient(r.port)
        first = 8 + 10_000  # header and the first 10,000 payload bytes: under the limit
        c.s.sendall(raw[:first])
        wait_for(lambda: len(got) == first, 10, what="the first part at the origin")
        c.s.sendall(raw[first:])
        assert c.close_frame() == 1009
        wait_for(lambda: ended, 10, what="the origin's connection closed")
        assert bytes(got) == raw[:first]  # not one byte more
        key = raw[4:8]
        k = (key * (len(got) // 4))[:len(got) - 8]
        body = (int.from_bytes(got[8:], "big") ^ int.from_bytes(k, "big")).to_bytes(len(got) - 8, "big")
        assert len(zlib.decompressobj(-15).decompress(body)) <= limit


# -- what the limit cannot measure through -------------------------------------------------------

@pytest.mark.parametrize("ext", [b"x-custom-extension", b"permessage-deflate; client_max_window_bits",
                                 b"permessage-deflate, permessage-deflate"])
def test_101_with_extensions_the_limit_cannot_measure_is_502(loop_thread, ext):
    async def answer(origin, c):
        c.writer.write(switching(c.head)[:-2] + b"Sec-WebSocket-Extensions: " + ext + b"\r\n\r\n")
        await c.writer.drain()
        while await c.reader.read(65536):
            pass

    with RawOrigin(loop_thread, answer) as o:
        with Relay(o.addr, workers=1, env=ENV) as r:
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            s.sendall(upgrade_request("/", extra=PMD_HEADER.decode() + "\r\n"))
            head, _ = read_head(s)
            assert status_of(head) == 502
            s.close()
        # without a limit there is nothing to measure: the 101 goes through as ever
        with Relay(o.addr, workers=1, env={"RELAY_MODE": "frames"}) as r:
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            s.sendall(upgrade_request("/", extra=PMD_HEADER.decode() + "\r\n"))
            head, _ = read_head(s)
            assert status_of(head) == 101 and ext in head
            s.close()
