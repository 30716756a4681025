"""The supervisor's side of the origins (README, "Routes and origins"): the
origin table it shares with its workers (relay/origins/table.py), and the
active health checks, run once per host, here, not once per worker.

Active checks (HAProxy's ``check``): with ``RELAY_HEALTH_CHECK_PATH`` set
for a pool, each of its origins gets ``GET <path>`` every
``RELAY_HEALTH_CHECK_INTERVAL`` seconds; an answer of 2xx or 3xx within
``RELAY_HEALTH_CHECK_TIMEOUT`` passes. ``RELAY_HEALTH_CHECK_FALL`` failures
in a row take the origin out, ``RELAY_HEALTH_CHECK_RISE`` passes in a row
bring it back (then it ramps up over ``RELAY_SLOWSTART``). An origin starts
up. The verdict goes into the table, which the workers read when they
choose; each change is one line on the service log.

The probes run on an asyncio loop in a thread of the supervisor: the
supervisor's own loop stays a plain ``selectors`` loop that never waits on
an origin (or on a DNS lookup). A worker is forked and at once exec'd, so
the thread never runs in a child.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

from metrics import layout
from relay import pools
from relay.config import Settings
from relay.origins.table import OriginTable, key
from relay.proxy_protocol import V2_LOCAL

log = logging.getLogger("wsrelay.origin")

_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})")


class Target(NamedTuple):
    """One origin to probe."""

    entry: int
    pool: str
    host: str
    port: int
    path: str
    interval: float
    timeout: float
    rise: int
    fall: int
    #: RELAY_ORIGIN_PROXY_PROTOCOL=v2: the origin expects a PROXY header on every connection
    proxy_v2: bool = False

    @property
    def who(self) -> str:
        return f"origin {self.host if ':' not in self.host else '[' + self.host + ']'}:{self.port} (pool {self.pool})"


async def probe(host: str, port: int, path: str, timeout: float, proxy_v2: bool = False) -> tuple[bool, str]:
    """``GET path`` to ``host:port``: (passed, what happened). 2xx and 3xx pass
    (HAProxy's ``option httpchk``). ``proxy_v2``: a PROXY v2 ``LOCAL`` header
    first (the relay's own connection, no client's), as HAProxy's checks of a
    ``send-proxy-v2`` server: an origin expecting the header on every
    connection refuses a check without one."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write((V2_LOCAL if proxy_v2 else b"")
                         + f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: wsrelay-health-check\r\n"
                         f"Connection: close\r\n\r\n".encode())
            line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {timeout:g} s"
    except OSError as e:
        return False, e.strerror or str(e)
    finally:
        if writer is not None:
            writer.close()
    m = _STATUS.match(line)
    if m is None:
        return False, "not an HTTP answer" if line else "closed without answering"
    status = int(m.group(1))
    return 200 <= status < 400, f"answered {status}"


class Checker:
    """The probes, on their own loop and thread, started with the first pool
    that asks for checks."""

    def __init__(self, table: OriginTable) -> None:
        self.table = table
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        #: entry -> (its target, its task)
        self.tasks: dict[int, tuple[Target, asyncio.Task]] = {}
        #: entry -> [passes in a row, failures in a row]
        self.streaks: dict[int, list[int]] = {}

    def configure(self, targets: list[Target]) -> None:
        """Probe exactly ``targets`` from now on (thread-safe: the supervisor calls it)."""
        if self.loop is None:
            if not targets:
                return
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="wsrelay-health", daemon=True)
            self.thread.start()
        self.loop.call_soon_threadsafe(self._apply, targets)

    def _apply(self, targets: list[Target]) -> None:
        wanted = {t.entry: t for t in targets}
        for entry, (target, task) in list(self.tasks.items()):
            if wanted.get(entry) != target:
                task.cancel()
                del self.tasks[entry]
                if entry not in wanted:  # unchecked from now on: up, as far as checks go
                    self.streaks.pop(entry, None)
                    self._set(entry, True, time.monotonic())
        for entry, target in wanted.items():
            if entry not in self.tasks:
                self.tasks[entry] = (target, self.loop.create_task(self._run(target)))

    async def _run(self, t: Target) -> None:
        # spread the first probes over the interval (HAProxy's spread-checks)
        await asyncio.sleep(random.uniform(0, t.interval))
        while True:
            started = time.monotonic()
            ok, detail = await probe(t.host, t.port, t.path, t.timeout, t.proxy_v2)
            self._record(t, ok, detail)
            await asyncio.sleep(max(0.0, t.interval - (time.monotonic() - started)))

    def _record(self, t: Target, ok: bool, detail: str) -> None:
        s = self.table.state
        base = t.entry * layout.O_SIZE
        s[base + layout.O_PROBES] += 1
        streak = self.streaks.setdefault(t.entry, [0, 0])
        streak[0 if ok else 1] += 1
        streak[1 if ok else 0] = 0
        up = s[base + layout.O_CHECK] != 0.0
        if ok and not up and streak[0] >= t.rise:
            self._set(t.entry, True, time.monotonic())
            log.info("%s up: health check GET %s passed %d times in a row (%s)", t.who, t.path, streak[0], detail)
        elif not ok and up and streak[1] >= t.fall:
            self._set(t.entry, False, time.monotonic())
            log.warning("%s down: health check GET %s failed %d times in a row (last: %s)", t.who, t.path,
                        streak[1], detail)
            same_pool = [e for e, (x, _task) in self.tasks.items() if x.pool == t.pool]
            if not any(self.table.up(e) for e in same_pool):
                log.warning("pool %s: every origin is out: trying them all (panic mode)", t.pool)

    def _set(self, entry: int, up: bool, now: float) -> None:
        s = self.table.state
        base = entry * layout.O_SIZE
        s[base + layout.O_CHECK_SINCE] = now
        s[base + layout.O_CHECK] = 1.0 if up else 0.0

    def close(self) -> None:
        if self.loop is None:
            return

        def stop() -> None:
            for _target, task in self.tasks.values():
                task.cancel()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)


class Origins:
    """The origin table and the checker, as the supervisor drives them."""

    def __init__(self, nslots: int) -> None:
        self.table = OriginTable(nslots)
        self.checker = Checker(self.table)
        #: generation -> the entries its settings use
        self.entries: dict[int, set[int]] = {}
        #: the current generation's entries by name
        self.names: dict[str, int] = {}

    def _keep(self, generation: int, running: Iterable[int]) -> set[int]:
        return set().union(*(self.entries.get(g, set()) for g in running if g != generation))

    def check(self, settings: Settings, running: Iterable[int]) -> None:
        """Raise ConfigError if the table has no room for ``settings`` beside
        what the ``running`` generations use; changes nothing."""
        self.table.assign(pools.keys(settings), self._keep(-1, running), dry_run=True)

    def configure(self, settings: Settings, generation: int, running: Iterable[int]) -> None:
        """Entries for ``generation`` (kept for those ``running`` still), then
        the checks its pools ask for. Raises ConfigError when the table is full."""
        running = set(running)
        self.names = self.table.assign(pools.keys(settings), self._keep(generation, running))
        self.entries = {g: e for g, e in self.entries.items() if g in running}
        self.entries[generation] = set(self.names.values())
        targets = [Target(self.names[key(p.name, str(a))], p.name, a.host, a.port, p.health_check_path,
                          p.health_check_interval, p.health_check_timeout, p.health_check_rise,
                          p.health_check_fall, settings.origin_proxy_protocol == "v2")
                   for p in pools.effective(settings) if p.health_check_path for a in dict.fromkeys(p.origins)]
        self.checker.configure(targets)

    def figures(self) -> list[tuple[str, str, bool, int, list[float], list[float]]]:
        """Per origin of the running settings: pool, origin, up, open
        connections, errors by reason, connect-time histogram (for /metrics)."""
        t = self.table
        out = []
        for name, e in sorted(self.names.items()):
            pool, _, origin = name.partition("/")
            out.append((pool, origin, t.up(e), t.open_connections(e), t.errors(e), t.connect_histogram(e)))
        return out

    def close(self) -> None:
        self.checker.close()
