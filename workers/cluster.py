"""Cluster mode: one client limit across a fleet of hosts, leased from Redis
(README, "A fleet").

Each host (one supervisor) holds a **lease**: a number of slots of the fleet
limit (``RELAY_CLUSTER_LIMIT``) recorded in Redis. Inside the host the lease
is the limit the workers already enforce in shared memory
(:class:`relay.shared_memory.Admission`): ``SharedState.limit = min(RELAY_MAX_CLIENTS,
lease)``. So a handshake never waits on Redis: leasing happens beside it, in
blocks, ahead of need.

Redis keys, under ``P = wsrelay:{RELAY_CLUSTER_NAME}``::

    P:hosts        set of host ids that may hold a lease
    P:host:<id>    hash {lease, held}; PEXPIRE RELAY_CLUSTER_LEASE_TTL, renewed
                   every :func:`heartbeat` (TTL/3, at most 1 s): a host that
                   dies loses its lease when Redis's own clock says so (no
                   host clock is ever compared)
    P:starved      the id of a host that refused clients and was denied slots;
                   it clears it once it refuses no more (else it expires
                   after two heartbeats)

One script, :data:`LEASE`, is the only writer: it sums the live leases of the
other hosts (dropping the ids whose hash expired), grants
``max(held, min(want, limit - others))``, records ``{lease, held}`` with the
TTL, and answers with the fleet's figures. Being one script it runs
atomically: no read-modify-write race between hosts.

**Invariant.** While Redis is reachable and every host got its lease from
it, the sum of the leases is at most the limit: a grant never exceeds
``limit - others``, and a host never admits past its lease (the workers'
limit is lowered *before* slots are given back, and raised only *after*
Redis granted them). The one exception is the ``held`` floor: a host is
never registered for fewer slots than the clients it really holds, so after
a partition (README, "A fleet › When Redis fails") the sum can exceed the
limit by what the fallback policy admitted; hosts then shed every unused slot
at their next call and admit nothing until the fleet is back under its limit.

**Blocks.** A host keeps one to two blocks of free slots leased ahead. It
asks for more when fewer than a block are free (or when it refused a client
at its lease), and gives back down to one block when more than two are free
(hysteresis: a client arriving and leaving does not talk to Redis), or more
than one while every slot of the fleet is leased (so a host that joins, or
that restarted, gets its share). The block is ``RELAY_CLUSTER_BLOCK`` while the fleet has room and
shrinks with the fleet's free capacity, to one slot near the limit::

    b = min(RELAY_CLUSTER_BLOCK, ceil((limit - fleet clients) / hosts))

(the fleet's clients: the others' as Redis last said, this host's own now).
So near the limit every free slot is leased to some host ahead of need: a
burst that the load balancer spreads over the hosts fills the fleet to
exactly its limit without waiting for Redis, and the last slots go to the
hosts that ask first (the script grants what is left, not a whole block). A
host that refused clients and is denied slots marks the fleet starved; every host
that admitted nobody for :data:`IDLE_SHED` seconds then gives its free slots
back at its next call, so a fleet whose clients arrive at only some hosts
still reaches exactly its limit, within a heartbeat and a second. Under a burst the fleet reaches
its limit as fast as hosts fill their blocks: the thread looks at the
workers' count every :data:`POLL` seconds, and one script call is one round
trip (the fleet tests quote the figures).

**Redis fails.** A host keeps its lease until the TTL (measured from the
moment its last successful call was *sent*, so it never outlives Redis's
copy), then applies ``RELAY_CLUSTER_FALLBACK``: ``hold`` keeps the last lease,
``local`` a fixed share (``RELAY_CLUSTER_LOCAL_LIMIT``, or the fleet limit
divided by the hosts last seen), ``closed`` admits nothing new. Open tunnels
are never touched. Redis back, even restarted empty, the next call
re-registers what the host holds and the lease it had (never more: for a TTL
after Redis forgot a host, it does not grow, so the first hosts back cannot
take the slots of those still re-registering): the fleet sum is true again
within a heartbeat.

**Why a thread.** redis-py is blocking. The lease loop runs in one daemon
thread of the supervisor, with its own timeouts (``socket_timeout``), and it
writes only the shared limit and its own figures; the supervisor's select
loop (signals, reaping, /metrics) never waits on Redis. Forking workers with
this thread alive is safe: the child execs at once (workers/child.py) and
touches nothing the thread could hold. Looking every :data:`POLL` seconds and
renewing every second costs the supervisor ~3 ms of CPU per second.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from metrics import layout

if TYPE_CHECKING:
    from relay.config import Settings
    from relay.shared_memory import SharedState

log = logging.getLogger("wsrelay")

#: Seconds between two looks at the workers' client count (a sum over a few
#: dozen int64 in shared memory: microseconds).
POLL = 0.02
#: A host that admitted nobody for this long gives its free slots back while
#: another host is starved.
IDLE_SHED = 1.0
#: Where a worker counts the upgrades it refused at the limit (metrics/layout.py).
REFUSED = layout.UPGRADES + layout.OUTCOMES.index("limit")
#: Longest wait between two denied requests for more slots (seconds): how
#: soon a host refusing clients takes the slots another host gave back.
GROW_RETRY_MAX = 0.25
#: Longest wait between two attempts while Redis fails (seconds).
RETRY_MAX = 1.0


def heartbeat(ttl: float) -> float:
    """Seconds between two renewals: a third of the TTL, at most a second (so
    what a host holds, and a starved fleet, reach every host within a second)."""
    return min(ttl / 3, 1.0)


#: The one writer of a fleet's keys. KEYS: hosts set, starved flag. ARGV:
#: host key prefix, host id, wanted lease, clients held, TTL ms, fleet limit,
#: starved flag's TTL ms, 1 if the host refused clients lately. Returns
#: {grant, others' leases, fleet's clients, hosts, starved?, did our lease exist?}.
LEASE = """
local prefix, me = ARGV[1], ARGV[2]
local want, held = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, limit, starve, need = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local others, fleet_held, hosts = 0, held, 1
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= me then
    local v = redis.call('HMGET', prefix .. h, 'lease', 'held')
    if v[1] then
      others = others + tonumber(v[1])
      fleet_held = fleet_held + tonumber(v[2])
      hosts = hosts + 1
    else
      redis.call('SREM', KEYS[1], h)
    end
  end
end
local existed = redis.call('EXISTS', prefix .. me)
local grant = math.min(want, limit - others)
if grant < held then grant = held end
redis.call('HSET', prefix .. me, 'lease', grant, 'held', held)
redis.call('PEXPIRE', prefix .. me, ttl)
redis.call('SADD', KEYS[1], me)
if need and grant < want and grant <= held then
  redis.call('SET', KEYS[2], me, 'PX', starve)
elseif not need and redis.call('GET', KEYS[2]) == me then
  redis.call('DEL', KEYS[2])
end
return {grant, others, fleet_held, hosts, redis.call('EXISTS', KEYS[2]), existed}
"""

RELEASE = """
redis.call('DEL', ARGV[1] .. ARGV[2])
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""


def prefix(name: str) -> str:
    """The fleet's key prefix (braces: one Redis Cluster hash slot, should it ever matter)."""
    return f"wsrelay:{{{name}}}:"


def connect(url: str, timeout: float):
    """A redis-py client for ``url`` (``redis://``, ``rediss://``, ``unix://``,
    or ``redis+sentinel://h1:26379,h2:26379/service[/db]``), every call bounded
    by ``timeout`` seconds, no retries of its own (the lease loop retries)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    opts = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
    if not url.startswith("redis+sentinel://"):
        return redis.Redis.from_url(url, **opts)
    from redis.sentinel import Sentinel

    rest = url.removeprefix("redis+sentinel://")
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    service, _, db = path.strip("/").partition("/")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        nodes.append((host.strip("[]"), int(port or 26379)))
    password = auth.partition(":")[2] or None
    sentinel = Sentinel(nodes, socket_timeout=timeout, socket_connect_timeout=timeout)
    return sentinel.master_for(service, db=int(db or 0), password=password, **opts)


def error_reason(e: BaseException) -> str:
    """The ``reason`` label of ``wsrelay_cluster_lease_errors_total``."""
    import redis

    if isinstance(e, (redis.TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(e, (redis.ConnectionError, OSError)):
        return "connection"
    if isinstance(e, redis.ResponseError):
        return "response"
    return "other"


class LocalLimit:
    """No cluster: the host's limit is ``RELAY_MAX_CLIENTS``."""

    def __init__(self, settings: Settings, shared: SharedState) -> None:
        self.shared = shared
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.shared.check_table(settings.max_clients)
        self.shared.limit = settings.max_clients

    def figures(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


class ClusterLimit:
    """The lease loop of one host (see the module's docstring)."""

    def __init__(self, settings: Settings, shared: SharedState, client=None) -> None:
        self.settings = settings
        self.shared = shared
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.prefix = prefix(settings.cluster_name)
        self.keys = [self.prefix + "hosts", self.prefix + "starved"]
        self.timeout = min(1.0, settings.cluster_lease_ttl / 4)
        self.client = client if client is not None else connect(settings.cluster_redis, self.timeout)
        self._lease = self.client.register_script(LEASE)
        self._release = self.client.register_script(RELEASE)
        self._mu = threading.Lock()
        self._stop = threading.Event()
        # What Redis granted, and until when it holds (monotonic; 0: no lease).
        self.lease = 0
        self.valid_until = 0.0
        self.next_renew = 0.0
        self.retry_at = 0.0
        self.retry_delay = 0.1
        self.grow_at = 0.0         # after a denied block: not before this
        self.cap_until = 0.0       # after Redis lost our lease: no growth before this (_lost)
        self.grow_delay = POLL
        self.resync = True         # the next call must reach Redis (start, after an error)
        self.redis_up = False
        self.failing = False       # the last call failed
        self.fallback = False      # RELAY_CLUSTER_FALLBACK applies now
        self.errors: dict[str, int] = {}
        self.calls = 0
        # The fleet as of the last reply.
        self.others = 0
        self.fleet_held = 0
        self.others_held = 0
        self.hosts = 1
        self.starved = False
        self.last_held = 0
        self.last_admit = time.monotonic()
        self.last_refused = 0.0
        self.last_refusal = -IDLE_SHED
        self.refusing = False      # refused a client at the limit within IDLE_SHED
        self._slots = [shared.values(slot) for slot in range(shared.nslots)]
        shared.limit = 0  # nothing is admitted before the first lease (or the fallback)
        self.thread = threading.Thread(target=self._loop, name="wsrelay-cluster", daemon=True)
        self.thread.start()
        log.info("cluster %s: fleet limit %d, host id %s, Redis %s", settings.cluster_name,
                 settings.cluster_limit, self.id, settings.to_dict()["RELAY_CLUSTER_REDIS"])

    # -- the supervisor's side ----------------------------------------------------------
    def configure(self, settings: Settings) -> None:
        """A reload: a new RELAY_MAX_CLIENTS, fleet limit, block, TTL or fallback
        applies at once (Redis and the fleet's name need a restart)."""
        self.shared.check_table(settings.max_clients)
        with self._mu:
            self.settings = settings
            self.resync = True
            self._publish(self._effective())

    def figures(self) -> dict:
        s = self.settings
        return {"name": s.cluster_name, "limit": s.cluster_limit, "leased": self.lease,
                "fleet_clients": self.fleet_held, "hosts": self.hosts, "redis_up": self.redis_up,
                "fallback": self.fallback, "errors": dict(self.errors)}

    def close(self) -> None:
        """Stop the loop and give the lease back (a clean stop: after the drain)."""
        self._stop.set()
        self.thread.join(2 * self.timeout + 1)
        try:
            self._release(keys=self.keys[:1], args=[self.prefix + "host:", self.id])
            log.info("cluster %s: lease given back", self.settings.cluster_name)
        except Exception as e:  # noqa: BLE001 - Redis down: the TTL gives it back
            log.warning("cluster %s: could not give the lease back (%s); Redis drops it within %gs",
                        self.settings.cluster_name, e, self.settings.cluster_lease_ttl)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self._step(time.monotonic())
            except Exception:  # noqa: BLE001 - a bug here must not end leasing silently
                log.exception("cluster: lease loop error")
                time.sleep(RETRY_MAX)
            if self._stop.wait(POLL):
                return

    def block(self, held: int) -> int:
        """The headroom a host keeps leased ahead now (module docstring,
        "Blocks"), from the others' clients as Redis last said and this host's own now."""
        s = self.settings
        free = s.cluster_limit - self.others_held - held
        if free <= 0:
            return 0
        return min(s.cluster_block, -(-free // self.hosts))

    def want(self, held: int, now: float) -> int | None:
        """The lease to ask Redis for now, or None: nothing to say yet."""
        b = self.block(held)
        free = self.lease - held
        over = self.others + self.lease > self.settings.cluster_limit
        full = self.others + self.lease >= self.settings.cluster_limit
        if (free < b or (self.refusing and free <= 0)) and now >= self.grow_at:
            want = held + max(b, 1)
        elif free > 2 * b or (full and free > b):
            want = held + b
        elif free > 0 and (over or (self.starved and not self.refusing and now - self.last_admit >= IDLE_SHED)):
            want = held
        elif self.resync or now >= self.next_renew:
            want = self.lease
        else:
            return None
        if self.failing or now < self.cap_until:
            want = min(want, self.lease)  # re-registering: what we had, not more (see _lost)
        return max(held, min(want, self.settings.max_clients))

    def _step(self, now: float) -> None:
        held = self.shared.total_clients()
        if held > self.last_held:
            self.last_admit = now
        self.last_held = held
        if held >= self.lease:  # only a host at its lease refuses for the limit
            refused = self._refused()
            if refused > self.last_refused:
                self.last_refusal = now
            self.last_refused = refused
        self.refusing = now - self.last_refusal < IDLE_SHED
        if self.failing and not self.fallback and now + self.timeout >= self.valid_until:
            # The next call may block for the timeout: fall back before Redis forgets us, not after.
            with self._mu:
                self._enter_fallback()
        if now < self.retry_at:
            return
        want = self.want(held, now)
        if want is None:
            return
        if want < self.lease:
            # Lower the workers' limit before Redis hears of it; a handshake
            # that read the old limit has finished once we hold the lock.
            with self._mu:
                self._publish(min(self.settings.max_clients, want))
            held = self._held_now()
            want = max(want, held)
        s = self.settings
        sent = time.monotonic()
        try:
            self.calls += 1
            grant, others, fleet_held, hosts, starved, existed = self._lease(
                keys=self.keys, args=[self.prefix + "host:", self.id, want, held,
                                      int(s.cluster_lease_ttl * 1000), s.cluster_limit,
                                      int(2000 * heartbeat(s.cluster_lease_ttl)), int(self.refusing)])
        except Exception as e:  # noqa: BLE001 - every failure of Redis is a reason, counted
            self._failed(e, sent)
            return
        with self._mu:
            was_up = self.redis_up
            if not existed and self.lease:
                self._lost(now)
            self.lease, self.others, self.fleet_held, self.hosts = int(grant), int(others), int(fleet_held), int(hosts)
            self.others_held = self.fleet_held - held
            self.starved = bool(starved)
            self.valid_until = sent + s.cluster_lease_ttl
            self.next_renew = sent + heartbeat(s.cluster_lease_ttl)
            self.retry_delay = 0.1
            self.redis_up = True
            if self.fallback:
                log.warning("cluster %s: Redis answers again; leasing %d slots (the host holds %d)",
                            s.cluster_name, self.lease, held)
            elif not was_up:
                log.info("cluster %s: leasing %d slots from Redis (%d hosts, %d clients in the fleet)",
                         s.cluster_name, self.lease, self.hosts, self.fleet_held)
            self.fallback = self.failing = False
            self.resync = False
            if self.lease < want and want > held:
                self.grow_at = now + self.grow_delay
                self.grow_delay = min(2 * self.grow_delay, GROW_RETRY_MAX)
            else:
                self.grow_delay = POLL
            self._publish(self._effective())
        if self._held_now() > self.lease:
            self.resync = True  # a handshake took a slot Redis does not know of yet

    def _lost(self, now: float) -> None:
        """Redis had no lease of ours: it restarted empty (or forgot us while we
        were cut off). Every live host re-registers within a heartbeat, but the
        first ones back would see an empty fleet and lease the slots of clients
        the others still hold: so for one TTL, until every live host had its
        turn, no host asks for more than it leased before."""
        self.cap_until = now + self.settings.cluster_lease_ttl
        log.warning("cluster %s: Redis had no lease of this host (restarted empty?); re-registering %d slots, "
                    "no more for %gs", self.settings.cluster_name, self.lease, self.settings.cluster_lease_ttl)

    def _failed(self, e: BaseException, sent: float) -> None:
        reason = error_reason(e)
        s = self.settings
        with self._mu:
            self.errors[reason] = self.errors.get(reason, 0) + 1
            if not self.failing:
                log.warning("cluster %s: Redis call failed (%s: %s); keeping the lease of %d slots until "
                            "its TTL, then RELAY_CLUSTER_FALLBACK=%s", s.cluster_name, reason, e,
                            self.lease, s.cluster_fallback)
            self.redis_up = False
            self.failing = True
            self.resync = True
            self.retry_at = time.monotonic() + self.retry_delay
            self.retry_delay = min(2 * self.retry_delay, RETRY_MAX, heartbeat(s.cluster_lease_ttl))
            if not self.fallback and time.monotonic() + self.timeout >= self.valid_until:
                self._enter_fallback()
            self._publish(self._effective())

    def _enter_fallback(self) -> None:
        s = self.settings
        self.fallback = True
        self._publish(self._effective())
        log.error("cluster %s: lease expired without Redis; RELAY_CLUSTER_FALLBACK=%s: admitting up to %d "
                  "clients on this host (open tunnels keep serving)", s.cluster_name, s.cluster_fallback,
                  self._effective())

    def _effective(self) -> int:
        """The workers' limit now: the lease, or what the fallback policy allows."""
        s = self.settings
        if not self.fallback:
            allowed = self.lease
        elif s.cluster_fallback == "hold":
            allowed = self.lease
        elif s.cluster_fallback == "local":
            allowed = self.local_share()
        else:
            allowed = 0
        return min(s.max_clients, allowed)

    def local_share(self) -> int:
        """``RELAY_CLUSTER_LOCAL_LIMIT``, or the fleet limit ÷ the hosts Redis last listed."""
        s = self.settings
        return s.cluster_local_limit or max(1, s.cluster_limit // max(1, self.hosts))

    def _refused(self) -> float:
        """Upgrades the workers refused at the limit (outcome ``limit``), summed
        over the slots: when it grows, this host has clients it cannot admit."""
        return sum(v[REFUSED] for v in self._slots)

    def _publish(self, limit: int) -> None:
        self.shared.limit = limit

    def _held_now(self) -> int:
        """The clients held, read under the workers' lock: no ``take`` is half done."""
        self.shared.lock()
        try:
            return self.shared.total_clients()
        finally:
            self.shared.unlock()


def limits(settings: Settings, shared: SharedState) -> LocalLimit | ClusterLimit:
    """What owns the host's limit: RELAY_MAX_CLIENTS alone, or a lease from Redis."""
    if settings.cluster_redis:
        return ClusterLimit(settings, shared)
    return LocalLimit(settings, shared)


def probe(settings: Settings) -> str:
    """One line for ``wsrelay check``: whether Redis answers, and the fleet as it stands."""
    url = settings.to_dict()["RELAY_CLUSTER_REDIS"]
    try:
        client = connect(settings.cluster_redis, min(1.0, settings.cluster_lease_ttl / 4))
        t = time.monotonic()
        client.ping()
        ms = 1000 * (time.monotonic() - t)
        p = prefix(settings.cluster_name)
        hosts = leased = held = 0
        for h in client.smembers(p + "hosts"):
            v = client.hmget(p + "host:" + h.decode(), "lease", "held")
            if v[0] is not None:
                hosts += 1
                leased += int(v[0])
                held += int(v[1])
        client.close()
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(why) > 200:  # redis-py's Sentinel errors embed every connection's repr
            why = why[:200] + "…"
        return (f"RELAY_CLUSTER_REDIS {url} does not answer ({error_reason(e)}: {why}); the relay would start "
                f"and apply RELAY_CLUSTER_FALLBACK={settings.cluster_fallback}")
    return (f"RELAY_CLUSTER_REDIS {url} answers (PING {ms:.1f} ms); fleet {settings.cluster_name!r}: "
            f"{hosts} hosts lease {leased} of {settings.cluster_limit} slots, {held} clients held")
