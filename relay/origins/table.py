"""The origin table: what every process of a relay knows about each origin
(README, "Routes and origins"), in shared memory of its own (a memfd named
``wsrelay-origins``, beside relay/shared.py's), laid out by
:mod:`metrics.layout` (``ORIGIN_*``, ``O_*``)::

    [ header: capacity, nslots, slots in use            ]  float64 x 8
    [ names[capacity]       "pool/host:port", NUL-padded ]  ORIGIN_NAME_BYTES each
    [ state[capacity][O_SIZE]                            ]  float64: health, errors
    [ conns[capacity][nslots]                            ]  int64: open connections, one writer each
    [ connect[nslots + 1][capacity][O_CONNECT_SIZE]      ]  float64: connect-time histogram per
                                                             worker slot, the last row the dead ones'

One entry per (pool, origin) of the configurations running. The supervisor
names the entries before it starts a generation (:meth:`assign`), keeps an
entry across a reload while the origin stays in its pool (so least
connections counts the draining generation's tunnels too), and frees it
once no running generation has it. Workers find their entries by name.

Who writes what: a worker its own ``conns`` column and ``connect`` row (plain
stores); the health checker (workers/health.py) the ``O_CHECK*`` fields and
``O_PROBES``; the passive fields and error counts change under the table's
``fcntl`` lock (relay/origins/outlier.py), which the kernel releases if its
holder dies. Readers tolerate a value one update old.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterable

from metrics import layout
from relay.errors import ConfigError

_HEADER = 8
CAPACITY, NSLOTS, IN_USE = 0, 1, 2


def key(pool: str, origin: str) -> str:
    """An entry's name: ``pool/host:port``."""
    return f"{pool}/{origin}"


def _size(nslots: int) -> tuple[int, int, int, int, int]:
    """Offsets of names, state, conns, connect, and the total size."""
    cap = layout.ORIGIN_CAPACITY
    names = 8 * _HEADER
    state = names + cap * layout.ORIGIN_NAME_BYTES
    conns = state + 8 * cap * layout.O_SIZE
    connect = conns + 8 * cap * nslots
    total = connect + 8 * (nslots + 1) * cap * layout.O_CONNECT_SIZE
    return names, state, conns, connect, total


class OriginTable:
    """The table, created by the supervisor (``fd=None``) or attached by a worker."""

    def __init__(self, nslots: int, fd: int | None = None) -> None:
        self.nslots = nslots
        names, state, conns, connect, total = _size(nslots)
        if fd is None:
            self.fd = os.memfd_create("wsrelay-origins", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, total)
        else:
            size = os.fstat(fd).st_size
            if size != total:
                raise ValueError(f"origin table is {size} bytes, this layout needs {total}")
            self.fd = fd
        self._mm = mmap.mmap(self.fd, total)
        view = memoryview(self._mm)
        self.header = view[:names].cast("d")
        self._names = view[names:state]
        #: per entry, O_SIZE float64 each (metrics.layout O_*)
        self.state = view[state:conns].cast("d")
        #: per entry, nslots int64 each: open connections of each worker slot
        self.conns = view[conns:connect].cast("q")
        #: per slot (and one more for the dead), per entry, O_CONNECT_SIZE float64
        self.connect = view[connect:total].cast("d")
        if fd is None:
            self.header[CAPACITY] = layout.ORIGIN_CAPACITY
            self.header[NSLOTS] = nslots
            for e in range(layout.ORIGIN_CAPACITY):
                self.state[e * layout.O_SIZE + layout.O_CHECK] = 1.0

    @classmethod
    def attach(cls, fd: int, nslots: int) -> "OriginTable":
        return cls(nslots, fd)

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- names ----------------------------------------------------------------------
    def name(self, entry: int) -> str:
        size = layout.ORIGIN_NAME_BYTES
        raw = bytes(self._names[entry * size:(entry + 1) * size])
        return raw.rstrip(b"\0").decode()

    def entries(self) -> dict[str, int]:
        """Every named entry: ``pool/host:port`` -> its index."""
        out = {}
        for e in range(layout.ORIGIN_CAPACITY):
            n = self.name(e)
            if n:
                out[n] = e
        return out

    # -- the supervisor's side --------------------------------------------------------
    def assign(self, keys: Iterable[str], keep: Iterable[int] = (), dry_run: bool = False) -> dict[str, int]:
        """Give each of ``keys`` an entry: the one it had, or a free one, reset.
        Entries of neither ``keys`` nor ``keep`` (what draining generations
        still use) are freed. Raises ConfigError when there is no room
        (``dry_run``: only that, changing nothing)."""
        keys = list(dict.fromkeys(keys))
        for k in keys:
            if len(k.encode()) > layout.ORIGIN_NAME_BYTES:
                raise ConfigError([f"origin {k!r}: a pool and address over {layout.ORIGIN_NAME_BYTES} bytes"])
        have = self.entries()
        out = {k: have[k] for k in keys if k in have}
        used = set(out.values()) | set(keep)
        free = [e for e in range(layout.ORIGIN_CAPACITY) if e not in used]
        new = [k for k in keys if k not in out]
        if len(new) > len(free):
            raise ConfigError([f"{len(keys)} origins across the pools, and the running generations hold "
                               f"{len(used)} of the {layout.ORIGIN_CAPACITY} entries of the origin table: "
                               f"restart wsrelay, or use fewer pools and origins"])
        if dry_run:
            return out
        for k, e in zip(new, free):
            self._reset(e)
            self._write_name(e, k)
            out[k] = e
        for name, e in have.items():
            if name not in out and e not in used:
                self._write_name(e, "")
        return out

    def _write_name(self, entry: int, name: str) -> None:
        size = layout.ORIGIN_NAME_BYTES
        self._names[entry * size:(entry + 1) * size] = name.encode().ljust(size, b"\0")

    def _reset(self, entry: int) -> None:
        s = self.state
        base = entry * layout.O_SIZE
        for i in range(layout.O_SIZE):
            s[base + i] = 0.0
        s[base + layout.O_CHECK] = 1.0
        c = self.conns
        for i in range(entry * self.nslots, (entry + 1) * self.nslots):
            c[i] = 0
        step = layout.ORIGIN_CAPACITY * layout.O_CONNECT_SIZE
        for row in range(self.nslots + 1):
            start = row * step + entry * layout.O_CONNECT_SIZE
            for i in range(start, start + layout.O_CONNECT_SIZE):
                self.connect[i] = 0.0

    def slot_started(self, slot: int) -> None:
        """A worker takes ``slot``: readers sum the slots up to the highest in use."""
        if slot + 1 > self.header[IN_USE]:
            self.header[IN_USE] = slot + 1

    def retire_slot(self, slot: int) -> None:
        """A worker of ``slot`` is gone: its connections are closed, its
        connect times join the dead's row (counters never go backwards)."""
        c = self.conns
        for e in range(layout.ORIGIN_CAPACITY):
            c[e * self.nslots + slot] = 0
        step = layout.ORIGIN_CAPACITY * layout.O_CONNECT_SIZE
        src, dst = slot * step, self.nslots * step
        h = self.connect
        for i in range(step):
            v = h[src + i]
            if v:
                h[dst + i] += v
                h[src + i] = 0.0

    # -- readers --------------------------------------------------------------------
    def open_connections(self, entry: int) -> int:
        base = entry * self.nslots
        return sum(self.conns[base: base + int(self.header[IN_USE])])

    def connect_histogram(self, entry: int) -> list[float]:
        """Buckets (not cumulative), +Inf, sum: every slot's and the dead's."""
        size = layout.O_CONNECT_SIZE
        step = layout.ORIGIN_CAPACITY * size
        out = [0.0] * size
        for row in range(self.nslots + 1):
            start = row * step + entry * size
            for i in range(size):
                out[i] += self.connect[start + i]
        return out

    def up(self, entry: int) -> bool:
        """Its health check passes and it was not taken out, or answered since
        (``wsrelay_origin_up``). One taken out is tried again after its
        cool-down, but is not up until it answers."""
        base = entry * layout.O_SIZE
        return self.state[base + layout.O_CHECK] != 0.0 and not self.state[base + layout.O_EJECTED]

    def errors(self, entry: int) -> list[float]:
        base = entry * layout.O_SIZE + layout.O_ERRORS
        return list(self.state[base: base + len(layout.ORIGIN_REASONS)])

    def close(self) -> None:
        for v in (self.header, self._names, self.state, self.conns, self.connect):
            v.release()
        self._mm.close()
        os.close(self.fd)
