"""A client connection until it is a tunnel: the seam between the socket a
client connected on and whatever serves its requests.

:class:`ClientConnection` reads a request head (bounded in size and time),
asks :mod:`relay.gate` whether it can be served, and hands it to a *server*:
an :class:`~relay.upgrade.Upgrade` or an :class:`~relay.exchange.Exchange`.
A server talks to the connection only through the methods under "the seam"
below (relay/seam.py's ``Connection``), and the connection calls its server
only through relay/seam.py's ``Server``. Nothing else reaches into either. The compiled data plane, TLS and the
PROXY protocol plug in here: a transport of another kind, a state before
``HEAD``, or a head read elsewhere and handed in with :meth:`unread`.

A head read elsewhere (the native head phase, relay/native/front.py) comes
in through the same seam: as the bytes read so far, given to :meth:`unread`
before the socket is adopted (the head is parsed again here, as if read
here), or, for a request already being answered (an origin's refusal the
native plane read), with ``serve``: the connection then starts in
``SERVING`` with the server ``serve`` makes for it.

States and their transitions are all in :data:`TRANSITIONS`::

    PROXY ──header──▶ TLS or HEAD    (RELAY_PROXY_PROTOCOL=on; refused: CLOSED, no answer)
    TLS ──handshake──▶ HEAD                                  (RELAY_TLS_LISTEN only)
     └──failed / timed out / plain HTTP (400)──▶ LINGER / CLOSED
    HEAD ──head──▶ SERVING ──finished(keep)──▶ HEAD          (keep-alive)
     │               ├──────finished(close)──▶ LINGER ──▶ CLOSED
     │               └──hand_over()──────────▶ TUNNEL      (the socket is a tunnel's)
     └──refused / timed out──▶ LINGER / CLOSED

Refusals are short canned answers followed by a lingering close, so the
client reads them even if it is still sending (nginx's ``lingering_close``).

A connection from a TLS listener starts in ``TLS``: the first bytes decide
between a ClientHello and plain HTTP (a 400 saying so), then the handshake
(relay/tls/handshake.py) runs within ``RELAY_HANDSHAKE_TIMEOUT``, counted from
the accept, and the head must arrive within the same deadline.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

from relay import gate
from relay.context import Context
from relay.errors import HeadError, ProxyProtocolError, RelayError
from relay.exchange import Exchange
from relay.handshake import is_upgrade
from relay.http_head import BARE_LF_END, HEAD_END, parse_request_head
from relay.headers import request_id_for, x_forwarded_for
from relay.logs import AccessLog, AccessRecord
from relay.proxy_protocol import V2_LOCAL, parse_proxy_header, v2_header
from relay.seam import Server
from relay.responses import PLAIN_HTTP_ON_TLS, refusal
from relay.tls import handshake as tls_handshake
from relay.tunnel import reset
from relay.upgrade import Upgrade

#: seconds a refused or closing connection keeps discarding what the client sends
LINGER_SECONDS = 2.0


def unparsed_record(access: AccessLog, client_ip: str, buf: bytes | bytearray) -> AccessRecord | None:
    """An access record for a head that did not parse (or never completed):
    what its request line seems to say; None while the access log is off."""
    if not access.enabled:
        return None
    first = bytes(buf[:min(len(buf), 1024)]).lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")
    return access.record(client_ip, first[0] if len(first) > 1 else b"", first[1] if len(first) > 1 else b"")


class State(enum.Enum):
    PROXY = "reading a PROXY protocol header"
    TLS = "TLS handshake"
    HEAD = "reading a request head"
    SERVING = "a server has the connection"
    LINGER = "answered; half-closed, discarding input"
    TUNNEL = "the socket belongs to a tunnel"
    CLOSED = "closed"


PROXY, TLS, HEAD, SERVING, LINGER, TUNNEL, CLOSED = State
TRANSITIONS: dict[State, frozenset[State]] = {
    # a balancer's PROXY header comes before the TLS handshake (HAProxy's accept-proxy on an ssl bind)
    PROXY: frozenset({TLS, HEAD, CLOSED}),
    TLS: frozenset({HEAD, LINGER, CLOSED}),
    HEAD: frozenset({SERVING, LINGER, CLOSED}),
    SERVING: frozenset({HEAD, LINGER, TUNNEL, CLOSED}),
    LINGER: frozenset({CLOSED}),
    TUNNEL: frozenset(),
    CLOSED: frozenset(),
}


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: Context, tls=None, serve: Callable[["ClientConnection"], Server] | None = None,
                 started: float = 0.0, behind_tls: tuple[str, str, bool] | None = None):
        """``tls``: the listener's relay.tls.server.TlsServer, None on a plain
        listener. ``serve``: the request's head was read and is being answered
        elsewhere (the native head phase hands it over): the connection starts
        in ``SERVING`` with ``serve(self)`` as its server; ``started`` is when
        that request's first byte came. ``behind_tls``: (client address, TLS
        version, resumed) of a TLS connection whose handshake the native head
        phase ran; its plaintext comes from the pump over a socket pair
        (relay/native/front.py, ``_offload``), so the peer is not the client."""
        #: the worker's context (settings, counters, access log, origins)
        self.ctx = ctx
        self._serve = serve
        #: the listener's relay.tls.server.TlsServer, None on a plain listener
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD if tls is None else TLS
        #: X-Forwarded-Proto of its requests: https on a TLS listener
        self.proto = ctx.proto if tls is None else b"https"
        #: RELAY_TLS_CLIENT_HEADER: (name, the line with the verified subject or b""), when mTLS is on
        self.own_header = ctx.own_header
        #: the negotiated TLS version ("" on a plain listener) and whether the session was resumed
        self.tls_version = ""
        self.tls_resumed = False
        self.tls_counted = False
        #: on a TLS listener, the TCP transport under the TLS one: the native
        #: plane checks it holds nothing unsent before taking the socket
        self.tcp_transport: asyncio.Transport | None = None
        #: the client's address and port (the peer's, until a PROXY header says otherwise)
        self.client_ip = "-"
        self.client_port = 0
        #: the address the client connected to, when a PROXY header said it
        #: (else the socket's own: :meth:`origin_header` asks it)
        self.local: tuple[str, int] | None = None
        #: the client is in RELAY_TRUSTED_PROXIES: its X-Forwarded-For and
        #: X-Request-ID are kept (README, "Behind a load balancer")
        self.trusted = False
        #: RELAY_ORIGIN_PROXY_PROTOCOL=v2: the header every origin connection
        #: of this client starts with, and the plain-HTTP origin connection kept
        #: for its next request (it carries this client's header: never pooled)
        self._origin_header: bytes | None = None
        self.parked_origin = None
        #: time.monotonic() of the first byte of the current request
        self.started = started
        self.timer: asyncio.TimerHandle | None = None
        self.server: Server | None = None
        self.requests = 0
        #: the current request is a HEAD: answers to it carry no body
        self.head_request = False
        self._behind_tls = behind_tls
        if behind_tls is not None:
            self.proto = b"https"
            _ip, self.tls_version, self.tls_resumed = behind_tls
            self.tls_counted = True

    def _to(self, state: State) -> None:
        assert state in TRANSITIONS[self.state], f"{self.state.name} -> {state.name}"
        self.state = state

    # -- asyncio callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state is TLS and self.transport is not None:
            self._tls_done(transport)  # the TLS transport, once the handshake is done
            return
        self.transport = transport  # type: ignore[assignment]
        self.ctx.connections.add(self)
        peer = transport.get_extra_info("peername")
        if self._behind_tls is not None:  # a socket pair's end: the client is who the head phase accepted
            self.client_ip, peer = self._behind_tls[0], None
        elif peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        # No TCP_NODELAY here: uvloop sets it on every TCP transport already.
        ctx = self.ctx
        if ctx.proxy_protocol:
            if not peer:  # reset before it was served: no address to judge, nothing to count
                transport.abort()
                return
            if self.client_ip not in ctx.trusted:
                # Only the load balancers may say who the client is (spec §5):
                # anyone else is closed without an answer.
                ctx.counters.proxy_error("untrusted")
                transport.close()
                return
            self.state = PROXY
        elif ctx.trusted:
            self.trusted = self.client_ip in ctx.trusted
        if self._serve is not None:  # a request the native head phase read (never after a PROXY header)
            serve, self._serve = self._serve, None
            self.requests = 1
            self._to(SERVING)
            self.server = serve(self)
            return
        if self.state is HEAD:
            self._await_head()
        else:
            # One deadline for the PROXY header, the TLS handshake and the head that follows.
            self.started = time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(ctx.settings.handshake_timeout,
                                                               self._head_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is HEAD:
            if not self.buf:
                self.started = time.monotonic()
            self.buf += data
            # Parse again only when these bytes may end the head (or overflow
            # it, or end it with bare LFs, which is refused): a head trickled
            # in small reads must not cost a scan of the whole buffer per read
            # (quadratic with RELAY_MAX_HEADER_BYTES).
            if len(self.buf) > self.ctx.settings.max_header_bytes:
                self._try_head()
            else:
                tail = self.buf[-len(data) - 3:]
                if HEAD_END in tail or BARE_LF_END in tail:
                    self._try_head()
        elif state is SERVING:
            self.server.data(data)
        elif state is TLS:
            self._tls_start(data)
        elif state is LINGER:
            if b"\r\n\r\n" in data or len(data) == 0:
                self.close()
        elif state is PROXY:
            self._proxy_header(data)

    def eof_received(self) -> bool:
        if self.state is SERVING:
            return self.server.eof()
        if self.state is LINGER:
            self.close()
        elif self.state is PROXY and self.buf:
            self._proxy_refused("truncated")  # spec §2.2: partial headers are refused
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not CLOSED:
            self._to(CLOSED)
        self.ctx.connections.discard(self)
        self._cancel_timer()
        if self.parked_origin is not None:
            self.parked_origin.transport.close()
            self.parked_origin = None
        server, self.server = self.server, None
        if server is not None:
            server.lost()
        self.ctx.maybe_idle()

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.writable(False)

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.writable(True)

    # -- the PROXY protocol header (README, "Behind a load balancer") -------------------
    def _proxy_header(self, data: bytes) -> None:
        """Read the header the load balancer puts first; the client's own bytes follow it."""
        self.buf += data
        try:
            header = parse_proxy_header(self.buf)
        except ProxyProtocolError as e:
            self._proxy_refused(e.reason)
            return
        if header is None:
            return
        if header.source is not None:  # else (LOCAL, UNKNOWN, AF_UNIX): the connection's own
            self.client_ip, self.client_port = header.source
            self.local = header.destination
        del self.buf[:header.length]
        ctx = self.ctx
        self.trusted = bool(ctx.trusted) and self.client_ip in ctx.trusted
        self._after_proxy_header()

    def _after_proxy_header(self) -> None:
        """The step after the PROXY phase: the rest of the stream is the
        client's, a TLS handshake on a TLS listener, else a request head. The
        handshake timeout still counts from the accept."""
        if self.tls is not None:
            self._to(TLS)
            if self.buf:
                first = bytes(self.buf)
                self.buf.clear()
                self._tls_start(first)
            return
        self._to(HEAD)
        if self.buf:
            self.started = time.monotonic()
            self._try_head()

    def _proxy_refused(self, reason: str) -> None:
        """The spec's answer to a bad header: abort, say nothing; counted by reason."""
        self.ctx.counters.proxy_error(reason)
        self.buf.clear()
        self._to(CLOSED)
        self.transport.abort()

    def origin_header(self) -> bytes:
        """The PROXY v2 header for this client's origin connections (HAProxy's
        ``send-proxy-v2``): its address and port, and the address it connected
        to, as a PROXY header gave them or the socket has them."""
        header = self._origin_header
        if header is None:
            local = self.local
            if local is None:
                sock = self.transport.get_extra_info("sockname")
                local = (sock[0], sock[1]) if sock else ("0.0.0.0", 0)
            try:
                header = v2_header((self.client_ip, self.client_port), local)
            except OSError:  # no IP address to tell (no peer name)
                header = V2_LOCAL
            self._origin_header = header
        return header

    # -- the head -------------------------------------------------------------------
    def _await_head(self) -> None:
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
            self.head_request = self.buf.lstrip(b"\r\n")[:5] in (b"HEAD ", b"HEAD\t")
            self.refuse(e.status, e.outcome if e.status != 431 else "bad_request",
                        unparsed_record(self.ctx.access, self.client_ip, self.buf), upgrade=False)
            return
        if req is None:
            return
        self._cancel_timer()
        self.requests += 1
        self.head_request = req.method == b"HEAD"
        self.transport.pause_reading()
        rest = bytes(self.buf[req.head_len:])
        self.buf.clear()
        ctx = self.ctx
        upgrade = is_upgrade(req)
        request_id = request_id_for(req, self.trusted)
        record = ctx.access.record(self.client_ip, req.method, req.path, req.get(b"user-agent"),
                                   x_forwarded_for(req), request_id.decode()) \
            if upgrade or ctx.access.enabled else None
        if record is not None and self.tls_version:
            record.tls_version = self.tls_version
            record.tls_resumed = self.tls_resumed
        self._to(SERVING)
        try:
            if upgrade:
                key, pool = gate.admit_upgrade(ctx, req, self.client_ip, self.requests == 1)
                self.server = Upgrade(self, req, key, record, rest, request_id, pool)
            else:
                length, pool = gate.admit_request(ctx, req, self.requests == 1)
                self.server = Exchange(self, req, length, record, rest, request_id, pool)
        except RelayError as e:
            if record is not None:
                record.pool = e.pool
            self.refuse(e.status, e.outcome, record, upgrade=upgrade)

    # -- TLS ---------------------------------------------------------------------
    def _tls_start(self, first: bytes) -> None:
        """The first bytes on a TLS listener: a ClientHello starts the
        handshake with them; anything else is plain HTTP and gets nginx's 400."""
        ctx = self.ctx
        if not tls_handshake.looks_like_tls(first):
            self.tls_counted = True
            ctx.counters.tls_handshake("plain_http")
            self.buf += first
            self.refuse(400, "bad_request", unparsed_record(ctx.access, self.client_ip, self.buf),
                        answer=PLAIN_HTTP_ON_TLS)
            return
        left = self.started + ctx.settings.handshake_timeout - time.monotonic()
        # The SSL protocol's own timer is a backstop: ours (the head timer) fires first.
        self.tcp_transport = self.transport
        waiter = tls_handshake.start(self.transport, self, self.tls.default, first, max(left, 0.01) + 1.0,
                                     LINGER_SECONDS)
        waiter.add_done_callback(self._tls_ended)

    def _tls_done(self, transport: asyncio.Transport) -> None:
        """Handshake complete: requests now come through ``transport``."""
        self.transport = transport
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_version = sslobj.version() or ""
        self.tls_resumed = sslobj.session_reused
        self.tls_counted = True
        self.ctx.counters.tls_handshake("resumed" if self.tls_resumed else "full")
        if self.own_header is not None and self.tls.client_header:
            from relay.tls.server import subject

            dn = subject(transport.get_extra_info("peercert"))
            if dn:
                self.own_header = (self.own_header[0], self.tls.client_header + b": " + dn.encode())
        self._to(HEAD)  # the head timer runs on: same deadline

    def _tls_ended(self, waiter: asyncio.Future) -> None:
        """The handshake's end: a failure (or the client gone) ends the connection."""
        if self.state is not TLS:
            return
        exc = None if waiter.cancelled() else waiter.exception()
        if not self.tls_counted:
            self.tls_counted = True
            self.ctx.counters.tls_handshake(tls_handshake.outcome(exc))
        self._to(CLOSED)
        self._cancel_timer()
        self.ctx.connections.discard(self)
        self.ctx.maybe_idle()

    def _head_timeout(self) -> None:
        self.timer = None
        if self.state is PROXY:
            self._proxy_refused("timeout")
            return
        if self.state is TLS:
            if not self.tls_counted:
                self.tls_counted = True
                self.ctx.counters.tls_handshake("timeout")
            self.transport.abort()
            return
        if self.state is not HEAD:
            return
        if self.buf:  # a started head that never finished: slowloris or a dead client
            ctx = self.ctx
            ctx.counters.http(408)
            record = unparsed_record(ctx.access, self.client_ip, self.buf)
            if record is not None:
                record.status = 408
                record.outcome = "client_timeout"
                record.duration_s = round(time.monotonic() - self.started, 3)
                ctx.access.write(record)
        self.close()

    # -- the seam: what a server may do with its connection ---------------------------
    def send(self, data: bytes) -> None:
        """Write to the client (nothing once it is gone)."""
        if self.state is not CLOSED:
            self.transport.write(data)

    def reading(self, on: bool) -> None:
        """Read from the client (``on``) or stop until told again."""
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def unread(self, data: bytes) -> int:
        """Keep ``data`` for the next request on this connection (pipelined
        bytes); returns how many bytes are kept."""
        self.buf += data
        return len(self.buf)

    def finished(self, keep: bool) -> None:
        """The server is done: wait for the next request (``keep``), or close,
        lingering: a client answered before the end of its body may still be
        sending it, and closing a socket with unread bytes resets it, which
        can destroy the answer in flight."""
        self.server = None
        if self.state is CLOSED:  # the client left first (an origin's refusal still coming)
            return
        if not keep or self.ctx.draining:
            self._linger()
            return
        self._to(HEAD)
        self.transport.resume_reading()
        self._await_head()

    def refuse(self, status: int, outcome: str, record: AccessRecord | None, upgrade: bool = False,
               answer: bytes | None = None) -> None:
        """Answer with the relay's canned ``status`` (relay/responses.py) or
        ``answer``, count it (as an upgrade outcome when ``upgrade``), log it,
        then linger."""
        if self.state is LINGER or self.state is CLOSED:
            return
        self.server = None
        ctx = self.ctx
        if upgrade:
            ctx.counters.upgrade(outcome, status)
        else:
            ctx.counters.http(status)
        if record is not None:
            record.status = status
            record.outcome = outcome
            record.duration_s = round(time.monotonic() - self.started, 3)
            ctx.access.write(record)
        self.transport.write(answer if answer is not None else refusal(status, self.head_request))
        self._linger()

    def reset(self) -> None:
        """Abort with a reset: an answer broke off, and the client must not
        take what it got for the whole of it."""
        self.server = None
        reset(self.transport)

    def hand_over(self) -> asyncio.Transport:
        """The socket becomes a tunnel's: this object steps aside for good."""
        self._to(TUNNEL)
        self.server = None
        self.ctx.connections.discard(self)
        return self.transport

    # -- closing --------------------------------------------------------------------
    def _linger(self) -> None:
        """Half-close and discard what the client still sends, for a short
        while, so it reads our answer instead of a reset."""
        self._to(LINGER)
        self.buf.clear()
        self._cancel_timer()
        t = self.transport
        if t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()
        t.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    def close(self) -> None:
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
        if self.state is HEAD and not self.buf and self.requests:
            self.close()
