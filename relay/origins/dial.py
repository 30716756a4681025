"""Connecting a request to an origin of its pool (README, "Routes and
origins"): the pool's balancer chooses (relay/origins/balance.py); a connect
error is counted against that origin and the next one is chosen, each
origin tried once per request (nginx's ``proxy_next_upstream error``). The
caller bounds the whole of it with the pool's ``RELAY_CONNECT_TIMEOUT``.

A :class:`Dial` holds one open-connection count on the origin it is trying
or connected to (least connections counts connects in progress, so a burst
spreads); the caller keeps it for the connection's life and gives it back
with :meth:`Dial.release`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from relay.errors import OriginUnavailable, Refused
from relay.origins.balance import AtLimit, Member, OriginPool

if TYPE_CHECKING:
    from relay.http_head import Request


class Dial:
    """One request's way to an origin: what was tried, what is held."""

    __slots__ = ("pool", "req", "member", "tried")

    def __init__(self, pool: OriginPool, req: "Request | None") -> None:
        self.pool = pool
        self.req = req
        #: the origin being tried or connected to (holding a count), or None
        self.member: Member | None = None
        #: every origin chosen so far, in order
        self.tried: tuple[Member, ...] = ()

    @property
    def tries(self) -> int:
        return len(self.tried)

    @property
    def last(self) -> str:
        """The last origin chosen (``host:port``), or ``""``."""
        return self.tried[-1].name if self.tried else ""

    def choose(self) -> Member | None:
        """Choose the next origin and hold it; None when every one was tried.
        Raises Refused(503, ``limit_origin``) when the rest are at ``RELAY_MAX_CONNS``."""
        self.release()
        try:
            m = self.pool.choose(self.req, self.tried)
        except AtLimit:
            raise Refused(503, f"every origin of pool {self.pool.name} is at RELAY_MAX_CONNS",
                          "limit_origin") from None
        if m is not None:
            self.hold(m)
        return m

    def hold(self, m: Member) -> None:
        """Hold ``m``'s connection count (giving back the one held before) and
        count it as tried: the origin asked now, whoever chose it (the native
        head phase's engine fails over by itself, relay/native/front.py)."""
        if self.member is m:
            return
        self.release()
        self.pool.opened(m)
        self.member = m
        self.tried_too(m)

    def tried_too(self, m: Member) -> None:
        """Count ``m`` as tried (once) without holding it."""
        if m not in self.tried:
            self.tried += (m,)

    def release(self) -> None:
        """Give back the count on the origin held, if any."""
        m = self.member
        if m is not None:
            self.member = None
            self.pool.closed(m)

    async def connect(self, factory, first: bytes = b"") -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect to the origin held (or the next one) with ``factory()`` as the
        protocol, failing over on connect errors; ``first`` is written at once
        (a PROXY v2 header: RELAY_ORIGIN_PROXY_PROTOCOL). Raises
        :class:`~relay.errors.OriginUnavailable` naming the last origin tried
        when none accepted."""
        loop = asyncio.get_running_loop()
        pool = self.pool
        last: OSError | None = None
        while True:
            m = self.member or self.choose()
            if m is None:
                raise OriginUnavailable(str(last), self.last)
            started = time.perf_counter()  # loop.time() counts whole milliseconds in uvloop
            try:
                transport, protocol = await loop.create_connection(factory, m.addr.host, m.addr.port)
            except OSError as e:
                last = e
                pool.failed(m, "connect", e.strerror or str(e))
                self.release()
                continue
            # uvloop sets TCP_NODELAY on every TCP transport it creates.
            pool.connected(m, time.perf_counter() - started)
            if first:
                transport.write(first)
            return transport, protocol
