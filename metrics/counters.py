"""A worker's counters by name: the facade over its slot of shared memory
(:mod:`metrics.layout`), so no other module does slot arithmetic.

The worker is the slot's only writer (plain stores, no lock); the supervisor
and sibling workers read it, tolerating a value one update old. Each method
is a handful of float stores, called per event (a handshake, a request, a
close), never per chunk.
"""

from __future__ import annotations

from metrics import layout

_OUTCOME = {name: layout.UPGRADES + i for i, name in enumerate(layout.OUTCOMES)}
_PROXY_ERROR = {name: layout.PROXY_PROTOCOL_ERRORS + i for i, name in enumerate(layout.PROXY_ERRORS)}
_HANDSHAKE_SUM = layout.HANDSHAKE + len(layout.HANDSHAKE_BUCKETS) + 1
_DURATION_SUM = layout.DURATION + len(layout.DURATION_BUCKETS) + 1
_LAST_CODE = layout.HTTP_CODES - 1
_TLS = {name: layout.TLS_HANDSHAKES + i for i, name in enumerate(layout.TLS_OUTCOMES)}


class Counters:
    """Named access to one worker's slot; ``view`` is its float64 memoryview."""

    __slots__ = ("_m",)

    def __init__(self, view: memoryview) -> None:
        self._m = view

    # -- events -------------------------------------------------------------------
    def upgrade(self, outcome: str, status: int, handshake_s: float | None = None) -> None:
        """An upgrade ended with ``outcome`` (one of layout.OUTCOMES), answered ``status``;
        ``handshake_s``: seconds from the first byte of the request to the 101."""
        m = self._m
        m[_OUTCOME[outcome]] += 1
        m[layout.HTTP + status] += 1
        if handshake_s is not None:
            m[layout.HANDSHAKE + layout.bucket_index(layout.HANDSHAKE_BUCKETS, handshake_s)] += 1
            m[_HANDSHAKE_SUM] += handshake_s

    def http(self, status: int) -> None:
        """A request answered ``status`` (0-599; refusals and 499 client aborts included)."""
        self._m[layout.HTTP + min(max(status, 0), _LAST_CODE)] += 1

    def tunnel_ended(self, duration_s: float) -> None:
        m = self._m
        m[layout.DURATION + layout.bucket_index(layout.DURATION_BUCKETS, duration_s)] += 1
        m[_DURATION_SUM] += duration_s

    def close(self, side: int, code: int) -> None:
        """A WebSocket Close with ``code`` went in ``side``'s stream (0 client, 1 origin)."""
        self._m[layout.close_index(side, code)] += 1

    def ping_timeout(self) -> None:
        self._m[layout.PING_TIMEOUTS] += 1

    def tls_handshake(self, outcome: str) -> None:
        """A TLS handshake ended with ``outcome`` (one of layout.TLS_OUTCOMES)."""
        self._m[_TLS[outcome]] += 1

    def tls_handshakes_view(self) -> memoryview:
        """The TLS handshake counts, one float64 per layout.TLS_OUTCOMES, for a
        writer in C (relay/native/handshake.c: this worker's slot, this worker alone)."""
        return self._m[layout.TLS_HANDSHAKES:layout.TLS_HANDSHAKES + len(layout.TLS_OUTCOMES)]

    def fast_path(self) -> tuple[memoryview, tuple[int, ...], tuple[tuple[float, ...], tuple[float, ...]]]:
        """For a writer in C (relay/native/fast_path.c, this worker alone): the
        slot, where an upgraded outcome, a 101, the handshake and tunnel
        duration histograms (buckets..., +Inf, sum) and the open tunnels gauge
        are in it, and those histograms' bounds."""
        counts = (_OUTCOME["upgraded"], layout.HTTP + 101, layout.HANDSHAKE, layout.DURATION, layout.CONNECTIONS)
        return self._m, counts, (layout.HANDSHAKE_BUCKETS, layout.DURATION_BUCKETS)

    def proxy_error(self, reason: str) -> None:
        """A connection closed in its PROXY protocol phase, for ``reason`` (one of layout.PROXY_ERRORS)."""
        self._m[_PROXY_ERROR[reason]] += 1

    def accept_error(self) -> None:
        self._m[layout.ACCEPT_ERRORS] += 1

    # -- published values (cumulative totals or gauges) ------------------------------
    def tunnel_opened(self) -> None:
        """The open tunnels gauge, up one. Changed by steps, not set: the fast
        path in C (relay/native/fast_path.c) counts its tunnels into the same gauge."""
        self._m[layout.CONNECTIONS] += 1

    def tunnel_closed(self) -> None:
        self._m[layout.CONNECTIONS] -= 1

    def bytes(self, up: int, down: int) -> None:
        self._m[layout.BYTES] = up
        self._m[layout.BYTES + 1] = down

    def messages(self, up: int, down: int) -> None:
        self._m[layout.MESSAGES] = up
        self._m[layout.MESSAGES + 1] = down

    def heartbeat(self, now: float) -> None:
        """The worker's event loop turned at ``now`` (time.monotonic())."""
        self._m[layout.HEARTBEAT] = now

    @property
    def last_heartbeat(self) -> float:
        return self._m[layout.HEARTBEAT]

    # -- accept balancing (workers/accept.py) -------------------------------------------
    @property
    def load(self) -> float:
        """Open connections of any kind, as of the worker's last accept."""
        return self._m[layout.LOAD]

    @load.setter
    def load(self, n: float) -> None:
        self._m[layout.LOAD] = n

    @property
    def accepting(self) -> bool:
        return bool(self._m[layout.ACCEPTING])

    @accepting.setter
    def accepting(self, on: bool) -> None:
        self._m[layout.ACCEPTING] = 1.0 if on else 0.0
