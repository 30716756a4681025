"""The supervisor's table of worker processes: who runs, in which generation,
in which shared-memory slot, whether ready or draining; and the record of a
reload that is starting a generation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from relay.config import Settings


class Reload(NamedTuple):
    """A reload in progress: the generation it starts and what a refusal goes back to."""

    generation: int
    before: Settings


class Worker:
    """One worker process as the supervisor tracks it."""

    __slots__ = ("pid", "index", "slot", "generation", "ready", "started", "ready_fd", "draining", "killed")

    def __init__(self, pid: int, index: int, slot: int, generation: int, ready_fd: int):
        self.pid = pid
        #: its place in the configured worker count; metric series are per index
        self.index = index
        #: its slot of shared memory (metrics, client count)
        self.slot = slot
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        #: the pipe it writes one byte to once it accepts (-1 when read)
        self.ready_fd = ready_fd
        #: killed by the supervisor as unresponsive
        self.killed = False
        self.draining = False


class WorkerSet:
    """Workers by pid."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Worker] = {}

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.by_pid.values())

    def __len__(self) -> int:
        return len(self.by_pid)

    def add(self, w: Worker) -> None:
        self.by_pid[w.pid] = w

    def pop(self, pid: int) -> Worker | None:
        return self.by_pid.pop(pid, None)

    def of(self, generation: int) -> list[Worker]:
        return [w for w in self.by_pid.values() if w.generation == generation]

    def with_ready_fd(self, fd: int) -> Worker | None:
        return next((w for w in self.by_pid.values() if w.ready_fd == fd), None)

    def free_slot(self, nslots: int) -> int | None:
        """A shared-memory slot no live worker uses (draining ones keep theirs)."""
        used = {w.slot for w in self.by_pid.values()}
        return next((i for i in range(nslots) if i not in used), None)

    def signal(self, sig: int, only: Callable[[Worker], bool] | None = None) -> None:
        for w in self.by_pid.values():
            if only is None or only(w):
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass

    def check_heartbeats(self, last_heartbeat: Callable[[Worker], float], now: float,
                         hung_after: float) -> tuple[bool, list[tuple[Worker, float]]]:
        """Ready workers whose heartbeat is older than ``hung_after`` seconds (and
        how old), not yet killed; and whether any ready worker's is fresh."""
        fresh, stuck = False, []
        for w in self.by_pid.values():
            if not w.ready or w.killed:
                continue
            silent = now - last_heartbeat(w)
            if silent < hung_after:
                fresh = True
            else:
                stuck.append((w, silent))
        return fresh, stuck

    def describe(self) -> list[dict]:
        """For /config: each worker's index, pid, generation and state."""
        return [{"index": w.index, "pid": w.pid, "generation": w.generation, "ready": w.ready,
                 "draining": w.draining} for w in sorted(self.by_pid.values(), key=lambda w: (w.generation, w.index))]


#: a worker that lived this long resets its index's backoff
HEALTHY_AFTER = 5.0
RESTART_BACKOFF_MAX = 10.0


class Restarts:
    """When each worker index may start again: at once after a worker that
    lived :data:`HEALTHY_AFTER`, else after 0.1 s doubling up to
    :data:`RESTART_BACKOFF_MAX` while it keeps dying young; never, until the
    next reload, for an index whose code cannot join the supervisor."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: dict[int, int] = {}      # index -> consecutive early deaths
        self.not_before: dict[int, float] = {}  # index -> earliest restart (monotonic)
        self.blocked: set[int] = set()

    def died(self, index: int, lived: float) -> float:
        """A worker of ``index`` died after ``lived`` seconds; returns the delay before its restart."""
        fails = self.failures.get(index, 0) + 1 if lived < HEALTHY_AFTER else 0
        self.failures[index] = fails
        delay = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** (fails - 1)) if fails else 0.0
        self.not_before[index] = time.monotonic() + delay
        self.count += 1
        return delay

    def delay(self, index: int, seconds: float) -> None:
        self.not_before[index] = time.monotonic() + seconds

    def may_start(self, index: int, now: float) -> bool:
        return index not in self.blocked and now >= self.not_before.get(index, 0.0)

    def due_in(self, now: float, running: set[int]) -> float | None:
        """Seconds until the next pending restart of an index not running, if any."""
        pending = [v - now for i, v in self.not_before.items() if v > now and i not in running]
        return min(pending) if pending else None

    def reset(self, blocked_too: bool = False) -> None:
        """A new generation starts: every index may start at once."""
        self.failures.clear()
        self.not_before.clear()
        if blocked_too:
            self.blocked.clear()
