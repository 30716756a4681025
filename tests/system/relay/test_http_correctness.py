"""HTTP/1.1 correctness at the edge (issue 13): inputs from public reports of
request smuggling and desync against other proxies, replayed against one
worker in front of a raw origin that answers byte for byte and records what
reached it. Each test fails on the code before the fix it names.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct

import pytest

from tests.support.net import read_head, status_of, upgrade_request, ws_key
from tests.support.raw_origins import (
    RawOrigin,
    accept_for,
    header,
    mask_frame,
    switching,
)
from tests.support.relay import Relay, wait_for
from tests.support.scrape import get, value


def recv_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the relay closes (a reset ends it too)."""
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
    return out


def heads_in(data: bytes) -> list[bytes]:
    """Status lines of every response in ``data``."""
    return re.findall(rb"HTTP/1\.[01] \d{3}[^\r\n]*", data)


def field(response: bytes, name: bytes) -> list[bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() == name.lower()]


async def read_until_eof(origin: RawOrigin, c) -> None:
    origin.received += c.rest
    while True:
        data = await c.reader.read(65536)
        if not data:
            return
        origin.received += data


def scripted(first: bytes, then_serve: bytes | None = None):
    """Answer the first head with ``first`` at once (without reading a body),
    then record everything that follows on the connection; answer any later
    request head with ``then_serve``."""
    async def behave(origin: RawOrigin, c) -> None:
        c.writer.write(first)
        await c.writer.drain()
        buf = bytearray(c.rest)
        origin.received += c.rest
        while True:
            data = await c.reader.read(65536)
            if not data:
                return
            origin.received += data
            buf += data
            if then_serve is not None and b"\r\n\r\n" in buf:
                c.writer.write(then_serve)
                buf.clear()
    return behave


@pytest.fixture
def raw(loop_thread):
    origins = []

    def make(behaviour, workers=1, env=None):
        o = RawOrigin(loop_thread, behaviour).start()
        origins.append(o)
        r = Relay(o.addr, workers=workers, env=env).start()
        origins.append(r)
        return o, r
    yield make
    for x in reversed(origins):
        x.stop()


# -- 1. bytes after an upgrade head ------------------------------------------------------

FORGED = b"GET /internal HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"


@pytest.mark.parametrize("mode", ["tunnel", "frames"])
def test_bytes_after_a_refused_upgrade_never_reach_the_origin(raw, mode):
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
    origin, relay = raw(scripted(refusal, then_serve=b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninternal"),
                        env={"RELAY_MODE": mode})
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.sendall(upgrade_request("/ws") + FORGED)
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 403 Forbidden"], out
    assert field(out, b"connection") == [b"close"], out
    assert b"internal" not in out
    assert b"/internal" not in bytes(origin.received), bytes(origin.received)
    assert all(b"/internal" not in h for h in origin.heads)


def test_bytes_after_an_upgrade_head_reach_the_origin_after_its_101(raw):
    async def check_then_echo(origin, c):
        # Nothing but the head before our 101.
        origin.received += b"EARLY:" + c.rest
        c.writer.write(switching(c.head))
        while data := await c.reader.read(65536):
            c.writer.write(data)
    origin, relay = raw(check_then_echo)
    frame = mask_frame(b"early bird")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/ws") + frame)
        head, data = read_head(s)
        assert status_of(head) == 101
        while len(data) < len(frame):
            data += s.recv(65536)
    assert data == frame  # the origin echoed the early frame, byte for byte
    assert bytes(origin.received) == b"EARLY:"  # and had nothing but the head before its 101


# -- 2. an answer before the end of the request body --------------------------------------

def test_early_answer_during_an_upload_never_parses_the_rest_as_a_request(raw):
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nX-Pad: "
    smuggled += b"p" * (92 - len(smuggled) - 4) + b"\r\n\r\n"
    assert len(smuggled) == 92
    origin, relay = raw(scripted(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
                                 then_serve=b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 156\r\n\r\n" + b"b" * 64)
        head, _ = read_head(s)
        assert status_of(head) == 401
        assert field(head + b"\r\n\r\n", b"connection") == [b"close"], head
        try:
            s.sendall(smuggled)
        except OSError:
            pass  # the relay may be gone already: fine
        out = head + recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 401 Unauthorized"], out
    assert all(not h.startswith(b"GET /smuggled") for h in origin.heads), origin.heads
    assert origin.connections == 1


def test_answer_after_expect_continue_keeps_the_connection(raw):
    async def continue_then_answer(origin, c):
        while True:
            n = int(header(c.head, b"content-length") or 0)
            if header(c.head, b"expect"):
                c.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = c.rest
            while len(body) < n:
                body += await c.reader.read(65536)
            c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body[:n]) + body[:n])
            rest = body[n:]
            while b"\r\n\r\n" not in rest:
                data = await c.reader.read(65536)
                if not data:
                    return
                rest += data
            head, _, c.rest = rest.partition(b"\r\n\r\n")
            c.head = head + b"\r\n\r\n"
    origin, relay = raw(continue_then_answer)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        head, rest = read_head(s)
        assert status_of(head) == 100
        s.sendall(b"hello")
        data = rest
        while b"hello" not in data:
            data += s.recv(65536)
        assert status_of(data) == 200 and b"keep-alive" in data.lower()
        s.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = recv_all(s)
    assert status_of(out) == 200
    assert origin.connections == 1


# -- 3. HTTP/1.0 clients ------------------------------------------------------------------

CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"])
def test_http10_client_gets_no_chunked_framing_and_no_interim_answer(raw, interim):
    origin, relay = raw(scripted(interim + CHUNKED))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 200 OK"], out
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"hello world", out
    assert not field(out, b"transfer-encoding") and not field(out, b"trailer"), head
    assert field(out, b"connection") == [b"close"]


def test_http11_client_gets_trailer_field_with_the_trailers(raw):
    """7. Trailer is end-to-end (RFC 9110 §6.6.2): kept when the trailers are relayed."""
    origin, relay = raw(scripted(CHUNKED))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = recv_all(s)
    assert field(out, b"trailer") == [b"X-Sum"], out
    assert out.endswith(b"0\r\nX-Sum: 42\r\n\r\n"), out


# -- 4. persistence of origin connections -------------------------------------------------

def http10_origin(keep_alive: bool):
    """Answers HTTP/1.0; without keep-alive it drops the connection when asked again."""
    async def behave(origin, c):
        while True:
            extra = b"Connection: keep-alive\r\n" if keep_alive else b""
            c.writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
            await c.writer.drain()
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await c.reader.read(65536)
                if not data:
                    return
                buf += data
            if not keep_alive:
                return  # an HTTP/1.0 server reads no second request: it closes
    return behave


@pytest.mark.parametrize("keep_alive", [False, True])
def test_http10_origin_connection_is_reused_only_with_keep_alive(raw, keep_alive):
    origin, relay = raw(http10_origin(keep_alive))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        for i in range(3):
            s.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            head, rest = read_head(s)
            while len(rest) < 2:
                rest += s.recv(65536)
            assert status_of(head) == 200, (i, head)
    assert origin.connections == (1 if keep_alive else 3)


# -- 5. a refused upgrade's hop-by-hop fields ----------------------------------------------

def test_refused_upgrade_says_connection_close_and_drops_hop_by_hop_fields(raw):
    refusal = (b"HTTP/1.1 404 Not Found\r\nConnection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\n"
               b"X-Internal: secret\r\nX-Kept: 1\r\nContent-Length: 3\r\n\r\nnah")
    origin, relay = raw(scripted(refusal))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/ws"))
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 404 Not Found"]
    assert field(out, b"connection") == [b"close"], out
    assert not field(out, b"keep-alive") and not field(out, b"x-internal"), out
    assert field(out, b"x-kept") == [b"1"] and out.endswith(b"\r\n\r\nnah")


@pytest.mark.parametrize("plane", ["auto", "python"])
def test_a_client_resetting_during_a_refusals_body_closes_the_origin_quietly(raw, plane):
    """An origin's refusal with a body delimited by close, still coming when
    the client resets: the relay closes the origin's connection at once (it
    held it until the origin gave up), and nothing breaks when the origin
    closes after (it asserted CLOSED -> LINGER). Both head phases: C (auto)
    and Python. (A FIN is a half-close, not an abort: test below.)"""
    left = asyncio.Event()

    async def slow_refusal(origin, c):
        c.writer.write(b"HTTP/1.0 403 Forbidden\r\n\r\n" + b"x" * 1000)
        await c.writer.drain()
        try:
            data = await asyncio.wait_for(c.reader.read(65536), 3)
            origin.received += b"<closed by the relay>" if not data else data
        except asyncio.TimeoutError:
            origin.received += b"<still open>"
        except ConnectionError:
            origin.received += b"<closed by the relay>"
        left.set()

    origin, relay = raw(slow_refusal, env={"RELAY_DATA_PLANE": plane})
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/ws"))
        assert status_of(read_head(s)[0]) == 403
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: left.is_set(), 6, what="the origin to see the end")
    assert bytes(origin.received) == b"<closed by the relay>"
    wait_for(lambda: any('"status":403' in line for line in relay.access), 5)
    relay.stop()  # fails on a traceback in its log


@pytest.mark.parametrize("plane", ["auto", "python"])
def test_a_client_half_closing_still_gets_the_whole_refusal(raw, plane):
    """A half-close is not an abort: the refusal's body still comes whole."""
    async def trickled(origin, c):
        c.writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 30000\r\n\r\n")
        for _ in range(3):
            await asyncio.sleep(0.1)
            c.writer.write(b"b" * 10000)
            await c.writer.drain()
        await c.reader.read(65536)

    origin, relay = raw(trickled, env={"RELAY_DATA_PLANE": plane})
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/ws"))
        s.shutdown(socket.SHUT_WR)
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 403 Forbidden"] and out.endswith(b"\r\n\r\n" + b"b" * 30000), out[:300]


# -- 6. interim answers before the 101 ----------------------------------------------------

def interim_then(interim: bytes, accept: bytes | None = None):
    async def behave(origin, c):
        c.writer.write(interim)
        await c.writer.drain()
        c.writer.write(switching(c.head, accept))
        while data := await c.reader.read(65536):
            origin.received += data
            c.writer.write(data)
    return behave


@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n",
                                     b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"])
def test_interim_answers_before_the_101_are_not_final(raw, interim):
    origin, relay = raw(interim_then(interim), env={"RELAY_METRICS_LISTEN": "127.0.0.1:0"})
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        key = ws_key()
        s.sendall(upgrade_request("/ws", key=key))
        head, rest = read_head(s)
        assert status_of(head) == 101, head  # the interim answers were consumed, not relayed
        assert field(head + b"\r\n\r\n", b"sec-websocket-accept") == [accept_for(key.encode())]
        frame = mask_frame(b"after hints")
        s.sendall(frame)
        while len(rest) < len(frame):
            rest += s.recv(65536)
        assert rest == frame  # echoed by the origin as sent
        assert _clients(relay) == 1
    wait_for(lambda: _clients(relay) == 0, 5, what="the slot given back at the end")
    wait_for(lambda: any('"outcome":"upgraded"' in line for line in relay.access), 5)
    assert not any("origin_rejected" in line for line in relay.access)


def test_wrong_accept_after_an_interim_answer_is_a_502(raw):
    origin, relay = raw(interim_then(b"HTTP/1.1 103 Early Hints\r\n\r\n", accept=b"d3Jvbmc="))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/ws"))
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 502 Bad Gateway"]


def _clients(relay) -> float:
    return value(relay, "wsrelay_clients")


# -- 8. an abandoned long poll --------------------------------------------------------------

def test_client_reset_during_a_long_poll_closes_the_origin_connection(raw):
    closed = []

    async def hold(origin, c):
        while await c.reader.read(65536):
            pass
        closed.append(True)  # the relay closed its side: the poll was abandoned

    origin, relay = raw(hold)
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    s.sendall(b"GET /lp/poll HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: origin.connections == 1 and origin.heads, 5, what="the poll at the origin")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset
    wait_for(lambda: closed, 3, what="the origin connection closed after the client's reset")
    wait_for(lambda: relay.access, 3, what="an access log line")
    line = json.loads(relay.access[-1])
    assert (line["status"], line["outcome"], line["path"]) == (499, "client_abort", "/lp/poll")
    assert value(relay, "wsrelay_http_requests_total", code="499", worker="0") == 1


def test_client_half_close_during_a_long_poll_still_gets_the_answer(raw):
    release = asyncio.Event()

    async def answer_later(origin, c):
        await release.wait()
        c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nmessage")
        await c.writer.drain()

    origin, relay = raw(answer_later)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET /lp/poll HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: origin.heads, 5, what="the poll at the origin")
        s.shutdown(socket.SHUT_WR)
        relay_loop = origin.lt.loop
        relay_loop.call_soon_threadsafe(release.set)
        out = recv_all(s)
    assert status_of(out) == 200 and out.endswith(b"message")


# -- 10. /readyz while the first worker serves ----------------------------------------------

def test_readyz_is_200_once_a_worker_accepts(ws_origin):
    r = Relay(ws_origin.addr, workers=2, env={"WSRELAY_FAULT": "slow-start"}).start(wait_ready=False)
    try:
        r.wait_log("metrics on http://", timeout=15)
        r.metrics_port = int(re.search(r"metrics on http://[^ ]*?:(\d+)/", r.text()).group(1))

        def readyz() -> int:
            return get(r, "/readyz")[0]
        wait_for(lambda: readyz() == 200, 4, what="/readyz 200 with one worker accepting")
        assert "ready:" not in r.text(), "the second worker is still starting: this must precede it"
        r.wait_log("ready: 2 workers", timeout=15)
        assert readyz() == 200
    finally:
        r.stop()


# -- 11. a request line over the head limit -------------------------------------------------

def test_request_line_over_the_limit_is_414(raw):
    origin, relay = raw(scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 414 URI Too Long"], out[:200]
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        out = recv_all(s)
    assert heads_in(out) == [b"HTTP/1.1 431 Request Header Fields Too Large"], out[:200]
    assert origin.connections == 0


# -- a pooled origin connection closed under our feet ------------------------------------------

async def answer_once_per_connection(origin, c):
    """Answers the first request with keep-alive, then closes on the next one
    without answering: its idle timeout raced the relay's reuse."""
    c.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await c.writer.drain()
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await c.reader.read(65536)
        if not data:
            return
        buf += data
    origin.received += buf  # the request that was lost


@pytest.mark.parametrize("method, status", [("GET", 200), ("DELETE", 200), ("POST", 502)])
def test_stale_pooled_connection_resends_only_idempotent_requests(raw, method, status):
    origin, relay = raw(answer_once_per_connection)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        head, rest = read_head(s)
        while len(rest) < 2:
            rest += s.recv(65536)
        s.sendall(f"{method} /second HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        out = recv_all(s)
    assert heads_in(out)[0].split(b" ")[1] == str(status).encode(), out
    # the first connection was reused (and lost the request); a retry opens one more
    assert origin.connections == (2 if status == 200 else 1)
