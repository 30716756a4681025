"""The per-worker origin pool for plain HTTP (relay/origins/pool.py): it keeps
more idle connections than a busy worker has clients (no reconnect churn),
stays bounded, and closes connections left idle past its idle timeout.
Real sockets on loopback; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from relay.origins.pool import OriginConn, Pool
from tests.support.raw_origins import RawOrigin, keepalive_http
from tests.support.relay import Relay


async def _until(cond, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _pool_scenario() -> None:
    loop = asyncio.get_running_loop()
    closed: list[int] = []
    writers: dict[int, asyncio.StreamWriter] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        writers[port] = writer
        await reader.read()  # until the relay side closes
        closed.append(port)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conns = []
        for _ in range(3):
            _t, proto = await loop.create_connection(OriginConn, "127.0.0.1", port)
            conns.append(proto)
        a, b, c = conns
        local = {id(p): p.transport.get_extra_info("sockname")[1] for p in conns}
        pool = Pool(loop, size=2, idle_timeout=0.5)
        assert pool.put(a) and pool.put(b)
        assert not pool.put(c), "a full pool takes no more"
        c.transport.close()
        assert pool.get() is b, "the most recently used connection comes first"
        assert len(pool) == 1
        t0 = loop.time()
        await _until(lambda: loop.time() - t0 >= 0.25, 5, "a quarter second")
        assert pool.put(b)  # b's idle time starts now, a's earlier
        await _until(lambda: local[id(a)] in closed, 5, "the idle connection to be closed")
        assert loop.time() - t0 >= 0.45, "closed before its idle timeout"
        assert local[id(b)] not in closed and not b.transport.is_closing(), "b was not idle long enough"
        assert len(pool) == 1
        await _until(lambda: local[id(b)] in closed, 5, "the second idle connection to be closed")
        assert len(pool) == 0 and pool.timer is None
        # one the origin closes leaves the pool at once
        _t, d = await loop.create_connection(OriginConn, "127.0.0.1", port)
        d_port = d.transport.get_extra_info("sockname")[1]
        assert pool.put(d)
        await _until(lambda: d_port in writers, 5, "the origin to accept")
        writers[d_port].close()
        await _until(lambda: len(pool) == 0, 5, "the connection the origin closed to leave the pool")
        assert pool.get() is None
        pool.close()
    finally:
        server.close()


def test_pool_is_bounded_lifo_and_closes_idle_connections():
    asyncio.run(asyncio.wait_for(_pool_scenario(), 30))


@pytest.fixture(scope="module")
def origin(loop_thread):
    with RawOrigin(loop_thread, keepalive_http) as o:
        yield o


def _request_all(socks: list[socket.socket], path: bytes) -> list[bytes]:
    for s in socks:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    bodies = []
    for s in socks:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length:")))
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk
            body += chunk
        bodies.append(body)
    return bodies


def test_more_clients_than_the_old_pool_reuse_origin_connections(origin):
    """48 kept-alive clients with requests in flight at once, several rounds:
    the origin sees at most one connection per client (with a pool of 32, each
    round closed the overflow and the next reopened it)."""
    clients = 48
    with Relay(origin.addr, workers=1) as relay:
        socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(clients)]
        try:
            before = origin.connections
            for i in range(6):
                _request_all(socks, b"/round%d" % i)
            assert origin.connections - before <= clients, (origin.connections - before)
        finally:
            for s in socks:
                s.close()
