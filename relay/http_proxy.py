"""Plain HTTP pass-through: the long-polling fallback (SPEC §4).

One :class:`Exchange` per request. The request head goes to the origin
rebuilt by :func:`relay.handshake.forward_head`; bodies stream both ways as
received (Content-Length or still chunked), delimited by
:class:`relay.framing.BodyScanner`, never buffered whole: a side that cannot
keep up pauses reading on the other. ``RELAY_READ_TIMEOUT`` bounds each wait
for the origin (504 if no answer has started). Origin connections are kept in
a small per-worker pool for the next request.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from relay.framing import BodyScanner, FramingError
from relay.handshake import HOP_BY_HOP, NEVER_NAMED, forward_head
from relay.http_head import CRLF, HeadError, Response, body_framing, parse_response_head
from relay.origin import MAX_RESPONSE_HEAD, OriginUnavailable

if TYPE_CHECKING:
    from relay.client import ClientConnection
    from relay.context import AccessRecord

POOL_SIZE = 32


class OriginConn(asyncio.Protocol):
    """An origin connection for plain HTTP, reusable across exchanges."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.pool: list[OriginConn] | None = None
        self.addr = ""

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
        if self.pool is not None and self in self.pool:
            self.pool.remove(self)
        if self.exchange is not None:
            self.exchange.origin_lost()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None and not self.exchange.req_body.done:
            self.exchange.conn.transport.resume_reading()


def _response_head(resp: Response, raw: bytes, keep: bool) -> bytes:
    """The origin's head with hop-by-hop fields replaced by our own Connection."""
    # never drop the framing we relay the body by, whatever Connection names
    drop = (HOP_BY_HOP - {b"transfer-encoding"}) | (resp.tokens(b"connection") - NEVER_NAMED)
    lines = [raw[: raw.find(CRLF)]]
    lines.extend(line for name, line, _v in resp.fields if name not in drop)
    lines.append(b"Connection: keep-alive" if keep else b"Connection: close")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


class Exchange:
    """One plain HTTP request and its response."""

    def __init__(self, conn: "ClientConnection", req) -> None:
        self.conn = conn
        self.ctx = ctx = conn.ctx
        self.req = req
        self.origin: OriginConn | None = None
        self.resp_buf = bytearray()
        self.resp_body: BodyScanner | None = None
        self.keep_client = False
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.record = ctx.record(conn.peer_ip, req.method, req.path)
        self.up = 0
        self.down = 0
        try:
            length = body_framing(req, is_request=True)
        except HeadError as e:
            self.done = True
            conn._refuse(e.status, e.outcome, self.record, upgrade=False)
            return
        if ctx.draining:
            self.done = True
            conn._refuse(503, "draining", self.record, upgrade=False)
            return
        self.req_body = BodyScanner(length or 0)
        conn_tokens = req.tokens(b"connection")
        self.keep_client = (b"close" not in conn_tokens) if req.version == b"1.1" else (b"keep-alive" in conn_tokens)
        # Bytes that followed the head in the same read.
        self.pending = bytes(conn.buf[req.head_len:])
        conn.buf.clear()
        self.task = asyncio.ensure_future(self._start())

    # -- connecting and sending the request ------------------------------------------
    async def _start(self) -> None:
        ctx = self.ctx
        pool = ctx.http_pool
        origin = None
        while pool:
            candidate = pool.pop()
            if not candidate.transport.is_closing():
                origin = candidate
                break
        if origin is None:
            try:
                async with asyncio.timeout(ctx.settings.connect_timeout):
                    _t, origin, addr = await ctx.origins.connect(OriginConn)
                origin.addr = str(addr)
            except TimeoutError:
                return self._fail(504, "timeout")
            except OriginUnavailable:
                return self._fail(502, "origin_error")
            if self.done:  # the client went away meanwhile
                origin.transport.close()
                return
        origin.exchange = self
        origin.pool = None
        self.origin = origin
        self.record.origin = origin.addr
        head = forward_head(self.req, self.conn.peer_ip, ctx.proto, False)
        origin.transport.write(head)
        pending, self.pending = self.pending, b""
        self._arm_timer()
        if pending:
            self.client_data(pending)
        if not self.req_body.done:
            self.conn.transport.resume_reading()

    def client_data(self, data: bytes) -> None:
        if self.origin is None:
            self.pending += data
            return
        body = self.req_body
        if body.done:
            self.conn.buf += data  # a pipelined next request: wait for this one
            self.conn.transport.pause_reading()
            return
        try:
            n = body.feed(data)
        except FramingError:
            return self._fail(400, "bad_request")
        self.up += n
        self.origin.transport.write(data[:n] if n < len(data) else data)
        if body.done:
            if n < len(data):
                self.conn.buf += data[n:]
            self.conn.transport.pause_reading()

    def client_eof(self) -> bool:
        # A client that half-closes after its request still wants the answer.
        if self.req_body.done:
            self.keep_client = False
            return True
        return False

    def client_lost(self) -> None:
        if not self.done:
            self.done = True
            self._cancel_timer()
            if self.origin is not None:
                self.origin.exchange = None
                self.origin.transport.close()
            elif not self.task.done():
                self.task.cancel()

    # -- the response ----------------------------------------------------------------
    def pause_origin(self, pause: bool) -> None:
        origin = self.origin
        if origin is not None and not origin.transport.is_closing():
            if pause:
                origin.transport.pause_reading()
            else:
                origin.transport.resume_reading()

    def origin_data(self, data: bytes) -> None:
        self._arm_timer()
        if self.resp_body is None:
            self.resp_buf += data
            try:
                self._parse_head()
            except (HeadError, FramingError) as e:
                status = getattr(e, "status", 502)
                self._fail(status, "origin_error")
            return
        self._send_body(data)

    def _parse_head(self) -> None:
        while self.resp_body is None:
            resp = parse_response_head(self.resp_buf, MAX_RESPONSE_HEAD)
            if resp is None:
                return
            raw = bytes(self.resp_buf[: resp.head_len])
            rest = bytes(self.resp_buf[resp.head_len:])
            self.resp_buf.clear()
            if 100 <= resp.status < 200:
                if resp.status != 101:  # interim answers (100 Continue) pass through
                    self.conn.transport.write(raw)
                self.resp_buf += rest
                continue
            if self.req.method == b"HEAD" or resp.status in (204, 304):
                length: int | None = 0
            else:
                length = body_framing(resp, is_request=False)
            if length is None:
                self.keep_client = False  # the body ends when the origin closes
            self.status = resp.status
            self.origin_keep = length is not None and b"close" not in resp.tokens(b"connection")
            self.resp_body = BodyScanner(length)
            self.conn.transport.write(_response_head(resp, raw, self.keep_client))
            if rest:
                self._send_body(rest)
            elif self.resp_body.done:
                self._finish()

    def _send_body(self, data: bytes) -> None:
        body = self.resp_body
        try:
            n = body.feed(data)
        except FramingError:
            self.keep_client = False
            self.origin_keep = False
            n = 0
            body.state = 4
        if n:
            self.down += n
            self.conn.transport.write(data[:n] if n < len(data) else data)
        if body.done:
            self._finish()

    def origin_eof(self) -> None:
        if self.resp_body is not None and self.resp_body.until_close:
            self.resp_body.state = 4
            self.origin_keep = False
            self._finish()

    def origin_lost(self) -> None:
        if self.done:
            return
        if self.resp_body is None:
            self._fail(502, "origin_error")
        elif self.resp_body.until_close:
            self.origin_keep = False
            self._finish()
        else:  # cut mid-body: the client must not take a truncated body as whole
            self.done = True
            self._cancel_timer()
            self.conn.transport.abort()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        ctx = self.ctx
        ctx.count_http(self.status)
        rec = self.record
        rec.status = self.status
        rec.outcome = "proxied"
        rec.duration_s = round(time.monotonic() - self.conn.started, 3)
        rec.bytes_up = self.up
        rec.bytes_down = self.down
        ctx.log(rec)
        origin = self.origin
        origin.exchange = None
        if self.origin_keep and self.req_body.done and len(ctx.http_pool) < POOL_SIZE \
                and not origin.transport.is_closing():
            origin.pool = ctx.http_pool
            origin.transport.resume_reading()  # it may have been paused for a slow client
            ctx.http_pool.append(origin)
        else:
            origin.transport.close()
        self.conn.keepalive_done(self.keep_client)

    # -- failures and the read timeout -------------------------------------------------
    def _fail(self, status: int, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.origin is not None:
            self.origin.exchange = None
            self.origin.transport.abort()
        if self.resp_body is None:
            self.conn._refuse(status, outcome, self.record, upgrade=False)
        else:
            self.conn.transport.abort()

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(self.ctx.settings.read_timeout, self._timeout)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self) -> None:
        self.timer = None
        self._fail(504, "timeout")


class _RejectionRelay(asyncio.Protocol):
    """Carries the rest of an origin's non-101 answer to an upgrade, then closes."""

    def __init__(self, conn: "ClientConnection", body: BodyScanner):
        self.conn = conn
        self.body = body

    def data_received(self, data: bytes) -> None:
        try:
            n = self.body.feed(data)
        except FramingError:
            n, self.body.state = 0, 4
        if n:
            self.conn.transport.write(data[:n])
        if self.body.done:
            self.conn.linger()
            self.transport.close()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.conn.state != 3:
            self.conn.linger()


def relay_rejection(conn: "ClientConnection", origin_t: asyncio.Transport, oproto, resp: Response,
                    record: "AccessRecord") -> None:
    """The origin refused an upgrade: its answer goes to the client verbatim."""
    conn.ctx.log(record)
    try:
        length = 0 if resp.status in (204, 304) else body_framing(resp, is_request=False)
    except HeadError:
        length = None
    body = BodyScanner(length)
    data = bytes(oproto.buf)
    head, rest = data[: resp.head_len], data[resp.head_len:]
    n = body.feed(rest)
    conn.transport.write(head + rest[:n])
    if body.done:
        origin_t.close()
        conn.linger()
        return
    relay = _RejectionRelay(conn, body)
    relay.transport = origin_t
    origin_t.set_protocol(relay)
    origin_t.resume_reading()
