"""The worker's head phase in C, for plain listeners on the native data plane
(tunnel mode; README "Architecture"): relay/native/handshake.c accepts, reads
each request head, connects to the origin and reads its response head;
Python is called once with a complete request head and once with the
origin's answer, and decides. The common answer, a 101 that carries the
Sec-WebSocket-Accept for the request's key, is checked in C (the same check as
relay/handshake.py's ``check_upgrade_response``, held to it by a
differential test) and comes to :meth:`NativeFront.on_upgrade` without a
view of its head; any other answer comes to :meth:`NativeFront.on_response`
as a view, checked again in Python, which says why it fails.

The boundary. C moves bytes and keeps time: accept (balanced across
workers, paused when out of descriptors), read a head up to
``RELAY_MAX_HEADER_BYTES`` within ``RELAY_HANDSHAKE_TIMEOUT``, split it
(relay/native/http_head.c, fuzzed against relay/http_head.py), connect to
the origins in the order given (each once, within ``RELAY_CONNECT_TIMEOUT``),
write the forwarded head, read the answer, write a refusal and linger, and
join both sockets in the pump. Python decides everything, here, with the
same sans-I/O pieces as relay/client.py and relay/upgrade.py:

- whether it serves the request at all: anything but a well-formed upgrade
  (plain HTTP, a head that does not parse, a head over the cap) is handed
  to the Python plane with every byte read (:meth:`NativeFront._to_python`,
  a relay/client.py ``ClientConnection`` through relay/seam.py's interface),
  which parses and answers it as if it had read it;
- validation (RFC 6455 §4.2.1's checks through the view's ``websocket()``,
  relay/handshake.py's ``is_upgrade`` and ``validate_upgrade`` compiled and
  fuzzed against them), the route, the path and ``Origin`` rules and
  admission (relay/gate.py, the one place that decides whether a request is
  served and by which pool), the refusals and their answers (relay/responses.py),
  the request id, the origin its pool's balancer chooses (relay/origins/,
  with the connection count it holds) and the order of the others, the
  forwarded head's policy (forward_head, in C, the compiled twin of
  relay/headers.py's, a trusted proxy's X-Forwarded-For kept);
- the answer: interim ``1xx`` skipped, a ``101`` checked against the key
  (in C for the common answer, else relay/handshake.py) before the pump
  takes both sockets, any other status
  relayed with its whole body by the Python plane (relay/upgrade.py's
  ``HandedOverRefusal`` on the sockets and bytes handed over);
- counting (metrics/counters.py), the access log (relay/logs.py: records are
  built only while it is on), each origin's passive health and failure
  lines (relay/origins/balance.py, from each failed attempt C reports), the
  connect time C measured to the origin that answered or timed out
  (``wsrelay_origin_connect_seconds``; not of an origin that closed without
  answering, whose connection the next attempt replaced).

Origins given as host names are resolved off the loop when the worker starts
and every :data:`RESOLVE_EVERY` seconds after (the Python plane resolves at
each connection); until the first answer, upgrades go to the Python plane.

Draining: accepting stops; connections already accepted keep their head
phase (the first request of a connection accepted before the drain is
served), and the worker waits for them as for its other connections.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import logging
import os
import socket
import time

from relay import gate
from relay.client import ClientConnection, unparsed_record
from relay.context import Context
from relay.errors import HeadError, OriginClosed, RelayError
from relay.handshake import check_upgrade_response
from relay.headers import request_id_for, x_forwarded_for
from metrics import layout
from relay.native import fast_path
from relay.native.plane import NativeTunnel, Offload, _share_strings
from relay.origins.balance import Member
from relay.origins.dial import Dial
from relay.responses import refusal
from relay.tls import handshake as tls_handshake
from relay.upgrade import GATEWAY_ERRORS, HandedOverRefusal
from workers.accept import LOG_EVERY, PAUSE

log = logging.getLogger("wsrelay.worker")

#: seconds between two resolutions of an origin given as a host name
RESOLVE_EVERY = 10.0
#: seconds between two looks at the head phase's timeouts and accept errors
TICK = 0.1

# why an origin attempt failed (handshake.h HF_*)
_CONNECT, _CLOSED, _TRUNCATED = 1, 2, 3


class NativeConnection:
    """A client connection in the C head phase, from its request head to its
    origin's answer: the part of relay/seam.py's ``Connection`` a request
    read in C is answered through (``ctx``, ``client_ip``, ``started``,
    :meth:`refuse`). What needs the rest of the seam (a server that sends,
    reads, finishes) goes to the Python plane whole, through
    :meth:`NativeFront._to_python` or ``HandedOverRefusal``."""

    __slots__ = ("front", "ctx", "cid", "client_ip", "started", "req", "key", "record", "dial", "order", "full", "tls")

    def __init__(self, front: "NativeFront", cid: int, client_ip: str, req, started: float, tls=None) -> None:
        self.front = front
        #: a TLS connection's ``_ssl._SSLSocket`` (the SSL's owner), None on a plain one
        self.tls = tls
        self.ctx = front.ctx
        self.cid = cid
        self.client_ip = client_ip
        self.started = started
        self.req = req
        self.key = b""
        self.record = None
        #: the origin holding this upgrade's connection count, and those tried (relay/origins/dial.py)
        self.dial: Dial | None = None
        #: the origins given to the engine, as indices of NativeFront.members
        self.order: list[int] = []
        #: origins of the pool were left out of ``order`` at RELAY_MAX_CONNS
        self.full = False

    def refuse(self, status: int, outcome: str, record, upgrade: bool = False) -> None:
        """Answer with the relay's canned ``status``, count it, log it; C writes
        it, half-closes and lingers (as relay/client.py's ``refuse``)."""
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
        self.front.engine.refuse(self.cid, refusal(status, self.req.method == b"HEAD"))

    def fail(self, status: int, outcome: str) -> None:
        """The upgrade ends without a tunnel: the admission slot and the
        origin's connection count go back first."""
        self.ctx.admission.give(self.client_ip)
        if self.dial is not None:
            self.dial.release()
        self.refuse(status, outcome, self.record, upgrade=True)


class NativeFront:
    """Accepts on ``socks`` through the engine and answers its callbacks (the
    ``on_*`` methods, called by relay/native/_engine.c)."""

    def __init__(self, ctx: Context, socks: list[socket.socket], mine=None, siblings=(), tls_flags=(),
                 tls_server=None) -> None:
        """``mine``/``siblings``: this worker's and the other workers' raw slots
        of shared memory (relay.shared_memory.SharedState.values), to balance accepts.
        ``tls_flags``: which of ``socks`` are TLS listeners (all plain when
        empty), served with ``tls_server`` (relay.tls.server.TlsServer)."""
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        s = ctx.settings
        self.engine = ctx.native.engine
        self.engine.handshakes(self, max_head=s.max_header_bytes, head_timeout=s.handshake_timeout,
                               connect_timeout=s.connect_timeout, proto=ctx.proto)
        #: every origin of every pool, once per pool: the engine's origin indices
        self.members: list[Member] = [m for pool in ctx.pools.values() for m in pool.members]
        self.index = {m: i for i, m in enumerate(self.members)}
        #: the tunnel mode's check of a 101, looked up once (NativeTunnel
        #: forwards class hooks through a metaclass __getattr__, a slow path)
        self.check_response = ctx.tunnel_class.check_response
        self.names = [m.name for m in self.members]
        self.resolver = _Resolver(self, [m.addr for m in self.members])
        self.socks = socks
        if mine is not None and siblings:
            self.engine.balance(mine, list(siblings), layout.LOAD, layout.ACCEPTING)
        #: TLS listeners' contexts (the Python plane answers plain HTTP on them with them)
        self.tls_server = tls_server
        if any(tls_flags):  # C counts how TLS handshakes end, into this worker's metrics
            table, shift, mask = tls_handshake.reason_table(layout.TLS_OUTCOMES)
            self.engine.tls_server(tls_server.default, table, shift, mask, ctx.counters.tls_handshakes_view())
        fast_path.install(self, any(tls_flags))  # the startup line said whether it is on, and why not
        for sock, is_tls in itertools.zip_longest(socks, tls_flags, fillvalue=False):
            self.engine.listen(sock.fileno(), is_tls)
        ctx.counters.accepting = True
        self.fd = self.engine.hs_fileno()
        self.loop.add_reader(self.fd, self.engine.poll_handshakes)
        self.accept_errors = self.logged_errors = 0
        self.last_log = -LOG_EVERY
        self.closed = False
        self._draining = _Draining(self)
        self._timer = self.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        self.engine.expire()
        errors = self.engine.handshake_stats["accept_errors"]
        if errors > self.accept_errors:
            # accept() ran out of descriptors: the engine paused accepting (workers/accept.py's rule)
            for _ in range(errors - self.accept_errors):
                self.ctx.counters.accept_error()
            now = time.monotonic()
            if now - self.last_log >= LOG_EVERY:
                log.error("accept() out of file descriptors or memory (%d failures since the last report): "
                          "pausing accepts for %gs at a time; open connections are still served "
                          "(raise LimitNOFILE / fs.file-max?)", errors - self.logged_errors, PAUSE)
                self.last_log = now
                self.logged_errors = errors
            self.accept_errors = errors
        self._draining.check()
        self._timer = self.loop.call_later(TICK, self._tick)

    def close(self) -> None:
        """Stop accepting (drain): what is in the backlog stays for the siblings;
        connections already accepted are still served, and waited for."""
        if self.closed:
            return
        self.closed = True
        self.engine.accepting = False
        self.ctx.counters.accepting = False
        for sock in self.socks:
            sock.close()
        self.resolver.stop()
        self._draining.start()

    def summary(self) -> str | None:
        """What the fast path did in this worker, for its last log line (None: it was off)."""
        st = self.engine.fast_path_stats
        if not st["on"]:
            return None
        return (f"the fast path decided {st['decided']} upgrades in C ({st['upgraded']} upgraded there, "
                f"{st['adopted']} handed to Python); {st['declined']} were Python's to decide")

    # -- the engine's callbacks ------------------------------------------------------
    def on_head(self, cid: int, req, ip: str, tls=None) -> None:
        """A request head is in (``req``: relay/native/http_head.c's view, None
        when it does not parse or is over the cap). ``tls``: None on a plain
        listener; on a TLS one the connection's ``_ssl._SSLSocket``, or False
        when it sent no TLS record (no head was read: plain HTTP on a TLS port)."""
        # is_upgrade and validate_upgrade in one C call: None, the key, or (status, reason)
        ws = req.websocket() if req is not None else None
        if ws is None or not self.resolver.ready:
            return self._to_python(cid, tls, ip)
        ctx = self.ctx
        conn = NativeConnection(self, cid, ip, req, time.monotonic(), tls)
        trusted = bool(ctx.trusted) and ip in ctx.trusted
        # None: C makes a new id for the forwarded head (Python has no use for it)
        request_id = request_id_for(req, trusted) if trusted or ctx.access.enabled else None
        rec = None
        if ctx.access.enabled:
            rec = conn.record = ctx.access.record(ip, req.method, req.path, req.get(b"user-agent"),
                                                  x_forwarded_for(req), request_id.decode())
            if tls:
                rec.tls_version = tls.version() or ""
                rec.tls_resumed = tls.session_reused
        try:
            if type(ws) is tuple:
                raise HeadError(*ws)
            conn.key, pool = gate.admit_upgrade(ctx, req, ip, True, ws)  # a connection's first request
        except RelayError as e:
            if rec is not None:
                rec.pool = e.pool
            return conn.refuse(e.status, e.outcome, rec, upgrade=True)
        if rec is not None:
            rec.pool = pool.name
        conn.dial = dial = Dial(pool, req)
        try:
            first = dial.choose()  # the pool's balancer: asked first, holding its count
        except RelayError as e:  # every origin of the pool at RELAY_MAX_CONNS
            conn.dial = None
            return conn.fail(e.status, e.outcome)
        index = self.index
        rest, conn.full = pool.failover(req, first)  # what dial.choose() would give after each failure
        conn.order = [index[first]] + [index[m] for m in rest]
        # True: C computes the Sec-WebSocket-Accept from the key the gate checked,
        # and checks the common answer itself (on_upgrade)
        self.engine.connect(cid, conn.order, req, request_id, trusted, conn, pool.connect_timeout, True)

    def on_adopt(self, cid: int, req, ip: str, started: float, origin: int, tls=None,
                 request_id: bytes = b"") -> NativeConnection:
        """An upgrade the fast path decided (relay/native/fast_path.py) whose
        outcome is not the common one: Python takes it over as if on_head had
        decided it, with the admission slot and the connection count C took on
        ``origin`` (engine index, asked first); the event follows at once.
        ``tls``: as on_head's; ``request_id``: the X-Request-ID C forwarded."""
        conn = NativeConnection(self, cid, ip, req, started, tls)
        conn.key = req.websocket()
        m = self.members[origin]
        if self.ctx.access.enabled:  # the record on_head would have begun
            rec = conn.record = self.ctx.access.record(ip, req.method, req.path, req.get(b"user-agent"),
                                                       x_forwarded_for(req), request_id.decode())
            rec.pool = m.pool.name
            if tls:
                rec.tls_version = tls.version() or ""
                rec.tls_resumed = tls.session_reused
        conn.dial = dial = Dial(m.pool, req)
        dial.member = m  # held: C counted it (OriginPool.opened)
        dial.tried = (m,)
        return conn

    def on_upgrade(self, cid: int, conn: NativeConnection, origin: int, attempts, connect_s: float | None) -> None:
        """The origin answered a 101 that C checked as check_upgrade_response
        does (tunnel mode agrees to anything it agreed): the tunnel opens.
        ``connect_s``: the connect to it, timed by C (None: taken already)."""
        self._upgraded(cid, conn, self._answered_by(conn, origin, attempts, connect_s))

    def on_response(self, cid: int, conn: NativeConnection, resp, origin: int, attempts) -> None:
        """The origin's response head (a view, or (status, reason, outcome) when malformed)."""
        ctx = self.ctx
        member = self._answered_by(conn, origin, attempts, self.engine.connect_time(cid))
        if type(resp) is tuple:
            return self._bad_answer(conn, member, HeadError(*resp))
        status = resp.status
        if status != 101:
            if status < 200:  # interim (100, 103 Early Hints): consumed, the final answer follows
                self.engine.skip(cid, resp.head_len)
                return
            if status in GATEWAY_ERRORS:  # its own 502/503/504 counts against it (passive health)
                member.pool.failed(member, "status_5xx", f"{status} to an upgrade", status)
            else:
                member.pool.answered(member)
            return self._relay_refusal(cid, conn, resp)
        try:
            check_upgrade_response(resp, conn.key)
            self.check_response(resp, ctx.settings)
        except HeadError as e:
            return self._bad_answer(conn, member, e)
        self._upgraded(cid, conn, member)

    def _upgraded(self, cid: int, conn: NativeConnection, member: Member) -> None:
        """The 101 passed: counted, logged, and both sockets to the pump."""
        ctx = self.ctx
        rec = conn.record
        member.pool.answered(member)
        handshake_s = time.monotonic() - conn.started
        ctx.counters.upgrade("upgraded", 101, handshake_s)
        if rec is not None:
            rec.status = 101
            rec.outcome = "upgraded"
            rec.handshake_ms = round(handshake_s * 1000, 3)
            rec.data_plane = "native"  # the pump relays it; a refusal is "python" (README "Logs")
            _share_strings(rec)
        if conn.tls is None:
            tunnel = NativeTunnel(ctx.native, -1, -1, rec, conn.client_ip)
        else:  # wss://: the pump takes the SSL too, on its engine for TLS (engine.c "TLS tunnels")
            tunnel = NativeTunnel(ctx.native, -1, -1, rec, conn.client_ip, tls=conn.tls,
                                  engine=ctx.native.tls_engine())
        tunnel.upstream = member  # the tunnel holds the origin's count now, given back when it ends
        conn.dial.member = None
        ctx.tunnels.add(tunnel)
        ctx.counters.tunnel_opened()
        tunnel.id = self.engine.splice(cid, tunnel, tunnel.engine)

    def on_failed(self, cid: int, conn: NativeConnection, origin: int, attempts) -> None:
        """No origin could be asked, or the answer broke off."""
        last = attempts[-1] if attempts else (origin, _CONNECT, errno.ECONNREFUSED)
        if last[1] == _TRUNCATED:
            if attempts[:-1]:
                self._failures(conn, attempts[:-1], last[0])
            return self._bad_answer(conn, self._held(conn, last[0]),
                                    HeadError(502, "origin closed in the middle of its answer", "origin_error"),
                                    "closed")
        if attempts:
            self._failures(conn, attempts)
        if last[0] >= 0:
            self._held(conn, last[0])  # the last one tried, named in the access log
        self._name(conn, self.names[last[0]] if last[0] >= 0 else "")
        if conn.full:  # the origins left are at RELAY_MAX_CONNS: dial.choose() would refuse so
            return conn.fail(503, "limit_origin")
        conn.fail(502, "origin_error")

    def on_timeout(self, cid: int, conn: NativeConnection, origin: int, attempts) -> None:
        """No answer within RELAY_CONNECT_TIMEOUT."""
        if attempts:
            self._failures(conn, attempts, origin)
        member = self._held(conn, origin) if origin >= 0 else conn.dial.member
        if member is not None:
            self._timed(member, self.engine.connect_time(cid))
            member.pool.failed(member, "timeout", f"no answer to an upgrade within "
                               f"RELAY_CONNECT_TIMEOUT={member.pool.connect_timeout:g}s", 504)
            self._name(conn, member.name)
        conn.fail(504, "timeout")

    def on_head_timeout(self, cid: int, data: bytes, ip: str) -> None:
        """No complete head within RELAY_HANDSHAKE_TIMEOUT: a started one is
        counted (408) and logged, nothing is written (relay/client.py)."""
        if not data:
            return
        ctx = self.ctx
        ctx.counters.http(408)
        record = unparsed_record(ctx.access, ip, data)
        if record is not None:
            record.status = 408
            record.outcome = "client_timeout"
            record.duration_s = ctx.settings.handshake_timeout
            ctx.access.write(record)

    # -- helpers ------------------------------------------------------------------------
    def _held(self, conn: NativeConnection, origin: int) -> Member:
        """The origin the engine is asking (or asked last): it holds the
        upgrade's connection count from now on, and counts as tried."""
        m = self.members[origin]
        conn.dial.hold(m)
        return m

    @staticmethod
    def _name(conn: NativeConnection, origin: str) -> None:
        """The access record names the origin asked last and how many were tried."""
        if conn.record is not None:
            conn.record.origin = origin
            conn.record.tries = len(conn.dial.tried)

    @staticmethod
    def _timed(member: Member, seconds: float | None) -> None:
        """The connect to ``member`` the engine timed (its connect_time(), taken
        once: None after an interim answer took it), into its
        wsrelay_origin_connect_seconds."""
        if seconds is not None:
            member.pool.connected(member, seconds)

    def _answered_by(self, conn: NativeConnection, origin: int, attempts, connect_s: float | None) -> Member:
        """The origin that answered (engine index ``origin``): the attempts that
        failed before it counted, it holds the upgrade's count, its connect
        timed, the access record names it."""
        if attempts:
            self._failures(conn, attempts, origin)
        member = self._held(conn, origin)
        self._timed(member, connect_s)
        self._name(conn, member.name)
        return member

    def _failures(self, conn: NativeConnection, attempts, answered: int = -1) -> None:
        """Count and log each failed attempt as relay/origins/dial.py and
        relay/upgrade.py do: a connect failure once per origin none of whose
        addresses took the connection (as create_connection tries them all),
        a close without a byte each time."""
        refused: dict[int, int] = {}
        dial = conn.dial
        for origin, kind, err in attempts:
            m = self.members[origin]
            dial.tried_too(m)
            if kind == _CONNECT:
                refused[origin] = err
            elif kind == _CLOSED:
                m.pool.failed(m, "closed", str(OriginClosed()))
        for origin, err in refused.items():
            if origin != answered:
                m = self.members[origin]
                m.pool.failed(m, "connect", self.resolver.error(origin) or os.strerror(err))

    def _bad_answer(self, conn: NativeConnection, member: Member, e: HeadError, reason: str = "invalid") -> None:
        self._name(conn, member.name)
        member.pool.failed(member, reason, str(e))
        conn.fail(e.status, e.outcome)

    def _relay_refusal(self, cid: int, conn: NativeConnection, resp) -> None:
        """The origin refused (any final status but 101): the Python plane relays
        its answer, body and all (relay/upgrade.py), from the sockets and bytes
        handed over; counted and logged as relay/upgrade.py does."""
        ctx = self.ctx
        ctx.admission.give(conn.client_ip)
        conn.dial.release()  # no tunnel: the origin's count goes back as its answer is relayed
        ctx.counters.upgrade("origin_rejected", resp.status)
        rec = conn.record
        if rec is not None:
            rec.status = resp.status
            rec.outcome = "origin_rejected"
        if conn.tls is not None:
            return self._offload(cid, conn.client_ip, conn.tls, lambda c, ofd, obytes: HandedOverRefusal(
                c, socket.socket(fileno=ofd), obytes, resp, rec), conn.started)
        cfd, ofd, _cbytes, obytes = self.engine.detach(cid)
        origin = socket.socket(fileno=ofd)
        client = ClientConnection(ctx, serve=lambda c: HandedOverRefusal(c, origin, obytes, resp, rec),
                                  started=conn.started)
        self._adopt(client, cfd)

    def _to_python(self, cid: int, tls=None, ip: str = "-") -> None:
        """Plain HTTP, a head that does not parse, an upgrade before the origins
        are resolved: the Python plane serves it from the bytes read so far
        (``tls``: as on_head's)."""
        if tls:
            return self._offload(cid, ip, tls)
        cfd, _ofd, data, _ = self.engine.detach(cid)
        # False: no TLS record came on a TLS listener; the Python plane's TLS
        # connection reads what came and answers it (nginx's 400)
        conn = ClientConnection(self.ctx, self.tls_server) if tls is False else ClientConnection(self.ctx)
        conn.unread(data)
        self._adopt(conn, cfd)

    def _offload(self, cid: int, ip: str, tls, serve=None, started: float = 0.0) -> None:
        """A TLS connection the Python plane serves (``serve``: with the
        origin's answer, ``serve(conn, origin fd, its bytes)``): its SSL cannot
        leave the engine, so the pump relays it, decrypted, to one end of a
        socket pair whose other end is a relay/client.py connection told who
        the client is and how TLS went."""
        ctx = self.ctx
        ours, theirs = socket.socketpair()
        try:
            ofd, data, obytes, _tid = self.engine.tls_offload(cid, ours.fileno(), ctx.native.tls_engine(),
                                                              Offload(tls))
        except (OSError, ValueError):
            ours.close()
            theirs.close()
            self.engine.close_handshake(cid)
            return
        ours.detach()  # the engine's now
        facts = (ip, tls.version() or "", tls.session_reused)
        if serve is None:
            conn = ClientConnection(ctx, behind_tls=facts)
            conn.unread(data)
        else:
            conn = ClientConnection(ctx, serve=lambda c: serve(c, ofd, obytes), started=started, behind_tls=facts)
        if serve is None and ofd >= 0:
            os.close(ofd)
        self._adopt_socket(conn, theirs)

    def _adopt(self, conn: ClientConnection, fd: int) -> None:
        self._adopt_socket(conn, socket.socket(fileno=fd))

    def _adopt_socket(self, conn: ClientConnection, sock: socket.socket) -> None:
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(_consume)


def _consume(task: asyncio.Task) -> None:
    # connect_accepted_socket closes the socket itself when it fails
    if not task.cancelled():
        task.exception()


class _Draining:
    """While the worker drains, the head phase's connections and the fast
    path's tunnels (which have no Python object) count among the worker's
    connections (relay.context.Context.connections): it waits for them as
    for the others, and closes what is left when its window ends."""

    def __init__(self, front: NativeFront) -> None:
        self.front = front
        self.on = False

    @property
    def connections(self) -> int:
        """How many connections in the head phase it stands for (the drain's log line counts them)."""
        return self.front.engine.handshakes_live

    @property
    def tunnels(self) -> int:
        """How many fast-path tunnels it stands for."""
        return self.front.engine.fast_path_stats["open"]

    def start(self) -> None:
        self.on = True
        self.front.ctx.connections.add(self)
        self.check()

    def check(self) -> None:
        if self.on and not self.front.engine.handshakes_live and not self.tunnels:
            self.on = False
            ctx = self.front.ctx
            ctx.connections.discard(self)
            ctx.maybe_idle()

    def drain(self) -> None:
        """Connections accepted before the drain keep their head phase (their first request is served)."""

    def close(self) -> None:
        self.front.engine.close_handshakes()
        for engine in self.front.ctx.native.engines():  # wss:// tunnels are on the TLS engine
            engine.close_fast()
        self.check()


class _Resolver:
    """Each origin's addresses for the engine: numeric ones as given, host names
    resolved off the loop now and every RESOLVE_EVERY seconds."""

    def __init__(self, front: NativeFront, origins) -> None:
        self.front = front
        self.origins = origins
        self.addrs: list[list[tuple]] = []
        self.errors: list[str] = ["" for _ in origins]
        self.named: list[bool] = []
        for a in origins:
            try:
                ipaddress.ip_address(a.host)
            except ValueError:
                self.addrs.append([])
                self.named.append(True)
            else:
                self.addrs.append([(a.host, a.port)])
                self.named.append(False)
        pending = any(self.named)
        self.ready = not pending
        front.engine.set_origins(self.addrs)
        self.task = asyncio.ensure_future(self._run()) if pending else None

    def error(self, origin: int) -> str:
        """Why an origin has no address (its last resolution's error), or ""."""
        return self.errors[origin] if not self.addrs[origin] else ""

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for i, a in enumerate(self.origins):
                if not self.named[i]:
                    continue
                try:
                    infos = await loop.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)
                except OSError as e:
                    self.errors[i] = e.strerror or str(e)
                    if self.ready:  # keep the last good answer: a resolver hiccup is not an outage
                        continue
                    self.addrs[i] = []
                else:
                    self.addrs[i] = [info[4] for info in infos]
                    self.errors[i] = ""
            self.front.engine.set_origins(self.addrs)
            self.ready = True
            await asyncio.sleep(RESOLVE_EVERY)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
