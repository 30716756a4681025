"""Both data planes relay the same byte streams and endings (RELAY_DATA_PLANE,
relay/native): random sequences of sends both ways, backpressure (one end
stops reading while the other pushes megabytes), half-closes in either
order, resets from either end, played through a real native relay (its
engine on io_uring, and again on epoll) and a real Python relay, each step
waiting for its effect before the next. The
two must agree with each other and with what a byte-transparent TCP tunnel
would do: every byte in order, a FIN as a FIN with the other direction
still open, a reset as a reset, and the access log counting the same bytes.

Bounded: DATA_PLANE_FUZZ_EXAMPLES sequences (default 15, a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import native
from tests.support.net import read_head, status_of, upgrade_request
from tests.support.raw_origins import switching
from tests.support.relay import Relay, wait_for

pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")

EXAMPLES = int(os.environ.get("DATA_PLANE_FUZZ_EXAMPLES", "15"))

STEP = st.one_of(
    st.tuples(st.just("c2o"), st.integers(1, 100_000)),
    st.tuples(st.just("o2c"), st.integers(1, 100_000)),
    st.tuples(st.just("stall_c2o"), st.integers(1, 6)),  # MiB pushed at an origin that waits, then reads
    st.tuples(st.just("stall_o2c"), st.integers(1, 6)),
)
ENDINGS = ["c_fin,o_fin", "o_fin,c_fin", "c_rst", "o_rst", "c_fin,o_rst", "o_fin,c_rst"]


@pytest.fixture(scope="module")
def origin_listener():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.settimeout(10)
    yield lst
    lst.close()


@pytest.fixture(scope="module")
def relays(origin_listener):
    addr = "127.0.0.1:%d" % origin_listener.getsockname()[1]
    with Relay(addr, workers=1, metrics=False, env={"RELAY_DATA_PLANE": "native"}) as n, \
            Relay(addr, workers=1, metrics=False, env={"RELAY_DATA_PLANE": "native",
                                                        "WSRELAY_NATIVE_BACKEND": "epoll"}) as ne, \
            Relay(addr, workers=1, metrics=False, env={"RELAY_DATA_PLANE": "python"}) as p:
        yield {"native": n, "native-epoll": ne, "python": p}


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(min(1 << 20, n - len(got)))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def ending(s: socket.socket, timeout: float = 5.0) -> str:
    """How the stream towards ``s`` ends: 'eof', 'reset', or 'open' (no end seen)."""
    s.settimeout(timeout)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return "eof"
            return "data:%d" % len(chunk)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    finally:
        s.settimeout(10)


def rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def stalled_transfer(src: socket.socket, dst: socket.socket, mib: int, rng: random.Random) -> bool:
    """``src`` pushes ``mib`` MiB while ``dst`` reads nothing for 0.3 s, then
    reads it all; True if every byte arrived in order."""
    blob = rng.randbytes(mib << 20)
    errors = []

    def push():
        try:
            src.sendall(blob)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=push, daemon=True)
    t.start()
    time.sleep(0.3)
    got = recv_exactly(dst, len(blob))
    t.join(10)
    return not errors and hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()


def play(relay: Relay, listener: socket.socket, steps, end: str, seed: int) -> dict:
    """Run one sequence through ``relay``; returns what both ends observed."""
    rng = random.Random(seed)
    seen = len(relay.access)
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    client.sendall(upgrade_request("/fuzz"))
    origin, _ = listener.accept()
    origin.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        head += origin.recv(65536)
    origin.sendall(switching(head))
    assert status_of(read_head(client)[0]) == 101
    up = down = 0
    log = []
    try:
        for kind, n in steps:
            if kind == "c2o":
                data = rng.randbytes(n)
                client.sendall(data)
                log.append(recv_exactly(origin, n) == data)
                up += n
            elif kind == "o2c":
                data = rng.randbytes(n)
                origin.sendall(data)
                log.append(recv_exactly(client, n) == data)
                down += n
            elif kind == "stall_c2o":
                log.append(stalled_transfer(client, origin, n, rng))
                up += n << 20
            else:
                log.append(stalled_transfer(origin, client, n, rng))
                down += n << 20
        finned = set()
        for action in end.split(","):
            who, what = action.split("_")
            me, other = (client, origin) if who == "c" else (origin, client)
            if what == "fin":
                me.shutdown(socket.SHUT_WR)
                finned.add(who)
                log.append((action, ending(other)))
                if len(finned) == 1:  # the other direction still flows after one FIN
                    data = rng.randbytes(1000)
                    other.sendall(data)
                    log.append(recv_exactly(me, 1000) == data)
                    if who == "c":
                        down += 1000
                    else:
                        up += 1000
            else:
                rst(me)
                log.append((action, ending(other)))
    finally:
        for s in (client, origin):
            try:
                s.close()
            except OSError:
                pass
    wait_for(lambda: len(relay.access) > seen, 10, what="the session's access log line")
    rec = json.loads(relay.access[-1])
    return {"log": log, "bytes": (rec["bytes_up"], rec["bytes_down"]), "expected_bytes": (up, down),
            "plane": rec["data_plane"]}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEP, max_size=5), end=st.sampled_from(ENDINGS), seed=st.integers(0, 2**32))
def test_both_data_planes_carry_the_same_streams_and_endings(relays, origin_listener, steps, end, seed):
    got = {plane: play(r, origin_listener, steps, end, seed) for plane, r in relays.items()}
    n, p = got["native"], got["python"]
    assert n["plane"] == got["native-epoll"]["plane"] == "native" and p["plane"] == "python"
    for other in ("native-epoll", "python"):
        o = got[other]
        assert n["log"] == o["log"], (other, steps, end, n["log"], o["log"])
        assert n["bytes"] == o["bytes"], (other, steps, end, n, o)
    # and both are what a transparent tunnel does
    assert all(x is True for x in n["log"] if isinstance(x, bool))
    for entry in n["log"]:
        if isinstance(entry, tuple) and len(entry) == 2:
            action, observed = entry
            assert observed == ("eof" if action.endswith("fin") else "reset"), (steps, end, n["log"])
    assert n["bytes"] == n["expected_bytes"], (steps, end, n)


# -- the head phase: C (the native plane's default) against Python --------------------------
#
# Random upgrade requests (extra fields, a query, early bytes, sent whole, cut
# or trickled; now and then one the relay must refuse) against random origin
# answers (a 101, a wrong accept, interim answers first, refusals delimited by
# Content-Length, chunks or close, a close without a byte, a truncated head,
# garbage), played through the same three relays. What the client reads, what
# the origin gets (the forwarded head, with the request id masked) and the
# access log's status and outcome must be the same on every plane.

EXTRA = st.sampled_from([
    "", "X-Forwarded-For: 198.51.100.7\r\n", "Cookie: a=b; c=d\r\n", "Origin: https://app.example.com\r\n",
    "Connection: keep-alive, Upgrade, X-Hop\r\nX-Hop: 1\r\n", "X_Forwarded_For: forged\r\n",
    "User-Agent: fuzz/1.0\r\nX-Request-ID: mine\r\n", "Sec-WebSocket-Protocol: chat, superchat\r\n",
])
BROKEN = st.sampled_from([
    None, None, None, None,
    b"GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\n\n",
    b"GET http://victim:1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
])
ANSWER = st.one_of(
    st.just(("101",)), st.just(("101",)), st.just(("wrong-accept",)),
    st.tuples(st.just("interim"), st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                                                   b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"])),
    st.tuples(st.just("length"), st.sampled_from([403, 404, 500]), st.integers(0, 300_000)),
    st.tuples(st.just("chunked"), st.lists(st.integers(1, 5000), max_size=4)),
    st.tuples(st.just("until-close"), st.integers(0, 100_000)),
    st.just(("close",)), st.just(("truncated",)), st.just(("garbage",)),
)


async def _scripted(origin, c) -> None:
    """Answers as the current example's plan says (origin.plan)."""
    kind, *args = origin.plan
    origin.received += c.rest  # nothing may come with the head: early bytes wait for the 101
    # This origin answers one request per connection: a plain request's answer
    # says Connection: close, or the relay would pool the connection and ask
    # it again (the next example's request would wait for an answer forever).
    close = b"Connection: close\r\n" if b"upgrade:" not in bytes(c.head).lower() else b""
    if kind in ("101", "wrong-accept", "interim"):
        if kind == "interim":
            c.writer.write(args[0])
            await c.writer.drain()
        c.writer.write(switching(c.head, b"d3Jvbmc=" if kind == "wrong-accept" else None))
        while data := await c.reader.read(65536):
            c.writer.write(data)
        return
    if kind == "close":
        return
    if kind == "truncated":
        c.writer.write(b"HTTP/1.1 101 Swi")
        return
    if kind == "garbage":
        c.writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    elif kind == "length":
        status, n = args
        c.writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: %d\r\nX-Origin: 1\r\n%s\r\n"
                       % (status, n, close) + bytes(i % 251 for i in range(n)))
    elif kind == "chunked":
        c.writer.write(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n%s\r\n"
                       % (close or b"Connection: keep-alive\r\n"))
        for i, n in enumerate(args[0]):
            c.writer.write(b"%x\r\n%s\r\n" % (n, bytes([65 + i]) * n))
            await c.writer.drain()
        c.writer.write(b"0\r\n\r\n")
    else:  # until close
        c.writer.write(b"HTTP/1.0 403 Forbidden\r\n\r\n" + b"z" * args[0])
        await c.writer.drain()
        return
    await c.writer.drain()
    while data := await c.reader.read(65536):  # until the relay closes
        origin.received += data


@pytest.fixture(scope="module")
def head_relays(loop_thread):
    from tests.support.raw_origins import RawOrigin

    origin = RawOrigin(loop_thread, _scripted).start()
    env = {"RELAY_CONNECT_TIMEOUT": "2", "RELAY_WS_PATHS": "/ws"}
    with Relay(origin.addr, workers=1, metrics=False, env={**env, "RELAY_DATA_PLANE": "native"}) as n, \
            Relay(origin.addr, workers=1, metrics=False, env={**env, "RELAY_DATA_PLANE": "native",
                                                               "WSRELAY_NATIVE_BACKEND": "epoll"}) as ne, \
            Relay(origin.addr, workers=1, metrics=False, env={**env, "RELAY_DATA_PLANE": "python"}) as p:
        yield origin, {"native": n, "native-epoll": ne, "python": p}
    origin.stop()


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return out + b"<reset>"
        if not chunk:
            return out
        out += chunk


def play_head(relay: Relay, origin, request: bytes, cuts, early: bytes, plan) -> dict:
    seen = len(relay.access)
    heads = len(origin.heads)
    origin.plan = plan
    origin.received.clear()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        data, prev = request + early, 0
        for cut in [*cuts, len(data)]:
            if prev < cut <= len(data):
                s.sendall(data[prev:cut])
                prev = cut
                time.sleep(0.005)
        got = b""
        while b"\r\n\r\n" not in got:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                got += b"<reset>"
                break
            if not chunk:
                break
            got += chunk
        if got.startswith(b"HTTP/1.1 101"):
            while len(got) < got.index(b"\r\n\r\n") + 4 + len(early):
                got += s.recv(65536)
            s.sendall(b"after the 101")
            echo = b""
            while len(echo) < 13:
                echo += s.recv(65536)
            got += b"|" + echo
            s.shutdown(socket.SHUT_WR)
            got += _read_all(s)
        else:
            got += _read_all(s)
    wait_for(lambda: len(relay.access) > seen, 10, what="the request's access log line")
    rec = json.loads(relay.access[-1])
    forwarded = [re.sub(rb"X-Request-ID: [0-9a-f]{32}", b"X-Request-ID: <id>", h) for h in origin.heads[heads:]]
    return {"client": got, "origin": forwarded, "before_101": bytes(origin.received),
            "log": (rec["status"], rec["outcome"], rec["method"], rec["path"], rec["origin"] != "")}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(extra=EXTRA, broken=BROKEN, query=st.sampled_from(["", "?a=1&b=%20"]),
       early=st.sampled_from([b"", b"\x81\x85abcd\x29\x07\x0f\x08\x0e"]), answer=ANSWER,
       cuts=st.lists(st.integers(1, 400), max_size=3))
def test_both_head_phases_answer_alike(head_relays, extra, broken, query, early, answer, cuts):
    origin, relays = head_relays
    request = broken or upgrade_request("/ws" + query, extra=extra)
    got = {plane: play_head(r, origin, request, sorted(set(cuts)), early, answer) for plane, r in relays.items()}
    for plane in ("native-epoll", "python"):
        assert got["native"] == got[plane], (plane, request, answer, got["native"], got[plane])
