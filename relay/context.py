"""A worker's shared state: settings turned into ready-to-use values, the open
connections, the counters in its shared-memory slot, and the once-a-second
sweep that publishes byte counts, enforces the idle timeout and, in frames
mode, pings silent peers and ends overdue closes (relay/frames_tunnel.py).

Counting happens per connection, never per chunk: a tunnel's byte counts (and
in frames mode its message counts) are plain attributes of its sides; the
sweep sums them into the slot.
"""

from __future__ import annotations

import asyncio
import time

from metrics.counters import Counters
from relay.config import Settings
from relay.logs import AccessLog, AccessRecord
from relay.origin import Origins
from relay.shared import Admission
from relay.tunnel import Tunnel


class Context:
    def __init__(self, settings: Settings, index: int, admission: Admission, counters: Counters):
        self.settings = settings
        self.index = index
        self.admission = admission
        #: this worker's counters in shared memory (metrics/counters.py)
        self.counters = counters
        self.ws_paths = tuple(p.encode() for p in settings.ws_paths)
        self.proto = settings.forwarded_proto.encode()
        self.origins = Origins(settings.origin)
        self.tunnels: set[Tunnel] = set()
        #: connections before a tunnel exists (head phase, plain HTTP)
        self.connections: set = set()
        #: idle origin connections for plain HTTP (relay.http_proxy)
        self.http_pool: list = []
        self.draining = False
        self.idle = asyncio.Event()
        self.access_log = settings.access_log
        self.access = AccessLog(settings.access_log, index)
        self._closed_up = 0
        self._closed_down = 0
        self.frames = settings.mode == "frames"
        self._closed_msgs_up = 0
        self._closed_msgs_down = 0
        self._sweeper: asyncio.TimerHandle | None = None

    # -- counting -----------------------------------------------------------------
    def count_upgrade(self, outcome: str, status: int, handshake_s: float | None = None) -> None:
        self.counters.upgrade(outcome, status, handshake_s)

    def count_http(self, status: int) -> None:
        self.counters.http(status)

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self.counters.tunnels(len(self.tunnels))

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self.admission.give(tunnel.record.client if tunnel.record is not None else None)
        self.counters.tunnels(len(self.tunnels))
        self._closed_up += tunnel.up
        self._closed_down += tunnel.down
        if self.frames:
            self._closed_msgs_up += tunnel.messages_up
            self._closed_msgs_down += tunnel.messages_down
        duration = time.monotonic() - tunnel.started
        self.counters.tunnel_ended(duration)
        # Bytes are published by the 1 s sweep, not here: publishing sums every
        # open tunnel, which at each close would cost O(open tunnels) (0.7 ms
        # with 10,000 open), i.e. a core's worth under churn. The counter stays
        # monotonic: the sweep adds this tunnel's final count to the closed sum.
        rec = tunnel.record
        if rec is not None and self.access_log:
            rec.duration_s = round(duration, 3)
            rec.bytes_up = tunnel.up
            rec.bytes_down = tunnel.down
            self.log(rec)
        self.maybe_idle()

    def maybe_idle(self) -> None:
        if self.draining and not self.tunnels and not self.connections:
            self.idle.set()

    def log(self, record: AccessRecord) -> None:
        self.access.write(record)

    def record(self, client: str, method: bytes, path: bytes) -> AccessRecord:
        return self.access.record(client, method, path)

    def _publish_bytes(self) -> None:
        up, down = self._closed_up, self._closed_down
        for t in self.tunnels:
            up += t.client.nbytes
            down += t.origin.nbytes
        self.counters.bytes(up, down)
        if self.frames:
            up, down = self._closed_msgs_up, self._closed_msgs_down
            for t in self.tunnels:
                up += t.messages_up
                down += t.messages_down
            self.counters.messages(up, down)

    # -- the sweep ----------------------------------------------------------------
    def start_sweeping(self) -> None:
        self.counters.heartbeat(time.monotonic())
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._publish_bytes()

    def _sweep(self) -> None:
        self.counters.heartbeat(time.monotonic())
        self._publish_bytes()
        limit = self.settings.idle_timeout
        if limit:
            now = time.monotonic()
            for t in list(self.tunnels):
                total = t.client.nbytes + t.origin.nbytes
                if total != t.last_bytes:
                    t.last_bytes = total
                    t.last_active = now
                elif now - t.last_active >= limit:
                    t.close()
        if self.frames:
            now = time.monotonic()
            s = self.settings
            for t in list(self.tunnels):
                t.keepalive(now, s.ping_interval, s.ping_timeout)
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
