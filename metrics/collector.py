"""A prometheus-client collector over the per-worker counters in shared memory.

Why a custom collector rather than prometheus-client's multiprocess mode:
multiprocess mode keeps one mmap'd file per process and metric and merges them
on every scrape, leaves files behind for dead pids, and labels by pid; here
the workers already keep their figures in one shared array (a store per event,
no file I/O), the supervisor owns the history of each worker *index*, and a
scrape is one pass over a few KiB. prometheus-client still does the exposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from metrics import layout


class Source(Protocol):
    version: str
    data_plane: str  # what serves tunnels: "native" or "python" (relay/native)

    def per_worker(self) -> dict[str, list[float]]: ...  # worker index -> layout values
    def clients(self) -> int: ...
    def limit(self) -> int: ...
    def restarts(self) -> int: ...
    def processes(self) -> dict[str, tuple[float, float, float]]: ...  # index -> rss, cpu s, fds
    def certificates(self) -> dict[str, float]: ...  # name -> expiry, Unix time
    def origins(self) -> Iterable: ...  # metrics.source.OriginFigures, one per origin of each pool
    def cluster(self) -> dict | None: ...  # cluster mode's figures, None when off


def _cumulative(buckets: tuple[float, ...], counts: list[float]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, c in zip((*(str(b) for b in buckets), "+Inf"), counts):
        running += c
        out.append((bound, running))
    return out


def _histogram(name: str, doc: str, buckets: tuple[float, ...], base: int,
               data: dict[str, list[float]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["worker"])
    for worker, v in data.items():
        h.add_metric([worker], _cumulative(buckets, v[base: base + len(buckets) + 1]), v[base + len(buckets) + 1])
    return h


def _origins(figures: list) -> Iterator[Metric]:
    """Per origin of each pool (README, "Routes and origins")."""
    labels = ["pool", "origin"]
    up = GaugeMetricFamily("wsrelay_origin_up", "1 while the origin's health check passes and it is not "
                           "taken out after failures (0 until it answers again)", labels=labels)
    conns = GaugeMetricFamily("wsrelay_origin_connections", "Open connections to the origin (tunnels, "
                              "requests in flight, connects), across workers", labels=labels)
    errors = CounterMetricFamily("wsrelay_origin_errors", "Origin failures by reason",
                                 labels=[*labels, "reason"])
    connect = HistogramMetricFamily("wsrelay_origin_connect_seconds", "TCP connect time to the origin",
                                    labels=labels)
    n = len(layout.CONNECT_BUCKETS)
    for f in figures:
        key = [f.pool, f.origin]
        up.add_metric(key, 1.0 if f.up else 0.0)
        conns.add_metric(key, f.connections)
        for reason, count in zip(layout.ORIGIN_REASONS, f.errors):
            errors.add_metric([*key, reason], count)
        connect.add_metric(key, _cumulative(layout.CONNECT_BUCKETS, f.connect[: n + 1]), f.connect[n + 1])
    yield from (up, conns, errors, connect)


class RelayCollector:
    def __init__(self, source: Source):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        src = self.source
        data = src.per_worker()
        info = GaugeMetricFamily("wsrelay_build_info", "wsrelay version and the data plane serving tunnels",
                                 labels=["version", "data_plane"])
        info.add_metric([src.version, src.data_plane], 1)
        yield info

        g = GaugeMetricFamily("wsrelay_websocket_connections", "Open WebSocket tunnels", labels=["worker"])
        for w, v in data.items():
            g.add_metric([w], v[layout.CONNECTIONS])
        yield g

        c = CounterMetricFamily("wsrelay_websocket_upgrades", "WebSocket upgrade attempts by outcome",
                                labels=["worker", "outcome"])
        for w, v in data.items():
            for i, outcome in enumerate(layout.OUTCOMES):
                c.add_metric([w, outcome], v[layout.UPGRADES + i])
        yield c

        c = CounterMetricFamily("wsrelay_http_requests", "Responses by status code (upgrades included)",
                                labels=["worker", "code"])
        for w, v in data.items():
            for code in range(100, layout.HTTP_CODES):
                n = v[layout.HTTP + code]
                if n:
                    c.add_metric([w, str(code)], n)
        yield c

        c = CounterMetricFamily("wsrelay_bytes", "Bytes relayed through tunnels", labels=["worker", "direction"])
        for w, v in data.items():
            for i, direction in enumerate(layout.DIRECTIONS):
                c.add_metric([w, direction], v[layout.BYTES + i])
        yield c

        c = CounterMetricFamily("wsrelay_messages", "WebSocket messages relayed (frames mode)",
                                labels=["worker", "direction"])
        for w, v in data.items():
            for i, direction in enumerate(layout.DIRECTIONS):
                c.add_metric([w, direction], v[layout.MESSAGES + i])
        yield c

        c = CounterMetricFamily("wsrelay_closes", "Close frames seen or sent (frames mode)",
                                labels=["worker", "side", "code"])
        for w, v in data.items():
            for s, side in enumerate(layout.SIDES):
                for i, code in enumerate((*layout.CLOSE_CODES, "other")):
                    n = v[layout.CLOSES + s * (len(layout.CLOSE_CODES) + 1) + i]
                    if n:
                        c.add_metric([w, side, str(code)], n)
        yield c

        c = CounterMetricFamily("wsrelay_ping_timeouts", "Tunnels dropped for a peer that did not answer "
                                "the relay's ping (frames mode)", labels=["worker"])
        for w, v in data.items():
            c.add_metric([w], v[layout.PING_TIMEOUTS])
        yield c

        c = CounterMetricFamily("wsrelay_accept_errors", "Failed accept() calls (EMFILE and the like)",
                                labels=["worker"])
        for w, v in data.items():
            c.add_metric([w], v[layout.ACCEPT_ERRORS])
        yield c

        c = CounterMetricFamily("wsrelay_proxy_protocol_errors", "Connections closed in their PROXY protocol "
                                "phase, by reason", labels=["worker", "reason"])
        for w, v in data.items():
            for i, reason in enumerate(layout.PROXY_ERRORS):
                c.add_metric([w, reason], v[layout.PROXY_PROTOCOL_ERRORS + i])
        yield c

        c = CounterMetricFamily("wsrelay_tls_handshakes", "TLS handshakes on RELAY_TLS_LISTEN by outcome",
                                labels=["worker", "outcome"])
        for w, v in data.items():
            for i, outcome in enumerate(layout.TLS_OUTCOMES):
                c.add_metric([w, outcome], v[layout.TLS_HANDSHAKES + i])
        yield c

        certificates = src.certificates()
        if certificates:
            g = GaugeMetricFamily("wsrelay_tls_certificate_expiry_timestamp_seconds",
                                  "When each served TLS certificate expires (notAfter, Unix time)", labels=["name"])
            for name, expiry in sorted(certificates.items()):
                g.add_metric([name], expiry)
            yield g

        yield _histogram("wsrelay_handshake_seconds", "From the request's first byte to the 101 relayed",
                         layout.HANDSHAKE_BUCKETS, layout.HANDSHAKE, data)
        yield _histogram("wsrelay_websocket_duration_seconds", "Lifetime of finished tunnels",
                         layout.DURATION_BUCKETS, layout.DURATION, data)

        g = GaugeMetricFamily("wsrelay_clients", "WebSocket clients counted against the global limit")
        g.add_metric([], src.clients())
        yield g
        g = GaugeMetricFamily("wsrelay_clients_limit", "The host's limit: RELAY_MAX_CLIENTS, "
                              "or the lease from Redis when lower (cluster mode)")
        g.add_metric([], src.limit())
        yield g
        c = CounterMetricFamily("wsrelay_worker_restarts", "Workers restarted after dying")
        c.add_metric([], src.restarts())
        yield c

        yield from _cluster(src.cluster())

        procs = src.processes()
        rss = GaugeMetricFamily("wsrelay_worker_resident_memory_bytes", "Worker RSS", labels=["worker"])
        cpu = CounterMetricFamily("wsrelay_worker_cpu_seconds", "Worker CPU time (user+system)", labels=["worker"])
        fds = GaugeMetricFamily("wsrelay_worker_open_fds", "Worker open file descriptors", labels=["worker"])
        for w, (r, t, f) in procs.items():
            rss.add_metric([w], r)
            cpu.add_metric([w], t)
            fds.add_metric([w], f)
        yield rss
        yield cpu
        yield fds
        yield from _origins(list(src.origins()))


#: Every reason a lease call can fail (each gets a series from the start).
LEASE_ERRORS = ("timeout", "connection", "response", "other")


def _cluster(figures: dict | None) -> Iterator[Metric]:
    """Cluster mode (README, "A fleet"): the host's lease and what Redis said last."""
    if figures is None:
        return
    name = [figures["name"]]
    for metric, doc, key in (
            ("wsrelay_cluster_leased_slots", "Slots of the fleet limit this host leases from Redis", "leased"),
            ("wsrelay_cluster_limit", "The fleet-wide limit (RELAY_CLUSTER_LIMIT)", "limit"),
            ("wsrelay_cluster_clients", "Clients held by the whole fleet, as of this host's last lease call",
             "fleet_clients"),
            ("wsrelay_cluster_hosts", "Hosts holding a lease, as of this host's last lease call", "hosts"),
            ("wsrelay_cluster_redis_up", "1 if this host's last call to Redis succeeded", "redis_up"),
            ("wsrelay_cluster_fallback", "1 while RELAY_CLUSTER_FALLBACK applies (lease expired without Redis)",
             "fallback")):
        g = GaugeMetricFamily(metric, doc, labels=["cluster"])
        g.add_metric(name, float(figures[key]))
        yield g
    c = CounterMetricFamily("wsrelay_cluster_lease_errors", "Failed lease calls to Redis by reason",
                            labels=["cluster", "reason"])
    errors = figures["errors"]
    for reason in (*LEASE_ERRORS, *(r for r in errors if r not in LEASE_ERRORS)):
        c.add_metric([figures["name"], reason], errors.get(reason, 0))
    yield c
