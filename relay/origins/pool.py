"""Origin connections for plain HTTP, and the pool that keeps them alive
between requests (nginx's upstream ``keepalive``): one per origin of each
pool in each worker (relay/origins/balance.py), so a request reuses a
connection only to the origin it was balanced to.

An :class:`OriginConn` serves one exchange at a time (relay/exchange.py)
and calls it back with what the origin sends; between exchanges it idles in
the worker's :class:`Pool`. Whether a connection may go back to the pool is
the exchange's call (RFC 9112 §9.3: relay/http_head.keeps_alive).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

#: idle connections kept per origin and worker: more than a busy worker has
#: requests in flight (the benchmark's 50 clients), still bounded.
POOL_SIZE = 256
#: an idle pooled connection is closed after this many seconds (nginx's
#: upstream ``keepalive_timeout`` default).
POOL_IDLE_TIMEOUT = 60.0
#: a timer this close to its deadline counts as expired (uvloop's timers
#: have millisecond resolution).
TIMER_SLACK = 0.001


class Exchange(Protocol):
    """What an origin connection calls on the exchange it serves."""

    def origin_data(self, data: bytes) -> None: ...
    def origin_eof(self) -> None: ...
    def origin_lost(self, exc: Exception | None) -> None: ...
    def pause_upload(self, pause: bool) -> None: ...
    def read_deadline(self) -> float | None: ...  # loop time, None when nothing is awaited
    def read_timeout(self) -> None: ...


class OriginConn(asyncio.Protocol):
    """An origin connection for plain HTTP, reusable across exchanges.

    The read timeout lives here, not in the exchange: armed when an exchange
    starts on a connection that has none pending (:meth:`watch`), it asks
    the exchange for its deadline when it fires and re-arms for the
    remainder, so a request answered in time costs no timer at all when the
    previous one's is still pending (one ``call_later`` per connection per
    read timeout, not two per request)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.pool: Pool | None = None
        self.addr = ""
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.origin_data(data)
        else:
            self.transport.close()  # nothing is owed on an idle connection

    def eof_received(self) -> bool:
        if self.exchange is not None:
            self.exchange.origin_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pool is not None:
            self.pool.remove(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.exchange is not None:
            self.exchange.origin_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upload(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upload(False)

    # -- the exchange's side -------------------------------------------------------
    def serve(self, exchange: Exchange, request: bytes, read_timeout: float) -> None:
        """Start ``exchange`` on this connection: send ``request`` (head and
        whatever body is at hand) and watch for the answer."""
        self.exchange = exchange
        self.transport.write(request)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(read_timeout, self._check_timeout)

    def release(self) -> None:
        """The exchange is over; the connection is idle (or about to close)."""
        self.exchange = None

    def _check_timeout(self) -> None:
        self.timer = None
        ex = self.exchange
        if ex is None:
            return  # idle or between exchanges: the next one arms it again
        deadline = ex.read_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining > TIMER_SLACK:
            self.timer = loop.call_later(remaining, self._check_timeout)
        else:
            ex.read_timeout()


class Pool:
    """A worker's idle origin connections, most recently used last.

    ``get`` takes the most recently used one (the warmest); the least recently
    used are at the front, where one timer per pool closes those idle for
    ``idle_timeout`` seconds. Closed when the worker starts draining: no
    connection is kept for a request that will not come."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = POOL_SIZE,
                 idle_timeout: float = POOL_IDLE_TIMEOUT) -> None:
        self.loop = loop
        self.size = size
        self.idle_timeout = idle_timeout
        self.conns: list[OriginConn] = []
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self.conns)

    def get(self) -> OriginConn | None:
        conns = self.conns
        while conns:
            origin = conns.pop()
            origin.pool = None
            if not origin.transport.is_closing():
                return origin
        return None

    def put(self, origin: OriginConn) -> bool:
        """Keep ``origin`` for the next request; False if the pool is full or closed."""
        if self.closed or len(self.conns) >= self.size or origin.transport.is_closing():
            return False
        origin.pool = self
        origin.idle_since = self.loop.time()
        self.conns.append(origin)
        if self.timer is None:
            self.timer = self.loop.call_later(self.idle_timeout, self._expire)
        return True

    def remove(self, origin: OriginConn) -> None:
        origin.pool = None
        try:
            self.conns.remove(origin)
        except ValueError:
            pass

    def _expire(self) -> None:
        self.timer = None
        conns = self.conns
        now = self.loop.time()
        deadline = now - self.idle_timeout + TIMER_SLACK
        n = 0
        while n < len(conns) and conns[n].idle_since <= deadline:
            n += 1
        if n:
            expired = conns[:n]
            del conns[:n]
            for origin in expired:
                origin.pool = None
                origin.transport.close()
        if conns:
            self.timer = self.loop.call_later(conns[0].idle_since + self.idle_timeout - now, self._expire)

    def clear(self) -> None:
        """Close every idle connection (their origin is out), keeping the pool open."""
        conns, self.conns = self.conns, []
        for origin in conns:
            origin.pool = None
            origin.transport.close()

    def close(self) -> None:
        """Close every idle connection and keep no more."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conns, self.conns = self.conns, []
        for origin in conns:
            origin.pool = None
            origin.transport.close()
