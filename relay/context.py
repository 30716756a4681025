"""A worker's shared state: settings turned into ready-to-use values, the open
connections and tunnels, the routes and origin pools, the counters in its
shared-memory slot, the access log, and the once-a-second sweep that
publishes byte counts, enforces the idle timeout, closes idle connections to
origins that are out, and runs the tunnel class's own housekeeping (frames
mode: pings, overdue closes).

The tunnel class is chosen once, here, from :data:`TUNNELS` keyed by
``RELAY_MODE``; nothing else asks which mode runs.

Counting happens per connection, never per chunk: a tunnel's byte counts (and
in frames mode its message counts) are plain attributes of its sides; the
sweep sums them into the slot. Tunnels on the native data plane
(relay/native, ``RELAY_DATA_PLANE``) are counted by their engine, read once
per sweep.
"""

from __future__ import annotations

import asyncio
import time

from metrics.counters import Counters
from relay import pools
from relay.addresses import TrustedProxies
from relay.config import Settings
from relay.frames_tunnel import FramesTunnel
from relay.http_head import Response
from relay.logs import AccessLog, AccessRecord
from relay.origins.balance import Member, OriginPool
from relay.origins.report import FailureLog
from relay.origins.table import OriginTable
from relay.routes import Router
from relay.shared_memory import Admission
from relay.tunnel import Tunnel

#: the tunnel class of each RELAY_MODE (README, "Settings")
TUNNELS: dict[str, type[Tunnel]] = {"tunnel": Tunnel, "frames": FramesTunnel}


class Context:
    def __init__(self, settings: Settings, index: int, admission: Admission, counters: Counters,
                 table: OriginTable | None = None, slot: int = 0):
        self.settings = settings
        self.index = index
        self.admission = admission
        #: this worker's counters in shared memory (metrics/counters.py)
        self.counters = counters
        self.access = AccessLog(settings.access_log, index)
        self.ws_paths = tuple(p.encode() for p in settings.ws_paths)
        self.proto = settings.forwarded_proto.encode()
        #: RELAY_TLS_CLIENT_HEADER while client certificates are asked for: the
        #: edge's own header (a client's is never passed on, on any listener)
        self.own_header = (settings.tls_client_header.lower().encode(), b"") if settings.tls_client_ca else None
        #: the ticket keys shared with the supervisor (relay/tls/tickets.py), on TLS workers
        self.ticket_keys = None
        if table is None:  # on its own (benchmarks, tests): a table of its own
            table = OriginTable(1)
            table.assign(pools.keys(settings))
            table.slot_started(0)
        self.table = table
        loop = asyncio.get_running_loop()
        failures = FailureLog()
        entries = table.entries()
        #: the origin pools by name (README, "Routes and origins"); each origin
        #: keeps its idle plain-HTTP connections, closed when draining starts
        self.pools = {p.name: OriginPool(p, table, entries, slot, loop, failures)
                      for p in pools.effective(settings)}
        #: which pool a request goes to (None: 404)
        self.router: Router[OriginPool] = Router(((r.host, r.path, self.pools[r.pool]) for r in settings.routes),
                                                 self.pools.get(pools.DEFAULT))
        #: every connection starts with a PROXY header (README, "Behind a load balancer")
        self.proxy_protocol = settings.proxy_protocol == "on"
        #: RELAY_TRUSTED_PROXIES: who may send that header, and whose X-Forwarded-For
        #: and X-Request-ID are kept
        self.trusted = TrustedProxies(settings.trusted_proxies)
        #: origins get a PROXY v2 header first on every connection
        self.origin_proxy_v2 = settings.origin_proxy_protocol == "v2"
        self.tunnel_class = TUNNELS[settings.mode]
        #: the native data plane (relay/native), when it serves this worker's tunnels
        self.native = None
        if settings.effective_data_plane() == "native":
            from relay.native.plane import NativePlane, NativeTunnel

            self.native = NativePlane(asyncio.get_running_loop(), self.tunnel_ended)
            self.tunnel_class = NativeTunnel
        self.tunnels: set[Tunnel] = set()
        #: connections before a tunnel exists (head phase, plain HTTP)
        self.connections: set = set()
        self.draining = False
        self.idle = asyncio.Event()
        self._closed_up = 0
        self._closed_down = 0
        self._closed_msgs_up = 0
        self._closed_msgs_down = 0
        self._sweeper: asyncio.TimerHandle | None = None

    # -- tunnels --------------------------------------------------------------------
    def open_tunnel(self, client: asyncio.Transport, origin: asyncio.Transport, record: AccessRecord,
                    response: Response, head: bytes, to_client: bytes, to_origin: bytes,
                    upstream: Member | None = None) -> Tunnel:
        """Join ``client`` and ``origin`` after the origin's 101 (``response``):
        ``head`` is that 101 as received, ``to_client`` what the origin sent
        after it, ``to_origin`` what the client sent after its request;
        ``upstream``: the origin, whose connection count the tunnel holds until it ends."""
        # TLS clients too: the native plane takes their SSL, or leaves them in Python (relay/native/plane.py)
        tunnel = self.tunnel_class.open(self, client, origin, record, response)
        tunnel.upstream = upstream
        self.tunnels.add(tunnel)
        self.counters.tunnel_opened()
        tunnel.start(head, to_client, to_origin)
        return tunnel

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        upstream = tunnel.upstream
        if upstream is not None:
            upstream.pool.closed(upstream)
        self.admission.give(tunnel.record.client if tunnel.record is not None else tunnel.client_ip)
        self.counters.tunnel_closed()
        self._closed_up += tunnel.up
        self._closed_down += tunnel.down
        if tunnel.counts_messages:
            self._closed_msgs_up += tunnel.messages_up
            self._closed_msgs_down += tunnel.messages_down
        duration = time.monotonic() - tunnel.started
        self.counters.tunnel_ended(duration)
        # Bytes are published by the 1 s sweep, not here: publishing sums every
        # open tunnel, which at each close would cost O(open tunnels) (0.7 ms
        # with 10,000 open), i.e. a core's worth under churn. The counter stays
        # monotonic: the sweep adds this tunnel's final count to the closed sum.
        rec = tunnel.record
        if rec is not None and self.access.enabled:
            rec.duration_s = round(duration, 3)
            rec.bytes_up = tunnel.up
            rec.bytes_down = tunnel.down
            self.access.write(rec)
        self.maybe_idle()

    # -- draining -------------------------------------------------------------------
    def start_draining(self) -> None:
        """Stop keeping anything for later: idle keep-alive connections and
        pooled origin connections close; what is in flight goes on."""
        self.draining = True
        for pool in self.pools.values():
            pool.close_idle()
        for conn in list(self.connections):
            conn.drain()
        self.maybe_idle()

    def maybe_idle(self) -> None:
        if self.draining and not self.tunnels and not self.connections:
            self.idle.set()

    # -- the sweep ----------------------------------------------------------------
    def _publish_bytes(self) -> None:
        up, down = self._closed_up, self._closed_down
        if self.native is not None:
            nup, ndown = self.native.engine_bytes()
            up += nup
            down += ndown
        for t in self.tunnels:
            if not t.native:
                up += t.client.nbytes
                down += t.origin.nbytes
        self.counters.bytes(up, down)
        if self.tunnel_class.counts_messages:
            up, down = self._closed_msgs_up, self._closed_msgs_down
            for t in self.tunnels:
                up += t.messages_up
                down += t.messages_down
            self.counters.messages(up, down)

    def start_sweeping(self) -> None:
        self.counters.heartbeat(time.monotonic())
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._publish_bytes()
        if self.native is not None:
            self.native.stop()

    def _sweep(self) -> None:
        self.counters.heartbeat(time.monotonic())
        if self.ticket_keys is not None:
            self.ticket_keys.refresh()
        self._publish_bytes()
        limit = self.settings.idle_timeout
        now = time.monotonic()
        if limit:
            if self.native is not None:
                self.native.close_idle(limit)
            for t in list(self.tunnels):
                if t.native:
                    continue
                total = t.client.nbytes + t.origin.nbytes
                if total != t.last_bytes:
                    t.last_bytes = total
                    t.last_active = now
                elif now - t.last_active >= limit:
                    t.close()
        self.tunnel_class.sweep(self.tunnels, now, self.settings)
        for pool in self.pools.values():
            pool.sweep(now)
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
