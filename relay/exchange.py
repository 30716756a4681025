"""Plain HTTP pass-through, the long-polling fallback (README, "Long polling,
the fallback"): one :class:`Exchange` per request.

The request head goes to the origin rebuilt by
:func:`relay.headers.forward_head`; bodies stream both ways as received
(Content-Length or still chunked; de-chunked only for an HTTP/1.0 client),
delimited by :class:`relay.http_body.BodyScanner`, never buffered whole: a side
that cannot keep up pauses reading on the other. The pool's
``RELAY_READ_TIMEOUT`` bounds each wait for the origin (504 if no answer has
started). The origin is chosen once, by the pool's balancer
(relay/origins/dial.py); its idle connections are reused, and the
connection goes back to them (relay/origins/pool.py). Failures count against
that origin, answers for it (relay/origins/outlier.py).

The client is read throughout, not only while its body streams: a reset
while the origin still holds the request (a long poll the client gave up)
closes the origin connection at once and is logged as ``client_abort`` with
status 499 (nginx's code). A half-close is not an abort (HAProxy without
``option abortonclose``): the client still gets its answer. Bytes after the
request are the next, pipelined request: kept by the connection (up to
:data:`PIPELINE_LIMIT`, then reading pauses) and parsed only once this
response is complete.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from relay.errors import FramingError, HeadError, OriginUnavailable, Refused
from relay.http_body import BodyScanner
from relay.headers import forward_head, response_head
from relay.http_head import Request, body_framing, keeps_alive, parse_response_head
from relay.logs import AccessRecord
from relay.origins.answer import MAX_RESPONSE_HEAD
from relay.origins.dial import Dial
from relay.origins.pool import OriginConn
from relay.seam import Connection
from relay.upgrade import GATEWAY_ERRORS

if TYPE_CHECKING:
    from relay.origins.balance import OriginPool

#: bytes of pipelined requests read ahead while a response is pending;
#: beyond it the client is not read until the response is complete.
PIPELINE_LIMIT = 64 * 1024
#: RFC 9110 §9.2.2: requests that may be sent again
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Exchange:
    """One plain HTTP request and its response (a :class:`relay.seam.Server`).

    With a pooled origin connection at hand the request goes out at once,
    from the constructor: no Task per request. Only a new origin connection
    is awaited, in a Task."""

    def __init__(self, conn: Connection, req: Request, length: int, record: AccessRecord | None,
                 rest: bytes, request_id: bytes, pool: "OriginPool") -> None:
        self.conn = conn
        self.ctx = conn.ctx
        self.req = req
        self.pool = pool
        #: the origin chosen (holding its connection count), and those tried before
        self.dial = dial = Dial(pool, req)
        self.record = record
        self.request_id = request_id
        self.origin: OriginConn | None = None
        self.origin_paused = False
        #: the origin cannot take more request body: the client is not read
        self.upload_paused = False
        #: pipelined bytes the connection keeps for after this exchange
        self.unread = 0
        self.resp_buf = bytearray()
        self.resp_body: BodyScanner | None = None
        self.origin_keep = False
        self.task: asyncio.Task | None = None
        self.done = False
        self.status = 0
        #: the origin connection came from the pool (it may have closed meanwhile)
        self.reused = False
        #: what the first write to the origin held (head and body at hand),
        #: while it may be sent again: until the origin answers a byte
        self.sent: bytes | None = None
        self.up = 0
        self.down = 0
        self.last = 0.0
        self.req_body = BodyScanner(length)
        self.keep_client = keeps_alive(req)
        #: an HTTP/1.0 client: no chunked framing, no interim answers (RFC 9110 §15.2)
        self.http10 = req.version == b"1.0"
        #: bytes that followed the head in the same read
        self.pending = rest
        self.read_timeout_s = pool.read_timeout
        self.loop = asyncio.get_running_loop()
        member = dial.choose()  # raises Refused (503) at RELAY_MAX_CONNS: the connection refuses
        if self.ctx.origin_proxy_v2:
            # An origin connection told one client's address serves that client
            # only (HAProxy reuses one only for the same PROXY block), and only
            # when it goes to the origin this request was balanced to.
            origin, conn.parked_origin = conn.parked_origin, None
            if origin is not None and (origin.transport.is_closing() or origin.addr != member.name):
                origin.transport.close()
                origin = None
        else:
            origin = member.idle.get()
        if origin is not None:
            self.reused = True
            self._begin(origin)
        else:
            self.task = asyncio.ensure_future(self._connect())

    # -- connecting and sending the request ------------------------------------------
    async def _connect(self) -> None:
        pool, dial = self.pool, self.dial
        try:
            async with asyncio.timeout(pool.connect_timeout):
                _t, origin = await dial.connect(
                    OriginConn, self.conn.origin_header() if self.ctx.origin_proxy_v2 else b"")
            origin.addr = dial.member.name
        except TimeoutError:
            if dial.member is not None:
                pool.failed(dial.member, "timeout", f"no connection within "
                            f"RELAY_CONNECT_TIMEOUT={pool.connect_timeout:g}s", 504)
            return self._fail(504, "timeout")
        except (OriginUnavailable, Refused) as e:
            return self._fail(e.status, e.outcome)
        if self.done:  # the client went away meanwhile
            origin.transport.close()
            return
        if self.sent is not None:  # sending again what a stale pooled connection lost
            self.origin = origin
            sent, self.sent = self.sent, None
            self.last = self.loop.time()
            origin.serve(self, sent, self.read_timeout_s)
            return
        self._begin(origin)

    def _begin(self, origin: OriginConn) -> None:
        """Send the request head, with whatever body followed it, in one write."""
        self.origin = origin
        conn = self.conn
        out = forward_head(self.req, conn.client_ip, conn.proto, False, self.request_id, origin.addr.encode(),
                           conn.trusted, own=conn.own_header)
        pending, self.pending = self.pending, b""
        body = self.req_body
        if pending:
            if body.done:
                self.unread = conn.unread(pending)  # a pipelined next request: it waits for this one
            else:
                try:
                    n = body.feed(pending)
                except FramingError as e:
                    return self._fail(e.status, e.outcome)
                self.up += n
                if n < len(pending):
                    out += pending[:n]
                    self.unread = conn.unread(pending[n:])
                else:
                    out += pending
        self.last = self.loop.time()
        if self.reused and self.req.method in IDEMPOTENT:
            self.sent = out
        origin.serve(self, out, self.read_timeout_s)
        self._read_client()

    def _read_client(self) -> None:
        """Read the client unless the origin is behind on the body or the
        pipelined bytes waiting for this response reach their limit."""
        self.conn.reading(not (self.upload_paused and not self.req_body.done or self.unread > PIPELINE_LIMIT))

    # -- the client's side (relay.client.Server) -------------------------------------------
    def data(self, data: bytes) -> None:
        if self.origin is None:
            self.pending += data
            return
        body = self.req_body
        if body.done:
            self.unread = self.conn.unread(data)  # a pipelined next request: wait for this one
            if self.unread > PIPELINE_LIMIT:
                self.conn.reading(False)
            return
        try:
            n = body.feed(data)
        except FramingError as e:
            return self._fail(e.status, e.outcome)
        self.up += n
        self.sent = None  # more than the first write went: it cannot be sent again
        self.origin.transport.write(data[:n] if n < len(data) else data)
        if n < len(data):
            self.unread = self.conn.unread(data[n:])
            self._read_client()

    def eof(self) -> bool:
        # A client that half-closes after its request still wants the answer.
        if self.req_body.done:
            self.keep_client = False
            return True
        return False

    def lost(self) -> None:
        """The client's connection is gone before the response was complete:
        a client abort (nginx logs 499); the origin connection closes now."""
        if self.done:
            return
        self.done = True
        started = self.resp_body is not None
        self._account(self.status if started else 499, "client_abort")
        if self.origin is not None:
            self.origin.release()
            self.origin.transport.abort()
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    def writable(self, ok: bool) -> None:
        """The client reads slower than the origin answers: pause the origin."""
        origin = self.origin
        if origin is not None and not origin.transport.is_closing():
            self.origin_paused = not ok
            if ok:
                origin.transport.resume_reading()
            else:
                origin.transport.pause_reading()

    # -- the origin's side (relay.origins.pool.Exchange) -------------------------------------
    def pause_upload(self, pause: bool) -> None:
        """The origin's socket is full (``pause``) or drained again."""
        self.upload_paused = pause
        self._read_client()

    def read_deadline(self) -> float | None:
        return None if self.done else self.last + self.read_timeout_s

    def read_timeout(self) -> None:
        self._failed("timeout", f"no answer within RELAY_READ_TIMEOUT={self.read_timeout_s:g}s", 504)
        self._fail(504, "timeout")

    def _failed(self, reason: str, detail: str, answer: int = 502) -> None:
        """Count a failure against the origin of this request."""
        if self.dial.member is not None:
            self.pool.failed(self.dial.member, reason, detail, answer)

    def origin_data(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.sent = None
        if self.resp_body is None:
            try:
                self._parse_head(data)
            except (HeadError, FramingError) as e:
                self._failed("invalid", str(e))
                self._fail(e.status, e.outcome)
            return
        out = self._body_part(data)
        if out:
            self.conn.send(out)
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
                self.conn.send(raw)
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
        if resp.status in GATEWAY_ERRORS:
            self._failed("status_5xx", f"{resp.status} to {self.req.method.decode('latin-1')}", resp.status)
        elif self.dial.member is not None:
            self.pool.answered(self.dial.member)
        self.origin_keep = length is not None and keeps_alive(resp)
        self.resp_body = body = BodyScanner(length, dechunk=dechunk, response=True)
        out = response_head(resp, raw, resp.tokens(b"connection"), self.keep_client, dechunk)
        if rest:  # the body's start, often all of it: one write with the head
            out += self._body_part(rest)
        self.conn.send(out)
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
            if self.sent is not None:
                return self._resend()
            self._failed("closed", "before answering a request")
            self._fail(502, "origin_error")
        elif body.until_close and exc is None:
            body.finish()
            self.origin_keep = False
            self._finish()
        else:
            self._failed("cut", "in the middle of a response body")
            self._cut()

    def _resend(self) -> None:
        """A pooled connection the origin closed before answering (its idle
        timeout raced our reuse): send the same idempotent request once more,
        on a new connection, as nginx does for a cached upstream connection."""
        self.origin.release()
        self.origin = None
        self.reused = False
        self.task = asyncio.ensure_future(self._connect())

    # -- endings ------------------------------------------------------------------------
    def _note(self) -> None:
        """The request is over: give the origin's count back; the access log
        names the pool, the last origin tried and how many were."""
        dial = self.dial
        dial.release()
        rec = self.record
        if rec is not None:
            rec.pool = self.pool.name
            rec.origin = dial.last
            rec.tries = dial.tries

    def _account(self, status: int, outcome: str) -> None:
        """Count the request and write its access log line."""
        ctx = self.ctx
        ctx.counters.http(status)
        self._note()
        rec = self.record
        if rec is not None:
            rec.status = status
            rec.outcome = outcome
            rec.duration_s = round(time.monotonic() - self.conn.started, 3)
            rec.bytes_up = self.up
            rec.bytes_down = self.down
            ctx.access.write(rec)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._account(self.status, "proxied")
        origin = self.origin
        origin.release()
        if self.origin_paused:
            origin.transport.resume_reading()  # it was paused for a slow client
        if not (self.origin_keep and self.req_body.done and self._keep(origin)):
            origin.transport.close()
        self.conn.finished(self.keep_client)

    def _keep(self, origin: OriginConn) -> bool:
        """Keep an idle origin connection for a next request: in the worker's
        pool, or, when it carries this client's PROXY header, for this client's
        next request only (closed with the client's connection)."""
        if not self.ctx.origin_proxy_v2:
            return self.dial.tried[-1].idle.put(origin)
        if not self.keep_client or self.ctx.draining or origin.transport.is_closing():
            return False
        self.conn.parked_origin = origin
        return True

    def _cut(self) -> None:
        """The response broke off mid-body (a reset, a cut before its end,
        broken chunking): reset the client, so that no client can take a
        truncated body for a whole one, even one delimited by close."""
        if self.done:
            return
        self.done = True
        self._account(self.status, "origin_error")  # its head went out
        if self.origin is not None:
            self.origin.release()
            self.origin.transport.abort()
        self.conn.reset()

    def _fail(self, status: int, outcome: str) -> None:
        if self.done:
            return
        if self.resp_body is not None:
            return self._cut()
        self.done = True
        if self.origin is not None:
            self.origin.release()
            self.origin.transport.abort()
        self._note()
        self.conn.refuse(status, outcome, self.record)
