"""Talking to the origin before the tunnel exists: connect with round-robin
and failover, then wait for the response head.

Only addresses from ``RELAY_ORIGIN`` are ever connected to; nothing in a
request can name another destination.
"""

from __future__ import annotations

import asyncio
import itertools

from relay.config import Address
from relay.http_head import HeadError, Response, parse_response_head

MAX_RESPONSE_HEAD = 64 * 1024


class OriginUnavailable(Exception):
    """Every origin refused or failed the connection: 502."""


class OriginClosed(HeadError):
    """The origin accepted the connection and closed it without a byte of
    answer (restarting, overloaded): safe to try the next origin, as nginx's
    ``proxy_next_upstream error`` does; a 502 when none is left."""

    def __init__(self) -> None:
        super().__init__(502, "origin closed before answering", "origin_error")


class OriginHead(asyncio.Protocol):
    """Collects the origin's response head; reading pauses once it is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        # Nobody awaits the head once the client is gone; don't warn about it.
        self.head.add_done_callback(_consume)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head.done():
            if len(self.buf) > MAX_RESPONSE_HEAD:
                self.transport.pause_reading()
            return
        try:
            resp = parse_response_head(self.buf, MAX_RESPONSE_HEAD)
        except HeadError as e:
            self.head.set_exception(e)
            return
        if resp is not None:
            self.transport.pause_reading()
            self.head.set_result(resp)

    def eof_received(self) -> bool:
        if not self.head.done():
            # The origin hung up before a complete head: a 502 now, not a 504 later.
            self.head.set_exception(self._closed())
            return False
        return True  # after the head, a FIN belongs to the tunnel (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(self._closed())

    def _closed(self) -> HeadError:
        if self.buf:  # a truncated answer: the origin did act on the request
            return HeadError(502, "origin closed in the middle of its answer", "origin_error")
        return OriginClosed()


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class Origins:
    """Round-robin over the configured origins, trying the next on a connect error."""

    def __init__(self, origins: tuple[Address, ...]):
        self._origins = origins
        self._next = itertools.cycle(range(len(origins))) if origins else None

    def __len__(self) -> int:
        return len(self._origins)

    async def connect(self, factory) -> tuple[asyncio.Transport, asyncio.Protocol, Address]:
        """Connect to one origin; the caller bounds the time with a timeout."""
        loop = asyncio.get_running_loop()
        start = next(self._next)  # type: ignore[arg-type]
        last: OSError | None = None
        for i in range(len(self._origins)):
            addr = self._origins[(start + i) % len(self._origins)]
            try:
                transport, protocol = await loop.create_connection(factory, addr.host, addr.port)
            except OSError as e:
                last = e
                continue
            # uvloop sets TCP_NODELAY on every TCP transport it creates.
            return transport, protocol, addr
        raise OriginUnavailable(str(last))
