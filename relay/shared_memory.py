"""Shared memory between the supervisor and its workers.

One anonymous file (memfd), mapped by the supervisor before it forks, so every
worker shares the same pages::

    [ header: limit                      ]  int64
    [ clients[slot] for every slot       ]  int64, one writer each
    [ counters[slot][metrics.layout.SIZE] ] float64, one writer each

The global client count is the sum of ``clients``. Taking a client is a
check-then-increment across processes, so it holds an ``fcntl`` record lock
for those few instructions: the kernel drops that lock when its holder dies,
so even a worker killed by SIGKILL inside the critical section cannot wedge
the others. Giving a client back is a single aligned store by the slot's own
writer and needs no lock. When the supervisor reaps a worker it zeroes that
worker's ``clients`` slot under the lock, which is how a crash gives its
share back.

Workers are separate interpreters (:mod:`workers.child`), possibly running a
newer wsrelay than the supervisor after an upgrade; they :meth:`SharedState.attach`
to the supervisor's memfd only if :func:`fingerprint` — this file's header
plus every constant of :mod:`metrics.layout` — is the same on both sides.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os

from metrics import layout
from metrics.counters import Counters

_HEADER = 8  # int64 slots in the header
LIMIT = 0
#: Bump on any change to the header or to how slots are laid out above.
VERSION = 1


def fingerprint() -> str:
    """What a process must agree on to share the memory: the header version and
    size, and every constant of :mod:`metrics.layout` (offsets, buckets, codes)."""
    consts = sorted((k, v) for k, v in vars(layout).items() if k.isupper() and isinstance(v, (int, float, tuple)))
    digest = hashlib.sha256(repr((VERSION, _HEADER, consts)).encode()).hexdigest()[:16]
    return f"v{VERSION}-h{_HEADER}-s{layout.SIZE}-{digest}"


def _size(nslots: int) -> int:
    return 8 * (_HEADER + nslots) + 8 * layout.SIZE * nslots


class SharedState:
    def __init__(self, nslots: int, limit: int, fd: int | None = None):
        """Create the memory (supervisor); :meth:`attach` maps an existing one."""
        self.nslots = nslots
        size = _size(nslots)
        if fd is None:
            self.fd = os.memfd_create("wsrelay-shared", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = fd
        self._mm = mmap.mmap(self.fd, size)
        view = memoryview(self._mm)
        self.header = view[: 8 * _HEADER].cast("q")
        self.clients = view[8 * _HEADER: 8 * (_HEADER + nslots)].cast("q")
        base = 8 * (_HEADER + nslots)
        step = 8 * layout.SIZE
        self._counters = [view[base + i * step: base + (i + 1) * step].cast("d") for i in range(nslots)]
        if fd is None:
            self.header[LIMIT] = limit

    @classmethod
    def attach(cls, fd: int, nslots: int) -> SharedState:
        """Map the supervisor's memfd, inherited as ``fd`` (a worker).

        The caller has compared :func:`fingerprint` with the supervisor's; the
        file's size is checked here too, before anything is mapped.
        """
        size = os.fstat(fd).st_size
        if size != _size(nslots):
            raise ValueError(f"shared memory is {size} bytes, this layout needs {_size(nslots)}")
        return cls(nslots, 0, fd=fd)

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

    def total_clients(self) -> int:
        return sum(self.clients)

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def reset_slot(self, slot: int) -> None:
        """Give back a dead worker's clients and clear its counters (supervisor only)."""
        self.lock()
        try:
            self.clients[slot] = 0
        finally:
            self.unlock()
        c = self._counters[slot]
        for i in range(len(c)):
            c[i] = 0.0


class Admission:
    """A worker's view of the global limit: :meth:`take` before contacting the
    origin, :meth:`give` exactly once when that client's tunnel ends.

    ``per_ip`` (``RELAY_MAX_CLIENTS_PER_IP``) also caps the clients of one
    address. That count is kept per worker, in process memory: a client
    spread over N workers may hold up to N times the limit. It dies with its
    worker, so a crash cannot leak it either.
    """

    __slots__ = ("_shared", "_clients", "_slot", "_fd", "_header", "_per_ip", "_ips")

    def __init__(self, shared: SharedState, slot: int, per_ip: int = 0):
        self._shared = shared
        self._clients = shared.clients
        self._header = shared.header
        self._slot = slot
        self._fd = shared.fd
        self._per_ip = per_ip
        self._ips: dict[str, int] = {}

    def take(self, ip: str | None = None) -> str | None:
        """Admit one client: None, or the outcome that refused it — ``"limit_ip"``
        (``RELAY_MAX_CLIENTS_PER_IP``) or ``"limit"`` (the global limit), counted
        apart so that an alert on the global limit does not fire on one busy address."""
        if self._per_ip and ip is not None and self._ips.get(ip, 0) >= self._per_ip:
            return "limit_ip"
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if sum(self._clients) >= self._header[LIMIT]:
                return "limit"
            self._clients[self._slot] += 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        if self._per_ip and ip is not None:
            self._ips[ip] = self._ips.get(ip, 0) + 1
        return None

    def give(self, ip: str | None = None) -> None:
        self._clients[self._slot] -= 1
        if self._per_ip and ip is not None:
            n = self._ips.pop(ip, 0) - 1
            if n > 0:
                self._ips[ip] = n
