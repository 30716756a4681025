"""The origin's answer to an upgrade request, read until its head is complete
(RFC 9112 §4, RFC 9110 §15.2 for interim answers)."""

from __future__ import annotations

import asyncio

from relay.errors import HeadError, OriginClosed
from relay.http_head import Response, parse_response_head

#: largest origin response head accepted (502 beyond)
MAX_RESPONSE_HEAD = 64 * 1024


class UpgradeAnswer(asyncio.Protocol):
    """Collects the origin's final response head to an upgrade; reading pauses
    once it is complete, with ``buf`` starting at that head.

    Interim answers (``1xx`` other than ``101``, RFC 9110 §15.2: ``100
    Continue``, ``103 Early Hints``) are consumed and dropped: the final
    answer follows within the same ``RELAY_CONNECT_TIMEOUT``. nginx drops an
    upstream's 1xx the same way; a WebSocket client waits for its 101 and
    many (the ``websockets`` library among them) would take an interim
    answer for a refusal."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        #: the origin sent something (an interim answer at least)
        self.answered = False
        self.head: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        # Nobody awaits the head once the client is gone; don't warn about it.
        self.head.add_done_callback(_consume)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.answered = True
        if self.head.done():
            if len(self.buf) > MAX_RESPONSE_HEAD:
                self.transport.pause_reading()
            return
        while True:
            try:
                resp = parse_response_head(self.buf, MAX_RESPONSE_HEAD)
            except HeadError as e:
                self.head.set_exception(e)
                return
            if resp is None:
                return
            if resp.status < 200 and resp.status != 101:
                del self.buf[:resp.head_len]  # interim: the final answer follows
                continue
            self.transport.pause_reading()
            self.head.set_result(resp)
            return

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
        if self.answered:  # a truncated answer: the origin did act on the request
            return HeadError(502, "origin closed in the middle of its answer", "origin_error")
        return OriginClosed()


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
