"""``/metrics``, ``/healthz``, ``/readyz`` and ``/config``, served from the
supervisor's single-threaded select loop: no thread, so forking workers stays
safe. ``/config`` is whatever JSON the supervisor's ``config`` callable
returns (the running settings, secrets redacted, its generation and version).

Requests are tiny; each connection is read without blocking until its head is
complete, answered without blocking, and closed. Everything is bounded: the
head in size, each connection in time (:data:`TIMEOUT` from accept to the last
byte out) and their number (:data:`MAX_CONNECTIONS`), so a slow or hostile
scraper can never stall the supervisor, which also watches the workers.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MAX_REQUEST = 8192
TIMEOUT = 5.0
MAX_CONNECTIONS = 64


class Endpoint:
    def __init__(self, sock: socket.socket, registry: CollectorRegistry,
                 healthy: Callable[[], bool], ready: Callable[[], bool],
                 config: Callable[[], bytes] | None = None):
        self.sock = sock
        self.registry = registry
        self.healthy = healthy
        self.ready = ready
        self.config = config
        #: connection -> [request bytes, deadline, answer still to send or None]
        self._pending: dict[socket.socket, list] = {}
        self._sel: selectors.BaseSelector | None = None

    @classmethod
    def bind(cls, host: str, port: int, **kw) -> "Endpoint":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
        return cls(sock, **kw)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def register(self, sel: selectors.BaseSelector) -> None:
        self._sel = sel
        sel.register(self.sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self._pending):
            self._drop(conn)
        if self._sel is not None:
            self._sel.unregister(self.sock)
        self.sock.close()

    def _accept(self, _sock, _ev) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if len(self._pending) >= MAX_CONNECTIONS:
            self._drop(next(iter(self._pending)))  # the oldest: a scraper waits at most that long
        conn.setblocking(False)
        self._pending[conn] = [bytearray(), time.monotonic() + TIMEOUT, None]
        self._sel.register(conn, selectors.EVENT_READ, self._read)

    def expire(self) -> None:
        now = time.monotonic()
        for conn, (_buf, deadline, _out) in list(self._pending.items()):
            if now > deadline:
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _read(self, conn: socket.socket, _ev) -> None:
        state = self._pending[conn]
        buf = state[0]
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(conn)
        buf += data
        if b"\r\n\r\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._drop(conn)
            return
        parts = bytes(buf).split(b" ", 2)
        path = parts[1].split(b"?")[0] if len(parts) > 2 else b""
        state[2] = memoryview(self.answer(parts[0], path))
        self._sel.modify(conn, selectors.EVENT_WRITE, self._write)
        self._write(conn, None)

    def _write(self, conn: socket.socket, _ev) -> None:
        state = self._pending.get(conn)
        if state is None:
            return
        out = state[2]
        try:
            sent = conn.send(out)
        except BlockingIOError:
            return
        except OSError:
            return self._drop(conn)
        state[2] = out = out[sent:]
        if not out:
            self._drop(conn)

    def answer(self, method: bytes, path: bytes) -> bytes:
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n")
        if path == b"/metrics":
            return _response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST, method == b"HEAD")
        if path == b"/healthz":
            ok = self.healthy()
            return _response(200 if ok else 503, b"ok\n" if ok else b"no live worker\n")
        if path == b"/readyz":
            ok = self.ready()
            return _response(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        if path == b"/config" and self.config is not None:
            return _response(200, self.config(), "application/json", method == b"HEAD")
        return _response(404, b"not found: try /metrics, /healthz, /readyz or /config\n")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _response(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + (b"" if head else body)


def serve(host: str, port: int, source, healthy: Callable[[], bool], ready: Callable[[], bool],
          config: Callable[[], bytes] | None = None) -> Endpoint:
    """Bind the endpoint for a relay whose figures ``source`` gives
    (metrics/source.py); raises OSError when the address cannot be bound."""
    from metrics.collector import RelayCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(source))
    return Endpoint.bind(host, port, registry=registry, healthy=healthy, ready=ready, config=config)
