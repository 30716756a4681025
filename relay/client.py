"""The client side of a connection until it becomes a tunnel.

``ClientConnection`` reads the request head (bounded in size and time), then
dispatches: an upgrade goes through validation, routing, admission and the
origin handshake (:meth:`_upgrade`), and on a 101 both sockets are handed to
:class:`relay.tunnel.Tunnel`; plain HTTP goes to :mod:`relay.http_proxy` and
comes back here for the next request on a kept-alive connection. Refusals are
short canned answers followed by a lingering close, so the client can read
them even if it is still sending.
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay import http_proxy
from relay.context import Context
from relay.logs import AccessRecord
from relay.frames_tunnel import FramesTunnel
from relay.handshake import check_upgrade_response, is_upgrade, origin_allowed, path_allowed, validate_upgrade
from relay.headers import forward_head
from relay.errors import HeadError, OriginClosed, OriginUnavailable
from relay.http_head import HEAD_END, Request, parse_request_head
from relay.origin import OriginHead
from relay.responses import refusal
from relay.tunnel import Tunnel

log = logging.getLogger("wsrelay.worker")

LINGER_SECONDS = 2.0

# states
HEAD, BUSY, LINGER, DONE = range(4)


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.peer_ip = "-"
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.exchange: http_proxy.Exchange | None = None
        self.requests = 0

    # -- asyncio callbacks --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
        # No TCP_NODELAY here: uvloop sets it on every TCP transport already.
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.state == HEAD:
            if not self.buf:
                self.started = time.monotonic()
            self.buf += data
            # Parse again only when these bytes may end the head (or overflow
            # it): a head trickled in small reads must not cost a scan of the
            # whole buffer per read (quadratic with RELAY_MAX_HEADER_BYTES).
            if len(self.buf) > self.ctx.settings.max_header_bytes or HEAD_END in self.buf[-len(data) - 3:]:
                self._try_head()
        elif self.state == BUSY:
            if self.exchange is not None:
                self.exchange.client_data(data)
            else:
                self.buf += data  # early frames behind an upgrade request: reading is paused
        elif self.state == LINGER:
            if b"\r\n\r\n" in data or len(data) == 0:
                self._close()

    def eof_received(self) -> bool:
        if self.state == BUSY and self.exchange is not None:
            return self.exchange.client_eof()
        if self.state == LINGER:
            self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = DONE
        self.ctx.connections.discard(self)
        self._cancel_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.exchange is not None:
            self.exchange.client_lost()
        self.ctx.maybe_idle()

    def pause_writing(self) -> None:
        # The client reads slower than the origin answers a plain HTTP request.
        if self.exchange is not None:
            self.exchange.pause_origin(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_origin(False)

    # -- head phase ---------------------------------------------------------------
    def _await_head(self) -> None:
        self.state = HEAD
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(
            self.ctx.settings.handshake_timeout, self._head_timeout)
        if self.buf:
            self.started = time.monotonic()
            self._try_head()

    def _try_head(self) -> None:
        try:
            req = parse_request_head(self.buf, self.ctx.settings.max_header_bytes)
        except HeadError as e:
            self._refuse(e.status, e.outcome if e.status != 431 else "bad_request", None, upgrade=None)
            return
        if req is None:
            return
        self._cancel_timer()
        self.state = BUSY
        self.requests += 1
        self.transport.pause_reading()
        if is_upgrade(req):
            self.task = asyncio.ensure_future(self._upgrade(req))
            self.task.add_done_callback(self._upgrade_done)
        elif self.ctx.draining and self.requests > 1:
            self._refuse(503, "draining", self.ctx.record(self.peer_ip, req.method, req.path), upgrade=False)
        else:
            self.exchange = http_proxy.Exchange(self, req)

    def _head_timeout(self) -> None:
        self.timer = None
        if self.state != HEAD:
            return
        if self.buf:  # a started head that never finished: slowloris or a dead client
            self.ctx.count_http(408)
        self._close()

    def keepalive_done(self, keep: bool) -> None:
        """Called by the HTTP exchange when its response is complete."""
        self.exchange = None
        if not keep or self.ctx.draining:
            # Linger rather than close: a client answered before the end of
            # its body may still be sending it, and closing a socket with
            # unread bytes resets it, which can destroy the answer in flight.
            self.linger()
            return
        self.transport.resume_reading()
        self._await_head()

    # -- refusals and closing -----------------------------------------------------
    def _refuse(self, status: int, outcome: str, record: AccessRecord | None, upgrade: bool | None = True) -> None:
        if self.state in (LINGER, DONE):
            return
        ctx = self.ctx
        if upgrade:
            ctx.count_upgrade(outcome, status)
        else:
            ctx.count_http(status)
        if record is not None:
            record.status = status
            record.outcome = outcome
            record.duration_s = round(time.monotonic() - self.started, 3)
            ctx.log(record)
        self.transport.write(refusal(status))
        self.linger()

    def linger(self) -> None:
        """Half-close and discard what the client still sends, for a short while,
        so it reads our answer instead of a reset (nginx's lingering_close)."""
        self.state = LINGER
        self.buf.clear()
        self._cancel_timer()
        t = self.transport
        if t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()
        t.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def drain(self) -> None:
        """The worker is draining: idle keep-alive connections close now. A
        connection accepted but not yet spoken on is left its handshake timeout:
        its client connected before the drain and gets an answer."""
        if self.state == HEAD and not self.buf and self.requests:
            self._close()

    # -- the upgrade ----------------------------------------------------------------
    def _upgrade_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("upgrade failed unexpectedly", exc_info=task.exception())
        if self.state == BUSY:
            self._refuse(502, "origin_error", None)
        elif self.transport is not None:
            self.transport.abort()

    async def _upgrade(self, req: Request) -> None:
        ctx = self.ctx
        s = ctx.settings
        rec = ctx.record(self.peer_ip, req.method, req.path)
        try:
            key = validate_upgrade(req)
        except HeadError as e:
            return self._refuse(e.status, e.outcome, rec)
        if not path_allowed(req.path, ctx.ws_paths) or not origin_allowed(req.get(b"origin"), s.allowed_origins):
            return self._refuse(403, "forbidden", rec)
        if ctx.draining and self.requests > 1:
            # A kept-alive connection asking again after the drain began; the
            # first request of a connection accepted before it is still served,
            # so a reload refuses nothing.
            return self._refuse(503, "draining", rec)
        if not ctx.admission.take(self.peer_ip):
            return self._refuse(503, "limit", rec)
        origin_t: asyncio.Transport | None = None
        handed_over = False
        try:
            try:
                async with asyncio.timeout(s.connect_timeout):
                    # Bytes after the upgrade head (frames of a client that does
                    # not wait, or anything else) are held until the origin's
                    # 101: sent with the head, an origin that refuses the upgrade
                    # and keeps its connection would read them as the next
                    # request, one no forwarding rule was applied to. After a
                    # refusal they are dropped with the connection (relay_rejection).
                    early = bytes(self.buf[req.head_len:])
                    self.buf.clear()
                    head = forward_head(req, self.peer_ip, ctx.proto, True)
                    for tries_left in range(len(ctx.origins) - 1, -1, -1):  # each origin once
                        origin_t, oproto, addr = await ctx.origins.connect(OriginHead)
                        rec.origin = str(addr)
                        origin_t.write(head)
                        try:
                            resp = await oproto.head
                            break
                        except OriginClosed:
                            # Closed without a byte of answer: the next origin may serve.
                            origin_t.abort()
                            origin_t = None
                            if not tries_left:
                                raise
            except TimeoutError:
                return self._refuse(504, "timeout", rec)
            except OriginUnavailable:
                return self._refuse(502, "origin_error", rec)
            except HeadError as e:
                return self._refuse(e.status, e.outcome, rec)
            if resp.status != 101:
                rec.status = resp.status
                rec.outcome = "origin_rejected"
                ctx.count_upgrade("origin_rejected", resp.status)
                handed_over = True
                ctx.admission.give(self.peer_ip)
                http_proxy.relay_rejection(self, origin_t, oproto, resp, rec)
                return
            try:
                check_upgrade_response(resp, key)
            except HeadError as e:
                return self._refuse(e.status, e.outcome, rec)
            if self.state != BUSY:
                return
            handed_over = True
            handshake_s = time.monotonic() - self.started
            rec.status = 101
            rec.outcome = "upgraded"
            rec.handshake_ms = round(handshake_s * 1000, 3)
            ctx.count_upgrade("upgraded", 101, handshake_s)
            ctx.connections.discard(self)
            self.state = DONE
            if ctx.frames:
                tunnel = FramesTunnel(self.transport, origin_t, ctx.tunnel_ended, rec, ctx.counters,
                                      s.max_message_bytes)
                ctx.tunnel_opened(tunnel)
                head = resp.head_len  # the 101 goes as is; what follows it is frames
                tunnel.start(bytes(oproto.buf[head:]), early, head=bytes(oproto.buf[:head]))
            else:
                tunnel = Tunnel(self.transport, origin_t, ctx.tunnel_ended, rec)
                ctx.tunnel_opened(tunnel)
                tunnel.start(bytes(oproto.buf), early)
        finally:
            if not handed_over:
                ctx.admission.give(self.peer_ip)
                if origin_t is not None:
                    origin_t.abort()
