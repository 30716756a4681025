"""An admitted upgrade, from its request to a running tunnel (README, "What
happens at the edge"): connect to an origin of its pool (relay/origins/dial.py),
forward the head, read the answer; on a valid ``101`` the tunnel for
``RELAY_MODE`` takes both sockets, on any other answer the origin's refusal
is relayed and the connection closes. Every failure is counted against the
origin that failed (relay/origins/outlier.py), every answer for it.

The admission slot :mod:`relay.gate` took is this object's until the tunnel
exists, then the tunnel's: given back here on every path that ends without
one, and by the worker's context when the tunnel ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from relay.errors import FramingError, HeadError, OriginClosed, OriginUnavailable, Refused
from relay.http_body import BodyScanner
from relay.handshake import check_upgrade_response
from relay.headers import forward_head, response_head
from relay.http_head import Request, Response, body_framing
from relay.logs import AccessRecord
from relay.origins.answer import UpgradeAnswer
from relay.origins.dial import Dial
from relay.seam import Connection

if TYPE_CHECKING:
    from relay.origins.balance import OriginPool

#: an origin's own answers that count as its failure (Envoy's gateway errors)
GATEWAY_ERRORS = frozenset({502, 503, 504})

log = logging.getLogger("wsrelay.worker")


class Upgrade:
    """Serves one upgrade request (a :class:`relay.seam.Server`)."""

    def __init__(self, conn: Connection, req: Request, key: bytes, record: AccessRecord,
                 rest: bytes, request_id: bytes, pool: "OriginPool") -> None:
        self.conn = conn
        self.req = req
        self.pool = pool
        #: the origin being tried, and those tried before it
        self.dial = Dial(pool, req)
        self.key = key
        self.record = record
        self.request_id = request_id
        # Bytes after the upgrade head (frames of a client that does not wait,
        # or anything else) are held until the origin's 101: sent with the
        # head, an origin that refuses the upgrade and keeps its connection
        # would read them as a next request no forwarding rule was applied to.
        # After a refusal they are dropped with the connection.
        self.early = rest
        #: the admission slot the gate took is ours until a tunnel takes it
        self.holds_slot = True
        #: the origin's connection while its refusal is relayed
        self.refusal_t: asyncio.Transport | None = None
        self.task = asyncio.ensure_future(self._run())
        self.task.add_done_callback(self._done)

    # -- the client's side (reading is paused until a refusal is relayed) ----------------
    def data(self, data: bytes) -> None:
        if self.refusal_t is None:  # during a refusal, dropped with the connection
            self.early += data

    def eof(self) -> bool:
        # during a refusal: a half-close is not an abort, the rest of the answer still goes
        return self.refusal_t is not None

    def lost(self) -> None:
        if not self.task.done():
            self.task.cancel()
        if self.refusal_t is not None:  # nobody left to relay the refusal to
            self.refusal_t.abort()

    def writable(self, ok: bool) -> None:
        pass

    # -- the origin handshake -----------------------------------------------------------
    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("upgrade failed unexpectedly", exc_info=task.exception())
        self._refuse(502, "origin_error")

    def _release(self) -> None:
        """Give the admission slot back (once): before any answer is written,
        so a client that reads its refusal and then the metrics sees it back."""
        if self.holds_slot:
            self.holds_slot = False
            self.conn.ctx.admission.give(self.conn.client_ip)

    def _note(self) -> None:
        """The access log names the pool, the last origin tried and how many were."""
        rec, dial = self.record, self.dial
        rec.pool = self.pool.name
        rec.origin = dial.last
        rec.tries = dial.tries

    def _refuse(self, status: int, outcome: str) -> None:
        self._release()
        self.dial.release()
        self._note()
        self.conn.refuse(status, outcome, self.record, upgrade=True)

    async def _run(self) -> None:
        conn, ctx, rec = self.conn, self.conn.ctx, self.record
        pool, dial = self.pool, self.dial
        origin_t: asyncio.Transport | None = None
        try:
            try:
                async with asyncio.timeout(pool.connect_timeout):
                    origin_t, answer, resp = await self._ask_origin()
            except TimeoutError:
                if dial.member is not None:
                    pool.failed(dial.member, "timeout", f"no answer to an upgrade within "
                                f"RELAY_CONNECT_TIMEOUT={pool.connect_timeout:g}s", 504)
                return self._refuse(504, "timeout")
            except (OriginUnavailable, OriginClosed, Refused) as e:  # counted where they happened
                return self._refuse(e.status, e.outcome)
            except HeadError as e:
                pool.failed(dial.member, "invalid", str(e))
                return self._refuse(e.status, e.outcome)
            member = dial.member
            self._note()
            if resp.status != 101:
                if resp.status in GATEWAY_ERRORS:
                    pool.failed(member, "status_5xx", f"{resp.status} to an upgrade", resp.status)
                else:
                    pool.answered(member)
                self._release()
                dial.release()
                rec.status = resp.status
                rec.outcome = "origin_rejected"
                ctx.counters.upgrade("origin_rejected", resp.status)
                relay_refusal(conn, origin_t, bytes(answer.buf), resp, rec)
                self.refusal_t, origin_t = origin_t, None  # relay_refusal owns it now
                conn.reading(True)  # to see the client leave: the rest is not worth relaying then
                return
            try:
                check_upgrade_response(resp, self.key)
                ctx.tunnel_class.check_response(resp, ctx.settings)  # frames mode: what the limit measures by
            except HeadError as e:
                pool.failed(member, "invalid", str(e))
                return self._refuse(e.status, e.outcome)
            pool.answered(member)
            handshake_s = time.monotonic() - conn.started
            rec.status = 101
            rec.outcome = "upgraded"
            rec.handshake_ms = round(handshake_s * 1000, 3)
            ctx.counters.upgrade("upgraded", 101, handshake_s)
            data = bytes(answer.buf)
            self.holds_slot = False  # the tunnel's now: given back when it ends
            dial.member = None  # and the origin's connection count too
            ctx.open_tunnel(conn.hand_over(), origin_t, rec, resp,
                            head=data[:resp.head_len], to_client=data[resp.head_len:], to_origin=self.early,
                            upstream=member)
            origin_t = None
        finally:
            self._release()
            dial.release()
            if origin_t is not None:
                origin_t.abort()

    async def _ask_origin(self) -> tuple[asyncio.Transport, UpgradeAnswer, Response]:
        """Connect, send the head, await the final answer's head. An origin that
        closes without a byte of answer is left for the next (each once)."""
        ctx, dial, conn = self.conn.ctx, self.dial, self.conn
        head = forward_head(self.req, conn.client_ip, conn.proto, True, self.request_id, trusted=conn.trusted,
                            own=conn.own_header)
        first = conn.origin_header() if ctx.origin_proxy_v2 else b""
        while True:
            origin_t, answer = await dial.connect(UpgradeAnswer, first)
            origin_t.write(head)
            try:
                return origin_t, answer, await answer.head
            except OriginClosed as e:
                self.pool.failed(dial.member, "closed", str(e))
                origin_t.abort()
                if dial.choose() is None:
                    raise
            except BaseException:
                origin_t.abort()
                raise


# -- an origin's refusal, relayed -------------------------------------------------------

class _RefusalBody(asyncio.Protocol):
    """Carries the rest of an origin's non-101 answer to the client, then closes."""

    def __init__(self, conn: Connection, body: BodyScanner):
        self.conn = conn
        self.body = body
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            n = self.body.feed(data)
        except FramingError:
            self.body.finish()
            self.transport.abort()
            self.conn.reset()  # a truncated body must not look whole
            return
        if n:
            self.conn.send(data[:n])
        if self.body.done:
            self.conn.finished(keep=False)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.body.done:
            return
        if self.body.until_close and exc is None:
            self.conn.finished(keep=False)
        else:  # cut before the end of its body
            self.conn.reset()


def _refusal_start(conn: Connection, data: bytes, resp: Response,
                   record: AccessRecord | None) -> tuple[BodyScanner | None, bool]:
    """Log the refusal and send its head (and what of its body came with it).
    Returns the scanner for the rest of the body (None when the answer is
    complete: the connection is finished) and whether the answer is sound
    (False: its framing broke, the connection was reset)."""
    if record is not None:
        conn.ctx.access.write(record)
    try:
        length = 0 if resp.status in (204, 304) else body_framing(resp, is_request=False)
    except HeadError:
        length = None
    body = BodyScanner(length, response=True)
    raw, rest = data[: resp.head_len], data[resp.head_len:]
    head = response_head(resp, raw, resp.tokens(b"connection"), keep=False)
    try:
        n = body.feed(rest)
    except FramingError:
        conn.reset()
        return None, False
    conn.send(head + rest[:n])
    if body.done:
        conn.finished(keep=False)
        return None, True
    return body, True


def relay_refusal(conn: Connection, origin_t: asyncio.Transport, data: bytes, resp: Response,
                  record: AccessRecord | None) -> None:
    """The origin refused an upgrade: its answer (``data``: from its head on,
    as read) goes to the client, then the connection closes. The head loses
    its hop-by-hop fields and says ``Connection: close`` (an origin's
    ``keep-alive`` would promise what the relay does not do); the body is
    delimited as its head says (``Content-Length``, chunked, or until the
    origin closes); whatever the client sent after its upgrade request is
    dropped with the connection, never parsed."""
    body, sound = _refusal_start(conn, data, resp, record)
    if body is None:
        origin_t.close() if sound else origin_t.abort()
        return
    carrier = _RefusalBody(conn, body)
    carrier.transport = origin_t
    origin_t.set_protocol(carrier)
    origin_t.resume_reading()


class HandedOverRefusal:
    """An origin's refusal whose head the native head phase read
    (relay/native/front.py): the Python plane relays it, as relay_refusal
    does, from the sockets and bytes handed over. The server of the client's
    connection (a :class:`relay.seam.Server`) until the answer is through."""

    def __init__(self, conn: Connection, origin: socket.socket, data: bytes, resp: Response,
                 record: AccessRecord | None) -> None:
        self.conn = conn
        self.origin_t: asyncio.Transport | None = None
        self.gone = False
        body, _sound = _refusal_start(conn, data, resp, record)
        if body is None:
            origin.close()
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: _RefusalBody(conn, body), origin))
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.conn.reset()  # the rest of the body cannot be read: it must not look whole
            return
        self.origin_t = task.result()[0]
        if self.gone:
            self.origin_t.abort()

    # -- the client's side: what it sends now is dropped with the connection ----------------
    def data(self, data: bytes) -> None:
        pass

    def eof(self) -> bool:
        return True  # a half-close is not an abort: the rest of the answer still goes

    def lost(self) -> None:
        self.gone = True
        if self.origin_t is not None:
            self.origin_t.abort()

    def writable(self, ok: bool) -> None:
        pass
