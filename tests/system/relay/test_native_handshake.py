"""The head phase in C (relay/native/handshake.c), on its own, against real
loopback sockets: accepting, reading a request head (capped, with a
deadline), refusing with a lingering close, connecting to an origin with
failover, holding what the client sent behind its head until the origin's
101, reading the response head (capped), and handing both sockets to the
pump (splice) or to the caller (detach). Python's decisions are played here
by the test; the worker's own wiring is a later step (milestone 2).
"""

from __future__ import annotations

import errno
import socket
import time

import pytest

from relay import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="native data plane unavailable")

GUID_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n")
HEAD = b"GET /chat HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


class Rig:
    def __init__(self, backend: str = "io_uring", **kw):
        self.events: list[tuple] = []
        self.ended: list[tuple] = []
        self.e = native.Engine(on_end=lambda tok, up, down: self.ended.append((tok, up, down)), backend=backend)
        self.e.handshakes(lambda *a: self.events.append(("head", *a)),
                          lambda *a: self.events.append(("response", *a)),
                          lambda *a: self.events.append(("failed", *a)),
                          lambda *a: self.events.append(("timeout", *a)), **kw)
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(64)
        self.lst.setblocking(False)
        self.e.listen(self.lst.fileno())
        self.port = self.lst.getsockname()[1]

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


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # bound, never listening: refused


@pytest.fixture(params=["io_uring", "epoll"])
def backend(request):
    return request.param


def test_the_head_reaches_python_once_with_the_peer_and_the_bytes_behind_it(backend):
    r = Rig(backend)
    c = r.client(HEAD[:20])
    time.sleep(0.05)
    r.e.poll_handshakes()
    assert not [e for e in r.events if e[0] == "head"]  # not complete yet
    c.sendall(HEAD[20:] + b"EARLY")
    _, cid, data, head_end, peer = r.next_event("head")
    assert data in (HEAD, HEAD + b"EARLY") and head_end == len(HEAD)
    assert peer == c.getsockname()
    assert r.e.handshake_stats["live"] == 1


def test_refuse_writes_half_closes_and_lingers(backend):
    r = Rig(backend)
    c = r.client(HEAD)
    _, cid, *_ = r.next_event("head")
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert r.e.refuse(cid, answer)
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


def test_connect_fails_over_holds_early_bytes_until_the_101_then_splices(backend):
    r = Rig(backend)
    o = origin_listener()
    c = r.client(HEAD + b"EARLY")
    _, cid, data, head_end, peer = r.next_event("head")
    forwarded = b"GET /chat HTTP/1.1\r\nHost: relay.test\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    assert r.e.connect(cid, [("127.0.0.1", dead_port()), ("127.0.0.1", o.getsockname()[1])], forwarded)
    r.poll(lambda: True)
    conn, _ = o.accept()
    conn.settimeout(5)
    got = b""
    while len(got) < len(forwarded):
        r.poll(lambda: True, 0.1)
        got += conn.recv(65536)
    assert got == forwarded  # the head only: EARLY is held
    conn.setblocking(False)
    time.sleep(0.05)
    r.poll(lambda: True)
    with pytest.raises(BlockingIOError):
        conn.recv(65536)
    conn.sendall(GUID_101 + b"after-101")
    _, rid, resp, resp_end, origin_index = r.next_event("response")
    assert rid == cid and resp_end == len(GUID_101) and resp.startswith(GUID_101) and origin_index == 1
    tid = r.e.splice(cid, resp, "tok")
    assert r.e.handshake_stats["live"] == 0 and r.e.open == 1
    c.settimeout(5)
    got = b""
    while len(got) < len(resp):
        r.e.poll()
        got += c.recv(65536)
    assert got == resp
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
    assert r.e.bytes(tid) == (4, 0)


def test_every_origin_refusing_is_reported_once(backend):
    r = Rig(backend)
    c = r.client(HEAD)
    _, cid, *_ = r.next_event("head")
    r.e.connect(cid, [("127.0.0.1", dead_port()), ("127.0.0.1", dead_port())], b"GET / HTTP/1.1\r\n\r\n")
    _, fid, err = r.next_event("failed")
    assert fid == cid and err == errno.ECONNREFUSED
    assert r.e.refuse(cid, b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    assert c.recv(100).startswith(b"HTTP/1.1 502")


@pytest.mark.parametrize("answer, expect", [(b"", "next"), (b"HTTP/1.1 101 Swi", "truncated"),
                                            (b"HTTP/1.1 101 OK\r\nX: " + b"y" * 70000, "too large")])
def test_origin_answers_that_fail(backend, answer, expect):
    r = Rig(backend)
    o = origin_listener()
    c = r.client(HEAD)
    _, cid, *_ = r.next_event("head")
    r.e.connect(cid, [("127.0.0.1", o.getsockname()[1])], b"GET / HTTP/1.1\r\n\r\n")
    r.poll(lambda: True)
    conn, _ = o.accept()
    conn.recv(65536)
    if answer:
        conn.sendall(answer)
    conn.close()
    _, fid, err = r.next_event("failed")
    # closed without a byte: the next origin (none here: refused); a partial answer: not retried
    assert err == {"next": errno.ECONNRESET, "truncated": errno.EPIPE, "too large": errno.EMSGSIZE}[expect]
    c.close()


def test_head_timeout_is_reported_with_the_bytes_read_and_the_connection_dropped(backend):
    r = Rig(backend, head_timeout=0.3)
    c = r.client(HEAD[:10])
    _, cid, phase, nbytes = r.next_event("timeout", 3)
    assert phase == "head" and nbytes == 10
    c.settimeout(2)
    assert c.recv(10) == b""  # closed, nothing answered (Python counts a 408)
    assert r.e.handshake_stats["live"] == 0


def test_origin_timeout(backend):
    r = Rig(backend, connect_timeout=0.3)
    o = origin_listener()  # accepts (the kernel does) and never answers
    c = r.client(HEAD)
    _, cid, *_ = r.next_event("head")
    r.e.connect(cid, [("127.0.0.1", o.getsockname()[1])], b"GET / HTTP/1.1\r\n\r\n")
    _, tid, phase, _n = r.next_event("timeout", 3)
    assert tid == cid and phase == "origin"
    assert r.e.refuse(cid, b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n")
    assert c.recv(100).startswith(b"HTTP/1.1 504")


def test_a_head_over_the_cap_is_delivered_without_an_end(backend):
    r = Rig(backend, max_head=1024)
    c = r.client(b"GET / HTTP/1.1\r\nX: " + b"a" * 3000)
    _, cid, data, head_end, _ = r.next_event("head")
    assert head_end == 0 and len(data) == 1025  # Python answers 431
    c.close()


def test_detach_hands_the_socket_and_the_bytes_over(backend):
    r = Rig(backend)
    c = r.client(HEAD + b"tail")
    _, cid, *_ = r.next_event("head")
    cfd, ofd, cbytes, obytes = r.e.detach(cid)
    assert ofd == -1 and cbytes == HEAD + b"tail" and obytes == b""
    s = socket.socket(fileno=cfd)
    s.sendall(b"served by Python")
    assert c.recv(100) == b"served by Python"
    s.close()
    assert r.e.handshake_stats["live"] == 0


def test_a_client_leaving_while_its_origin_is_asked_is_reported(backend):
    r = Rig(backend)
    o = origin_listener()
    c = r.client(HEAD)
    _, cid, *_ = r.next_event("head")
    r.e.connect(cid, [("127.0.0.1", o.getsockname()[1])], b"GET / HTTP/1.1\r\n\r\n")
    r.poll(lambda: True)
    c.close()
    _, fid, err = r.next_event("failed")
    assert fid == cid and err == errno.ECONNABORTED
    assert r.e.close_handshake(cid)
    assert r.e.handshake_stats["live"] == 0


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
        e.handshakes(lambda cid, *a, heads=heads: heads.append(cid), lambda *a: None, lambda *a: None,
                     lambda *a: None)
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
    r.e.balance(mine, [sibling], layout.LOAD, layout.ACCEPTING, slack=0)
    clients = [r.client(HEAD) for _ in range(30)]
    r.poll(lambda: len([e for e in r.events if e[0] == "head"]) == 30, 10)
    assert mine[layout.LOAD] > 0  # published at each wake-up
    for c in clients:
        c.close()


def test_the_prototype_front_serves_a_real_relay(aio_origin):
    """WSRELAY_NATIVE_HANDSHAKE=1 (relay/native/front.py): an upgrade and its
    echo, a refusal, and plain HTTP handed back to the Python path, through
    a real relay with 2 workers; the access log says native for both upgrades."""
    import json

    from websockets.sync.client import connect

    from tests.support.net import raw_exchange, status_of, upgrade_request
    from tests.support.relay import Relay, wait_for

    with Relay(aio_origin.addr, workers=2, env={"WSRELAY_NATIVE_HANDSHAKE": "1", "RELAY_WS_PATHS": "/ws"}) as r:
        with connect(r.url + "/ws") as ws:
            ws.send("through C")
            assert ws.recv(timeout=5) == "through C"
        assert status_of(raw_exchange(r.port, upgrade_request("/elsewhere"))) == 403
        out = raw_exchange(r.port, b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200
        wait_for(lambda: len(r.access) >= 3, 5, what="three access log lines")
        recs = [json.loads(line) for line in r.access]
        assert {(x["status"], x["data_plane"]) for x in recs} == {(101, "native"), (403, "native"), (200, "python")}
        assert "Traceback" not in r.text()


EMFILE_SCRIPT = r"""
import os, resource, socket, sys, time
from relay import native
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
heads = []
e = native.Engine()
e.handshakes(lambda cid, *a: heads.append(cid), lambda *a: None, lambda *a: None, lambda *a: None)
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
