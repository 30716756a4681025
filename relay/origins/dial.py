"""Choosing an origin and connecting to it (README, "Settings": RELAY_ORIGIN).

Round-robin over the configured origins; a connect error moves on to the
next, each origin tried once per call. The caller bounds the whole call
with ``RELAY_CONNECT_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import itertools

from relay.config import Address
from relay.errors import OriginUnavailable
from relay.origins.report import FailureLog


class Origins:
    """Round-robin over the configured origins, trying the next on a connect error."""

    def __init__(self, origins: tuple[Address, ...], failures: FailureLog | None = None):
        self._origins = origins
        self.failures = failures or FailureLog()
        self._next = itertools.cycle(range(len(origins))) if origins else None

    def __len__(self) -> int:
        return len(self._origins)

    async def connect(self, factory, first: bytes = b"") -> tuple[asyncio.Transport, asyncio.Protocol, Address]:
        """Connect to one origin with ``factory()`` as the protocol; ``first``
        is written at once (a PROXY v2 header: RELAY_ORIGIN_PROXY_PROTOCOL).

        Returns (transport, protocol, address). Raises
        :class:`~relay.errors.OriginUnavailable` when every origin failed.
        """
        loop = asyncio.get_running_loop()
        start = next(self._next)  # type: ignore[arg-type]
        last: OSError | None = None
        for i in range(len(self._origins)):
            addr = self._origins[(start + i) % len(self._origins)]
            try:
                transport, protocol = await loop.create_connection(factory, addr.host, addr.port)
            except OSError as e:
                last = e
                self.failures.failed(str(addr), "connect failed", e.strerror or str(e))
                continue
            # uvloop sets TCP_NODELAY on every TCP transport it creates.
            if first:
                transport.write(first)
            return transport, protocol, addr
        raise OriginUnavailable(str(last), str(addr))
