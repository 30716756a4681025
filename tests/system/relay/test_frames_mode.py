"""RELAY_MODE=frames through the real relay (README: "Frames mode"; issue 9): the interop
cases of tunnel mode, clean closes when a side drops, spread drains with 1001
and 1012, keepalive pings, the message limit, protocol errors, and the
metrics. Real websockets/aiohttp peers and raw sockets, loopback only."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.relay import Relay, run, wait_for
from tests.support.scrape import metric

FRAMES = {"RELAY_MODE": "frames"}


@pytest.fixture(scope="module")
def relay(ws_origin):
    with Relay(ws_origin.addr, workers=2, env=FRAMES) as r:
        yield r


# -- a raw WebSocket client, to see every frame the relay sends --------------------------

class RawClient:
    """Speaks frames by hand: sends masked frames, reads unmasked ones."""

    def __init__(self, port: int, path: str = "/"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.sendall(upgrade_request(path))
        head, rest = read_head(self.s)
        assert status_of(head) == 101, head
        self.buf = bytearray(rest)

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        key = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", fin << 7 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", fin << 7 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", fin << 7 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        self.s.sendall(head + key + masked)

    def frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next frame (opcode, payload); None when the relay closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                n, off = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = struct.unpack("!H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
                if n < 126 or off > 2:
                    assert not self.buf[1] & 0x80, "the relay masked a frame towards the client"
                    if len(self.buf) >= off + n:
                        op, payload = self.buf[0] & 0x0F, bytes(self.buf[off:off + n])
                        del self.buf[:off + n]
                        return op, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the relay")
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                continue
            try:
                chunk = self.s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        self.s.close()


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


# -- interop -------------------------------------------------------------------------------

def test_aiohttp_client_and_origin(aio_origin):
    async def go(url):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url + "/ws", protocols=("chat",), max_msg_size=0) as ws:
                assert ws.protocol == "chat"
                await ws.send_str("hello aiohttp")
                assert (await ws.receive()).data == "hello aiohttp"
                blob = os.urandom(300_000)
                await ws.send_bytes(blob)
                assert (await ws.receive()).data == blob
                await ws.close(code=4005)
            assert ws.closed

    with Relay(aio_origin.addr, workers=1, env=FRAMES) as r:
        run(go(r.url))


# -- clean closes when a side drops ----------------------------------------------------------

KILLABLE_ORIGIN = """
import asyncio
from websockets.asyncio.server import serve

async def echo(ws):
    async for m in ws:
        await ws.send(m)

async def main():
    async with serve(echo, "127.0.0.1", 0, ping_interval=None) as s:
        print(s.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


def test_origin_killed_client_gets_1014():
    origin = subprocess.Popen([sys.executable, "-c", KILLABLE_ORIGIN], stdout=subprocess.PIPE)
    try:
        port = int(origin.stdout.readline())
        with Relay(f"127.0.0.1:{port}", workers=1, env=FRAMES) as r:
            async def go():
                async with connect(r.url + "/", close_timeout=5) as ws:
                    await ws.send("hello")
                    assert await ws.recv() == "hello"
                    origin.kill()
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(ws.recv(), 10)
                    return ws.close_code
            assert run(go()) == 1014
            wait_for(lambda: metric(r, "wsrelay_closes_total", code="1014", side="origin") == 1, 5,
                     what="the 1014 counted")
    finally:
        origin.kill()
        origin.wait()


class RecordingOrigin:
    """A websockets echo origin that remembers the close code of each connection."""

    def __init__(self, lt):
        self.lt = lt
        self.codes: list[int | None] = []

    async def _handler(self, ws):
        try:
            async for m in ws:
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


def test_client_vanishing_gives_the_origin_1001(loop_thread):
    with RecordingOrigin(loop_thread) as origin, Relay(origin.addr, workers=1, env=FRAMES) as r:
        for how in ("reset", "fin"):
            c = RawClient(r.port)
            c.send(0x1, b"x" * 300)
            assert c.frame() == (0x1, b"x" * 300)
            if how == "reset":
                c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        wait_for(lambda: len(origin.codes) == 2, 10, what="the origin's connections to end")
        assert origin.codes == [1001, 1001]


def test_client_close_is_answered_and_tcp_closed(relay):
    """The client closes; the origin's answering Close comes back; the relay then
    closes the TCP connection promptly (RFC 6455 §7.1.1), not after a timeout."""
    c = RawClient(relay.port)
    c.send(0x8, struct.pack("!H", 4100) + b"done")
    t0 = time.monotonic()
    op, payload = c.frame()
    assert op == 0x8 and close_code(payload) == 4100
    assert c.frame() is None
    assert time.monotonic() - t0 < 2
    c.close()


# -- drains -------------------------------------------------------------------------------------

async def _hold(url: str, n: int, after) -> list[tuple[float, int | None]]:
    """Open n clients, run after(), return (time, close code) of each as it is closed."""
    conns = [await connect(url + "/", close_timeout=5) for _ in range(n)]
    for i, ws in enumerate(conns):
        await ws.send(f"hi {i}")
        assert await ws.recv() == f"hi {i}"

    async def ended(ws):
        try:
            await ws.recv()
        except ConnectionClosed:
            pass
        return time.monotonic(), ws.close_code

    waits = [asyncio.ensure_future(ended(ws)) for ws in conns]
    await asyncio.sleep(0)
    await asyncio.get_running_loop().run_in_executor(None, after)
    return await asyncio.wait_for(asyncio.gather(*waits), 20)


def test_sigterm_closes_50_clients_with_1001_spread_over_the_drain(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={**FRAMES, "RELAY_DRAIN_TIMEOUT": "5"}) as r:
        t0 = []
        ends = run(_hold(r.url, 50, lambda: (t0.append(time.monotonic()), r.signal(signal.SIGTERM))), 40)
        assert [code for _, code in ends] == [1001] * 50
        times = sorted(t - t0[0] for t, _ in ends)
        assert times[-1] - times[0] > 2.0, times
        assert sum(t < 0.1 for t in times) < 10, times
        assert times[-1] < 5.0, times
        assert r.proc.wait(15) == 0


def test_sighup_closes_the_old_generation_with_1012(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={**FRAMES, "RELAY_DRAIN_TIMEOUT": "2"}) as r:
        ends = run(_hold(r.url, 10, lambda: r.signal(signal.SIGHUP)), 40)
        assert [code for _, code in ends] == [1012] * 10
        # the new generation serves
        async def again():
            async with connect(r.url + "/") as ws:
                await ws.send("new generation")
                assert await ws.recv() == "new generation"
        run(again())


# -- keepalive ------------------------------------------------------------------------------------

def test_dead_client_is_dropped_live_one_kept_and_never_sees_relay_pongs(ws_origin):
    env = {**FRAMES, "RELAY_PING_INTERVAL": "1", "RELAY_PING_TIMEOUT": "1"}
    with Relay(ws_origin.addr, workers=1, env=env) as r:
        dead = RawClient(r.port)
        live = RawClient(r.port)
        for c in (dead, live):
            c.send(0x1, b"hello")
            assert c.frame() == (0x1, b"hello")
        t0 = time.monotonic()
        pings = 0
        dead_at = None
        while time.monotonic() - t0 < 5.5:
            frame = live.frame(timeout=0.2) if select.select([live.s], [], [], 0.2)[0] else ()
            assert frame is not None, "the live client was dropped"
            if frame:
                op, payload = frame
                assert op == 0x9, f"unexpected frame {frame}: the relay's pongs must not reach the client"
                pings += 1
                live.send(0xA, payload)
            if dead_at is None and select.select([dead.s], [], [], 0)[0]:
                try:
                    gone = not dead.s.recv(65536)
                except ConnectionResetError:
                    gone = True
                if gone:
                    dead_at = time.monotonic() - t0
        assert pings >= 2
        # silent ≥ 1 s → pinged at the next sweep; no answer within 1 s → dropped
        # at the sweep after: interval + timeout + two sweeps of slack.
        assert dead_at is not None and dead_at < 1 + 1 + 2.5, dead_at
        assert metric(r, "wsrelay_ping_timeouts_total") == 1
        # the live client's own ping passes through and its pong comes back
        live.send(0x9, b"mine")
        frame = live.frame()
        while frame[0] == 0x9:  # one of the relay's, answered
            live.send(0xA, frame[1])
            frame = live.frame()
        assert frame == (0xA, b"mine")
        dead.close()
        live.close()


# -- limits and protocol errors -----------------------------------------------------------------

def test_message_over_the_limit_gets_1009_and_the_origin_1001(loop_thread):
    with RecordingOrigin(loop_thread) as origin, \
            Relay(origin.addr, workers=1, env={**FRAMES, "RELAY_MAX_MESSAGE_BYTES": "1000"}) as r:
        async def go():
            async with connect(r.url + "/", compression=None) as ws:
                await ws.send("x" * 1000)
                assert await ws.recv() == "x" * 1000
                await ws.send([b"y" * 600, b"y" * 600])  # fragmented: the sum counts
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                return ws.close_code
        assert run(go()) == 1009
        wait_for(lambda: origin.codes == [1001], 10, what="the origin told 1001")


@pytest.mark.parametrize("frame", [
    (0x3, b"reserved"),       # reserved opcode
    (0x9, b"p" * 126),        # control frame over 125 bytes
])
def test_protocol_error_from_the_client_gets_1002(relay, frame):
    c = RawClient(relay.port)
    c.send(0x1, b"before")
    assert c.frame() == (0x1, b"before")
    c.send(*frame)
    op, payload = c.frame()
    assert (op, close_code(payload)) == (0x8, 1002)
    c.send(0x8, payload)  # answer the close
    assert c.frame() is None
    c.close()


def test_unmasked_client_frame_gets_1002(relay):
    c = RawClient(relay.port)
    c.s.sendall(b"\x81\x05hello")  # no MASK bit
    op, payload = c.frame()
    assert (op, close_code(payload)) == (0x8, 1002)
    c.close()


# -- metrics -----------------------------------------------------------------------------------------

def test_messages_and_closes_are_counted(ws_origin):
    with Relay(ws_origin.addr, workers=1, env=FRAMES) as r:
        async def go():
            async with connect(r.url + "/", compression=None) as ws:
                for i in range(10):
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"
                await ws.send([b"a", b"b", b"c"])  # one message in three frames
                assert await ws.recv() == b"abc"
                # open tunnels are published by the 1 s sweep
                await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
                    lambda: metric(r, "wsrelay_messages_total", direction="upstream") == 11, 5,
                    what="upstream messages"))
                await ws.close(1000)
        run(go())
        wait_for(lambda: metric(r, "wsrelay_messages_total", direction="downstream") == 11, 5,
                 what="downstream messages")
        # the client's Close and the origin's answer, each counted once
        wait_for(lambda: metric(r, "wsrelay_closes_total", code="1000", side="client") == 1, 5,
                 what="the client's close")
        wait_for(lambda: metric(r, "wsrelay_closes_total", code="1000", side="origin") == 1, 5,
                 what="the origin's close")


# -- origins that misbehave (raw) ----------------------------------------------------------------

def test_origin_dropping_inside_a_frame_closes_the_client_without_a_close_frame(loop_thread):
    """The stream to the client stopped mid-frame: no Close can follow it, the
    connection is closed as in tunnel mode. At a boundary, a FIN gets 1014."""
    from tests.support.raw_origins import RawOrigin, switching

    async def mid_frame(origin, c):
        c.writer.write(switching(c.head) + b"\x82\x7e\x03\xe8" + b"z" * 10)  # 1000 announced, 10 sent
        await c.writer.drain()

    async def at_boundary(origin, c):
        c.writer.write(switching(c.head) + b"\x81\x02ok")
        await c.writer.drain()

    with RawOrigin(loop_thread, mid_frame) as o, Relay(o.addr, workers=1, env=FRAMES) as r:
        c = RawClient(r.port)
        assert c.frame() is None
        assert bytes(c.buf) == b"\x82\x7e\x03\xe8" + b"z" * 10
    with RawOrigin(loop_thread, at_boundary) as o, Relay(o.addr, workers=1, env=FRAMES) as r:
        c = RawClient(r.port)
        assert c.frame() == (0x1, b"ok")
        op, payload = c.frame()
        assert (op, close_code(payload)) == (0x8, 1014)
        c.send(0x8, payload)  # the answer ends the closing handshake: the relay closes at once
        assert c.frame() is None


def test_silent_origin_is_pinged_masked_and_dropped_client_gets_1001(loop_thread):
    from tests.support.raw_origins import RawOrigin, switching

    async def deaf(origin, c):
        c.writer.write(switching(c.head))
        while data := await c.reader.read(65536):
            origin.received += data

    env = {**FRAMES, "RELAY_PING_INTERVAL": "1", "RELAY_PING_TIMEOUT": "1"}
    with RawOrigin(loop_thread, deaf) as o, Relay(o.addr, workers=1, env=env) as r:
        c = RawClient(r.port)
        t0 = time.monotonic()
        while True:
            op, payload = c.frame(timeout=6)
            if op == 0x9:
                c.send(0xA, payload)  # the client is alive; the origin is not
                continue
            break
        assert (op, close_code(payload)) == (0x8, 1001)
        assert time.monotonic() - t0 < 1 + 1 + 2.5
        c.send(0x8, payload)
        assert c.frame() is None
        # the relay's ping reached the origin masked (client-to-server rules)
        assert o.received[:1] == b"\x89" and o.received[1] & 0x80
        wait_for(lambda: metric(r, "wsrelay_ping_timeouts_total") == 1, 5, what="the ping timeout counted")


def test_frames_sent_with_the_upgrade_request_are_tracked_and_delivered(relay):
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    key = os.urandom(4)
    frame = b"\x81\x85" + key + bytes(b ^ key[i % 4] for i, b in enumerate(b"early"))
    s.sendall(upgrade_request("/") + frame)
    head, rest = read_head(s)
    assert status_of(head) == 101
    data = rest
    while len(data) < 7:
        data += s.recv(65536)
    assert data[:7] == b"\x81\x05early"
    s.close()
