"""How a tunnel (tunnel mode, 2 workers) passes endings on, seen from both
ends: a client's FIN reaches the origin while the other direction stays open,
a client's reset reaches the origin as a reset, both sockets of a tunnel have
TCP_NODELAY set (read from the worker's own descriptors), and backpressure
holds upstream too (a fast client, an origin that reads nothing for a while)."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import random
import socket
import struct
import threading
import time

import pytest

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.raw_origins import RawOrigin, switching
from tests.support.relay import Relay, wait_for

SYS_PIDFD_GETFD = 438  # same number on every Linux architecture (unified syscall table)


async def behave(origin: RawOrigin, c) -> None:
    """``/fin/<token>``: read to EOF, then answer and close. ``/reset/<token>``:
    echo until the stream ends, noting whether it ended with a reset. ``/hold/<token>``:
    note the relay's address as seen here, then echo."""
    kind, token = c.head.split(b" ", 2)[1].decode().strip("/").split("/")
    c.writer.write(switching(c.head))
    await c.writer.drain()
    if kind == "sink":
        # read nothing until the test opens the tap, then everything to EOF
        tap = origin.taps[token] = asyncio.Event()
        await tap.wait()
        h, n = hashlib.sha256(c.rest), len(c.rest)
        while data := await c.reader.read(1 << 20):
            h.update(data)
            n += len(data)
        origin.events[token] = ("eof", (n, h.hexdigest()))
        return
    got = bytearray(c.rest)
    if kind == "hold":
        origin.events[token] = ("peer", c.writer.get_extra_info("peername"))
    try:
        while True:
            data = await c.reader.read(65536)
            if not data:
                break
            got += data
            if kind != "fin":
                c.writer.write(data)
                await c.writer.drain()
    except ConnectionResetError:
        origin.events[token] = ("reset", bytes(got))
        return
    origin.events[token] = ("eof", bytes(got))
    if kind == "fin":
        # the client half-closed: its way back must still be open
        c.writer.write(b"answer after your FIN")
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
def relay(origin, data_plane):
    origin.events.clear()  # the tokens are reused by each data plane's run
    origin.taps.clear()
    with Relay(origin.addr, workers=2) as r:
        yield r


def upgraded(relay: Relay, path: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    s.sendall(upgrade_request(path))
    head, rest = read_head(s)
    assert status_of(head) == 101
    return s, rest


def read_to_eof(s: socket.socket, got: bytes = b"") -> bytes:
    while chunk := s.recv(65536):
        got += chunk
    return got


def test_client_fin_reaches_the_origin_and_the_way_back_stays_open(relay, origin):
    s, rest = upgraded(relay, "/fin/a")
    try:
        s.sendall(b"last words before my FIN")
        s.shutdown(socket.SHUT_WR)
        assert read_to_eof(s, rest) == b"answer after your FIN"
    finally:
        s.close()
    wait_for(lambda: "a" in origin.events, 5, what="the origin to see the end")
    assert origin.events["a"] == ("eof", b"last words before my FIN")


def test_client_reset_reaches_the_origin_as_a_reset(relay, origin):
    s, rest = upgraded(relay, "/reset/b")
    s.sendall(b"ping")
    got = rest
    while len(got) < 4:
        got += s.recv(65536)
    assert got == b"ping"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    wait_for(lambda: "b" in origin.events, 5, what="the origin to see the end")
    assert origin.events["b"] == ("reset", b"ping")


def _worker_sockets(pid: int):
    """Every TCP socket a worker holds, duplicated into this process (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (1, 38):  # EPERM (ptrace policy), ENOSYS (kernel < 5.6)
                    pytest.skip(f"pidfd_getfd not permitted here: {os.strerror(err)}")
                continue
            s = socket.socket(fileno=fd)
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                yield s
            else:
                s.close()
    finally:
        os.close(pidfd)


def test_both_sockets_of_a_tunnel_have_tcp_nodelay(relay, origin):
    s, rest = upgraded(relay, "/hold/c")
    try:
        wait_for(lambda: "c" in origin.events, 5, what="the origin to note the relay's address")
        relay_side_of_origin = origin.events["c"][1][:2]
        client_side, origin_side = None, None
        deadline = time.monotonic() + 5
        while (client_side is None or origin_side is None) and time.monotonic() < deadline:
            for pid in relay.worker_pids().values():
                for w in _worker_sockets(pid):
                    with w:
                        try:
                            peer, local = w.getpeername()[:2], w.getsockname()[:2]
                        except OSError:
                            continue  # the listening socket
                        nodelay = w.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                        if peer == s.getsockname()[:2]:
                            client_side = nodelay
                        elif local == relay_side_of_origin:
                            origin_side = nodelay
        assert client_side is not None and origin_side is not None, "the tunnel's sockets were not found"
        assert client_side and origin_side, (client_side, origin_side)
        s.sendall(b"still echoing")  # duplicating the descriptors disturbed nothing
        got = rest
        while len(got) < 13:
            got += s.recv(65536)
        assert got == b"still echoing"
    finally:
        s.close()


def test_fast_client_slow_origin_memory_bounded_then_everything_arrives(relay, origin):
    """200 MiB pushed by a client at an origin that reads nothing for 3 s: the
    workers' RSS grows < 64 MiB, then every byte arrives, sha256 equal."""
    mib = random.Random(7).randbytes(1 << 20)
    n = 200
    s, _ = upgraded(relay, "/sink/d")
    s.settimeout(60)
    sent = []

    def push():
        try:
            for _ in range(n):
                s.sendall(mib)
            s.shutdown(socket.SHUT_WR)
            sent.append(n)
        except OSError as e:
            sent.append(e)

    before = relay.rss()
    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        wait_for(lambda: "d" in origin.taps, 5, what="the origin to hold its tap")
        grew = relay.rss_growth(3, before)
        assert not sent, "the client pushed 200 MiB while the origin read nothing"
        assert grew < 64 * 1024 * 1024, f"relay RSS grew by {grew >> 20} MiB"
        origin.lt.loop.call_soon_threadsafe(origin.taps["d"].set)
        pusher.join(60)
        assert sent == [n], sent
        wait_for(lambda: "d" in origin.events, 30, what="the origin to read everything")
        expected = hashlib.sha256(mib * n).hexdigest()
        assert origin.events["d"] == ("eof", (n << 20, expected))
    finally:
        s.close()
