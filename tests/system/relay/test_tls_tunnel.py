"""wss:// tunnels after the 101, on each data plane (tests/conftest.py
BOTH_PLANES, EPOLL_TOO): on the native plane the engine relays them with the
client's SSL (relay/native/engine.c "TLS tunnels"; on an io_uring worker a
second engine on epoll), on the Python plane uvloop's SSL protocol does.
Both must behave alike, seen from a real TLS client (an ssl.SSLObject whose
records the test places itself, tests/support/tls.TlsConn) and a raw origin:
bytes both ways in order at every size, what arrives in the same packets as
the 101 from either side, half-close both ways (close_notify, FIN), resets,
backpressure with bounded memory, idle timeout, and the access log's
data plane and plaintext byte counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time

import pytest

from tests.support.net import upgrade_request
from tests.support.raw_origins import RawOrigin, rst, switching
from tests.support.relay import wait_for
from tests.support.tls import TlsConn, client_context, tls_relay


async def behave(origin: RawOrigin, c) -> None:
    """``/<kind>/<token>``: echo (the default), ``fin`` (read to EOF, then
    answer and close), ``first`` (data in the same write as the 101, then
    echo), ``closer`` (send, FIN, then read to EOF), ``rst`` (send, then
    reset), ``sink`` (read nothing until the test opens the tap), ``flood/<MiB>``
    (send that much, then FIN, then read to EOF). What it read and how the
    stream ended is in origin.events[token]."""
    parts = c.head.split(b" ", 2)[1].decode().strip("/").split("/")
    kind, token = parts[0], parts[1]
    hello = b"origin-first" if kind == "first" else b""
    c.writer.write(switching(c.head) + hello)
    await c.writer.drain()
    got = bytearray(c.rest)
    if kind == "sink":
        tap = origin.taps[token] = asyncio.Event()
        await tap.wait()
        h, n = hashlib.sha256(c.rest), len(c.rest)
        while data := await c.reader.read(1 << 20):
            h.update(data)
            n += len(data)
        origin.events[token] = ("eof", (n, h.hexdigest()))
        return
    if kind in ("closer", "flood"):
        if kind == "closer":
            c.writer.write(b"bye from the origin")
        else:
            block = random.Random(11).randbytes(1 << 20)
            for _ in range(int(parts[2])):
                c.writer.write(block)
                await c.writer.drain()
        await c.writer.drain()
        c.writer.write_eof()
    if kind == "rst":
        c.writer.write(b"about to reset")
        await c.writer.drain()
        await asyncio.sleep(0.05)  # the relay reads the bytes before the reset
        rst(c.writer)
        origin.events[token] = ("reset-sent", b"")
        return
    try:
        while data := await c.reader.read(65536):
            got += data
            if kind in ("echo", "first"):
                c.writer.write(data)
                await c.writer.drain()
    except ConnectionResetError:
        origin.events[token] = ("reset", bytes(got))
        return
    origin.events[token] = ("eof", bytes(got))
    if kind == "fin":
        c.writer.write(b"answer after your close_notify")
        await c.writer.drain()
        c.writer.close()


@pytest.fixture(scope="module")
def origin(loop_thread):
    o = RawOrigin(loop_thread, behave)
    o.events = {}
    o.taps = {}
    with o:
        yield o


@pytest.fixture(scope="module")
def relay(origin, pki, data_plane):
    origin.events.clear()  # tokens are reused by each data plane's run
    origin.taps.clear()
    with tls_relay(origin.addr, pki[2], workers=1, RELAY_IDLE_TIMEOUT="3") as r:
        yield r


def expected_plane(data_plane: str) -> str:
    return "python" if data_plane == "python" else "native"


def wss(relay, pki, path: str, extra: bytes = b"", together: bool = True) -> TlsConn:
    """An upgraded wss:// connection; ``extra`` (plaintext) follows the
    request in the same TLS record (``together``) or in a record of its own
    sent in the same TCP write."""
    c = TlsConn(relay.tls_port, client_context(pki[0]))
    request = upgrade_request(path)
    if together:
        c.sock.sendall(c.seal(request + extra))
    else:
        c.sock.sendall(c.seal(request) + (c.seal(extra) if extra else b""))
    head = c.read_head()
    assert head.startswith(b"HTTP/1.1 101"), head
    return c


def access_line(relay, path: str) -> dict:
    needle = f'"path":"{path}"'
    wait_for(lambda: any(needle in line for line in relay.access), 10, what=f"the access log line of {path}")
    return next(json.loads(line) for line in relay.access if needle in line)


def origin_event(origin, token: str, timeout: float = 10.0):
    wait_for(lambda: token in origin.events, timeout, what=f"the origin to see {token} end")
    return origin.events[token]


SIZES = (1, 64, 4096, 16383, 16384, 16385, 100_000, 1 << 20, 3 << 20)


def test_echo_of_every_size_both_ways_and_the_access_log(relay, origin, pki, data_plane):
    rng = random.Random(5)
    c = wss(relay, pki, "/echo/sizes")
    sent = 0
    try:
        for n in SIZES:
            data = rng.randbytes(n)
            # sent from a thread: 3 MiB would fill both directions' socket buffers
            # of a client that sends it all before reading any
            t = threading.Thread(target=c.send, args=(data,), daemon=True)
            t.start()
            assert c.recv_exactly(n) == data, n
            t.join(10)
            sent += n
        c.close_notify()
        rest, how = c.read_to_end()
        assert (rest, how) == (b"", "close_notify")
    finally:
        c.close()
    assert origin_event(origin, "sizes")[0] == "eof"
    line = access_line(relay, "/echo/sizes")
    assert line["data_plane"] == expected_plane(data_plane)
    assert (line["bytes_up"], line["bytes_down"]) == (sent, sent)


@pytest.mark.parametrize("together", [True, False], ids=["one-record", "own-record"])
def test_data_behind_the_request_and_behind_the_101_arrives_in_order(relay, origin, pki, together):
    """The client's bytes in the same TCP write as its request (in its record,
    or in records of their own, up to 300 KiB: uvloop's read BIO and the
    SSL hold them at the hand-over), the origin's in the same write as its
    101: nothing lost, nothing doubled, in order."""
    token = f"early{int(together)}"
    blob = random.Random(3).randbytes(300_000 if not together else 8000)
    c = wss(relay, pki, f"/first/{token}", extra=blob, together=together)
    try:
        assert c.recv_exactly(len(b"origin-first")) == b"origin-first"
        assert c.recv_exactly(len(blob)) == blob  # the echo of what came with the request
        c.send(b"and then more")
        assert c.recv_exactly(13) == b"and then more"
        c.close_notify()
        assert c.read_to_end() == (b"", "close_notify")
    finally:
        c.close()
    assert origin_event(origin, token) == ("eof", blob + b"and then more")


def test_client_close_notify_is_a_half_close_the_way_back_stays_open(relay, origin, pki, data_plane):
    c = wss(relay, pki, "/fin/cn")
    try:
        c.send(b"last words")
        c.close_notify()
        data, how = c.read_to_end()
    finally:
        c.close()
    assert origin_event(origin, "cn") == ("eof", b"last words")
    # the Python plane (uvloop) cannot half-close TLS: the client's close_notify ends both ways
    assert data == (b"answer after your close_notify" if data_plane != "python" else b"")
    assert how == "close_notify"


def test_client_fin_without_close_notify_reaches_the_origin_as_a_fin(relay, origin, pki):
    c = wss(relay, pki, "/fin/tcpfin")
    try:
        c.send(b"cut short")
        c.sock.shutdown(2 - 1)  # SHUT_WR: a FIN, no close_notify
        c.read_to_end()
    finally:
        c.close()
    assert origin_event(origin, "tcpfin") == ("eof", b"cut short")


def test_origin_fin_is_close_notify_then_fin_and_the_client_may_still_send(relay, origin, pki, data_plane):
    c = wss(relay, pki, "/closer/ofin")
    try:
        data, how = c.read_to_end()
        assert (data, how) == (b"bye from the origin", "close_notify")
        if data_plane != "python":  # TLS half-close: the client goes on after the server's close_notify
            c.send(b"still talking")
            c.close_notify()
    finally:
        c.close()
    if data_plane != "python":
        assert origin_event(origin, "ofin") == ("eof", b"still talking")
    else:  # uvloop closes the TLS connection at the origin's FIN; how the origin's socket ends is not ours here
        assert origin_event(origin, "ofin")[1] == b""


def test_client_reset_reaches_the_origin_as_a_reset(relay, origin, pki):
    c = wss(relay, pki, "/echo/creset")
    c.send(b"ping")
    assert c.recv_exactly(4) == b"ping"
    c.reset()
    assert origin_event(origin, "creset") == ("reset", b"ping")


def test_origin_reset_reaches_the_client_as_a_reset(relay, origin, pki):
    c = wss(relay, pki, "/rst/oreset")
    try:
        data, how = c.read_to_end()
    finally:
        c.close()
    assert data == b"about to reset" and how == "reset"


def test_a_client_that_reads_nothing_holds_the_origin_back_memory_bounded(relay, origin, pki):
    """The origin sends 128 MiB at a client that reads nothing for 1 s: the
    relay's RSS grows < 64 MiB (as for cleartext; ASan's quarantine included),
    then every byte arrives, sha256 equal. (1 s: well inside this relay's
    RELAY_IDLE_TIMEOUT=3, which closes a stalled tunnel 3 s after its last byte.)"""
    n = 128
    c = wss(relay, pki, f"/flood/slow/{n}")
    try:
        grew = relay.rss_growth(1)
        assert grew < 64 << 20, f"relay RSS grew by {grew >> 20} MiB"
        c.sock.settimeout(60)
        data, how = c.read_to_end()
        c.close_notify()
    finally:
        c.close()
    block = random.Random(11).randbytes(1 << 20)
    assert len(data) == n << 20 and hashlib.sha256(data).digest() == hashlib.sha256(block * n).digest()
    assert how == "close_notify"


def test_a_fast_client_and_an_origin_that_reads_nothing_memory_bounded(relay, origin, pki):
    mib = random.Random(7).randbytes(1 << 20)
    n = 100
    c = wss(relay, pki, "/sink/fast")
    c.sock.settimeout(60)
    sent = []

    def push():
        try:
            for _ in range(n):
                c.send(mib)
            c.close_notify()
            sent.append(n)
        except OSError as e:
            sent.append(e)

    before = relay.rss()
    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        wait_for(lambda: "fast" in origin.taps, 5, what="the origin to hold its tap")
        # 1 s of a stalled push (gigabytes at loopback speed, were nothing holding
        # it back), well inside this relay's RELAY_IDLE_TIMEOUT=3: a stalled
        # tunnel is idle, and closed 3 s after its last byte (HAProxy's
        # "timeout tunnel"), which would end this test's push with a reset
        grew = relay.rss_growth(1, before)
        assert not sent, "the client pushed 100 MiB while the origin read nothing"
        assert grew < 64 << 20, f"relay RSS grew by {grew >> 20} MiB"
        origin.lt.loop.call_soon_threadsafe(origin.taps["fast"].set)
        pusher.join(60)
        assert sent == [n], sent
        event = origin_event(origin, "fast", 30)
        assert event == ("eof", (n << 20, hashlib.sha256(mib * n).hexdigest()))
    finally:
        c.close()


def test_an_idle_tunnel_is_closed_with_close_notify(relay, origin, pki):
    c = wss(relay, pki, "/echo/idle")
    c.sock.settimeout(15)
    started = time.monotonic()
    try:
        data, how = c.read_to_end()
    finally:
        c.close()
    assert (data, how) == (b"", "close_notify")
    assert 2.0 <= time.monotonic() - started < 10  # RELAY_IDLE_TIMEOUT=3, swept once a second
    assert origin_event(origin, "idle") == ("eof", b"")


def test_bytes_of_an_open_tls_tunnel_reach_the_metrics(relay, origin, pki):
    """wsrelay_bytes_total counts an open TLS tunnel's plaintext by the next
    sweep (on an io_uring worker, read from its second, epoll engine)."""
    from tests.support.scrape import metric

    up0, down0 = (metric(relay, "wsrelay_bytes_total", direction=d) for d in ("upstream", "downstream"))
    c = wss(relay, pki, "/echo/metered")
    try:
        blob = random.Random(9).randbytes(200_000)
        threading.Thread(target=c.send, args=(blob,), daemon=True).start()
        assert c.recv_exactly(len(blob)) == blob

        def counted() -> bool:
            c.send(b".")  # activity: the idle timeout (3 s) must not end the tunnel, which would count it too
            assert c.recv_exactly(1) == b"."
            return (metric(relay, "wsrelay_bytes_total", direction="upstream") - up0 >= len(blob)
                    and metric(relay, "wsrelay_bytes_total", direction="downstream") - down0 >= len(blob))
        wait_for(counted, 10, interval=0.2, what="the open tunnel's bytes in /metrics")
    finally:
        c.close()
