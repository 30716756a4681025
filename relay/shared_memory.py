"""Shared memory between the supervisor and its workers.

One anonymous file (memfd), mapped by the supervisor before it forks, so every
worker shares the same pages::

    [ header: limit, the per-IP table's size, entries and hash key ]  int64
    [ clients[slot] for every slot       ]  int64, one writer each
    [ counters[slot][metrics.layout.SIZE] ] float64, one writer each
    [ the per-IP table: 3 x capacity     ]  int64, under the lock (relay/ip_table.py)

The global client count is the sum of ``clients``. Taking a client is a
check-then-increment across processes, so it holds an ``fcntl`` record lock
for those few instructions: the kernel drops that lock when its holder dies,
so even a worker killed by SIGKILL inside the critical section cannot wedge
the others. While the sum is far from the limit (at most the limit minus
the slot count), a take skips the lock: an atomic add to its own slot, then
the sum read again (relay/native/_engine.c's admit_fast; exact, since each
worker has at most one take in flight). Giving a client back is a single aligned store by the slot's own
writer and needs no lock. When the supervisor reaps a worker it zeroes that
worker's ``clients`` slot under the lock, which is how a crash gives its
share back; it also drops that worker's entries from the per-IP table
(:meth:`relay.ip_table.IPTable.rebuild`).

Workers are separate interpreters (:mod:`workers.child`), possibly running a
newer wsrelay than the supervisor after an upgrade; they :meth:`SharedState.attach`
to the supervisor's memfd only if :func:`fingerprint` — this file's header
plus every constant of :mod:`metrics.layout` — is the same on both sides.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import time

from metrics import layout
from metrics.counters import Counters
from relay import ip_table
from relay.addresses import per_ip_key

try:  # the lock-free admission fast path; without the extension every take locks
    from relay.native._engine import admit_fast as _admit_fast
except ImportError:
    _admit_fast = None

log = logging.getLogger("wsrelay")
#: at most one log line per this many seconds about a full per-IP table
FULL_LOG_EVERY = 10.0
#: client addresses whose table place a worker keeps at hand
WHERE_CACHE = 4096

_HEADER = 8  # int64 slots in the header
LIMIT = 0
TABLE_CAPACITY = 1   # buckets of the per-IP table, fixed at start
TABLE_USED = 2       # its entries in use
TABLE_SECRET = 3     # 3 and 4: the key of its bucket hash (random per relay)
#: Bump on any change to the header or to how slots are laid out above.
VERSION = 2


def fingerprint() -> str:
    """What a process must agree on to share the memory: the header version and
    size, and every constant of :mod:`metrics.layout` (offsets, buckets, codes)."""
    consts = sorted((k, v) for k, v in vars(layout).items() if k.isupper() and isinstance(v, (int, float, tuple)))
    digest = hashlib.sha256(repr((VERSION, _HEADER, consts)).encode()).hexdigest()[:16]
    return f"v{VERSION}-h{_HEADER}-s{layout.SIZE}-{digest}"


def _size(nslots: int, capacity: int) -> int:
    return 8 * (_HEADER + nslots) + 8 * layout.SIZE * nslots + 8 * 3 * capacity


class SharedState:
    def __init__(self, nslots: int, limit: int, fd: int | None = None, capacity: int | None = None):
        """Create the memory (supervisor): the per-IP table gets ``capacity``
        buckets, by default enough for ``limit`` (RELAY_MAX_CLIENTS) clients.
        :meth:`attach` maps an existing one."""
        self.nslots = nslots
        if fd is None:
            capacity = capacity or ip_table.capacity_for(limit)
            self.fd = os.memfd_create("wsrelay-shared", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, _size(nslots, capacity))
        else:
            self.fd = fd
        size = _size(nslots, capacity)
        self._mm = mmap.mmap(self.fd, size)
        view = memoryview(self._mm)
        self.header = view[: 8 * _HEADER].cast("q")
        self.clients = view[8 * _HEADER: 8 * (_HEADER + nslots)].cast("q")
        base = 8 * (_HEADER + nslots)
        step = 8 * layout.SIZE
        self._counters = [view[base + i * step: base + (i + 1) * step].cast("d") for i in range(nslots)]
        if fd is None:
            self.header[LIMIT] = limit
            self.header[TABLE_CAPACITY] = capacity
            secret = os.urandom(16)
            self.header[TABLE_SECRET] = int.from_bytes(secret[:8], "little", signed=True)
            self.header[TABLE_SECRET + 1] = int.from_bytes(secret[8:], "little", signed=True)
        base += step * nslots
        secret = b"".join(self.header[TABLE_SECRET + i].to_bytes(8, "little", signed=True) for i in range(2))
        self.table = ip_table.IPTable(view[base: base + 8 * 3 * capacity].cast("q"), capacity, secret,
                                      self.header[TABLE_USED: TABLE_USED + 1])

    @classmethod
    def attach(cls, fd: int, nslots: int) -> SharedState:
        """Map the supervisor's memfd, inherited as ``fd`` (a worker).

        The caller has compared :func:`fingerprint` with the supervisor's; the
        file's size is checked here too, before anything but the header is mapped.
        """
        size = os.fstat(fd).st_size
        if size < 8 * _HEADER:
            raise ValueError(f"shared memory is {size} bytes, too small for its header")
        with mmap.mmap(fd, 8 * _HEADER) as mm:
            capacity = memoryview(mm).cast("q")[TABLE_CAPACITY]
        if capacity < 1 or capacity & (capacity - 1) or size != _size(nslots, capacity):
            raise ValueError(f"shared memory is {size} bytes, this layout needs {_size(nslots, max(capacity, 0))}")
        return cls(nslots, 0, fd=fd, capacity=capacity)

    def counters(self, slot: int) -> Counters:
        """The named counters of a slot (what workers write)."""
        return Counters(self._counters[slot])

    def values(self, slot: int) -> memoryview:
        """A slot's raw values in metrics.layout order (what the supervisor folds and reads)."""
        return self._counters[slot]

    @property
    def limit(self) -> int:
        return self.header[LIMIT]

    @limit.setter
    def limit(self, value: int) -> None:
        self.header[LIMIT] = value

    def check_table(self, max_clients: int) -> None:
        """Warn when (a reload's) ``RELAY_MAX_CLIENTS`` is more than the per-IP
        table, sized at start, can always hold (supervisor)."""
        if max_clients > self.table.max_entries:
            log.warning("RELAY_MAX_CLIENTS=%d is more than the per-IP table holds (%d addresses x workers, "
                        "sized at start): with RELAY_MAX_CLIENTS_PER_IP set, clients of new addresses beyond "
                        "it get 503 (limit_ip) until a restart", max_clients, self.table.max_entries)

    def total_clients(self) -> int:
        return sum(self.clients)

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def reset_slot(self, slot: int) -> None:
        """Give back a dead worker's clients, per-IP entries included, and
        clear its counters (supervisor only)."""
        self.lock()
        try:
            self.clients[slot] = 0
            self.table.rebuild(dead_slot=slot)
        finally:
            self.unlock()
        c = self._counters[slot]
        for i in range(len(c)):
            c[i] = 0.0


class Admission:
    """A worker's view of the limits: :meth:`take` before contacting the
    origin, :meth:`give` exactly once when that client's tunnel ends.

    ``per_ip`` (``RELAY_MAX_CLIENTS_PER_IP``) also caps the clients of one
    address — an IPv6 one per ``v6_prefix`` network — across every worker
    of the host, in the per-IP table (relay/ip_table.py), judged under the
    same lock as the global limit: concurrent bursts never pass either.
    """

    __slots__ = ("_shared", "_clients", "_slot", "_fd", "_header", "_per_ip", "_v6_prefix", "_table",
                 "_full", "_full_logged", "_where")

    def __init__(self, shared: SharedState, slot: int, per_ip: int = 0, v6_prefix: int = 64):
        self._shared = shared
        self._clients = shared.clients
        self._header = shared.header
        self._slot = slot
        self._fd = shared.fd
        self._per_ip = per_ip
        self._v6_prefix = v6_prefix
        self._table = shared.table
        self._full = 0
        self._full_logged = -FULL_LOG_EVERY
        #: client address -> its place in the table (IPTable.locate), for the
        #: addresses seen lately: a give, a reconnect, need no hashing again
        self._where: dict[str, tuple[int, int, int] | None] = {}

    def _locate(self, ip: str) -> tuple[int, int, int] | None:
        where = self._where.get(ip, False)
        if where is False:
            if len(self._where) >= WHERE_CACHE:
                self._where.clear()
            key = per_ip_key(ip, self._v6_prefix)
            where = self._where[ip] = None if key is None else self._table.locate(key)
        return where

    def _global(self) -> str | None:
        """The global limit, under the lock."""
        return "limit" if sum(self._clients) >= self._header[LIMIT] else None

    def take(self, ip: str | None = None) -> str | None:
        """Admit one client: None, or the outcome that refused it — ``"limit_ip"``
        (``RELAY_MAX_CLIENTS_PER_IP``, or the per-IP table full) or ``"limit"``
        (the global limit), counted apart so that an alert on the global limit
        does not fire on one busy address."""
        where = self._locate(ip) if self._per_ip and ip is not None else None
        # Far from the global limit, a take needs no lock (two fcntl calls per
        # upgrade): the native extension's admit_fast, exact by construction
        # (relay/native/_engine.c); near it, or without the extension, the lock.
        if where is None and _admit_fast is not None and _admit_fast(self._clients, self._slot, self._header[LIMIT]):
            return None
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if where is None:
                refused = self._global()
            else:
                refused = self._table.take(where, self._slot, self._per_ip, self._global)
            if refused is None:
                self._clients[self._slot] += 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        if refused == "full":
            self._table_full()
            return "limit_ip"
        return refused

    def give(self, ip: str | None = None) -> None:
        where = self._locate(ip) if self._per_ip and ip is not None else None
        if where is None:
            self._clients[self._slot] -= 1  # one aligned store by the slot's only writer: no lock
            return
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            self._table.give(where, self._slot)
            self._clients[self._slot] -= 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def fast_path(self) -> tuple[memoryview, int, memoryview] | None:
        """For a taker in C (relay/native/fast_path.c, the lock-free take of
        :meth:`take` far from the limit, and :meth:`give`): every worker's
        client count, this worker's slot, the header (the limit first). None
        with a per-IP limit, whose table takes the lock."""
        if self._per_ip:
            return None
        return self._clients, self._slot, self._header

    def _table_full(self) -> None:
        self._full += 1
        now = time.monotonic()
        if now - self._full_logged >= FULL_LOG_EVERY:
            log.error("per-IP table full (%d entries): %d new client address(es) refused with 503 (outcome "
                      "limit_ip) since the last report; it was sized at start for RELAY_MAX_CLIENTS=%d, "
                      "restart to resize", self._table.max_entries, self._full, self._table.max_entries)
            self._full_logged = now
            self._full = 0
