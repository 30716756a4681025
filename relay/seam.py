"""The seam between a client connection and whatever serves its requests
(README, "Architecture"), as two interfaces.

A :class:`Connection` (relay/client.py's ``ClientConnection`` for sockets on
the Python plane) reads a request head and hands the request to a
:class:`Server` (relay/upgrade.py's ``Upgrade``, relay/exchange.py's
``Exchange``). Each talks to the other only through these methods; nothing
reaches into the other's state. Another kind of connection — a socket whose
head the native plane read, a TLS or PROXY-protocol one — plugs in by
implementing :class:`Connection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from relay.context import Context
    from relay.logs import AccessRecord
    from relay.origins.pool import OriginConn


class Connection(Protocol):
    """What a server may do with the client's connection."""

    ctx: "Context"         # the worker's context
    client_ip: str         # the client's address (a PROXY header's, when there is one)
    trusted: bool          # the client is in RELAY_TRUSTED_PROXIES (X-Forwarded-For, X-Request-ID kept)
    started: float         # time.monotonic() of the request's first byte
    parked_origin: "OriginConn | None"  # RELAY_ORIGIN_PROXY_PROTOCOL=v2: this client's idle origin connection

    def send(self, data: bytes) -> None: ...
    def reading(self, on: bool) -> None: ...       # read from the client, or stop
    def unread(self, data: bytes) -> int: ...      # bytes for the next request; returns how many are kept
    def finished(self, keep: bool) -> None: ...    # the answer is complete: next request, or close
    def refuse(self, status: int, outcome: str, record: "AccessRecord | None",
               upgrade: bool = False) -> None: ...  # the relay's own answer, then close
    def reset(self) -> None: ...                   # abort with a reset (an answer broke off)
    def hand_over(self) -> "asyncio.Transport": ...  # the socket becomes a tunnel's
    def origin_header(self) -> bytes: ...          # the PROXY v2 header for this client's origin connections


class Server(Protocol):
    """What serves one request; the connection calls it with what happens to the client."""

    def data(self, data: bytes) -> None: ...       # bytes the client sent
    def eof(self) -> bool: ...                     # the client half-closed; True keeps our side open
    def lost(self) -> None: ...                    # the client's connection is gone
    def writable(self, ok: bool) -> None: ...      # the client's socket is full (False) or drained (True)
