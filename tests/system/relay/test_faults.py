"""Faulty origins: reset during the handshake, garbage, a truncated head, a
101 without a valid accept, killed mid-stream. Each is a 502 or a clean
close (or a passed-on reset) for that client only, while another client's
tunnel through the same relay keeps echoing and the relay stays healthy.

The origins are raw asyncio servers (tests/raw_origins.py) that pick their
misbehaviour from the request path.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.support.net import raw_exchange, read_head, status_of, upgrade_request
from tests.support.probes import closed_by_peer
from tests.support.raw_origins import RawOrigin, answer, echo_after_101, rst, switching
from tests.support.relay import Relay, wait_for
from tests.support.scrape import metric


async def _echo_then(origin: RawOrigin, c, then: str) -> None:
    """Echo the first chunk after the 101, then reset, close or hang up half-way."""
    c.writer.write(switching(c.head))
    data = c.rest or await c.reader.read(65536)
    c.writer.write(data)
    await c.writer.drain()
    if then == "reset":
        rst(c.writer)
    elif then == "close":
        c.writer.close()
    elif then == "half-close":
        c.writer.write_eof()
        while await c.reader.read(65536):
            pass


BIG_HEAD = b"HTTP/1.1 101 Switching Protocols\r\nX-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n"

FAULTS = {
    "/reset-on-head": answer(b"", then="reset"),
    "/close-on-head": answer(b"", then="close"),
    "/garbage": answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    "/binary": answer(bytes(range(256)) * 4),
    "/truncated": answer(b"HTTP/1.1 101 Switching Proto"),
    "/truncated-fields": answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConn"),
    "/no-accept": answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    "/wrong-accept": answer(lambda head: switching(head, accept=b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")),
    "/no-upgrade": answer(lambda head: switching(head).replace(b"Upgrade: websocket\r\n", b"")),
    "/bare-lf": answer(lambda head: switching(head).replace(b"\r\n", b"\n")),
    "/ctl-in-field": answer(lambda head: switching(head).replace(b"Upgrade: websocket", b"Upgrade: web\x00socket")),
    "/huge-head": answer(BIG_HEAD, then="hang"),
    "/status-0": answer(b"HTTP/1.1 000 Zero\r\n\r\n"),
    "/http2": answer(b"HTTP/2 101\r\n\r\n"),
    "/reset-mid-stream": lambda o, c: _echo_then(o, c, "reset"),
    "/close-mid-stream": lambda o, c: _echo_then(o, c, "close"),
    "/half-close-mid-stream": lambda o, c: _echo_then(o, c, "half-close"),
}


async def dispatch(origin: RawOrigin, c) -> None:
    path = c.head.split(b" ", 2)[1].decode()
    await FAULTS.get(path, echo_after_101)(origin, c)


@pytest.fixture(scope="module")
def faulty(loop_thread):
    with RawOrigin(loop_thread, dispatch) as o:
        yield o


@pytest.fixture(scope="module")
def relay(faulty, data_plane):
    with Relay(faulty.addr, workers=2, env={"RELAY_CONNECT_TIMEOUT": "3"}) as r:
        yield r


class Witness:
    """Another client's tunnel, open for the whole module: it must keep echoing."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.s.sendall(upgrade_request("/echo"))
        head, self.rest = read_head(self.s)
        assert status_of(head) == 101
        self.n = 0

    def check(self) -> None:
        self.n += 1
        msg = b"witness %d " % self.n * 10
        self.s.sendall(msg)
        got = self.rest
        deadline = time.monotonic() + 5
        while len(got) < len(msg) and time.monotonic() < deadline:
            chunk = self.s.recv(65536)
            assert chunk, "the witness tunnel was closed"
            got += chunk
        self.rest = got[len(msg):]
        assert got[:len(msg)] == msg


@pytest.fixture(scope="module")
def witness(relay):
    w = Witness(relay.port)
    yield w
    w.s.close()


@pytest.mark.parametrize("path", ["/reset-on-head", "/close-on-head", "/garbage", "/binary", "/truncated",
                                  "/truncated-fields", "/no-accept", "/wrong-accept", "/no-upgrade", "/bare-lf",
                                  "/ctl-in-field", "/huge-head", "/status-0", "/http2"])
def test_broken_origin_handshake_is_a_502_for_that_client_only(relay, witness, path):
    out = raw_exchange(relay.port, upgrade_request(path))
    assert status_of(out) == 502, out[:300]
    head = out.split(b"\r\n\r\n")[0]
    assert b"Connection: close" in head
    assert b"Switching" not in out and b"SSH" not in out  # nothing of the broken answer leaks through
    witness.check()


@pytest.mark.parametrize("how", ["reset", "close", "half-close"])
def test_origin_cut_mid_stream_ends_that_tunnel_only(relay, witness, how):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(upgrade_request(f"/{how}-mid-stream"))
        head, rest = read_head(s)
        assert status_of(head) == 101
        s.sendall(b"last words")
        got = rest
        ended = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            if not chunk:
                ended = "eof"
                break
            got += chunk
        # the echo that came before the cut is delivered whole, unless the cut was a reset
        if how != "reset":
            assert got == b"last words"
        # a reset is passed on as a reset (or reads as EOF if it raced our last read); the rest as EOF
        assert ended in (("reset", "eof") if how == "reset" else ("eof",)), ended
        if how == "half-close":
            # the client may still talk; the relay passed the FIN on and keeps the other way open
            s.sendall(b"still talking")
    witness.check()


def test_relay_healthy_after_the_faults(relay, witness):
    witness.check()
    # only the witness holds a slot; every failed handshake gave its slot back
    wait_for(lambda: metric(relay, "wsrelay_clients") == 1, 10, what="only the witness left")
    assert metric(relay, "wsrelay_websocket_upgrades_total", outcome="origin_error") >= 14
    assert relay.proc.poll() is None
    assert "unexpectedly" not in relay.text(), relay.text()[-3000:]


def test_origin_killed_fails_over_and_other_origin_tunnels_live_on(loop_thread, ws_origin):
    """Two origins, round-robin: killing one ends its tunnels (closed or reset,
    never hung), the other's tunnels keep echoing, new clients fail over."""
    doomed = RawOrigin(loop_thread).start()
    try:
        with Relay(f"{doomed.addr},{ws_origin.addr}", workers=1) as r:
            tunnels = []
            for _ in range(4):  # round-robin: two on each origin
                s = socket.create_connection(("127.0.0.1", r.port), timeout=5)
                s.sendall(upgrade_request("/"))
                head, _ = read_head(s)
                assert status_of(head) == 101
                tunnels.append(s)
            assert doomed.connections == 2
            on_doomed = [s for s, h in zip(tunnels, _origin_of(tunnels, doomed)) if h]
            survivors = [s for s in tunnels if s not in on_doomed]
            assert len(on_doomed) == 2
            doomed.stop()  # the origin process dies: listener closed, connections reset
            for s in on_doomed:
                assert closed_by_peer(s, 5), "a tunnel to a dead origin was left hanging"
            from websockets.sync.client import connect
            for _ in range(3):  # failover: every new client reaches the live origin
                with connect(r.url + "/", open_timeout=5) as ws:
                    ws.send("failover")
                    assert ws.recv(timeout=5) == "failover"
            for s in survivors:  # the websockets origin's tunnels still work (a ping frame)
                s.sendall(b"\x89\x80abcd")  # masked ping, empty payload
                assert s.recv(2) == b"\x8a\x00"
                s.close()
            wait_for(lambda: metric(r, "wsrelay_clients") == 0, 10, what="all slots back")
    finally:
        doomed.stop() if doomed.server.is_serving() else None


@pytest.mark.parametrize("then", ["close", "reset"])
def test_an_origin_closing_before_answering_is_retried_on_the_next(loop_thread, ws_origin, then):
    """An origin that accepts and hangs up without a byte of answer (a restart,
    an overloaded accept queue) costs no client a 502 while another origin
    serves: the upgrade moves on, as nginx's proxy_next_upstream does. An
    origin that answered part of a head is not retried (test below)."""
    flaky = RawOrigin(loop_thread, answer(b"", then=then)).start()
    try:
        with Relay(f"{flaky.addr},{ws_origin.addr}", workers=1) as r:
            for _ in range(6):  # round-robin: half of them try the flaky origin first
                with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
                    s.sendall(upgrade_request("/"))
                    assert status_of(read_head(s)[0]) == 101
            assert flaky.connections >= 3
    finally:
        flaky.stop()


def test_a_truncated_origin_answer_is_a_502_not_a_retry(loop_thread, ws_origin):
    truncated = RawOrigin(loop_thread, answer(b"HTTP/1.1 101 Swi")).start()
    try:
        with Relay(f"{truncated.addr},{ws_origin.addr}", workers=1) as r:
            statuses = []
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
                    s.sendall(upgrade_request("/"))
                    statuses.append(status_of(read_head(s)[0]))
                # least connections alternates only while the last tunnel's count is back
                wait_for(lambda: metric(r, "wsrelay_origin_connections") == 0, 5, what="origin counts at 0")
            assert sorted(statuses) == [101, 101, 502, 502]
    finally:
        truncated.stop()


def _origin_of(tunnels: list[socket.socket], raw: RawOrigin) -> list[bool]:
    """Which tunnels end at the raw echo origin: it echoes raw bytes, websockets does not."""
    out = []
    for s in tunnels:
        s.sendall(b"\x89\x80abcd")  # a masked empty ping: websockets answers a pong, raw echoes it
        reply = s.recv(64)
        out.append(reply == b"\x89\x80abcd")
    return out


def test_plain_http_origin_garbage_and_truncation(faulty):
    with Relay(faulty.addr, workers=1) as r:
        for path in ("/garbage", "/truncated", "/reset-on-head", "/close-on-head"):
            out = raw_exchange(r.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert status_of(out) == 502, (path, out[:200])



def test_an_origin_named_by_its_host_name(ws_origin):
    """RELAY_ORIGIN=localhost:PORT: resolved (the native head phase off the
    loop, when the worker starts), served, and named as configured."""
    from websockets.sync.client import connect

    port = ws_origin.addr.rsplit(":", 1)[1]
    with Relay(f"localhost:{port}", workers=1, env={"RELAY_ACCESS_LOG": "1"}) as r:
        with connect(r.url + "/named", open_timeout=5) as ws:
            ws.send("by name")
            assert ws.recv(timeout=5) == "by name"
        rec = wait_for(lambda: next((json.loads(x) for x in r.access if '"upgraded"' in x), None), 5,
                       what="the session's access log line")
        assert rec["origin"] == f"localhost:{port}"
        assert "connect failed" not in r.text()


def test_an_origin_name_that_does_not_resolve_is_a_502_naming_it():
    with Relay("no-such-origin.invalid:9", workers=1) as r:
        assert status_of(raw_exchange(r.port, upgrade_request("/"))) == 502
        r.wait_log("origin no-such-origin.invalid:9 connect failed:", timeout=5)
