"""The zero-copy pump: after a 101, bytes move between the client's and the
origin's sockets without a bytes object per chunk.

Each direction is a :class:`Side`, an ``asyncio.BufferedProtocol``: uvloop
reads straight into one read buffer shared by every tunnel of the worker
(the loop is single-threaded and calls ``get_buffer`` and ``buffer_updated``
back to back), and the chunk goes out with one ``write`` of a memoryview
slice, which uvloop tries to send at once with no copy.

Ownership of that buffer is the one subtle rule. When the peer socket cannot
take the whole chunk, uvloop keeps the slice, not a copy. The write limits are
set to zero, so that is exactly when uvloop calls ``pause_writing``: there
we hand the buffer to the transport for good and allocate a fresh one, and
stop reading from the other side until the slice is sent (``resume_writing``).
So an idle tunnel owns no buffer at all, a busy one allocates only when its
peer is slower than its source, and memory per tunnel is bounded by one read
buffer per direction plus the kernel's socket buffers, whatever the peers do.

Why a BufferedProtocol and not ``data_received``: the plain protocol costs
uvloop one new ``bytes`` per chunk, and measured inside wsrelay it wins only
on small messages (64 B: ~0.7 µs of user CPU per round trip, about 8% of the
worker) while losing on bulk (1 MiB: ~50 µs more user CPU per round trip for
the copy); bench/RESULTS.md §3 has the figures. We keep the design that
allocates nothing per chunk and wins where the bytes are.

Half-closes (FIN) are passed on with ``write_eof``; a reset is passed on as a
reset (SO_LINGER 0), a clean close as a clean close.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

READ_SIZE = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
# uvloop keeps the previous protocol alive when a transport switches from a
# Protocol to a BufferedProtocol (its cached data_received is not replaced);
# hopping through a plain Protocol first frees the handshake's objects:
# 6.4 -> 4.1 KiB per idle tunnel (bench/RESULTS.md, "Idle memory").
_HOP = asyncio.Protocol()


class _ReadBuffer:
    """The worker's read buffer; replaced when a transport keeps a slice of it."""

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))

    def renew(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


BUFFER = _ReadBuffer()


class Side(asyncio.BufferedProtocol):
    """One socket of a tunnel; reads from it are written to the peer side."""

    __slots__ = ("tunnel", "transport", "peer", "nbytes", "eof", "lost")

    def __init__(self, tunnel: "Tunnel", transport: asyncio.Transport):
        self.tunnel = tunnel
        self.transport = transport
        self.peer: Side = None  # type: ignore[assignment]  # set by Tunnel
        self.nbytes = 0
        self.eof = False
        self.lost = False

    # -- the data path: nothing here allocates but the slice ----------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return BUFFER.view

    def buffer_updated(self, nbytes: int) -> None:
        self.peer.transport.write(BUFFER.view[:nbytes])
        self.nbytes += nbytes

    # -- flow control ----------------------------------------------------------
    def pause_writing(self) -> None:
        # Our transport kept part of the shared buffer: it is its now.
        BUFFER.renew()
        if not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.lost and not self.peer.eof:
            self.peer.transport.resume_reading()

    # -- endings ----------------------------------------------------------------
    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer.lost:
            return False
        if peer.eof:
            self.tunnel.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        else:  # TLS has no half-close (uvloop): close_notify after what is buffered
            peer.transport.close()
        # Keep our write side open, the other direction may go on: TCP can
        # (half-close); TLS cannot (uvloop closes after the client's close_notify).
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if not peer.lost:
            if exc is not None:
                reset(peer.transport)
            else:
                peer.transport.close()  # flushes what is still buffered
        self.tunnel.side_lost()


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with RST, so a reset on one side reads as a reset on the other."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


class Tunnel:
    """A client and an origin connection joined after a 101 (``RELAY_MODE=tunnel``).

    The worker's context builds one with :meth:`open` and starts it with
    :meth:`start`; class-level hooks (:meth:`sweep`, :meth:`drain`,
    :attr:`counts_messages`) are where another mode's tunnel class differs
    (relay/frames_tunnel.py)."""

    __slots__ = ("client", "origin", "on_end", "started", "last_bytes", "last_active", "ended", "record",
                 "upstream")

    #: the protocol of each socket; relay.frames_tunnel swaps in its own
    side_class = Side
    #: whether it counts messages (wsrelay_messages_total)
    counts_messages = False
    messages_up = messages_down = 0
    #: the client's address when there is no record (native tunnels with the access log off)
    client_ip = None

    @classmethod
    def open(cls, ctx, client_transport: asyncio.Transport, origin_transport: asyncio.Transport,
             record, response) -> "Tunnel":
        """A tunnel for the worker context ``ctx``; ``response`` is the origin's 101."""
        return cls(client_transport, origin_transport, ctx.tunnel_ended, record)

    @classmethod
    def check_response(cls, response, settings) -> None:
        """The origin's 101, already checked against RFC 6455: raise HeadError
        if this mode cannot carry what it agreed. Tunnel mode carries anything."""

    @classmethod
    def sweep(cls, tunnels, now: float, settings) -> None:
        """Once a second, from the worker's sweep: nothing to do in tunnel mode."""

    @classmethod
    def drain(cls, tunnels: set, code: int, timeout: float,
              loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        """The worker drains (``timeout``: RELAY_DRAIN_TIMEOUT; ``code``: what
        frames mode tells clients). Tunnel mode lets tunnels end by themselves
        until the worker closes what is left; returns a timer to cancel, if any."""
        return None

    def shutdown(self, code: int) -> None:
        """End the session the mode's way before the sockets close (tunnel mode: nothing)."""
    #: a Python tunnel (relay.native.plane.NativeTunnel says True)
    native = False

    def __init__(self, client_transport: asyncio.Transport, origin_transport: asyncio.Transport,
                 on_end, record) -> None:
        self.client = self.side_class(self, client_transport)
        self.origin = self.side_class(self, origin_transport)
        self.client.peer = self.origin
        self.origin.peer = self.client
        self.on_end = on_end
        #: what the access log says of this session; finished by on_end
        self.record = record
        #: the origin (relay/origins/balance.Member) whose connection count it holds
        self.upstream = None
        self.started = time.monotonic()
        self.last_bytes = 0
        self.last_active = self.started
        self.ended = False
        for side in (self.client, self.origin):
            t = side.transport
            # A TLS transport copies what it is given into OpenSSL at once, and
            # with a high-water mark of 0 would report itself paused after every
            # write (its buffer size is 0 >= 0): 1 pauses only when records wait.
            t.set_write_buffer_limits(high=0 if t.get_extra_info("ssl_object") is None else 1)
            t.set_protocol(_HOP)
            t.set_protocol(side)

    def start(self, head: bytes, to_client: bytes, to_origin: bytes) -> None:
        """Send the origin's 101 ``head`` and what followed it to the client,
        what the client sent after its request to the origin, then pump."""
        self.client.transport.write(head + to_client if to_client else head)
        if to_origin:
            self.origin.transport.write(to_origin)
        for side in (self.client, self.origin):
            if not side.transport.is_closing():
                side.transport.resume_reading()

    @property
    def up(self) -> int:
        return self.client.nbytes

    @property
    def down(self) -> int:
        return self.origin.nbytes

    def close(self) -> None:
        """Close both sockets cleanly, flushing what is buffered."""
        for side in (self.client, self.origin):
            if not side.lost:
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.origin):
            if not side.lost:
                side.transport.abort()

    def side_lost(self) -> None:
        if self.client.lost and self.origin.lost and not self.ended:
            self.ended = True
            self.on_end(self)
