"""WebSocket traffic through the real relay (2 workers) to real origins, with
real clients from websockets, aiohttp and picows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.support.net import read_head, upgrade_request
from relay import native
from tests.support.origins import flood_digest
from tests.support.relay import Relay, run

SIZES = [0, 125, 126, 64 * 1024, 8 * 1024 * 1024]


@pytest.fixture(scope="module", params=["tunnel-native", "tunnel-python", "frames"])
def relay(ws_origin, request):
    """The interop cases, against a relay in each RELAY_MODE, tunnel mode on
    each data plane (RELAY_DATA_PLANE; frames mode has the Python one only)."""
    mode, _, plane = request.param.partition("-")
    env = {"RELAY_MODE": mode, "RELAY_DATA_PLANE": plane or "auto"}
    if plane == "native" and not native.AVAILABLE:
        pytest.skip("native data plane unavailable: " + native.WHY_NOT)
    with Relay(ws_origin.addr, workers=2, env=env) as r:
        yield r


@pytest.mark.parametrize("size", SIZES)
def test_echo_text_and_binary(relay, size):
    async def go():
        async with connect(relay.url + "/", max_size=None, compression=None) as ws:
            # exactly ``size`` bytes of UTF-8, mostly two-byte characters
            text = "é" * (size // 2) + "a" * (size % 2)
            assert len(text.encode()) == size
            await ws.send(text)
            assert await ws.recv() == text
            data = os.urandom(size)
            await ws.send(data)
            assert await ws.recv() == data
    run(go())


def test_fragmented_message(relay):
    async def go():
        async with connect(relay.url + "/", compression=None) as ws:
            await ws.send([b"frag-one ", b"frag-two ", b"frag-three"])
            assert await ws.recv() == b"frag-one frag-two frag-three"
            await ws.send(["a" * 1000, "b" * 70000, "c"])
            assert await ws.recv() == "a" * 1000 + "b" * 70000 + "c"
    run(go())


def test_subprotocol_and_permessage_deflate_end_to_end(relay):
    async def go():
        async with connect(relay.url + "/", subprotocols=["superchat", "chat"],
                           extensions=[ClientPerMessageDeflateFactory()], compression=None) as ws:
            assert ws.subprotocol == "superchat"
            ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert "permessage-deflate" in ext
            msg = "compressible " * 5000
            await ws.send(msg)
            assert await ws.recv() == msg
    run(go())


def test_close_code_and_reason_both_ways(relay):
    async def go():
        # client -> origin: the echo server answers our close with the same code
        ws = await connect(relay.url + "/")
        await ws.close(4001, "client says bye")
        assert ws.close_code == 4001 and ws.close_reason == "client says bye"
        # origin -> client
        async with connect(relay.url + "/close/4002") as ws2:
            with pytest.raises(ConnectionClosed):
                await ws2.recv()
            assert ws2.close_code == 4002
            assert ws2.close_reason == "origin says bye"
    run(go())


def test_query_cookies_authorization_and_forwarded_headers(relay):
    async def go():
        headers = {"Cookie": "session=abc123; theme=dark", "Authorization": "Bearer s3cret",
                   "X-Forwarded-For": "203.0.113.7", "X-Custom": "kept"}
        async with connect(relay.url + "/headers?room=42&x=%20y", additional_headers=headers) as ws:
            info = json.loads(await ws.recv())
        return info
    info = run(go())
    assert info["path"] == "/headers?room=42&x=%20y"
    h = {}
    for k, v in info["headers"]:
        h.setdefault(k.lower(), []).append(v)
    assert h["cookie"] == ["session=abc123; theme=dark"]
    assert h["authorization"] == ["Bearer s3cret"]
    assert h["x-custom"] == ["kept"]
    assert h["x-forwarded-for"] == ["127.0.0.1"]  # a client's own claim replaced (no trusted proxies)
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [f"127.0.0.1:{relay.port}"]
    assert h["host"] == [f"127.0.0.1:{relay.port}"]


def test_200_concurrent_connections_no_crosstalk(relay):
    async def one(i):
        async with connect(relay.url + "/", compression=None) as ws:
            for j in range(5):
                payload = f"conn-{i}-msg-{j}-" + "x" * (i * 7 % 300)
                await ws.send(payload)
                assert await ws.recv() == payload

    async def go():
        await asyncio.gather(*(one(i) for i in range(200)))
    run(go(), timeout=90)


def test_aiohttp_client_and_origin(aio_origin):
    from tests.support.relay import Relay

    async def go(url):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url + "/ws", protocols=("chat",), max_msg_size=0) as ws:
                assert ws.protocol == "chat"
                await ws.send_str("hello aiohttp")
                assert (await ws.receive()).data == "hello aiohttp"
                blob = os.urandom(300_000)
                await ws.send_bytes(blob)
                assert (await ws.receive()).data == blob

    with Relay(aio_origin.addr, workers=2) as r:
        run(go(r.url))


def test_picows_client(relay):
    from picows import WSListener, WSMsgType, ws_connect

    async def go():
        got = asyncio.get_running_loop().create_future()

        class Client(WSListener):
            def on_ws_frame(self, transport, frame):
                if frame.msg_type == WSMsgType.BINARY and not got.done():
                    got.set_result(frame.get_payload_as_bytes())

        transport, _client = await ws_connect(Client, relay.url + "/")
        payload = os.urandom(5000)
        transport.send(WSMsgType.BINARY, payload)
        assert await asyncio.wait_for(got, 10) == payload
        transport.send_close()
        transport.disconnect()
    run(go())


def test_slow_reader_memory_bounded_then_everything_arrives(relay):
    """200 MiB pushed at a client that reads nothing for 5 s: relay RSS grows < 64 MiB,
    then every byte arrives intact."""
    n = 200
    s = socket.create_connection(("127.0.0.1", relay.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(upgrade_request(f"/flood/{n}", host="flood.test"))
    head, rest = read_head(s)
    assert head.startswith(b"HTTP/1.1 101")
    grew = relay.rss_growth(5)
    assert grew < 64 * 1024 * 1024, f"relay RSS grew by {grew >> 20} MiB"
    # Now read everything and check the payloads.
    h = hashlib.sha256()
    buf = bytearray(rest)
    got = 0
    s.settimeout(30)
    while got < n:
        while True:
            if len(buf) >= 2:
                ln = buf[1] & 0x7F
                off = 2
                if ln == 126:
                    off = 4
                    ln = int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else None
                elif ln == 127:
                    off = 10
                    ln = int.from_bytes(buf[2:10], "big") if len(buf) >= 10 else None
                if ln is not None and len(buf) >= off + ln:
                    assert buf[0] & 0x0F in (0x2, 0x0)
                    h.update(buf[off:off + ln])
                    del buf[:off + ln]
                    got += 1
                    continue
            break
        if got >= n:
            break
        chunk = s.recv(1 << 20)
        assert chunk, "relay closed before every message arrived"
        buf += chunk
    s.close()
    assert h.hexdigest() == flood_digest(n)


def test_idle_timeout_closes_silent_tunnel(ws_origin):
    from tests.support.relay import Relay

    async def go(url):
        async with connect(url + "/") as ws:
            await ws.send("alive")
            assert await ws.recv() == "alive"
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return time.monotonic() - t0

    with Relay(ws_origin.addr, workers=1, env={"RELAY_IDLE_TIMEOUT": "2"}) as r:
        took = run(go(r.url))
    assert 1.5 < took < 5
