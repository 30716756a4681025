"""An origin pool as a worker uses it (README, "Routes and origins"): which
origin a request goes to, and what the worker tells the origin table about
it (open connections, connect times, failures, answers).

Balancing (``RELAY_BALANCE``):

- ``least_conn`` (the default; HAProxy's advice for long sessions such as
  WebSockets): the origin with the fewest open connections across every
  worker (the origin table's counts), ties taken in turn;
- ``round_robin``: nginx's smooth weighted round-robin;
- ``cookie:NAME`` / ``header:NAME``: a consistent hash of that cookie or
  header (a ring of 160 points per origin, crc32 as nginx's ``hash ...
  consistent``), so a client keeps its origin across requests, reloads and
  restarts, and only the keys of an origin that leaves move. A request
  without the key is balanced by least connections.

An origin that is taken out (relay/origins/outlier.py) or fails its health
check (workers/health.py) gets nothing, unless every origin of the pool is
out: then all are used (Envoy's panic mode). One that came back ramps up
over ``RELAY_SLOWSTART`` seconds (HAProxy's ``slowstart``): its weight grows
from 5% to 100%, so a reconnect storm does not land on it at once (hashing
ignores it: moving keys would break their stickiness).
"""

from __future__ import annotations

import asyncio
import bisect
import time
import zlib
from typing import TYPE_CHECKING

from metrics import layout
from relay.config import Address, PoolSettings
from relay.origins import outlier
from relay.origins.pool import Pool
from relay.origins.report import FailureLog
from relay.origins.table import OriginTable, key

if TYPE_CHECKING:
    from relay.http_head import Request

#: points per origin on the hash ring (nginx's ``hash ... consistent`` uses 160 per weight unit)
RING_POINTS = 160
#: the weight of an origin at the start of its slow start
MIN_WEIGHT = 0.05
#: :meth:`OriginPool.weight` of an origin taken out whose cool-down is over:
#: the next request tries it, if it wins the claim (relay/origins/outlier.trial)
TRIAL = -1.0
_CHECK, _CHECK_SINCE, _DOWN_UNTIL = layout.O_CHECK, layout.O_CHECK_SINCE, layout.O_DOWN_UNTIL
_EJECTED = layout.O_EJECTED
_BUCKETS = layout.CONNECT_BUCKETS
_INF = float("inf")


class AtLimit(Exception):
    """Every origin of the pool holds ``RELAY_MAX_CONNS`` connections: 503."""


class Member:
    """One origin of a pool, in one worker."""

    __slots__ = ("pool", "addr", "name", "entry", "who", "base", "cell", "state", "hist", "idle", "current")

    def __init__(self, pool: "OriginPool", addr: Address, entry: int, slot: int, table: OriginTable,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.addr = addr
        #: host:port, as logs and metrics name it
        self.name = str(addr)
        self.entry = entry
        #: the subject of its log lines
        self.who = f"origin {self.name} (pool {pool.name})"
        #: its row of the table's connection counts, and this worker's cell in it
        self.base = entry * table.nslots
        self.cell = self.base + slot
        #: where its health fields start in the table's state
        self.state = entry * layout.O_SIZE
        #: this worker's connect-time histogram of it
        self.hist = (slot * layout.ORIGIN_CAPACITY + entry) * layout.O_CONNECT_SIZE
        #: idle plain-HTTP connections to it: a request reuses one only after
        #: choosing this origin, so an origin taken out gets none
        self.idle = Pool(loop)
        #: smooth weighted round-robin's running weight
        self.current = 0.0

    def __repr__(self) -> str:
        return f"<Member {self.pool.name}/{self.name}>"


class OriginPool:
    """A pool's origins in one worker, and its settings (relay.config.PoolSettings)."""

    def __init__(self, cfg: PoolSettings, table: OriginTable, entries: dict[str, int], slot: int,
                 loop: asyncio.AbstractEventLoop, failures: FailureLog) -> None:
        self.name = cfg.name
        self.settings = cfg
        self.websocket = cfg.websocket
        self.allowed_origins = cfg.allowed_origins
        self.connect_timeout = cfg.connect_timeout
        self.read_timeout = cfg.read_timeout
        self.table = table
        self.failures = failures
        self.members = tuple(Member(self, a, entries[key(cfg.name, str(a))], slot, table, loop)
                             for a in dict.fromkeys(cfg.origins))
        self._conns = table.conns
        self._state = table.state
        self._hist = table.connect
        self._header = table.header
        self._nslots = table.nslots
        self._turn = 0
        kind, _, name = cfg.balance.partition(":")
        self.least_conn = kind != "round_robin"
        self.hash_cookie = name.encode() if kind == "cookie" else None
        self.hash_header = name.encode() if kind == "header" else None
        self.ring: list[int] = []
        self.ring_members: list[Member] = []
        if name:
            points = sorted((zlib.crc32(f"{m.name}-{i}".encode()), m.name, m)
                            for m in self.members for i in range(RING_POINTS))
            self.ring = [p[0] for p in points]
            self.ring_members = [p[2] for p in points]

    def __len__(self) -> int:
        return len(self.members)

    # -- choosing -----------------------------------------------------------------------
    def weight(self, m: Member, now: float) -> float:
        """0 while ``m`` is out (health check failing, or taken out and
        cooling down), :data:`TRIAL` when it is due to be tried again; then up
        to 1 over the slow start."""
        s = self._state
        base = m.state
        if s[base + _CHECK] == 0.0:
            return 0.0
        back = s[base + _DOWN_UNTIL]
        if now < back:
            return 0.0
        if s[base + _EJECTED]:
            return TRIAL
        ramp = self.settings.slowstart
        if ramp:
            since = s[base + _CHECK_SINCE]
            if since > back:
                back = since
            if now - back < ramp:
                return max(MIN_WEIGHT, (now - back) / ramp)
        return 1.0

    def _try(self, m: Member, now: float) -> bool:
        """Claim ``m``'s trial for this request (one request across workers)."""
        return outlier.trial(self.table, m.entry, now, self.connect_timeout)

    def usable(self, m: Member, now: float) -> bool:
        """Requests go to ``m`` (it is neither out nor on trial)."""
        return self.weight(m, now) > 0.0

    def open_connections(self, m: Member) -> int:
        """``m``'s open connections across every worker."""
        n = int(self._header[2])  # worker slots in use
        if n == 1:
            return self._conns[m.base]
        return sum(self._conns[m.base: m.base + n])

    def choose(self, req: "Request | None", tried: tuple[Member, ...] = ()) -> Member | None:
        """The origin for ``req``, never one of ``tried``; None when every
        origin was tried. Raises :class:`AtLimit` when the rest hold
        ``RELAY_MAX_CONNS`` each."""
        members = self.members
        if len(members) == 1 and not tried and not self.settings.max_conns:
            return members[0]
        now = time.monotonic()
        if self.ring and req is not None:
            hashed = self._hash_key(req)
            if hashed is not None:
                return self._by_hash(hashed, tried, now)
        if self.least_conn:
            return self._least_conn(tried, now)
        return self._round_robin(tried, now)

    def failover(self, req: "Request | None", first: Member) -> tuple[list[Member], bool]:
        """The origins a request moves on to, in order, when ``first`` (what
        :meth:`choose` gave it) fails, chosen ahead for the head phase in C
        (relay/native/front.py), which connects down the list without asking
        again: what :meth:`choose` would give it then, by the counts of now.
        Origins out (health check, taken out, a trial not yet claimed) come
        only after every usable one (panic mode), those at ``RELAY_MAX_CONNS``
        never; the hash's next origins on the ring, least connections' by
        their counts. Also returns whether one was left out at
        ``RELAY_MAX_CONNS`` (the request then ends with 503 ``limit_origin``,
        not 502, when the list runs out). Claims no trial, moves no
        round-robin weight."""
        members = self.members
        if len(members) == 1:
            return [], False
        seq: tuple[Member, ...] | list[Member] = members
        hashed = self._hash_key(req) if self.ring and req is not None else None
        if hashed is not None:  # the ring's next origins, each once
            ring, on_ring = self.ring, self.ring_members
            start = bisect.bisect(ring, zlib.crc32(hashed))
            seen: dict[Member, None] = {}
            for i in range(len(ring)):
                seen[on_ring[(start + i) % len(ring)]] = None
                if len(seen) == len(members):
                    break
            seq = list(seen)
        now = time.monotonic()
        limit = self.settings.max_conns
        usable: list[tuple[float, int, Member]] = []
        out: list[tuple[float, int, Member]] = []
        full = False
        for i, m in enumerate(seq):
            if m is first:
                continue
            conns = self.open_connections(m)
            if limit and conns >= limit:
                full = True
                continue
            w = self.weight(m, now)
            if hashed is not None or not self.least_conn:
                score = float(i)  # the ring's order, or the pool's
            elif w > 0.0:
                score = (conns + 1) / w  # least connections, slow start weighed in
            else:
                score = float(conns)  # panic mode: connections alone
            (usable if w > 0.0 else out).append((score, i, m))
        usable.sort()
        out.sort()
        return [m for _s, _i, m in usable] + [m for _s, _i, m in out], full

    def _hash_key(self, req: "Request") -> bytes | None:
        if self.hash_header is not None:
            return req.get(self.hash_header)
        cookies = req.get(b"cookie")
        if cookies is None:
            return None
        name = self.hash_cookie
        for part in cookies.split(b";"):
            part = part.strip()
            if part.startswith(name) and part[len(name):len(name) + 1] == b"=":
                return part[len(name) + 1:]
        return None

    def _by_hash(self, hashed: bytes, tried: tuple[Member, ...], now: float) -> Member | None:
        ring, members = self.ring, self.ring_members
        start = bisect.bisect(ring, zlib.crc32(hashed))
        limit = self.settings.max_conns
        full = False
        for panic in (False, True):
            for i in range(len(ring)):
                m = members[(start + i) % len(ring)]
                if m in tried:
                    continue
                if not panic:
                    w = self.weight(m, now)
                    if w == TRIAL and self._try(m, now):
                        return m
                    if w <= 0.0:
                        continue
                if limit and self.open_connections(m) >= limit:
                    full = True
                    continue
                return m
        if full:
            raise AtLimit()
        return None

    def _least_conn(self, tried: tuple[Member, ...], now: float) -> Member | None:
        members = self.members
        n = len(members)
        self._turn = turn = (self._turn + 1) % n
        limit = self.settings.max_conns
        best: Member | None = None
        best_score = _INF
        full = False
        for panic in (False, True):
            for i in range(n):
                m = members[(turn + i) % n]
                if m in tried:
                    continue
                w = 1.0 if panic else self.weight(m, now)
                if w == TRIAL and self._try(m, now):
                    return m
                if w <= 0.0:
                    continue
                conns = self.open_connections(m)
                if limit and conns >= limit:
                    full = True
                    continue
                score = (conns + 1) / w
                if score < best_score:
                    best, best_score = m, score
            if best is not None:
                return best
        if full:
            raise AtLimit()
        return None

    def _round_robin(self, tried: tuple[Member, ...], now: float) -> Member | None:
        limit = self.settings.max_conns
        full = False
        for panic in (False, True):
            best: Member | None = None
            total = 0.0
            for m in self.members:
                if m in tried:
                    continue
                w = 1.0 if panic else self.weight(m, now)
                if w == TRIAL and self._try(m, now):
                    return m
                if w <= 0.0:
                    continue
                if limit and self.open_connections(m) >= limit:
                    full = True
                    continue
                m.current += w
                total += w
                if best is None or m.current > best.current:
                    best = m
            if best is not None:
                best.current -= total
                return best
        if full:
            raise AtLimit()
        return None

    # -- what happens to a member -----------------------------------------------------------
    def opened(self, m: Member) -> None:
        """A connection to ``m`` starts (connecting counts: a burst must spread).
        This worker's open connections to it (tunnels, requests in flight,
        connects) are its cell of the table, changed by steps: the fast path in
        C (relay/native/fast_path.c) counts into the same cell."""
        self._conns[m.cell] += 1

    def closed(self, m: Member) -> None:
        self._conns[m.cell] -= 1

    def connected(self, m: Member, seconds: float) -> None:
        """A TCP connect to ``m`` took ``seconds``."""
        h = self._hist
        i = m.hist
        for bound in _BUCKETS:
            if seconds <= bound:
                break
            i += 1
        h[i] += 1
        h[m.hist + len(_BUCKETS) + 1] += seconds

    def failed(self, m: Member, reason: str, detail: str = "", answer: int = 502) -> None:
        """``m`` failed (``reason``: one of layout.ORIGIN_REASONS); its clients got ``answer``."""
        self.failures.failed(m.name, _KIND[reason], detail, answer)
        s = self.settings
        now = time.monotonic()
        if outlier.failed(self.table, m.entry, reason, detail, now, s.max_fails, s.fail_timeout, m.who) == "down":
            m.idle.clear()
            if not any(self.usable(x, now) for x in self.members):
                outlier.log.warning("pool %s: every origin is out: trying them all (panic mode)", self.name)

    def answered(self, m: Member) -> None:
        """``m`` answered (anything but a 502/503/504 of its own)."""
        if self._state[m.state + layout.O_EJECTED]:
            now = time.monotonic()
            panic = not any(self.usable(x, now) for x in self.members)
            outlier.answered(self.table, m.entry, now, m.who, panic)

    def sweep(self, now: float) -> None:
        """Once a second: idle connections to an origin that is out are closed."""
        for m in self.members:
            if m.idle.conns and not self.usable(m, now):
                m.idle.clear()

    def close_idle(self) -> None:
        for m in self.members:
            m.idle.close()


#: the FailureLog kind of each reason (the rate-limited warning lines)
_KIND = {"connect": "connect failed", "timeout": "timeout", "closed": "closed", "invalid": "bad answer",
         "status_5xx": "answered", "cut": "cut"}
