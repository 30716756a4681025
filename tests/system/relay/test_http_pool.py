"""Plain HTTP pass-through against a raw origin that shows what reached it
(issue 5): the per-worker origin pool reuses connections and drops one the
origin answered with ``Connection: close``; hop-by-hop headers are removed in
both directions; request bodies are streamed to the origin, not buffered.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.net import raw_exchange, read_head, status_of
from tests.support.raw_origins import RawOrigin, header, keepalive_http
from tests.support.relay import Relay, wait_for

RESPONSE_HOP = (b"Keep-Alive: timeout=5, max=100\r\nConnection: keep-alive, X-Origin-Secret\r\n"
                b"X-Origin-Secret: s\r\nProxy-Connection: keep-alive\r\nX-Origin-Kept: k\r\n")


async def streaming_sink(origin: RawOrigin, c) -> None:
    """Records body bytes as they arrive; answers once the whole body is in."""
    length = header(c.head, b"content-length")
    data = bytearray(c.rest)
    origin.received += c.rest
    while not (len(data) >= int(length) if length is not None else data.endswith(b"0\r\n\r\n")):
        chunk = await c.reader.read(65536)
        if not chunk:
            return
        data += chunk
        origin.received += chunk
    body = b"got %d" % len(data)
    c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await c.writer.drain()


@pytest.fixture(scope="module")
def origin(loop_thread):
    with RawOrigin(loop_thread, keepalive_http) as o:
        yield o


@pytest.fixture(scope="module")
def relay(origin):
    # One worker: the pool is per worker, so every request meets the same one.
    with Relay(origin.addr, workers=1) as r:
        yield r


def get(relay: Relay, path: str, extra: str = "") -> tuple[bytes, bytes]:
    out = raw_exchange(relay.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert status_of(head) == 200, out[:300]
    return head, body


def test_origin_connection_is_reused_across_requests_and_client_connections(relay, origin):
    before = origin.connections
    bodies = [get(relay, f"/r{i}")[1] for i in range(4)]
    # a kept-alive client connection draws on the same pool
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        f = s.makefile("rb")
        for i in range(2):
            s.sendall(b"GET /k%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            bodies.append(f.read(length))
    assert len(set(bodies)) == 1, bodies
    assert origin.connections <= before + 1, "the origin connection was not reused"


@pytest.mark.parametrize("path", ["/close", "/close-linger"])
def test_origin_connection_close_is_never_reused(relay, origin, path):
    get(relay, "/warm")  # a pooled connection exists
    before = origin.connections
    _, closing = get(relay, path)
    _, after = get(relay, "/next")
    assert closing != after, (closing, after)
    assert origin.connections == before + 1, "the next request must open a new origin connection"
    # and the new one is pooled in turn
    assert get(relay, "/again")[1] == after


def test_hop_by_hop_headers_are_removed_both_ways(relay, origin):
    before = len(origin.heads)
    extra = ("Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
             "Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-Kept: 2\r\n")
    out = raw_exchange(relay.port, f"GET /hop HTTP/1.1\r\nHost: front.example\r\n{extra}\r\n".encode()
                       + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2, out
    wait_for(lambda: len(origin.heads) >= before + 2, 5, what="both heads at the origin")
    seen = next(h for h in origin.heads[before:] if h.startswith(b"GET /hop "))
    lines = [ln.lower() for ln in seen.split(b"\r\n")]
    for name in (b"x-secret", b"keep-alive", b"te", b"proxy-connection"):
        assert not any(ln.startswith(name + b":") for ln in lines), (name, seen)
    # Trailer is end-to-end (RFC 9110 §6.6.2): it goes with the trailers it announces
    assert b"trailer: x-t" in lines
    assert b"x-kept: 2" in lines and b"host: front.example" in lines
    assert b"x-forwarded-for: 127.0.0.1" in lines and b"x-forwarded-proto: http" in lines
    assert b"x-forwarded-host: front.example" in lines
    assert [ln for ln in lines if ln.startswith(b"connection:")] == [b"connection: keep-alive"]
    # towards the client: the origin's hop-by-hop fields are replaced by the relay's own Connection
    first = out[: out.index(b"HTTP/1.1 200", 1)]
    head = first.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
    for name in (b"x-origin-secret", b"keep-alive", b"proxy-connection"):
        assert not any(ln.startswith(name + b":") for ln in head), (name, first)
    assert b"x-origin-kept: k" in head
    assert [ln for ln in head if ln.startswith(b"connection:")] == [b"connection: keep-alive"]


@pytest.fixture(scope="module")
def sink(loop_thread):
    with RawOrigin(loop_thread, streaming_sink) as o:
        yield o


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_body_is_streamed_to_the_origin_before_it_is_complete(sink, framing):
    first = b"x" * 1000
    rest = b"y" * (256 * 1024)
    if framing == "chunked":
        te = b"Transfer-Encoding: chunked\r\n"
        first, rest = b"%x\r\n%s\r\n" % (len(first), first), b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest)
    else:
        te = b"Content-Length: %d\r\n" % (len(first) + len(rest))
    with Relay(sink.addr, workers=1) as r, socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
        sink.received.clear()
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + te + b"Connection: close\r\n\r\n" + first)
        # The start of the body reaches the origin while the client still holds the rest.
        wait_for(lambda: len(sink.received) >= len(first), 10, what="the first part of the body at the origin")
        assert bytes(sink.received) == first
        t0 = time.monotonic()
        s.sendall(rest)
        head, body = read_head(s)
        while len(body) < len(b"got %d" % (len(first) + len(rest))):
            chunk = s.recv(65536)
            assert chunk
            body += chunk
        assert time.monotonic() - t0 < 10
    assert status_of(head) == 200
    assert body == b"got %d" % (len(first) + len(rest))
    assert bytes(sink.received) == first + rest


def _smuggling_cases():
    from tests.system.relay.test_http import SMUGGLING

    return {name: data for name, data in SMUGGLING.items() if name != "bad-chunk"}  # bad-chunk: a valid head


@pytest.mark.parametrize("name", list(_smuggling_cases()))
def test_smuggling_attempts_never_reach_a_raw_origin(relay, origin, name):
    """tests/system/relay/test_http.py checks the same cases against aiohttp, which would refuse most
    of them itself; this origin takes any bytes, so nothing arriving means nothing sent."""
    get(relay, "/warm")  # a pooled origin connection is there to be (mis)used
    heads, connections = len(origin.heads), origin.connections
    out = raw_exchange(relay.port, _smuggling_cases()[name])
    assert status_of(out) == 400 and out.count(b"HTTP/1.1") == 1
    get(relay, "/after")  # goes through the pool: anything smuggled would be read before it
    assert origin.connections == connections, "the refused request opened an origin connection"
    assert [h.split(b"\r\n")[0] for h in origin.heads[heads:]] == [b"GET /after HTTP/1.1"]
