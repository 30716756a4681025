"""The global client limit (relay/shared_memory.py, Admission): exact across
workers, taken without the lock while far from the limit (the native
extension's admit_fast), under the lock near it."""

from __future__ import annotations

import fcntl
import multiprocessing
import os

import pytest

from relay import shared_memory
from relay.shared_memory import Admission, SharedState

needs_native = pytest.mark.skipif(shared_memory._admit_fast is None, reason="the native extension is not built")


def _counting_locks(monkeypatch) -> list[int]:
    """How many times the admission lock is taken (the real lock still runs)."""
    calls: list[int] = []
    real = fcntl.lockf

    def lockf(fd, op, *a):
        if op == fcntl.LOCK_EX:
            calls.append(fd)
        return real(fd, op, *a)

    monkeypatch.setattr(shared_memory.fcntl, "lockf", lockf)
    return calls


@needs_native
def test_takes_far_from_the_limit_take_no_lock_and_near_it_do(monkeypatch):
    shared = SharedState(4, 20)
    workers = [Admission(shared, slot) for slot in range(4)]
    locks = _counting_locks(monkeypatch)
    # far from the limit: sum + 1 <= 20 - 4 + 1 = 17, no lock
    for i in range(17):
        assert workers[i % 4].take("10.0.0.1") is None
    assert locks == []
    # nearer: the lock decides, exactly up to the limit
    for i in range(17, 20):
        assert workers[i % 4].take("10.0.0.1") is None
    assert len(locks) == 3
    assert workers[0].take("10.0.0.1") == "limit"
    assert sum(shared.clients) == 20
    workers[1].give("10.0.0.1")
    assert workers[2].take("10.0.0.1") is None
    assert workers[3].take("10.0.0.1") == "limit"
    assert list(shared.clients) == [5, 4, 6, 5]


def test_the_limit_is_exact_one_worker_at_a_time():
    shared = SharedState(2, 5)
    a, b = Admission(shared, 0), Admission(shared, 1)
    taken = [w.take() for w in (a, b, a, b, a, b, a)]
    assert taken == [None] * 5 + ["limit", "limit"]
    assert sum(shared.clients) == 5


def _fill(fd: int, slot: int, nslots: int, start, out) -> None:
    worker = Admission(SharedState.attach(fd, nslots), slot)
    start.wait()
    n = 0
    while worker.take() is None:
        n += 1
    out.put(n)


def test_workers_racing_to_the_limit_take_exactly_the_limit_together():
    """Four processes take as fast as they can until refused: between them,
    exactly the limit, whichever way their fast and locked takes interleave."""
    for limit in (1, 7, 2000):
        shared = SharedState(4, limit)
        ctx = multiprocessing.get_context("fork")
        start, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_fill, args=(shared.fd, slot, 4, start, out)) for slot in range(4)]
        for p in procs:
            p.start()
        counts = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert sum(counts) == limit, counts
        assert sum(shared.clients) == limit
        os.close(shared.fd)
