"""PROTOTYPE (milestone 2, off by default): the worker's head phase in C.

With ``WSRELAY_NATIVE_HANDSHAKE=1`` (and the native data plane in use) the
engine accepts, reads each request head and talks to the origin itself
(relay/native/handshake.c); Python is called once with a complete request
head and once with a complete response head, and decides as relay/client.py
does, with the same sans-I/O pieces: parse and validate, path and Origin
rules, admission, the forwarded head, the refusals, counting and the access
log. Plain HTTP is handed back to the Python path (relay.client) with the
bytes read so far.

Accepts are balanced across workers as workers/accept.py does, in C,
through the LOAD/ACCEPTING slots of shared memory (handshake.c).

Out of descriptors, the engine stops accepting for 250 ms at a time and
the failures are counted and logged as workers/accept.py does.

What this prototype does not do yet (so it is not the default): relaying a
rejection's body beyond the first read (the origin's non-101 answer is
written as read, then the connection closes),
origins named by host name (resolved once at start), the passive health of
origins beyond the first tried (a failure counts against the pool's first
choice), and the drain's
"first request of a connection accepted before the drain is served" rule
beyond stopping accepts. It exists to measure the design (bench/RESULTS.md)
and will be wired through the client-connection seam of relay/client.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from relay import gate
from relay.client import ClientConnection
from relay.context import Context
from relay.errors import HeadError, RelayError
from relay.handshake import check_upgrade_response, is_upgrade
from relay.headers import forward_head, request_id_for
from relay.http_head import parse_request_head, parse_response_head
from relay.native.plane import NativeTunnel, _share_strings
from relay.origins.answer import MAX_RESPONSE_HEAD
from relay.origins.dial import Dial
from relay.responses import refusal
from relay.upgrade import GATEWAY_ERRORS
from workers.accept import LOG_EVERY, PAUSE

ENV = "WSRELAY_NATIVE_HANDSHAKE"
log = logging.getLogger("wsrelay.worker")


def _numeric(origins) -> list[tuple[str, int]]:
    out = []
    for a in origins:
        info = socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)[0]
        out.append((info[4][0], a.port))
    return out


class NativeFront:
    """Accepts on ``socks`` through the engine and answers its callbacks."""

    def __init__(self, ctx: Context, socks: list[socket.socket], mine=None, siblings=()) -> None:
        """``mine``/``siblings``: this worker's and the other workers' raw slots
        of shared memory (relay.shared_memory.SharedState.values), to balance accepts."""
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        s = ctx.settings
        self.engine = ctx.native.engine
        self.engine.handshakes(self._head, self._response, self._failed, self._timeout,
                               max_head=s.max_header_bytes, head_timeout=s.handshake_timeout,
                               connect_timeout=s.connect_timeout)
        #: each origin of each pool, resolved once (module docstring)
        self.addrs = {m: _numeric([m.addr])[0] for pool in ctx.pools.values() for m in pool.members}
        #: upgrades waiting for their origin: id -> (record, key, client ip, started, origins in order)
        self.pending: dict[int, tuple] = {}
        self.socks = socks
        if mine is not None and siblings:
            from metrics import layout

            self.engine.balance(mine, list(siblings), layout.LOAD, layout.ACCEPTING)
        for sock in socks:
            self.engine.listen(sock.fileno())
        ctx.counters.accepting = True
        self.fd = self.engine.hs_fileno()
        self.loop.add_reader(self.fd, self.engine.poll_handshakes)
        self.accept_errors = self.logged_errors = 0
        self.last_log = -LOG_EVERY
        self._timer = self.loop.call_later(0.1, self._tick)

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
        self._timer = self.loop.call_later(0.1, self._tick)

    def close(self) -> None:
        """Stop accepting (drain): what is in the backlog stays for the siblings."""
        self.engine.accepting = False
        self.ctx.counters.accepting = False
        for sock in self.socks:
            sock.close()

    # -- the engine's callbacks ------------------------------------------------------
    def _head(self, cid: int, data: bytes, head_end: int, peer: tuple[str, int]) -> None:
        ctx = self.ctx
        ip = peer[0]
        try:
            req = parse_request_head(data, ctx.settings.max_header_bytes)
        except HeadError as e:
            ctx.counters.http(e.status)
            self.engine.refuse(cid, refusal(e.status))
            return
        if req is None or not is_upgrade(req) or ctx.tunnel_class.counts_messages:
            self._to_python(cid)
            return
        started = time.monotonic()
        trusted = ip in ctx.trusted
        request_id = request_id_for(req, trusted)
        rec = ctx.access.record(ip, req.method, req.path, req.get(b"user-agent"), req.get(b"x-forwarded-for"),
                                request_id.decode())
        rec.data_plane = "native"
        try:
            key, pool = gate.admit_upgrade(ctx, req, ip, True)
        except RelayError as e:
            return self._refuse(cid, e.status, e.outcome, rec, started)
        try:
            first = Dial(pool, req).choose()  # the pool's balancer: the engine tries it first
        except RelayError as e:  # every origin at RELAY_MAX_CONNS
            ctx.admission.give(ip)
            return self._refuse(cid, e.status, e.outcome, rec, started)
        order = [first] + [m for m in pool.members if m is not first]
        rec.pool = pool.name
        self.pending[cid] = (rec, key, ip, started, order)
        self.engine.connect(cid, [self.addrs[m] for m in order],
                            forward_head(req, ip, ctx.proto, True, request_id, trusted=trusted))

    def _response(self, cid: int, data: bytes, head_end: int, index: int) -> None:
        rec, key, ip, started, order = self.pending.pop(cid)
        ctx = self.ctx
        member = order[index]
        pool = member.pool
        if index:  # the first did not accept the connection: the count moves on
            pool.closed(order[0])
            pool.opened(member)
        rec.origin = member.name
        rec.tries = index + 1
        try:
            resp = parse_response_head(data, MAX_RESPONSE_HEAD)
            if resp is None:
                raise HeadError(502, "incomplete origin answer", "origin_error")
            if resp.status in GATEWAY_ERRORS:
                pool.failed(member, "status_5xx", f"{resp.status} to an upgrade", resp.status)
            else:
                pool.answered(member)
            if resp.status != 101:
                pool.closed(member)
                rec.status = resp.status
                rec.outcome = "origin_rejected"
                ctx.counters.upgrade("origin_rejected", resp.status)
                ctx.admission.give(ip)
                ctx.access.write(rec)
                self.engine.refuse(cid, data)  # prototype: the answer as read (module docstring)
                return
            check_upgrade_response(resp, key)
        except HeadError as e:
            pool.closed(member)
            ctx.admission.give(ip)
            return self._refuse(cid, e.status, e.outcome, rec, started)
        handshake_s = time.monotonic() - started
        rec.status = 101
        rec.outcome = "upgraded"
        rec.handshake_ms = round(handshake_s * 1000, 3)
        ctx.counters.upgrade("upgraded", 101, handshake_s)
        _share_strings(rec)
        tunnel = NativeTunnel(ctx.native, -1, -1, rec)
        tunnel.upstream = member  # its connection count, given back when the tunnel ends
        ctx.tunnels.add(tunnel)
        ctx.counters.tunnels(len(ctx.tunnels))
        tunnel.id = self.engine.splice(cid, data, tunnel)

    def _failed(self, cid: int, err: int) -> None:
        rec, _key, ip, started, order = self.pending.pop(cid)
        self.ctx.admission.give(ip)
        order[0].pool.closed(order[0])
        if err == errno.ECONNABORTED:  # the client left while its origin was asked
            self.engine.close_handshake(cid)
            return
        # every origin of the pool was tried (the first counts the failure; the
        # engine does not say which of the others failed how)
        order[0].pool.failed(order[0], "connect", os.strerror(err))
        rec.origin = order[-1].name
        rec.tries = len(order)
        self._refuse(cid, 502, "origin_error", rec, started)

    def _timeout(self, cid: int, phase: str, nbytes: int) -> None:
        if phase == "head":
            if nbytes:
                self.ctx.counters.http(408)
            return
        rec, _key, ip, started, order = self.pending.pop(cid)
        self.ctx.admission.give(ip)
        order[0].pool.closed(order[0])
        order[0].pool.failed(order[0], "timeout", "no answer to an upgrade within RELAY_CONNECT_TIMEOUT", 504)
        rec.origin = order[0].name
        self._refuse(cid, 504, "timeout", rec, started)

    # -- helpers ------------------------------------------------------------------------
    def _refuse(self, cid: int, status: int, outcome: str, rec, started: float) -> None:
        ctx = self.ctx
        ctx.counters.upgrade(outcome, status)
        rec.status = status
        rec.outcome = outcome
        rec.duration_s = round(time.monotonic() - started, 3)
        ctx.access.write(rec)
        self.engine.refuse(cid, refusal(status))

    def _to_python(self, cid: int) -> None:
        """Plain HTTP (or frames mode): the Python path serves it from here."""
        cfd, _ofd, data, _ = self.engine.detach(cid)
        sock = socket.socket(fileno=cfd)
        conn = ClientConnection(self.ctx)
        conn.buf += data
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
