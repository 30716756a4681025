"""The head phase in C (relay/native/handshake.c), on its own, against real
loopback sockets: accepting, reading a request head (capped, with a
deadline), refusing with a lingering close, connecting to an origin with
failover, holding what the client sent behind its head until the origin's
101, reading the response head (capped), and handing both sockets to the
pump (splice) or to the caller (detach). Python's decisions are played here
by the test (a Front whose callbacks record and answer); the worker's
wiring (relay/native/front.py) runs in every relay the suites start.
"""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from relay import native

# skipped only where nothing asks for the extension: with WSRELAY_REQUIRE_NATIVE (CI) they run or fail
pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")

GUID_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n")
HEAD = b"GET /chat HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
RID = b"0123456789abcdef0123456789abcdef"


class Front:
    """Plays Python's part: records every callback; the tests decide."""

    def __init__(self):
        self.events: list[tuple] = []

    def on_head(self, cid, req, ip, tls=None):
        self.events.append(("head", cid, req, ip))
        self.decide(cid)

    def on_response(self, cid, token, resp, origin, attempts):
        self.events.append(("response", cid, token, resp, origin, attempts))
        self.decide(cid)

    def on_failed(self, cid, token, origin, attempts):
        self.events.append(("failed", cid, token, origin, attempts))
        self.decide(cid)

    def on_timeout(self, cid, token, origin, attempts):
        self.events.append(("timeout", cid, token, origin, attempts))
        self.decide(cid)

    def on_head_timeout(self, cid, data, ip):
        self.events.append(("head_timeout", cid, data, ip))

    #: what to do with each event at once (a callback must decide before it returns)
    decide = staticmethod(lambda cid: None)


class Rig:
    def __init__(self, backend: str = "io_uring", origins=(), **kw):
        self.ended: list[tuple] = []
        self.front = Front()
        self.events = self.front.events
        self.e = native.Engine(on_end=lambda tok, up, down: self.ended.append((tok, up, down)), backend=backend)
        self.e.handshakes(self.front, **kw)
        self.e.set_origins([list(o) for o in origins])
        self.norigins = len(origins)
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(64)
        self.lst.setblocking(False)
        self.e.listen(self.lst.fileno())
        self.port = self.lst.getsockname()[1]

    def order(self, first: int) -> list[int]:
        """Every origin once, from ``first`` on (connect()'s order: what Python's balancer chose first)."""
        return [(first + i) % self.norigins for i in range(self.norigins)]

    def on(self, kind: str, act):
        """Answer events of ``kind`` with act(event) from inside the callback."""
        prev = self.front.decide

        def decide(cid):
            ev = self.events[-1]
            if ev[0] == kind:
                act(ev)
            else:
                prev(cid)
        self.front.decide = decide

    def poll(self, until, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while True:
            self.e.poll_handshakes()
            self.e.poll()
            got = until()
            if got:
                return got
            assert time.monotonic() < deadline, f"timed out; events so far: {self.events}"
            time.sleep(0.002)

    def next_event(self, kind: str, timeout: float = 5.0) -> tuple:
        def find():
            for ev in self.events:
                if ev[0] == kind:
                    self.events.remove(ev)
                    return ev
            return None
        return self.poll(find, timeout)

    def client(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if data:
            s.sendall(data)
        return s


def origin_listener() -> socket.socket:
    o = socket.socket()
    o.bind(("127.0.0.1", 0))
    o.listen(16)
    o.settimeout(5)
    return o


def addr(o: socket.socket) -> tuple[str, int]:
    return ("127.0.0.1", o.getsockname()[1])


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # bound, never listening: refused


def recv_head(conn: socket.socket, r: Rig) -> bytes:
    got = b""
    conn.settimeout(0.05)
    deadline = time.monotonic() + 5
    while b"\r\n\r\n" not in got:
        assert time.monotonic() < deadline, got
        r.poll(lambda: True, 0.1)
        try:
            got += conn.recv(65536)
        except TimeoutError:
            pass
    conn.settimeout(5)
    return got


@pytest.fixture(params=["io_uring", "epoll"])
def backend(request):
    return request.param


def test_the_head_reaches_python_once_parsed_with_the_peer(backend):
    r = Rig(backend)
    c = r.client(HEAD[:20])
    time.sleep(0.05)
    r.e.poll_handshakes()
    assert not [e for e in r.events if e[0] == "head"]  # not complete yet
    r.on("head", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 403 Forbidden\r\n\r\n"))
    c.sendall(HEAD[20:] + b"EARLY")
    _, cid, req, ip = r.next_event("head")
    assert (req.method, req.path, req.head_len, ip) == (b"GET", b"/chat", len(HEAD), c.getsockname()[0])
    assert req.tokens(b"upgrade") == {b"websocket"}


def test_a_head_that_cannot_parse_or_is_over_the_cap_comes_as_none(backend):
    r = Rig(backend, max_head=1024)
    r.on("head", lambda ev: r.e.detach(ev[1]))
    c1 = r.client(b"GET / HTTP/1.1\r\nX: " + b"a" * 3000)
    _, _, req, _ = r.next_event("head")
    assert req is None  # over the cap: Python answers 431 from the bytes read
    c2 = r.client(b"GET / HTTP/1.1\n\n")
    _, _, req, _ = r.next_event("head")
    assert req is None  # bare LF: answered at once, not at the handshake timeout
    c1.close()
    c2.close()


def test_accepted_sockets_have_tcp_nodelay_the_first_and_the_rest():
    """TCP_NODELAY is set once on the listening socket and inherited (the
    first accepted socket is checked, the rest carry it with no setsockopt)."""
    r = Rig()
    assert r.lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    handed = []
    r.on("head", lambda ev: handed.append(r.e.detach(ev[1])))
    clients = [r.client(HEAD) for _ in range(3)]
    r.poll(lambda: len(handed) == 3)
    for cfd, _ofd, data, _ in handed:
        with socket.socket(fileno=cfd) as s:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert data == HEAD
    for c in clients:
        c.close()


def test_refuse_writes_half_closes_and_lingers(backend):
    r = Rig(backend)
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    r.on("head", lambda ev: r.e.refuse(ev[1], answer))
    c = r.client(HEAD)
    r.next_event("head")
    got = b""
    c.settimeout(5)
    while True:
        r.e.poll_handshakes()
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    assert got == answer
    c.sendall(b"more the client still sends: discarded, no reset")
    r.poll(lambda: True)
    c.close()
    r.poll(lambda: r.e.handshake_stats["live"] == 0)


def test_a_callback_that_decides_nothing_is_an_error_and_the_connection_closes(backend):
    r = Rig(backend)
    c = r.client(HEAD)
    with pytest.raises(RuntimeError, match="undecided"):
        r.poll(lambda: False, 2)
    c.settimeout(5)
    assert c.recv(10) == b""
    assert r.e.handshake_stats["live"] == 0


def test_connect_fails_over_forwards_in_c_holds_early_bytes_until_the_101_then_splices(backend):
    o = origin_listener()
    r = Rig(backend, origins=[[("127.0.0.1", dead_port())], [addr(o)]], proto=b"https")
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "token"))
    c = r.client(HEAD + b"EARLY")
    _, cid, req, ip = r.next_event("head")
    r.poll(lambda: True)
    conn, _ = o.accept()
    got = recv_head(conn, r)
    assert got == (b"GET /chat HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nX-Forwarded-For: 127.0.0.1\r\n"
                   b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: relay.test\r\nX-Request-ID: " + RID +
                   b"\r\nConnection: Upgrade\r\n\r\n")  # the head only: EARLY is held
    conn.setblocking(False)
    time.sleep(0.05)
    r.poll(lambda: True)
    with pytest.raises(BlockingIOError):
        conn.recv(65536)
    r.on("response", lambda ev: r.tid.append(r.e.splice(ev[1], "tunnel")))
    r.tid = []
    conn.sendall(GUID_101 + b"after-101")
    _, rid, token, resp, origin, attempts = r.next_event("response")
    assert (rid, token, resp.status, resp.head_len, origin) == (cid, "token", 101, len(GUID_101), 1)
    assert attempts == ((0, 1, errno.ECONNREFUSED),)  # for the failure log
    assert r.e.handshake_stats["live"] == 0 and r.e.open == 1
    c.settimeout(5)
    got = b""
    while len(got) < len(GUID_101) + 9:
        r.e.poll()
        got += c.recv(65536)
    assert got == GUID_101 + b"after-101"
    conn.settimeout(5)
    got = b""
    while len(got) < 5:
        r.e.poll()
        got += conn.recv(65536)
    assert got == b"EARLY"  # now, after the 101
    c.sendall(b"ping")
    got = b""
    while len(got) < 4:
        r.e.poll()
        got += conn.recv(65536)
    assert got == b"ping"
    assert r.e.bytes(r.tid[0]) == (4, 0)


def test_an_origin_closing_without_a_byte_moves_on_each_origin_once(backend):
    quitters = [origin_listener() for _ in range(2)]
    r = Rig(backend, origins=[[addr(q)] for q in quitters])
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(1), ev[2], RID, False, "tok"))
    r.on("failed", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 502 Bad Gateway\r\n\r\n"))
    c = r.client(HEAD)
    order = []
    for _ in range(2):
        r.poll(lambda: True)
        for i, q in enumerate(quitters):
            q.setblocking(False)
            try:
                conn, _ = q.accept()
            except BlockingIOError:
                continue
            order.append(i)
            conn.close()  # without a byte of answer
    _, _, token, origin, attempts = r.next_event("failed")
    assert order == [1, 0]  # from the origin Python named, each once
    assert token == "tok" and origin == 0 and [a[:2] for a in attempts] == [(1, 2), (0, 2)]
    assert c.recv(100).startswith(b"HTTP/1.1 502")


def test_an_origins_addresses_are_tried_in_order_before_the_next_origin(backend):
    o = origin_listener()
    r = Rig(backend, origins=[[("127.0.0.1", dead_port()), addr(o)]])
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    r.on("response", lambda ev: r.e.splice(ev[1], "t"))
    r.client(HEAD)
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(GUID_101)
    _, _, _, resp, origin, attempts = r.next_event("response")
    assert resp.status == 101 and origin == 0 and attempts == ((0, 1, errno.ECONNREFUSED),)


@pytest.mark.parametrize("answer, kind", [(b"HTTP/1.1 101 Swi", 3), (b"HTTP/1.1 100 Continue\r\n\r\n", 3)])
def test_an_answer_that_breaks_off_fails_without_a_retry(backend, answer, kind):
    o, other = origin_listener(), origin_listener()
    r = Rig(backend, origins=[[addr(o)], [addr(other)]])
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    r.on("response", lambda ev: r.e.skip(ev[1], ev[3].head_len))  # the interim answer: read on
    r.on("failed", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 502 Bad Gateway\r\n\r\n"))
    r.client(HEAD)
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(answer)
    conn.close()
    _, _, _, origin, attempts = r.next_event("failed")
    assert attempts[-1][:2] == (0, kind)  # truncated: it acted on the request
    other.setblocking(False)
    with pytest.raises(BlockingIOError):
        other.accept()


def test_interim_answers_are_skipped_on_pythons_word(backend):
    o = origin_listener()
    r = Rig(backend, origins=[[addr(o)]])
    statuses = []

    def answer(ev):
        statuses.append(ev[3].status)
        if ev[3].status < 200 and ev[3].status != 101:
            r.e.skip(ev[1], ev[3].head_len)
        else:
            r.e.splice(ev[1], "t")
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    r.on("response", answer)
    c = r.client(HEAD)
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n")
    r.poll(lambda: len(statuses) == 2)
    conn.sendall(GUID_101)
    r.poll(lambda: len(statuses) == 3)
    assert statuses == [100, 103, 101]
    c.settimeout(5)
    assert recv_all(c, r, len(GUID_101)) == GUID_101  # the interim answers never reach the client


def recv_all(s: socket.socket, r: Rig, n: int) -> bytes:
    got = b""
    while len(got) < n:
        r.e.poll()
        got += s.recv(65536)
    return got


def test_malformed_answers_come_as_the_error(backend):
    o = origin_listener()
    r = Rig(backend, origins=[[addr(o)]])
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    r.on("response", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 502 Bad Gateway\r\n\r\n"))
    r.client(HEAD)
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(b"SSH-2.0-OpenSSH\r\n")  # at once: not at the connect timeout
    _, _, _, resp, _, _ = r.next_event("response", 2)
    assert resp == (502, "malformed origin status line", "origin_error")


def test_head_timeout_is_reported_with_the_bytes_read_and_the_connection_dropped(backend):
    r = Rig(backend, head_timeout=0.3)
    c = r.client(HEAD[:10])
    _, cid, data, ip = r.next_event("head_timeout", 3)
    assert data == HEAD[:10] and ip == "127.0.0.1"
    c.settimeout(2)
    assert c.recv(10) == b""  # closed, nothing answered (Python counts a 408)
    assert r.e.handshake_stats["live"] == 0


def test_origin_timeout(backend):
    o = origin_listener()  # accepts (the kernel does) and never answers
    r = Rig(backend, origins=[[addr(o)]], connect_timeout=0.3)
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    r.on("timeout", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n"))
    c = r.client(HEAD)
    _, tid, token, origin, _ = r.next_event("timeout", 3)
    assert token == "tok" and origin == 0
    assert c.recv(100).startswith(b"HTTP/1.1 504")


def test_detach_hands_both_sockets_and_every_byte_over(backend):
    o = origin_listener()
    r = Rig(backend, origins=[[addr(o)]])
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, "tok"))
    handed = []
    r.on("response", lambda ev: handed.append(r.e.detach(ev[1])))
    c = r.client(HEAD + b"tail")
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno!!"
    conn.sendall(refusal)
    r.poll(lambda: handed)
    cfd, ofd, cbytes, obytes = handed[0]
    assert cbytes == HEAD + b"tail" and obytes == refusal
    s = socket.socket(fileno=cfd)
    s.sendall(b"served by Python")
    assert c.recv(100) == b"served by Python"
    with socket.socket(fileno=ofd) as osock:
        osock.sendall(b"to the origin")
        assert conn.recv(100) == b"to the origin"
    s.close()
    assert r.e.handshake_stats["live"] == 0


def test_tokens_are_released_with_their_connections(backend):
    import sys

    token = object()
    before = sys.getrefcount(token)
    o = origin_listener()
    r = Rig(backend, origins=[[addr(o)]], connect_timeout=0.2)
    r.on("head", lambda ev: r.e.connect(ev[1], r.order(0), ev[2], RID, False, token))
    r.on("timeout", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 504 Gateway Timeout\r\n\r\n"))
    r.client(HEAD)
    r.next_event("timeout", 3)
    r.events.clear()
    assert sys.getrefcount(token) == before


class Taker:
    """A front that answers nothing and keeps each connection a while (an empty
    refusal: half-closed, lingering 2 s), so it counts in the worker's load."""

    def __init__(self, heads):
        self.heads = heads
        self.engine = None

    def on_head(self, cid, req, ip, tls=None):
        self.heads.append(cid)
        self.engine.refuse(cid, b"")

    def on_response(self, *a):
        pass

    on_failed = on_timeout = on_head_timeout = on_response


def test_accepts_balance_across_workers_through_shared_slots():
    """Two engines ("workers") on one listening socket, polled one after the
    other, the first always first: without balancing it would take every
    connection. With their loads in a shared float64 array (as metrics.layout's
    LOAD and ACCEPTING slots), a worker ahead of its sibling defers, and the
    connections split evenly."""
    import array

    from metrics import layout

    slots = [memoryview(array.array("d", [0.0] * layout.SIZE)) for _ in range(2)]
    for s in slots:
        s[layout.ACCEPTING] = 1.0
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(256)
    lst.setblocking(False)
    workers = []
    for i in range(2):
        heads = []
        e = native.Engine()
        taker = Taker(heads)
        taker.engine = e
        e.handshakes(taker)
        e.listen(lst.fileno())
        e.balance(slots[i], [slots[1 - i]], layout.LOAD, layout.ACCEPTING)
        workers.append((e, heads))
    clients = []
    for _ in range(60):
        clients.append(socket.create_connection(lst.getsockname()))
        clients[-1].sendall(HEAD)
        deadline = time.monotonic() + 5
        while sum(len(h) for _, h in workers) < len(clients):
            assert time.monotonic() < deadline, "a connection was not taken"
            for e, _ in workers:
                e.poll_handshakes()
            time.sleep(0.001)
    counts = [len(h) for _, h in workers]
    assert sum(counts) == 60 and all(24 <= c <= 36 for c in counts), counts
    assert slots[0][layout.LOAD] > 0 and slots[1][layout.LOAD] > 0  # published at each wake-up


def test_a_stalled_sibling_costs_latency_not_service():
    """The sibling never takes anything (stopped): the worker ahead of it
    still takes every connection, each after at most a deferral."""
    import array

    from metrics import layout

    mine, sibling = (memoryview(array.array("d", [0.0] * layout.SIZE)) for _ in range(2))
    mine[layout.ACCEPTING] = sibling[layout.ACCEPTING] = 1.0
    r = Rig()
    r.on("head", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 503 x\r\n\r\n"))
    r.e.balance(mine, [sibling], layout.LOAD, layout.ACCEPTING, slack=0)
    clients = [r.client(HEAD) for _ in range(30)]
    r.poll(lambda: len([e for e in r.events if e[0] == "head"]) == 30, 10)
    assert mine[layout.LOAD] > 0  # published at each wake-up
    for c in clients:
        c.close()


def test_the_head_phase_in_c_serves_a_real_relay_by_default(aio_origin):
    """The default on the native plane (relay/native/front.py): an upgrade and
    its echo, a refusal, and plain HTTP handed to the Python plane, through a
    real relay with 2 workers; the access log says native for the tunnel, python
    for the refusal (nothing was relayed: README "Logs") and plain HTTP."""
    import json

    from websockets.sync.client import connect

    from tests.support.net import raw_exchange, status_of, upgrade_request
    from tests.support.relay import Relay, wait_for

    with Relay(aio_origin.addr, workers=2, env={"RELAY_WS_PATHS": "/ws"}) as r:
        with connect(r.url + "/ws") as ws:
            ws.send("through C")
            assert ws.recv(timeout=5) == "through C"
        assert status_of(raw_exchange(r.port, upgrade_request("/elsewhere"))) == 403
        out = raw_exchange(r.port, b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200
        wait_for(lambda: len(r.access) >= 3, 5, what="three access log lines")
        recs = [json.loads(line) for line in r.access]
        assert {(x["status"], x["data_plane"]) for x in recs} == {(101, "native"), (403, "python"), (200, "python")}
        assert "Traceback" not in r.text()


EMFILE_SCRIPT = r"""
import os, resource, socket, sys, time
from relay import native
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
heads = []
e = native.Engine()
class Front:  # keeps each connection, lingering (an empty refusal)
    def on_head(self, cid, req, ip, tls=None):
        heads.append(cid); e.refuse(cid, b"")
    def on_response(self, *a):
        pass
    on_failed = on_timeout = on_head_timeout = on_response
e.handshakes(Front())
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(512); lst.setblocking(False)
e.listen(lst.fileno())
pid = os.fork()
if pid == 0:  # the clients, in a process with its own descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    cs = [socket.create_connection(lst.getsockname()) for _ in range(120)]
    for c in cs:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(30)
    os._exit(0)
deadline = time.monotonic() + 10
while e.handshake_stats["accept_errors"] == 0:
    assert time.monotonic() < deadline, "no accept error"
    e.poll_handshakes(); time.sleep(0.001)
t0 = os.times(); w0 = time.monotonic()
while time.monotonic() - w0 < 1.0:
    e.poll_handshakes(); time.sleep(0.001)   # out of descriptors: must not spin
t1 = os.times()
cpu = (t1.user - t0.user) + (t1.system - t0.system)
errors = e.handshake_stats["accept_errors"]
taken = len(heads)
deadline = time.monotonic() + 10
while e.handshake_stats["accepted"] < 120:   # free descriptors as heads come: the rest is taken
    assert time.monotonic() < deadline, f"accepting did not resume: {e.handshake_stats}"
    for cid in heads:
        e.close_handshake(cid)
    heads.clear()
    e.poll_handshakes(); time.sleep(0.001)
print("ok", errors, round(cpu, 3), taken)
os.kill(pid, 9)
"""


def test_out_of_descriptors_pauses_accepting_without_spinning_then_resumes():
    import subprocess
    import sys

    from tests.support.relay import ROOT

    p = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stdout + p.stderr
    _, errors, cpu, taken = p.stdout.split()
    assert 1 <= int(errors) <= 10  # one per 250 ms pause, not one per queued connection
    assert float(cpu) < 0.5, f"{cpu} s of CPU in 1 s while out of descriptors"
    assert 0 < int(taken) < 120


def test_the_prototype_front_routes_to_the_pools_origins():
    """The head phase in C asks relay/gate.py like the Python path: a route's
    pool, its balancer's choice tried first, the origin's connection count
    held by the tunnel until it ends, pool and origin in the access log."""
    import json

    from tests.support.origin_process import OriginProcess, held_hello, hello_over_ws
    from tests.support.relay import Relay, wait_for
    from tests.support.scrape import metric

    a, b = OriginProcess("a").start(), OriginProcess("b").start()
    try:
        env = {"WSRELAY_NATIVE_HANDSHAKE": "1", "RELAY_POOL_CHAT": b.addr, "RELAY_ROUTES": "/chat = chat"}
        with Relay(a.addr, workers=1, env=env) as r:
            assert hello_over_ws(r.port, "/")[1]["origin"] == "a"
            sock, origin = held_hello(r.port, "/chat/room")
            assert origin == "b"
            assert metric(r, "wsrelay_origin_connections", pool="chat", origin=b.addr) == 1
            sock.close()
            wait_for(lambda: metric(r, "wsrelay_origin_connections", pool="chat") == 0, 10, what="count back")
            wait_for(lambda: len(r.access) >= 2, 5, what="two access log lines")
            recs = {x["path"]: x for x in (json.loads(line) for line in r.access)}
            assert (recs["/chat/room"]["pool"], recs["/chat/room"]["origin"], recs["/chat/room"]["data_plane"],
                    recs["/chat/room"]["tries"]) == ("chat", b.addr, "native", 1)
            assert recs["/"]["pool"] == "default"
    finally:
        a.stop()
        b.stop()


# -- the 101 checked in C (on_upgrade) ---------------------------------------------------
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
KEYED = HEAD[:-2] + b"Sec-WebSocket-Key: " + KEY + b"\r\n\r\n"


def _answer(status: bytes = b"101 Switching Protocols", fields=None) -> bytes:
    from relay.handshake import accept_key

    if fields is None:
        fields = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept_key(KEY)]
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _random_answers(n: int, seed: int = 6455) -> list[bytes]:
    """Answers around a good 101: each field dropped, doubled, recased, padded,
    given another token or value; other statuses; a head that does not parse."""
    import random

    from relay.handshake import accept_key

    rnd = random.Random(seed)
    good = accept_key(KEY)
    choices = {
        b"upgrade": [b"websocket"] * 8 + [b"WebSocket", b"h2c", b"websocket, h2c", b"h2c, websocket", b"", b"websockets"],
        b"connection": [b"Upgrade"] * 8 + [b"upgrade", b"keep-alive, Upgrade", b"close", b"Upgrade , close", b"upgradex"],
        b"sec-websocket-accept": [good] * 10 + [good.lower(), good[:-1], b" " + good + b" ", good + b"x", b"", b"\t" + good],
    }
    names = {b"upgrade": [b"Upgrade", b"UPGRADE", b"upgrade"], b"connection": [b"Connection", b"CONNECTION"],
             b"sec-websocket-accept": [b"Sec-WebSocket-Accept", b"sec-websocket-accept"]}
    out = []
    for _ in range(n):
        fields = []
        for key in choices:
            for _copy in range(rnd.choice([0] + [1] * 12 + [2])):
                fields.append(rnd.choice(names[key]) + b":" + rnd.choice([b" ", b"", b"  "]) + rnd.choice(choices[key]))
        if rnd.random() < 0.2:
            fields.append(b"Sec-WebSocket-Extensions: permessage-deflate")
        rnd.shuffle(fields)
        status = rnd.choice([b"101 Switching Protocols"] * 6 + [b"200 OK", b"101", b"1010 X", b"426 Upgrade Required"])
        head = _answer(status, fields)
        if rnd.random() < 0.05:
            head = head.replace(b"\r\n", b"\n", 1)  # bare LF: does not parse
        out.append(head)
    return out


class UpgradeFront(Front):
    def on_upgrade(self, cid, token, origin, attempts, connect_s):
        self.events.append(("upgrade", cid, token, origin, attempts, connect_s))
        self.decide(cid)


def _python_passes(answer: bytes) -> bool:
    """What relay/native/front.py's on_response decides from a view: a 101
    check_upgrade_response passes (the reference parse, relay/http_head.py)."""
    from relay.errors import HeadError
    from relay.handshake import check_upgrade_response
    from relay.http_head import parse_response_head

    try:
        resp = parse_response_head(answer, 16384)
        if resp is None or resp.status != 101:
            return False
        check_upgrade_response(resp, KEY)
    except HeadError:
        return False
    return True


def _upgrade_rig(backend: str, o: socket.socket) -> Rig:
    r = Rig(backend, origins=[[addr(o)]])
    r.front = UpgradeFront()
    r.events = r.front.events
    r.e = native.Engine(on_end=lambda tok, up, down: r.ended.append((tok, up, down)), backend=backend)
    r.e.handshakes(r.front)
    r.e.set_origins([[addr(o)]])
    r.e.listen(r.lst.fileno())
    # True: the accept from the request's key, in C (ws_accept.c)
    r.on("head", lambda ev: r.e.connect(ev[1], [0], ev[2], RID, False, "tok", -1.0, True))
    r.on("upgrade", lambda ev: r.e.splice(ev[1], "tunnel"))
    r.on("response", lambda ev: r.e.refuse(ev[1], b"HTTP/1.1 502 Bad Gateway\r\n\r\n"))
    return r


def test_a_good_101_is_checked_in_c_and_python_gets_no_view(backend):
    """connect() given the expected Sec-WebSocket-Accept: a 101 that carries it
    comes to on_upgrade (origin, attempts; no response view), after an interim
    100 was skipped; the tunnel is spliced from there, bytes intact."""
    o = origin_listener()
    r = _upgrade_rig(backend, o)
    r.on("response", lambda ev: r.e.skip(ev[1], ev[3].head_len))  # the interim 100
    c = r.client(KEYED)
    r.next_event("head")
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    _, _, _, resp, _, _ = r.next_event("response")
    assert resp.status == 100
    conn.sendall(_answer() + b"frame")
    _, cid, token, origin, attempts, connect_s = r.next_event("upgrade")
    assert (token, origin, attempts) == ("tok", 0, None)
    assert 0 <= connect_s < 5 and r.e.connect_time(cid) is None  # taken once, given with the 101
    assert not [e for e in r.events if e[0] == "response"]
    c.settimeout(5)
    got = b""
    while not got.endswith(b"frame"):
        r.e.poll()
        got += c.recv(65536)
    assert got == b"HTTP/1.1 100 Continue\r\n\r\n" + _answer() + b"frame" or got == _answer() + b"frame"


def test_c_and_python_agree_on_which_101s_pass(backend):
    """Differential: for every answer, on_upgrade (C's check) is called exactly
    when relay/handshake.py's check_upgrade_response passes on the reference
    parse; everything else reaches on_response as a view, as before."""
    o = origin_listener()
    r = _upgrade_rig(backend, o)
    answers = _random_answers(120)
    passed = [_python_passes(a) for a in answers]
    assert 10 < sum(passed) < len(answers) - 10  # both kinds are exercised
    for answer, expect in zip(answers, passed):
        c = r.client(KEYED)
        r.next_event("head")
        r.poll(lambda: True)
        conn, _ = o.accept()
        recv_head(conn, r)
        conn.sendall(answer)
        kind = r.poll(lambda: next((e[0] for e in r.events if e[0] in ("upgrade", "response")), None))
        r.events.clear()
        assert (kind == "upgrade") == expect, answer
        c.close()
        conn.close()
    r.poll(lambda: r.e.handshake_stats["live"] == 0)


def test_without_an_accept_every_answer_comes_as_a_view(backend):
    """connect() without the accept (a caller that checks itself): a good 101
    reaches on_response as a view even when the front has on_upgrade."""
    o = origin_listener()
    r = _upgrade_rig(backend, o)
    r.front.decide = lambda cid: None
    r.on("head", lambda ev: r.e.connect(ev[1], [0], ev[2], RID, False, "tok"))
    r.on("response", lambda ev: r.e.splice(ev[1], "tunnel"))
    r.client(KEYED)
    r.next_event("head")
    r.poll(lambda: True)
    conn, _ = o.accept()
    recv_head(conn, r)
    conn.sendall(_answer())
    _, _, _, resp, _, _ = r.next_event("response")
    assert resp.status == 101


def test_an_accept_given_as_bytes_is_the_one_checked(backend):
    """connect(accept=value): a 101 must carry that value, whatever the key."""
    from relay.handshake import accept_key

    o = origin_listener()
    r = _upgrade_rig(backend, o)
    r.front.decide = lambda cid: None
    other = accept_key(b"another key")
    r.on("head", lambda ev: r.e.connect(ev[1], [0], ev[2], RID, False, "tok", -1.0, other))
    r.on("upgrade", lambda ev: r.e.splice(ev[1], "tunnel"))
    r.on("response", lambda ev: r.e.refuse(ev[1], b""))
    for accept, kind in ((accept_key(KEY), "response"), (other, "upgrade")):
        r.client(KEYED)
        r.next_event("head")
        r.poll(lambda: True)
        conn, _ = o.accept()
        recv_head(conn, r)
        conn.sendall(_answer(fields=[b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept]))
        assert r.next_event(kind)[0] == kind


def test_without_a_request_id_c_makes_a_new_one_per_request(backend):
    """connect(request_id=None) (no access log wants it, no trusted proxy sent
    one): the forwarded head carries a new X-Request-ID of 32 hex digits, as
    relay/logs.py's new_request_id makes, a different one each time."""
    import re

    o = origin_listener()
    r = Rig(backend, origins=[[addr(o)]])
    r.on("head", lambda ev: r.e.connect(ev[1], [0], ev[2], None, False, "tok"))
    r.on("failed", lambda ev: r.e.refuse(ev[1], b""))  # each origin closes without answering
    ids = []
    for _ in range(3):
        r.client(HEAD)
        r.next_event("head")
        r.poll(lambda: True)
        conn, _ = o.accept()
        got = recv_head(conn, r)
        ids += re.findall(rb"\r\nX-Request-ID: ([^\r]*)\r\n", got)
        conn.close()
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids), ids
