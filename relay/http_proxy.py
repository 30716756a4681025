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

from relay.errors import FramingError, HeadError, OriginUnavailable
from relay.framing import BodyScanner
from relay.headers import forward_head, response_head
from relay.http_head import Response, body_framing, keeps_alive, parse_response_head
from relay.origin import MAX_RESPONSE_HEAD
from relay.tunnel import reset

if TYPE_CHECKING:
    from relay.client import ClientConnection
    from relay.logs import AccessRecord

#: idle origin connections kept per worker: more than a busy worker has
#: requests in flight (the benchmark's 50 clients), still bounded.
POOL_SIZE = 256
#: an idle pooled connection is closed after this many seconds (nginx's
#: upstream ``keepalive_timeout`` default).
POOL_IDLE_TIMEOUT = 60.0
#: a read timer this close to its deadline counts as expired (uvloop's
#: timers have millisecond resolution).
_TIMER_SLACK = 0.001
#: bytes of pipelined requests read ahead while a response is pending;
#: beyond it the client is not read until the response is complete.
PIPELINE_LIMIT = 64 * 1024


class OriginConn(asyncio.Protocol):
    """An origin connection for plain HTTP, reusable across exchanges.

    The read timeout lives here, not in the exchange: armed when an exchange
    starts on a connection that has none pending, it checks the exchange's
    last activity when it fires and re-arms for the remainder, so a request
    that is answered in time costs no timer at all when the previous one's is
    still pending (one ``call_later`` per connection per read timeout, not two
    per request)."""

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

    def check_timeout(self) -> None:
        self.timer = None
        ex = self.exchange
        if ex is None or ex.done:
            return  # idle or between exchanges: the next one arms it again
        loop = ex.loop
        remaining = ex.last + ex.ctx.settings.read_timeout - loop.time()
        if remaining > _TIMER_SLACK:
            self.timer = loop.call_later(remaining, self.check_timeout)
        else:
            ex.read_timeout()


class Pool:
    """A worker's idle origin connections, most recently used last.

    ``get`` takes the most recently used one (the warmest); the least recently
    used are at the front, where one timer per pool closes those idle for
    ``idle_timeout`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = POOL_SIZE,
                 idle_timeout: float = POOL_IDLE_TIMEOUT) -> None:
        self.loop = loop
        self.size = size
        self.idle_timeout = idle_timeout
        self.conns: list[OriginConn] = []
        self.timer: asyncio.TimerHandle | None = None

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
        """Keep ``origin`` for the next request; False if the pool is full."""
        if len(self.conns) >= self.size or origin.transport.is_closing():
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
        deadline = now - self.idle_timeout + _TIMER_SLACK
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

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conns, self.conns = self.conns, []
        for origin in conns:
            origin.pool = None
            origin.transport.close()


def pool_of(ctx) -> Pool:
    """The worker's pool, made on first use (``Context`` starts with a list)."""
    pool = ctx.http_pool
    if pool.__class__ is not Pool:
        pool = ctx.http_pool = Pool(asyncio.get_running_loop())
    return pool


class Exchange:
    """One plain HTTP request and its response.

    With a pooled origin connection at hand the request goes out at once,
    from the constructor: no Task per request. Only a new origin connection
    is awaited, in a Task.

    The client is read throughout, not only while its body streams: a reset
    while the origin still holds the request (a long poll the client gave
    up) closes the origin connection at once and is logged as
    ``client_abort`` with status 499 (nginx's code). A half-close is not an
    abort (HAProxy without ``option abortonclose``): the client still gets
    its answer. Bytes after the request are the next, pipelined request:
    kept (up to :data:`PIPELINE_LIMIT`, then reading pauses) and parsed only
    once this response is complete.
    """

    def __init__(self, conn: "ClientConnection", req) -> None:
        self.conn = conn
        self.ctx = ctx = conn.ctx
        self.req = req
        self.origin: OriginConn | None = None
        self.origin_paused = False
        #: the origin cannot take more request body: the client is not read
        self.upload_paused = False
        self.resp_buf = bytearray()
        self.resp_body: BodyScanner | None = None
        self.keep_client = False
        self.task: asyncio.Task | None = None
        self.done = False
        self.status = 0
        # With the access log off nobody reads the record: don't build one.
        self.record = ctx.record(conn.peer_ip, req.method, req.path) if ctx.access_log else None
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
        self.keep_client = keeps_alive(req)
        #: an HTTP/1.0 client: no chunked framing, no interim answers (RFC 9110 §15.2)
        self.http10 = req.version == b"1.0"
        # Bytes that followed the head in the same read.
        buf = conn.buf
        self.pending = bytes(buf[req.head_len:]) if len(buf) > req.head_len else b""
        buf.clear()
        pool = pool_of(ctx)
        self.loop = pool.loop
        self.last = 0.0
        origin = pool.get()
        if origin is not None:
            self._begin(origin)
        else:
            self.task = asyncio.ensure_future(self._connect())

    # -- connecting and sending the request ------------------------------------------
    async def _connect(self) -> None:
        ctx = self.ctx
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
        self._begin(origin)

    def _begin(self, origin: OriginConn) -> None:
        """Send the request head, with whatever body followed it, in one write."""
        origin.exchange = self
        self.origin = origin
        if self.record is not None:
            self.record.origin = origin.addr
        conn = self.conn
        out = forward_head(self.req, conn.peer_ip, self.ctx.proto, False)
        pending, self.pending = self.pending, b""
        body = self.req_body
        if pending:
            if body.done:
                conn.buf += pending  # a pipelined next request: it waits for this one
            else:
                try:
                    n = body.feed(pending)
                except FramingError as e:
                    return self._fail(e.status, e.outcome)
                self.up += n
                if n < len(pending):
                    out += pending[:n]
                    conn.buf += pending[n:]
                else:
                    out += pending
        origin.transport.write(out)
        self.last = self.loop.time()
        if origin.timer is None:
            origin.timer = self.loop.call_later(self.ctx.settings.read_timeout, origin.check_timeout)
        self._read_client()

    def _read_client(self) -> None:
        """Read the client unless the origin is behind on the body or the
        pipelined bytes waiting for this response reach their limit."""
        conn = self.conn
        if self.upload_paused and not self.req_body.done or len(conn.buf) > PIPELINE_LIMIT:
            conn.transport.pause_reading()
        else:
            conn.transport.resume_reading()

    def pause_upload(self, pause: bool) -> None:
        """The origin's socket is full (``pause``) or drained again."""
        self.upload_paused = pause
        self._read_client()

    def client_data(self, data: bytes) -> None:
        if self.origin is None:
            self.pending += data
            return
        body = self.req_body
        if body.done:
            self.conn.buf += data  # a pipelined next request: wait for this one
            if len(self.conn.buf) > PIPELINE_LIMIT:
                self.conn.transport.pause_reading()
            return
        try:
            n = body.feed(data)
        except FramingError as e:
            return self._fail(e.status, e.outcome)
        self.up += n
        self.origin.transport.write(data[:n] if n < len(data) else data)
        if n < len(data):
            self.conn.buf += data[n:]
            self._read_client()

    def client_eof(self) -> bool:
        # A client that half-closes after its request still wants the answer.
        if self.req_body.done:
            self.keep_client = False
            return True
        return False

    def client_lost(self) -> None:
        """The client's connection is gone before the response was complete:
        a client abort (nginx logs 499); the origin connection closes now."""
        if self.done:
            return
        self.done = True
        ctx = self.ctx
        started = self.resp_body is not None
        ctx.count_http(self.status if started else 499)
        rec = self.record
        if rec is not None:
            rec.status = self.status if started else 499
            rec.outcome = "client_abort"
            rec.duration_s = round(time.monotonic() - self.conn.started, 3)
            rec.bytes_up = self.up
            rec.bytes_down = self.down
            ctx.log(rec)
        if self.origin is not None:
            self.origin.exchange = None
            self.origin.transport.abort()
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    # -- the response ----------------------------------------------------------------
    def pause_origin(self, pause: bool) -> None:
        origin = self.origin
        if origin is not None and not origin.transport.is_closing():
            self.origin_paused = pause
            if pause:
                origin.transport.pause_reading()
            else:
                origin.transport.resume_reading()

    def origin_data(self, data: bytes) -> None:
        self.last = self.loop.time()
        if self.resp_body is None:
            try:
                self._parse_head(data)
            except (HeadError, FramingError) as e:
                self._fail(e.status, e.outcome)
            return
        out = self._body_part(data)
        if out:
            self.conn.transport.write(out)
        if self.resp_body.done:
            self._finish()

    def _parse_head(self, data: bytes) -> None:
        buf = self.resp_buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        while True:
            resp = parse_response_head(data, MAX_RESPONSE_HEAD)
            if resp is None:
                buf += data
                return
            raw, rest = data[: resp.head_len], data[resp.head_len:]
            if resp.status >= 200:
                break
            if resp.status == 101:
                # Upgrade is hop-by-hop and was not forwarded: nothing asked to switch.
                raise HeadError(502, "origin switched protocols on a plain HTTP request", "origin_error")
            # Interim answers (RFC 9110 §15.2) pass through as HAProxy passes
            # them, except to an HTTP/1.0 client, which must not get one.
            if not self.http10:
                self.conn.transport.write(raw)
            data = rest
        if self.req.method == b"HEAD" or resp.status in (204, 304):
            length: int | None = 0
        else:
            length = body_framing(resp, is_request=False)
        # A chunked body for an HTTP/1.0 client is de-chunked and delimited by
        # close (RFC 9112 §6.1 and §6.3 rule 8), as nginx does for 1.0 clients.
        dechunk = length == -1 and self.http10
        if length is None or dechunk:
            self.keep_client = False  # the body ends when the connection does
        if not self.req_body.done or self.ctx.draining:
            # An answer before the whole request body (401, 413 to an upload):
            # the rest of that body must never be read as a request, so the
            # connection ends after this response, announced in its head.
            self.keep_client = False
        self.status = resp.status
        self.origin_keep = length is not None and keeps_alive(resp)
        self.resp_body = body = BodyScanner(length, dechunk=dechunk, response=True)
        out = response_head(resp, raw, resp.tokens(b"connection"), self.keep_client, dechunk)
        if rest:  # the body's start, often all of it: one write with the head
            out += self._body_part(rest)
        self.conn.transport.write(out)
        if body.done:
            self._finish()

    def _body_part(self, data: bytes) -> bytes:
        """The part of ``data`` that the client gets of the response body."""
        body = self.resp_body
        try:
            n = body.feed(data)
        except FramingError:
            # Broken framing mid-body: the client must not take what it got
            # for the whole body (a de-chunked one ends at close): reset it.
            self._cut()
            return b""
        if n < len(data):
            # Bytes past the end of the body: the connection is out of step.
            self.origin_keep = False
            data = data[:n]
        self.down += n
        if body.spans is not None:
            return body.payload(data)
        return data

    def origin_eof(self) -> None:
        if self.resp_body is not None and self.resp_body.until_close:
            self.resp_body.finish()
            self.origin_keep = False
            self._finish()

    def origin_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        body = self.resp_body
        if body is None:
            self._fail(502, "origin_error")
        elif body.until_close and exc is None:
            body.finish()
            self.origin_keep = False
            self._finish()
        else:
            self._cut()

    def _cut(self) -> None:
        """The response broke off mid-body (a reset, a cut before its end,
        broken chunking): reset the client, so that no client can take a
        truncated body for a whole one, even one delimited by close."""
        if self.done:
            return
        self.done = True
        ctx = self.ctx
        ctx.count_http(self.status)  # its head went out
        rec = self.record
        if rec is not None:
            rec.status = self.status
            rec.outcome = "origin_error"
            rec.duration_s = round(time.monotonic() - self.conn.started, 3)
            rec.bytes_up = self.up
            rec.bytes_down = self.down
            ctx.log(rec)
        if self.origin is not None:
            self.origin.exchange = None
            self.origin.transport.abort()
        reset(self.conn.transport)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        ctx = self.ctx
        ctx.count_http(self.status)
        rec = self.record
        if rec is not None:
            rec.status = self.status
            rec.outcome = "proxied"
            rec.duration_s = round(time.monotonic() - self.conn.started, 3)
            rec.bytes_up = self.up
            rec.bytes_down = self.down
            ctx.log(rec)
        origin = self.origin
        origin.exchange = None
        if self.origin_paused:
            origin.transport.resume_reading()  # it was paused for a slow client
        if not (self.origin_keep and self.req_body.done and ctx.http_pool.put(origin)):
            origin.transport.close()
        self.conn.keepalive_done(self.keep_client)

    # -- failures and the read timeout -------------------------------------------------
    def _fail(self, status: int, outcome: str) -> None:
        if self.done:
            return
        if self.resp_body is not None:
            return self._cut()
        self.done = True
        if self.origin is not None:
            self.origin.exchange = None
            self.origin.transport.abort()
        self.conn._refuse(status, outcome, self.record, upgrade=False)

    def read_timeout(self) -> None:
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
            self.body.finish()
            self.transport.abort()
            reset(self.conn.transport)  # a truncated body must not look whole
            return
        if n:
            self.conn.transport.write(data[:n])
        if self.body.done:
            self.conn.linger()
            self.transport.close()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.body.done:
            return
        if self.body.until_close and exc is None:
            self.conn.linger()
        else:  # cut before the end of its body
            reset(self.conn.transport)


def relay_rejection(conn: "ClientConnection", origin_t: asyncio.Transport, oproto, resp: Response,
                    record: "AccessRecord") -> None:
    """The origin refused an upgrade: its answer goes to the client, then the
    connection closes. The head loses its hop-by-hop fields and says
    ``Connection: close`` (an origin's ``keep-alive`` would promise what the
    relay does not do); whatever the client sent after its upgrade request is
    dropped with the connection, never parsed."""
    conn.ctx.log(record)
    try:
        length = 0 if resp.status in (204, 304) else body_framing(resp, is_request=False)
    except HeadError:
        length = None
    body = BodyScanner(length, response=True)
    data = bytes(oproto.buf)
    raw, rest = data[: resp.head_len], data[resp.head_len:]
    head = response_head(resp, raw, resp.tokens(b"connection"), keep=False)
    try:
        n = body.feed(rest)
    except FramingError:
        origin_t.abort()
        reset(conn.transport)
        return
    conn.transport.write(head + rest[:n])
    if body.done:
        origin_t.close()
        conn.linger()
        return
    relay = _RejectionRelay(conn, body)
    relay.transport = origin_t
    origin_t.set_protocol(relay)
    origin_t.resume_reading()
