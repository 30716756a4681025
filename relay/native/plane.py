"""A worker's native data plane: the engine, polled from the event loop, and
:class:`NativeTunnel`, the worker context's tunnel class in tunnel mode when
the native plane is on: held like a :class:`relay.tunnel.Tunnel` (``open``,
``start``, ``close``, ``abort``, ``record``, ``started``, ``up``/``down``
once ended, ``on_end(tunnel)`` exactly once, the class hooks).

Handing a tunnel over: the head phase ran on uvloop transports; at the 101
both sockets are duplicated out of their transports, which are then dropped
without a shutdown (closing one descriptor of a duplicated pair sends
nothing), and the engine owns the duplicates. Nothing can be lost or
doubled in between: reading was paused on both transports when their heads
were complete (relay/upgrade.py, relay/origins/answer.py), so uvloop holds no
unread byte, and what arrived behind a head was already handed to us as
``to_client``/``to_origin``. A transport that still holds unsent bytes
cannot be handed over (uvloop would drop them): such a tunnel, and one
whose descriptors cannot be duplicated (EMFILE), stays on the Python data
plane, and the access log says so.

A TLS client (wss://) is handed over with its OpenSSL ``SSL``, whose
handshake uvloop's SSL protocol ran (engine.c "TLS tunnels"). Where uvloop
keeps what is in flight at the 101, and what becomes of it:

- ciphertext read but not decrypted: the SSL's read BIO (uvloop writes every
  read into it at once): the engine takes it and decrypts it first;
- plaintext decrypted but not delivered: inside the SSL (uvloop stopped
  reading it when our reading paused; what it had delivered already is
  ``to_origin``): the engine's first ``SSL_read`` returns it;
- records written but not sent: the SSL's write BIO (while uvloop's TCP
  transport had paused it), taken and sent first; records the TCP transport
  holds, or plaintext queued in uvloop's write backlog, cannot be taken:
  such a tunnel stays in Python;
- the 101 itself and what followed it: plaintext, sealed by the engine.

The engine keeps a reference to the ``_ssl._SSLSocket`` that owns the SSL
(``NativeTunnel.tls``) for the tunnel's life: _ssl points the SSL's app
data at it, and frees the SSL with it. On an io_uring worker TLS tunnels go
to a second engine, on epoll (engine.c says why).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from relay import native
from relay.native import Engine, wanted_backend
from relay.tunnel import READ_SIZE, Tunnel


class _Gone(asyncio.Protocol):
    """The protocol of a transport whose socket the engine took: hears nothing."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass


_GONE = _Gone()


class _TunnelModeHooks(type):
    """Class-level hooks NativeTunnel does not define itself (sweep, drain,
    check_response, ... relay/tunnel.py) are tunnel mode's: the native plane
    serves tunnel mode, and a hook added there later applies here unchanged."""

    def __getattr__(cls, name: str):
        return getattr(Tunnel, name)


class NativeTunnel(metaclass=_TunnelModeHooks):
    """A tunnel whose sockets the engine owns."""

    # An idle tunnel costs its slot in the engine and this object: no bound
    # on_end per tunnel (the plane holds the context's), descriptors dropped
    # once the engine owns them (bench/RESULTS.md, idle memory).
    __slots__ = ("plane", "engine", "tls", "cfd", "ofd", "id", "record", "started", "up", "down", "ended", "upstream",
                 "client_ip")

    #: relay.context reads byte counts and idle times of native tunnels from
    #: the engine in one call per sweep, not per tunnel
    native = True
    counts_messages = False
    messages_up = messages_down = 0

    @classmethod
    def open(cls, ctx, client_transport: asyncio.Transport, origin_transport: asyncio.Transport,
             record, response):
        """The native tunnel of ``ctx``'s plane, or a :class:`relay.tunnel.Tunnel`
        where the sockets cannot be handed over (see the module docstring)."""
        return ctx.native.tunnel(client_transport, origin_transport, record)

    def shutdown(self, code: int) -> None:
        """Tunnel mode: nothing before the sockets close."""

    def __init__(self, plane: "NativePlane", cfd: int, ofd: int, record, client_ip: str | None = None,
                 tls=None, engine: Engine | None = None) -> None:
        """``client_ip``: given back to the admission slot at the end (the
        record's, when there is one: the native head phase builds none while
        the access log is off). ``tls``: the client's ``_ssl._SSLSocket``
        (a wss:// tunnel), kept until the tunnel ends; ``engine``: the one
        that relays it (the plane's unless said)."""
        self.plane = plane
        self.tls = tls
        self.engine = plane.engine if engine is None else engine
        self.client_ip = client_ip
        self.cfd = cfd
        self.ofd = ofd
        self.id: int | None = None
        self.record = record
        #: the origin (relay/origins/balance.Member) whose connection count it holds
        self.upstream = None
        self.started = time.monotonic()
        #: final byte counts, set when the tunnel ends (open ones: bytes())
        self.up = 0
        self.down = 0
        self.ended = False

    def start(self, head: bytes, to_client: bytes, to_origin: bytes) -> None:
        """Send the origin's 101 ``head`` and what followed it to the client,
        what the client sent after its request to the origin, then pump (the
        tunnel may end at once)."""
        cfd, ofd, self.cfd, self.ofd = self.cfd, self.ofd, -1, -1
        try:
            if self.tls is None:
                self.id = self.engine.tunnel(cfd, ofd, head + to_client, to_origin, self)
            else:
                self.id = self.engine.tls_tunnel(cfd, ofd, head + to_client, to_origin, self, self.tls)
        except OSError:
            os.close(cfd)
            os.close(ofd)
            self.plane.ended(self, 0, 0)

    def bytes(self) -> tuple[int, int]:
        """(up, down) so far."""
        if self.ended or self.id is None:
            return self.up, self.down
        return self.engine.bytes(self.id) or (self.up, self.down)

    def close(self) -> None:
        """Close both sockets cleanly, flushing what is pending."""
        if self.id is not None:
            self.engine.close(self.id)

    def abort(self) -> None:
        if self.id is not None:
            self.engine.abort(self.id)


class Offload:
    """The token of a TLS connection the Python plane serves behind the pump:
    the head phase's TLS tunnel between the client and one end of a socket
    pair whose other end is a relay/client.py connection (relay/native/front.py,
    ``_offload``). It holds the SSL's owner; the engine reports no end for it
    (a carrier, engine.c ``eng_carrier``: the connection behind it counts its
    own requests)."""

    __slots__ = ("tls",)

    def __init__(self, tls) -> None:
        self.tls = tls


def _share_strings(record) -> None:
    """Tunnels live long and mostly share a client address, an origin and a
    method: one string each for all of them, not one per tunnel."""
    record.client = sys.intern(record.client)
    record.origin = sys.intern(record.origin)
    record.method = sys.intern(record.method)


def _detach(transport: asyncio.Transport) -> int:
    """A duplicate of the transport's socket descriptor (close-on-exec)."""
    return os.dup(transport.get_extra_info("socket").fileno())


class NativePlane:
    """One engine per worker, its epoll descriptor watched by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end, read_size: int = READ_SIZE) -> None:
        self.loop = loop
        #: the context's tunnel_ended, called with each tunnel once it ended
        self.on_end = on_end
        self.read_size = read_size
        self.engine = Engine(read_size, self.ended, backend=wanted_backend())
        self.fd = self.engine.fileno()
        loop.add_reader(self.fd, self.engine.poll)
        #: TLS tunnels' engine on an io_uring worker (made at the first one)
        self._tls_engine: Engine | None = None

    def tls_engine(self) -> Engine:
        """The engine for TLS tunnels: this plane's on epoll; on io_uring a
        second one on epoll, polled from the loop likewise (engine.c, "TLS tunnels")."""
        if self.engine.backend == "epoll":
            return self.engine
        if self._tls_engine is None:
            self._tls_engine = Engine(self.read_size, self.ended, backend="epoll")
            self.loop.add_reader(self._tls_engine.fileno(), self._tls_engine.poll)
        return self._tls_engine

    def engines(self) -> tuple[Engine, ...]:
        """This plane's engine, and its TLS engine once made."""
        return (self.engine,) if self._tls_engine is None else (self.engine, self._tls_engine)

    def ended(self, tunnel: NativeTunnel, up: int, down: int) -> None:
        tunnel.up = up
        tunnel.down = down
        tunnel.ended = True
        self.on_end(tunnel)

    def tunnel(self, client_t: asyncio.Transport, origin_t: asyncio.Transport, record):
        """Take both sockets; a :class:`relay.tunnel.Tunnel` where they cannot be taken."""
        on_end = self.on_end
        sslobj = client_t.get_extra_info("ssl_object")
        tls = None
        engine = self.engine
        if sslobj is not None:
            tls = _tls_to_take(client_t, sslobj)
            if tls is None:
                return Tunnel(client_t, origin_t, on_end, record)
            try:
                engine = self.tls_engine()
            except OSError:  # no descriptor for its epoll set (EMFILE): this one stays in Python
                return Tunnel(client_t, origin_t, on_end, record)
        elif client_t.get_write_buffer_size():
            return Tunnel(client_t, origin_t, on_end, record)
        if origin_t.get_write_buffer_size():
            return Tunnel(client_t, origin_t, on_end, record)
        try:
            cfd = _detach(client_t)
        except OSError:
            return Tunnel(client_t, origin_t, on_end, record)
        try:
            ofd = _detach(origin_t)
        except OSError:
            os.close(cfd)
            return Tunnel(client_t, origin_t, on_end, record)
        for t in (client_t, origin_t):
            t.set_protocol(_GONE)
            t.abort()  # closes uvloop's descriptor only: the socket lives on in ours
        if record is not None:
            record.data_plane = "native"
            _share_strings(record)
        return NativeTunnel(self, cfd, ofd, record, tls=tls, engine=engine)

    def engine_bytes(self) -> tuple[int, int]:
        """(up, down) read so far by the tunnels still open, and by the fast
        path's that ended (relay/native/fast_path.py: they end in C, with no
        on_end for the context to add them up)."""
        up, down = self.engine.fast_path_stats["ended_bytes"]
        for e in self.engines():
            u, d = e.open_bytes
            up += u
            down += d
        return up, down

    def close_idle(self, seconds: float) -> int:
        return sum(e.close_idle(seconds) for e in self.engines())

    def stop(self) -> None:
        for e in self.engines():
            self.loop.remove_reader(e.fileno())


def _tls_to_take(client_t: asyncio.Transport, sslobj):
    """The ``_ssl._SSLSocket`` of a TLS client whose tunnel the engine can
    take, or None: the engine cannot use this Python's OpenSSL, or uvloop
    holds bytes to send that are not in the SSL's write BIO (records in its
    TCP transport's buffer, plaintext in its write backlog), which would be
    lost (the module docstring has where uvloop keeps what)."""
    if not native.TLS_AVAILABLE:
        return None
    tcp = getattr(client_t.get_protocol(), "tcp_transport", None)
    if tcp is None or tcp.get_write_buffer_size():
        return None
    sslsock = getattr(sslobj, "_sslobj", None)
    try:
        _read, written = native._engine.tls_held(sslsock)
    except (TypeError, RuntimeError):
        return None
    # uvloop's write buffer size is its write BIO plus its plaintext backlog
    if client_t.get_write_buffer_size() != written:
        return None
    return sslsock
