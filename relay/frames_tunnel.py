"""The frame-aware pump of ``RELAY_MODE=frames`` (README, "Frames mode"): the zero-copy
tunnel of :mod:`relay.tunnel`, with a :class:`~relay.frames.FrameTracker` on
each direction so the relay knows where the frame boundaries are and can speak
WebSocket at them.

What it does with that knowledge:

- **Clean closes** (RFC 6455 §7.1.1, §7.1.7). The origin's connection drops
  (EOF or reset) without a Close having passed → the client gets Close 1014
  (Bad Gateway) at the boundary of the origin→client stream; the client drops
  → the origin gets Close 1001, masked with a fresh key as a client's frame
  must be. If the stream towards the survivor stopped inside a frame, it is
  corrupt anyway: the survivor's connection is closed (or reset) as in tunnel
  mode. Once a Close has gone one way, the relay waits for the answering
  Close, then closes the TCP connection whose closing handshake is complete;
  the wait is bounded by :data:`CLOSE_TIMEOUT`, then both sockets are aborted.
- **Drain** (:meth:`FramesTunnel.shutdown`, driven by workers/worker.py): Close
  1001 (shutdown, ``SIGTERM``) or 1012 (reload) to the client and 1001 to the
  origin, each at the next boundary of the stream it goes into; the worker
  spreads these over the drain window (:func:`spread_closes`).
- **Keepalive** (:meth:`FramesTunnel.keepalive`, from the worker's 1 s sweep in
  relay/context.py, never from the data path): a side silent for
  ``RELAY_PING_INTERVAL`` is pinged with a payload of the relay's; no byte
  from it within ``RELAY_PING_TIMEOUT`` → the tunnel is dropped, the other
  side gets 1001 and ``PING_TIMEOUTS`` counts it. Any byte counts as a sign of
  life, not only the Pong (silence is what is measured, from byte counts the
  pump keeps anyway). The Pong answering the relay's Ping is cut out of the
  stream; the peers' own Pings and Pongs pass through.
- **Limits and errors**: a message over ``RELAY_MAX_MESSAGE_BYTES`` (1009) or a
  frame breaking RFC 6455 (1002: reserved opcode, RSV2/3, a control frame
  fragmented or over 125 bytes, an unmasked client frame or a masked origin
  frame) → that Close to the offender, 1001 to the other side; the offending
  frame is never passed on. With permessage-deflate agreed, a compressed
  message counts inflated (relay/frames.py, relay/deflate.py); when it goes
  over the limit (or turns out invalid, 1002) only after part of a frame
  spanning reads was passed on, the rest is held back, the offender gets its
  Close and the other side's connection is closed (``ProtocolError.cut``: no
  Close can follow half a frame). A side quiet for a sweep gives its
  inflater's zlib state back (:meth:`FramesTunnel.keepalive`).
- **Metrics**: messages per direction are the trackers' counts, published by
  the sweep and at tunnel end (no metric call per chunk). Close frames are
  counted as they are written (rare): ``side`` is the side whose stream the
  Close travelled in, i.e. what the other endpoint saw — a client's Close, or
  the relay's 1001 to the origin on a client's behalf, is ``side="client"``;
  the origin's, or the relay's 1014/1001/1012 to the client, ``side="origin"``.
  Answers to the relay's own Closes end at the relay and are not counted.

The data path stays that of tunnel mode: :meth:`FramesSide.buffer_updated`
feeds the chunk to the tracker, which reads only frame headers; in the common
case it returns ``None`` and the slice of the shared read buffer is written as
is. With a plan (a control frame or a header split across reads), the pieces
are written in order — memoryview slices of the same buffer, so the ownership
rule of relay.tunnel (``pause_writing`` renews the buffer) holds for them too.
One attribute test per chunk (``slow``) routes the rare states — a frame
waiting for a boundary, a stream past its Close — to :meth:`FramesSide._slow`.

Why frame-aware and not frame-terminating: a relay that ends the WebSocket on
each side (parse, unmask, re-frame, re-mask) copies and XORs every payload
twice, must inflate/deflate or refuse permessage-deflate (the extension's
context spans messages, so it cannot be passed through a terminating relay
without being negotiated there), and loses the zero-copy pump. Reading only
the 2-14 header bytes of each frame costs a few integer operations per frame
and keeps payloads, masks and extensions end to end between client and origin.

Why not picows (already a dependency, used by the benchmark): its server
side cannot adopt a connection whose handshake we parsed — ``WSProtocol``
starts every server connection in the handshake state and reads the upgrade
request itself (``ws_create_server`` only builds listening servers through
``loop.create_server``; ``ws_connect`` refuses a ``sock`` argument), and its
request validation requires ``Connection`` to be exactly ``upgrade``
(``_validate_upgrade_request`` in picows 2.3.1), rejecting the legal
``Connection: keep-alive, Upgrade`` that Firefox sends. And it terminates the
protocol, with the costs above.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time

from relay.deflate import PerMessageDeflate
from relay.handshake import negotiated_deflate
from relay.frames import OP_CLOSE, OP_PONG, Control, FrameTracker, ProtocolError, close_frame, ping_frame
from relay.tunnel import BUFFER, Side, Tunnel, reset

#: Seconds a tunnel may spend closing (a Close sent, its answer awaited)
#: before both sockets are aborted. Checked by the 1 s sweep.
CLOSE_TIMEOUT = 5.0

#: Share of RELAY_DRAIN_TIMEOUT over which a draining worker spreads its
#: closes; the rest of the window is left for the answers.
DRAIN_SPREAD = 0.8

GOING_AWAY = 1001
SERVICE_RESTART = 1012
BAD_GATEWAY = 1014

CLIENT, ORIGIN = 0, 1


class Close(enum.Enum):
    """Where the closing handshake stands in one side's stream (RFC 6455 §7.1.1)."""

    OPEN = "no Close in this stream"
    QUEUED = "a Close of the relay's waits for this stream's next boundary"
    SENT = "a Close (the peer's or the relay's) is in this stream: nothing follows it"


OPEN, QUEUED, SENT = Close


class FramesSide(Side):
    """One socket of a frames-mode tunnel; its tracker follows the stream it sends.

    The *stream of a side* is what that side sends, written to the peer.
    Frames of the relay towards this side are injected into the peer's stream.
    """

    __slots__ = ("index", "tracker", "slow", "pending", "drop", "close", "failed",
                 "gone_code", "ping_payload", "ping_due", "seen", "quiet_since")

    def setup(self, index: int, max_message_bytes: int, now: float, deflate=None) -> None:
        self.index = index
        self.tracker = FrameTracker(index == CLIENT, max_message_bytes, deflate)
        #: the rare path is needed: something pending, or the stream is dropped
        self.slow = False
        #: frames waiting for this stream's next boundary: (frame, close code or None)
        self.pending: list | None = None
        #: bytes from this side are no longer forwarded (past a Close in its
        #: stream, or the peer is gone); Close frames in them are still noted
        self.drop = False
        #: the closing handshake in this side's stream: OPEN -> QUEUED -> SENT
        self.close = OPEN
        #: this side broke the protocol; its tracker is dead
        self.failed = False
        #: what the other side is told when this one vanishes without a Close
        self.gone_code = GOING_AWAY if index == CLIENT else BAD_GATEWAY
        #: the payload of the relay's last Ping to this side (None: never pinged)
        self.ping_payload: bytes | None = None
        self.ping_due = 0.0
        self.seen = 0
        self.quiet_since = now

    # -- the data path ------------------------------------------------------------
    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes
        if self.slow:
            self._slow(BUFFER.view, nbytes)
            return
        view = BUFFER.view
        try:
            plan = self.tracker.feed(view, 0, nbytes)
        except ProtocolError as e:
            self.tunnel.protocol_error(self, e)
            return
        if plan is None:
            self.peer.transport.write(view[:nbytes])
        else:
            self._forward(plan)

    def _forward(self, plan: list) -> None:
        write = self.peer.transport.write
        for item in plan:
            if item.__class__ is Control:
                op = item.opcode
                if op == OP_PONG and item.payload == self.ping_payload:
                    self.ping_due = 0.0  # the answer to the relay's Ping: not the peer's business
                    continue
                write(item.raw)
                if op == OP_CLOSE:
                    self.tunnel.close_passed(self, item.code)
                    return  # nothing follows a Close (§5.5.1)
            else:
                write(item)

    # -- the rare path --------------------------------------------------------------
    def _slow(self, view, nbytes: int) -> None:
        start = 0
        if self.pending is not None:
            left = self.tracker.to_boundary
            if left <= nbytes:
                if left:
                    self.tracker.feed(view, 0, left)  # the rest of a payload: no plan
                    if not self.drop:
                        self.peer.transport.write(view[:left])
                    start = left
                self.flush()
        if start < nbytes:
            self._pass(view, start, nbytes)

    def _pass(self, view, start: int, end: int) -> None:
        try:
            plan = self.tracker.feed(view, start, end)
        except ProtocolError as e:
            if not self.failed:
                self.tunnel.protocol_error(self, e)
            return
        if not self.drop:
            if plan is None:
                self.peer.transport.write(view[start:end])
            else:
                self._forward(plan)
        elif plan:
            for item in plan:
                if item.__class__ is Control and item.opcode == OP_CLOSE:
                    self.tunnel.settle()  # an answer to a Close of ours: not forwarded
                    return

    def inject(self, frame: bytes, code: int | None = None) -> None:
        """Put one of the relay's frames into this side's stream at its next
        boundary; ``code``: it is a Close with that code."""
        if self.pending is None:
            self.pending = []
        self.pending.append((frame, code))
        self.slow = True
        if self.tracker.at_boundary:
            self.flush()

    def flush(self) -> None:
        """Write the pending frames: the stream is at a boundary."""
        pending, self.pending = self.pending, None
        self.slow = self.drop
        if self.peer.lost or not pending:
            return
        for frame, code in pending:
            if self.close is SENT:
                break
            self.peer.transport.write(frame)
            if code is not None:
                self.tunnel.close_written(self, code)

    # -- endings ------------------------------------------------------------------
    def eof_received(self) -> bool:
        if self.tracker.close_code is not None or self.failed:
            return super().eof_received()  # after its Close: a half-close as in tunnel mode
        self.eof = True
        return False  # vanished without a Close: connection_lost handles it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.lost(self, exc)


class FramesTunnel(Tunnel):
    """A tunnel whose two directions are tracked frame by frame."""

    __slots__ = ("counters", "deadline")

    side_class = FramesSide
    counts_messages = True

    @classmethod
    def check_response(cls, response, settings) -> None:
        """With a message limit, a 101 agreeing extensions the limit cannot
        measure through is a 502 (relay.handshake.negotiated_deflate)."""
        if settings.max_message_bytes:
            negotiated_deflate(response)

    @classmethod
    def open(cls, ctx, client_transport: asyncio.Transport, origin_transport: asyncio.Transport,
             record, response) -> "FramesTunnel":
        limit = ctx.settings.max_message_bytes
        # what the limit inflates by (README "Frames mode"); check_response passed it
        deflate = negotiated_deflate(response) if limit else None
        return cls(client_transport, origin_transport, ctx.tunnel_ended, record, ctx.counters, limit, deflate)

    @classmethod
    def sweep(cls, tunnels, now: float, settings) -> None:
        """Pings for silent peers, aborts for overdue closes."""
        for t in list(tunnels):
            t.keepalive(now, settings.ping_interval, settings.ping_timeout)

    @classmethod
    def drain(cls, tunnels: set, code: int, timeout: float,
              loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle:
        """Close ``tunnels`` with ``code`` spread over the first :data:`DRAIN_SPREAD`
        of ``timeout`` (:func:`spread_closes`); tunnels opened since (upgrades
        accepted before the drain) get theirs at the end of that window."""
        window = DRAIN_SPREAD * timeout
        spread_closes(tunnels, code, window, loop)
        return loop.call_later(window, lambda: [t.shutdown(code) for t in list(tunnels)])

    def __init__(self, client_transport: asyncio.Transport, origin_transport: asyncio.Transport,
                 on_end, record, counters, max_message_bytes: int = 0,
                 deflate: PerMessageDeflate | None = None) -> None:
        """``deflate``: the permessage-deflate the origin's 101 agreed
        (relay.handshake.negotiated_deflate), so the limit counts compressed
        messages inflated; None when none was, or with no limit."""
        super().__init__(client_transport, origin_transport, on_end, record)
        #: this worker's counters (metrics/counters.py); written on closes only
        self.counters = counters
        #: when closing must be over (monotonic), 0.0 while open
        self.deadline = 0.0
        self.client.setup(CLIENT, max_message_bytes, self.started, deflate)
        self.origin.setup(ORIGIN, max_message_bytes, self.started, deflate)

    def start(self, head: bytes, to_client: bytes, to_origin: bytes) -> None:
        """As Tunnel.start, but the frames that came after either head go
        through the trackers (the 101 itself goes to the client untracked)."""
        self.client.transport.write(head)
        for side, data in ((self.origin, to_client), (self.client, to_origin)):
            if data:
                side.nbytes += len(data)
                side._slow(memoryview(data), len(data))
        for side in (self.client, self.origin):
            if not side.transport.is_closing():
                side.transport.resume_reading()

    @property
    def messages_up(self) -> int:
        return self.client.tracker.messages

    @property
    def messages_down(self) -> int:
        return self.origin.tracker.messages

    # -- closes ------------------------------------------------------------------
    def close_toward(self, side: FramesSide, code: int) -> None:
        """Send ``side`` a Close with ``code``, at the next boundary of the peer's stream."""
        src = side.peer
        if side.lost or src.close is not OPEN:
            return
        src.close = QUEUED
        self._arm()
        src.inject(close_frame(code, mask=side.index == ORIGIN), code)

    def close_passed(self, src: FramesSide, code: int) -> None:
        """A peer's own Close went through ``src``'s stream."""
        self._arm()
        self.close_written(src, code)

    def close_written(self, src: FramesSide, code: int) -> None:
        """A Close (the peer's or ours) is now in ``src``'s stream: stop forwarding it."""
        src.close = SENT
        src.drop = src.slow = True
        self.counters.close(src.index, code)
        self.settle()

    def settle(self) -> None:
        """Close each connection whose closing handshake is complete: it got a
        Close and sent one (RFC 6455 §7.1.1; the relay closes as a server
        would towards the client, and does not keep the origin waiting either)."""
        for side in (self.client, self.origin):
            if side.lost or side.transport.is_closing():
                continue
            if side.peer.close is SENT and (side.tracker.close_code is not None or side.failed):
                side.transport.close()

    def _arm(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + CLOSE_TIMEOUT

    def shutdown(self, code: int) -> None:
        """Drain: ``code`` (1001 or 1012) to the client, 1001 to the origin,
        each at its stream's next boundary; the answers end the tunnel."""
        if self.ended:
            return
        self.close_toward(self.client, code)
        self.close_toward(self.origin, GOING_AWAY)

    def close(self) -> None:
        """Close now: 1001 both ways where a stream is at a boundary, then the sockets."""
        for side in (self.client, self.origin):
            src = side.peer
            if src.close is OPEN and not side.lost and src.tracker.at_boundary and src.pending is None:
                self.close_toward(side, GOING_AWAY)
        super().close()

    def protocol_error(self, src: FramesSide, e: ProtocolError) -> None:
        """``src`` broke the protocol or the message limit: e.code to it, 1001 to
        the other side — or, when src's stream was cut inside the bad frame
        (a compressed message found too big after part of it passed), the
        other side's connection is closed: no frame can follow half a frame."""
        if e.plan and not src.drop:
            src._forward(e.plan)
        src.failed = True
        self.close_toward(src, e.code)
        if e.cut:
            if src.close is OPEN:
                src.close = QUEUED
            src.pending = None
            if not src.peer.lost:
                src.peer.transport.close()  # flushes what went before, then FIN
        else:
            self.close_toward(src.peer, GOING_AWAY)  # src's stream: at a boundary, the bad frame held
        src.drop = src.slow = True
        self.settle()

    def lost(self, side: FramesSide, exc: Exception | None) -> None:
        """``side``'s connection is gone: tell the other side at a boundary, or end it."""
        peer = side.peer
        side.pending = None
        if not peer.lost:
            peer.drop = peer.slow = True  # nothing to forward to: only its Close matters now
            if side.close is OPEN and not side.failed and side.tracker.at_boundary:
                self.close_toward(peer, side.gone_code)
            elif side.close is not SENT:
                # Its stream stopped inside a frame: what the peer got is corrupt.
                if exc is not None:
                    reset(peer.transport)
                else:
                    peer.transport.close()
            self.settle()
        self.side_lost()

    # -- keepalive, from the sweep ------------------------------------------------------
    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        if self.deadline:
            if now >= self.deadline:
                self.abort()
            return
        for side in (self.client, self.origin):
            if side.lost or side.peer.close is not OPEN:
                continue
            if side.nbytes != side.seen:
                side.seen = side.nbytes
                side.quiet_since = now
                side.ping_due = 0.0
                continue
            if side.tracker.inflating:
                side.tracker.rest()  # quiet for a sweep: zlib state back if it can be rebuilt
            if side.ping_due:
                if now >= side.ping_due:
                    self.counters.ping_timeout()
                    side.gone_code = GOING_AWAY
                    side.transport.abort()  # connection_lost sends the other side 1001
                    return
            elif interval and now - side.quiet_since >= interval:
                side.ping_payload = b"wsrelay-" + os.urandom(6)
                side.ping_due = now + timeout
                side.peer.inject(ping_frame(side.ping_payload, mask=side.index == ORIGIN))


def spread_closes(tunnels, code: int, window: float, loop: asyncio.AbstractEventLoop) -> None:
    """Shut ``tunnels`` down with ``code`` evenly over ``window`` seconds: tunnel
    i of n at i/n × window, so clients reconnect as a trickle, not a stampede."""
    tunnels = list(tunnels)
    n = len(tunnels)
    for i, t in enumerate(tunnels):
        if i == 0:
            t.shutdown(code)
        else:
            loop.call_later(window * i / n, t.shutdown, code)
