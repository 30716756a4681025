"""Plain HTTP pass-through, the long-polling fallback (README: "Long polling, the fallback"; issue 5):
an aiohttp origin behind the real relay."""

from __future__ import annotations

import hashlib
import socket
import time

import aiohttp
import pytest

from tests.support.net import raw_exchange, status_of
from tests.support.origins import flood_digest
from tests.support.relay import Relay, run


def request(relay, method, path, **kw):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.request(method, f"http://127.0.0.1:{relay.port}{path}", **kw) as r:
                return r.status, dict(r.headers), await r.read()
    return run(go())


def test_get_and_post_with_content_length(aio_relay, aio_origin):
    status, headers, body = request(aio_relay, "GET", "/hello?x=1")
    assert status == 200 and headers["X-Echo-Method"] == "GET" and body == b""
    status, headers, body = request(aio_relay, "POST", "/submit", data=b"a=1&b=2" * 1000)
    assert status == 200 and body == b"a=1&b=2" * 1000
    method, path, seen_headers, seen_body = aio_origin.seen[-1]
    assert (method, path, seen_body) == ("POST", "/submit", b"a=1&b=2" * 1000)
    assert seen_headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen_headers["X-Forwarded-Proto"] == "http"


def test_chunked_bodies_both_ways(aio_relay, aio_origin):
    async def gen():
        for i in range(10):
            yield b"chunk-%d|" % i
    status, headers, body = request(aio_relay, "POST", "/chunked", data=gen())
    expected_up = b"".join(b"chunk-%d|" % i for i in range(10))
    assert status == 200
    assert headers.get("Transfer-Encoding") == "chunked"
    assert body == b"".join(b"part %d;" % i for i in range(5)) + expected_up
    assert aio_origin.seen[-1][3] == expected_up


def test_two_requests_on_one_kept_alive_connection(aio_relay):
    with socket.create_connection(("127.0.0.1", aio_relay.port), timeout=10) as s:
        f = s.makefile("rb")
        for i in range(2):
            s.sendall(b"POST /k%d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" % i)
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200")
            headers = {}
            while (line := f.readline()) != b"\r\n":
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            assert headers["connection"] == "keep-alive"
            assert f.read(int(headers["content-length"])) == b"abc"


def test_pipelined_requests_are_answered_in_order(aio_relay):
    data = b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(aio_relay.port, data)
    assert out.count(b"HTTP/1.1 200") == 2


def test_long_poll_answered_after_5s_passes(aio_relay):
    t0 = time.monotonic()
    status, _, body = request(aio_relay, "GET", "/poll?delay=5")
    assert status == 200 and body == b"polled after 5.0"
    assert time.monotonic() - t0 >= 5


def test_read_timeout_gives_504(aio_origin):
    with Relay(aio_origin.addr, workers=1, env={"RELAY_READ_TIMEOUT": "2"}) as r:
        t0 = time.monotonic()
        status, _, _ = request(r, "GET", "/poll?delay=5")
        assert status == 504
        assert 1.8 < time.monotonic() - t0 < 4.5


def test_502_when_origin_unreachable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with Relay(f"127.0.0.1:{port}", workers=1) as r:
        assert request(r, "GET", "/")[0] == 502


def test_50mib_response_intact_and_memory_bounded(aio_relay):
    n = 50
    with socket.create_connection(("127.0.0.1", aio_relay.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big?mib=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
        before = aio_relay.rss()
        peak = before
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        # Read slowly at first: the relay must apply backpressure, not buffer.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            peak = max(peak, aio_relay.rss())
            time.sleep(0.1)
        h = hashlib.sha256(rest)
        got = len(rest)
        while got < n << 20:
            chunk = s.recv(1 << 20)
            assert chunk, "closed early"
            h.update(chunk)
            got += len(chunk)
        assert got == n << 20
        assert h.hexdigest() == flood_digest(n)
        assert peak - before < 32 << 20, f"relay grew by {(peak - before) >> 20} MiB"


SMUGGLING = {
    "cl-and-te": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "cl-list": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 5\r\n\r\nabcde",
    "te-not-chunked-last": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-gzip": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-http10": b"POST /s HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n folded\r\n\r\nabc",
    "bad-name": b"POST /s HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\nContent-Length: 3\r\n\r\nabc",
    "nul-value": b"POST /s HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 3\r\n\r\nabc",
    "bare-lf": b"POST /s HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc\r\n\r\n",
    "space-te": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", SMUGGLING)
def test_request_smuggling_is_refused_and_never_reaches_the_origin(aio_relay, aio_origin, name):
    seen = len(aio_origin.seen)
    out = raw_exchange(aio_relay.port, SMUGGLING[name])
    assert status_of(out) == 400
    assert b"Connection: close" in out
    assert out.count(b"HTTP/1.1") == 1
    # bad-chunk reaches the origin as a started request; it must not complete there
    assert all(p != "/s" or name == "bad-chunk" for _m, p, _h, _b in aio_origin.seen[seen:])
    if name == "bad-chunk":
        assert all(b != b"abc" for _m, p, _h, b in aio_origin.seen[seen:])
