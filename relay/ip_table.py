"""The per-IP table: how many WebSocket clients each address holds, across
all workers of a host (``RELAY_MAX_CLIENTS_PER_IP``; README, "Behind a load
balancer"). Lives in shared memory (relay/shared_memory.py) and is changed only
under the record lock that also guards the global limit, so both are judged
in one critical section.

A fixed-size open-addressing hash table of int64 words, three per entry::

    [ key high | key low | meta = state << 56 | slot << 32 | count ]

An entry is one (client key, worker slot) pair with its count: an address
spread over three workers has three entries, so each knows which worker slot
holds how many, and the supervisor, reaping a dead worker, drops exactly that
worker's share (:meth:`IPTable.rebuild`). The key is 16 bytes
(relay/addresses.per_ip_key); its bucket comes from keyed BLAKE2b with a
random key per relay, so no client can pick addresses that collide.
Linear probing, all entries of a key on one probe run: a lookup sums the
counts of the run's entries with that key.

Crash safety: a worker may die at any instruction (SIGKILL) while holding
the lock; the kernel drops the lock, and other workers go on before the
supervisor reaps it. So every step leaves a table that may *over*count but
never under: a count changes with one aligned store; a new entry gets its
key before its meta; a deletion (Knuth's algorithm R, backward shift: no
tombstones, so probe runs do not grow over time) copies each entry it moves
before it frees the old place, and frees the last place only at the end.
What such a death can leave — a duplicate of a moved entry, the dying
worker's own entries — :meth:`rebuild` clears when the supervisor reaps it.

Full: a new entry is refused once :attr:`IPTable.max_entries` (half the
buckets, so runs stay short) are in use; the client gets a 503 like one
over its limit (outcome ``limit_ip``), never let past. Sized from
``RELAY_MAX_CLIENTS`` at start, it cannot fill while the global limit holds:
every entry holds at least one admitted client.
"""

from __future__ import annotations

import hashlib

FREE = 0
USED = 1
_STATE = 56
_SLOT = 32
_COUNT_MASK = (1 << 32) - 1
_SLOT_MASK = (1 << 24) - 1
#: the largest table (entries); bigger RELAY_MAX_CLIENTS fill it at max_entries
MAX_CAPACITY = 1 << 21


def capacity_for(max_clients: int) -> int:
    """Buckets for ``RELAY_MAX_CLIENTS``: a power of two, at least twice it
    (so :attr:`IPTable.max_entries` >= it), 64 .. :data:`MAX_CAPACITY`."""
    n = 64
    while n < 2 * max_clients and n < MAX_CAPACITY:
        n *= 2
    return n


def _key(hi: int, lo: int) -> bytes:
    return hi.to_bytes(8, "big", signed=True) + lo.to_bytes(8, "big", signed=True)


def _meta(slot: int, count: int) -> int:
    return (USED << _STATE) | (slot << _SLOT) | count


class IPTable:
    """The table over ``words`` (int64 memoryview, 3 x ``capacity`` long).

    ``used`` is a one-element int64 view holding the number of entries (kept
    by whoever changes them; exact again after every :meth:`rebuild`).
    Callers hold the shared lock around :meth:`take`, :meth:`give` and :meth:`rebuild`."""

    __slots__ = ("words", "capacity", "mask", "max_entries", "used", "_secret")

    def __init__(self, words: memoryview, capacity: int, secret: bytes, used: memoryview) -> None:
        assert capacity & (capacity - 1) == 0 and len(words) == 3 * capacity
        self.words = words
        self.capacity = capacity
        self.mask = capacity - 1
        self.max_entries = capacity // 2
        self.used = used
        self._secret = secret

    def home(self, key: bytes) -> int:
        """The bucket ``key``'s probe run starts at."""
        return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=self._secret).digest(), "little") & self.mask

    def locate(self, key: bytes) -> tuple[int, int, int]:
        """What :meth:`take` and :meth:`give` need of a 16-byte key: its two
        int64 halves and its home bucket (callers may keep it: it never changes)."""
        return int.from_bytes(key[:8], "big", signed=True), int.from_bytes(key[8:], "big", signed=True), \
            self.home(key)

    # -- a worker's side ------------------------------------------------------------
    def take(self, where: tuple[int, int, int], slot: int, limit: int, admit) -> str | None:
        """One more client of the key ``where`` (:meth:`locate`) in ``slot``,
        if the key holds fewer than ``limit`` across all slots and ``admit()``
        (the global limit) agrees. Returns None (taken), ``"limit_ip"``,
        ``"full"`` or what ``admit`` returned."""
        words, mask = self.words, self.mask
        hi, lo, i = where
        total = 0
        mine = -1
        for _ in range(self.capacity):
            b = 3 * i
            meta = words[b + 2]
            if meta == 0:
                break
            if words[b] == hi and words[b + 1] == lo:
                total += meta & _COUNT_MASK
                if mine < 0 and (meta >> _SLOT) & _SLOT_MASK == slot:
                    mine = b
            i = (i + 1) & mask
        else:
            i = -1  # no free bucket at all (a table rebuilt over a raised limit)
        if total >= limit:
            return "limit_ip"
        refused = admit()
        if refused:
            return refused
        if mine >= 0:
            words[mine + 2] += 1  # one store: the count
            return None
        if i < 0 or self.used[0] >= self.max_entries:
            return "full"
        b = 3 * i
        words[b] = hi  # the key first: while its meta is 0 the bucket is free
        words[b + 1] = lo
        words[b + 2] = _meta(slot, 1)
        self.used[0] += 1
        return None

    def give(self, where: tuple[int, int, int], slot: int) -> bool:
        """One client of the key ``where`` (:meth:`locate`) in ``slot`` fewer;
        False if it had none."""
        words, mask = self.words, self.mask
        hi, lo, i = where
        for _ in range(self.capacity):
            b = 3 * i
            meta = words[b + 2]
            if meta == 0:
                return False
            if words[b] == hi and words[b + 1] == lo and (meta >> _SLOT) & _SLOT_MASK == slot:
                if meta & _COUNT_MASK > 1:
                    words[b + 2] = meta - 1
                else:
                    self._delete(i, slot)
                return True
            i = (i + 1) & mask
        return False

    def _delete(self, hole: int, slot: int) -> None:
        """Knuth's algorithm R (linear probing deletion by backward shift),
        ordered so that a death at any step overcounts and never loses an
        entry: the hole keeps a copy of something until a mover is copied
        over it, and is freed last. Before a copy, the hole (the deleted entry,
        or the stale copy of the last mover) is marked ``slot``'s, the
        deleting worker's: whatever half-copied state a death leaves there,
        the reap of that worker drops."""
        words, mask = self.words, self.mask
        j = hole
        while True:
            j = (j + 1) & mask
            b = 3 * j
            if words[b + 2] == 0:
                break
            home = self.home(_key(words[b], words[b + 1]))
            # j may move to the hole unless its home lies cyclically in (hole, j]
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue
            h = 3 * hole
            words[h + 2] = _meta(slot, words[h + 2] & _COUNT_MASK)
            words[h] = words[b]
            words[h + 1] = words[b + 1]
            words[h + 2] = words[b + 2]  # now in both places: counted twice, never lost
            hole = j
        words[3 * hole + 2] = 0
        self.used[0] -= 1

    # -- the supervisor's side ------------------------------------------------------------
    def rebuild(self, dead_slot: int | None = None) -> None:
        """Rewrite the table from its entries, without ``dead_slot``'s (a
        reaped worker's) and without what a worker killed inside
        :meth:`take` or :meth:`_delete` may have left: of two entries with the
        same key and slot, the one a lookup finds first is the live one."""
        words, mask = self.words, self.mask
        occupied = [i for i, meta in enumerate(words[2::3].tolist()) if meta]
        seen: dict[tuple[int, int, int], tuple[int, int]] = {}
        for i in occupied:
            b = 3 * i
            meta = words[b + 2]
            slot = (meta >> _SLOT) & _SLOT_MASK
            if slot == dead_slot:
                continue
            hi, lo = words[b], words[b + 1]
            distance = (i - self.home(_key(hi, lo))) & mask
            ident = (hi, lo, slot)
            if ident not in seen or distance < seen[ident][0]:
                seen[ident] = (distance, meta)
        for i in occupied:
            words[3 * i + 2] = 0
        self.used[0] = 0
        for (hi, lo, _slot), (_d, meta) in seen.items():
            i = self.home(_key(hi, lo))
            while words[3 * i + 2]:
                i = (i + 1) & mask
            words[3 * i] = hi
            words[3 * i + 1] = lo
            words[3 * i + 2] = meta
            self.used[0] += 1

    def counts(self) -> dict[bytes, int]:
        """Clients per key across slots (tests, diagnostics)."""
        out: dict[bytes, int] = {}
        w = self.words
        for i in range(self.capacity):
            meta = w[3 * i + 2]
            if meta:
                key = _key(w[3 * i], w[3 * i + 1])
                out[key] = out.get(key, 0) + (meta & _COUNT_MASK)
        return out
