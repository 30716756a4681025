"""What the Prometheus collector reads (metrics/collector.py ``Source``),
built from plain data the supervisor hands over: the live workers' slots and
pids, and the history of dead ones.

**Counters never go backwards for a worker index** (README, "Observability"):
when a worker dies, :meth:`History.fold` adds its final counters to its
index's history, and a restarted worker's counts add on top.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

from metrics import layout


class OriginFigures(NamedTuple):
    """One origin of one pool, from the origin table (relay/origins/table.py)."""

    pool: str
    origin: str          # host:port
    up: bool             # requests go to it
    connections: int     # open, across workers
    errors: list[float]  # by layout.ORIGIN_REASONS, cumulative
    connect: list[float]  # layout.CONNECT_BUCKETS counts (not cumulative), +Inf, sum


class LiveWorker(NamedTuple):
    index: int
    pid: int
    values: memoryview  # its slot, in metrics.layout order


class History:
    """Per worker index, the counters of its dead workers, summed."""

    def __init__(self) -> None:
        self.by_index: dict[int, list[float]] = {}

    def fold(self, index: int, values: memoryview) -> None:
        """A worker of ``index`` died with these final values (gauges are not history)."""
        hist = self.by_index.setdefault(index, [0.0] * layout.SIZE)
        for i in range(layout.SIZE):
            if i not in layout.GAUGES:
                hist[i] += values[i]


class Source:
    """The collector's view of a relay: ``live()`` gives the workers running now."""

    def __init__(self, version: str, history: History, live: Callable[[], Iterable[LiveWorker]],
                 indices: Callable[[], int], clients: Callable[[], int], limit: Callable[[], int],
                 restarts: Callable[[], int], data_plane: Callable[[], str] = lambda: "python",
                 certificates: Callable[[], dict[str, float]] = dict,
                 origins: Callable[[], Iterable[OriginFigures]] = lambda: (),
                 cluster: Callable[[], dict | None] = lambda: None) -> None:
        self.version = version
        self._data_plane = data_plane
        self.history = history
        self.live = live
        #: how many worker indices the configuration asks for (each gets a series from the start)
        self.indices = indices
        self.clients = clients
        self.limit = limit
        self.restarts = restarts
        #: served TLS certificates: metric label ``name`` -> expiry (Unix time)
        self.certificates = certificates
        #: every origin of the running pools: a label set bounded by the configuration
        self.origins = origins
        #: cluster mode's figures (workers/cluster.py ``figures``), None when it is off
        self.cluster = cluster

    @property
    def data_plane(self) -> str:
        """What serves tunnels: "native" or "python" (wsrelay_build_info's label)."""
        return self._data_plane()

    def per_worker(self) -> dict[str, list[float]]:
        out: dict[int, list[float]] = {}
        for index in range(self.indices()):
            out[index] = list(self.history.by_index.get(index, [0.0] * layout.SIZE))
        for index, hist in self.history.by_index.items():
            out.setdefault(index, list(hist))
        for w in self.live():
            acc = out.setdefault(w.index, [0.0] * layout.SIZE)
            values = w.values
            for i in range(layout.SIZE):
                acc[i] += values[i]
        return {str(i): v for i, v in sorted(out.items())}

    def processes(self) -> dict[str, tuple[float, float, float]]:
        """Per worker index: resident bytes, CPU seconds, open descriptors (from /proc)."""
        out: dict[int, list[float]] = {}
        for w in self.live():
            figures = process_figures(w.pid)
            if figures is None:
                continue
            acc = out.setdefault(w.index, [0.0, 0.0, 0.0])
            for i, v in enumerate(figures):
                acc[i] += v
        return {str(i): tuple(v) for i, v in sorted(out.items())}  # type: ignore[misc]


_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_figures(pid: int) -> tuple[float, float, float] | None:
    """(resident bytes, CPU seconds, open descriptors) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        rss = int(fields[21]) * _PAGE
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None
    return float(rss), cpu, float(fds)
