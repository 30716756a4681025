"""The per-IP table (relay/ip_table.py) and its admission (relay/shared_memory.py),
without processes: counts against a model under random churn, a worker
killed at every single store of every operation (the table may overcount
until the reap, never undercount; after the reap it is exact), probe runs
that stay short over a long churn (no tombstone decay), the table full, and
the addresses that count as one client (relay/addresses.py)."""

from __future__ import annotations

import random

import pytest

from relay import ip_table
from relay.addresses import TrustedProxies, per_ip_key
from relay.shared_memory import Admission, SharedState


def table(capacity: int = 64) -> ip_table.IPTable:
    words = memoryview(bytearray(8 * 3 * capacity)).cast("q")
    used = memoryview(bytearray(8)).cast("q")
    return Located(words, capacity, b"0123456789abcdef", used)


def key(n: int) -> bytes:
    return per_ip_key(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 64)


class Located(ip_table.IPTable):
    """The table taking keys, as the tests write them (Admission passes their place)."""

    __slots__ = ()

    def take(self, key, slot, limit, admit):  # type: ignore[override]
        return super().take(self.locate(key), slot, limit, admit)

    def give(self, key, slot):  # type: ignore[override]
        return super().give(self.locate(key), slot)


def never() -> None:
    return None


def counts_by_slot(t: ip_table.IPTable) -> dict[tuple[bytes, int], int]:
    out = {}
    w = t.words
    for i in range(t.capacity):
        meta = w[3 * i + 2]
        if meta:
            k = ip_table._key(w[3 * i], w[3 * i + 1])
            slot = (meta >> 32) & 0xFFFFFF
            out[(k, slot)] = out.get((k, slot), 0) + (meta & 0xFFFFFFFF)
    return out


def reachable(t: ip_table.IPTable) -> None:
    """Every entry is found from its key's home without crossing a free bucket."""
    w = t.words
    for i in range(t.capacity):
        if w[3 * i + 2]:
            j = t.home(ip_table._key(w[3 * i], w[3 * i + 1]))
            while j != i:
                assert w[3 * j + 2], f"entry at {i} unreachable: free bucket at {j}"
                j = (j + 1) & t.mask


def test_take_and_give_against_a_model():
    t = table(256)
    rng = random.Random(7)
    model: dict[tuple[bytes, int], int] = {}
    for _ in range(20000):
        k, slot = key(rng.randrange(40)), rng.randrange(4)
        total = sum(v for (kk, _s), v in model.items() if kk == k)
        if rng.random() < 0.55:
            got = t.take(k, slot, 5, never)
            if total >= 5:
                assert got == "limit_ip"
            else:
                assert got is None
                model[(k, slot)] = model.get((k, slot), 0) + 1
        elif model.get((k, slot)):
            assert t.give(k, slot)
            model[(k, slot)] -= 1
            if not model[(k, slot)]:
                del model[(k, slot)]
        else:
            assert not t.give(k, slot)
        assert t.used[0] == len(model)
    assert counts_by_slot(t) == model
    reachable(t)


def test_the_global_limit_is_asked_last_and_its_answer_kept():
    t = table()
    assert t.take(key(1), 0, 5, lambda: "limit") == "limit"
    assert t.used[0] == 0 and not counts_by_slot(t)
    for _ in range(5):
        assert t.take(key(1), 0, 5, never) is None
    # at the per-IP limit the global one is not even asked
    assert t.take(key(1), 1, 5, lambda: pytest.fail("asked")) == "limit_ip"


def test_probe_runs_stay_short_under_long_churn_at_full_load():
    """Backward-shift deletion leaves no tombstones: after a million
    operations at the table's fullest, lookups are as short as at the start
    (the tombstone design this replaced decayed to full scans in 20 rounds)."""
    t = table(1024)
    rng = random.Random(1)
    live: list[int] = []
    nxt = 0
    for _ in range(200_000):
        if len(live) < t.max_entries and (rng.random() < 0.5 or not live):
            assert t.take(key(nxt), 0, 1, never) is None
            live.append(nxt)
            nxt += 1
        else:
            k = live.pop(rng.randrange(len(live)))
            assert t.give(key(k), 0)
    reachable(t)
    runs = []
    w = t.words
    for k in live:
        i, n = t.home(key(k)), 1
        while ip_table._key(w[3 * i], w[3 * i + 1]) != key(k):
            i, n = (i + 1) & t.mask, n + 1
        runs.append(n)
    assert sum(runs) / len(runs) < 3 and max(runs) < 40, (sum(runs) / len(runs), max(runs))


def test_full_table_refuses_new_addresses_and_keeps_counting_known_ones():
    t = table(64)
    for n in range(t.max_entries):
        assert t.take(key(n), 0, 3, never) is None
    assert t.take(key(999), 0, 3, never) == "full"
    assert t.take(key(0), 1, 3, never) == "full"   # a new (address, worker) pair is an entry too
    assert t.take(key(0), 0, 3, never) is None     # a known pair still counts up to its limit
    assert t.give(key(5), 0)
    assert t.take(key(999), 0, 3, never) is None   # room again


def test_capacity_follows_max_clients():
    assert ip_table.capacity_for(1) == 64
    assert ip_table.capacity_for(10_000) == 32768          # 16384 entries >= 10,000 clients
    assert ip_table.capacity_for(10 ** 15) == ip_table.MAX_CAPACITY
    for n in (1, 31, 32, 33, 5000, 10_000):
        assert ip_table.capacity_for(n) // 2 >= n


# -- a worker killed in the middle of an operation ---------------------------------------

class Killed(Exception):
    pass


class Dying:
    """The table's words, for a worker that is killed at its ``n``-th store."""

    def __init__(self, words: memoryview, n: int):
        self.words, self.left = words, n

    def __getitem__(self, i):
        return self.words[i]

    def __setitem__(self, i, v):
        if self.left == 0:
            raise Killed
        self.left -= 1
        self.words[i] = v

    def __len__(self):
        return len(self.words)


def crowded() -> tuple[ip_table.IPTable, dict]:
    """A table with long runs (64 buckets, 30 entries of 6 keys over 5 slots)."""
    t = table(64)
    rng = random.Random(3)
    model: dict[tuple[bytes, int], int] = {}
    while len(model) < 30:
        k, slot = key(rng.randrange(12)), rng.randrange(5)
        if t.take(k, slot, 100, never) is None:
            model[(k, slot)] = model.get((k, slot), 0) + 1
    return t, model


@pytest.mark.parametrize("op", ["give-last", "give", "take-new", "take-known"])
def test_a_worker_killed_at_any_store_overcounts_until_reaped_then_the_table_is_exact(op):
    base, model = crowded()
    victims = sorted(model)
    for victim in victims:
        k, slot = victim
        for n in range(40):
            t = table(64)
            t.words[:] = base.words
            t.used[0] = base.used[0]
            if op == "give-last":  # a deletion: the backward shift moves other workers' entries
                while counts_by_slot(t).get(victim, 0) > 1:
                    t.give(k, slot)
            real = t.words
            t.words = Dying(real, n)
            done = True
            try:
                if op.startswith("give"):
                    t.give(k, slot)
                elif op == "take-new":
                    t.take(per_ip_key("192.0.2.9", 64), slot, 100, never)
                else:
                    t.take(k, slot, 100, never)
            except Killed:
                done = False
            t.words = real
            expect = dict(model)
            # Between the death and the reap: other slots' clients are all still
            # counted, reachable from their key's home (never let past a limit).
            by_key = t.counts()
            for kk in {kk for kk, _s in expect}:
                others = sum(c for (k2, s2), c in expect.items() if k2 == kk and s2 != slot)
                assert by_key.get(kk, 0) >= others, (op, victim, n)
            reachable(t)
            # The reap: the dead slot's share goes, everything else is exact.
            t.rebuild(dead_slot=slot)
            assert counts_by_slot(t) == {ks: v for ks, v in expect.items() if ks[1] != slot}, (op, victim, n)
            assert t.used[0] == len(counts_by_slot(t))
            reachable(t)
            if done:
                break
        else:
            pytest.fail("the operation never completed")


# -- across processes' views: the admission in shared memory -------------------------------

def test_admission_counts_one_address_across_workers_and_the_reap_gives_a_share_back():
    shared = SharedState(8, 100)
    workers = [Admission(shared, slot, per_ip=5) for slot in range(4)]
    results = [workers[i % 4].take("127.0.0.2") for i in range(60)]
    assert results.count(None) == 5 and results.count("limit_ip") == 55
    assert shared.total_clients() == 5
    held_by_1 = shared.clients[1]
    shared.reset_slot(1)  # worker 1 killed and reaped
    assert shared.total_clients() == 5 - held_by_1
    again = [workers[0].take("127.0.0.2") for _ in range(10)]
    assert again.count(None) == held_by_1
    worker = Admission(SharedState.attach(shared.fd, 8), 2, per_ip=5)  # another process's view
    assert worker.take("127.0.0.2") == "limit_ip" and worker.take("127.0.0.3") is None


def test_admission_refuses_limit_ip_when_the_table_is_full_and_logs(caplog):
    shared = SharedState(4, 10, capacity=64)  # 32 entries
    shared.limit = 1000  # a reload raised the limit past what the table was sized for
    a = Admission(shared, 0, per_ip=2)
    for n in range(32):
        assert a.take(f"10.0.0.{n}") is None
    assert a.take("10.0.1.1") == "limit_ip"
    assert shared.total_clients() == 32
    assert "per-IP table full" in caplog.text and "RELAY_MAX_CLIENTS" in caplog.text


def test_ipv6_counts_per_prefix_and_mapped_ipv4_is_ipv4():
    assert per_ip_key("2001:db8:1:2:aaaa::1", 64) == per_ip_key("2001:db8:1:2:bbbb::2", 64)
    assert per_ip_key("2001:db8:1:2::1", 64) != per_ip_key("2001:db8:1:3::1", 64)
    assert per_ip_key("2001:db8:1:2::1", 48) == per_ip_key("2001:db8:1:3::1", 48)
    assert per_ip_key("2001:db8::1", 128) != per_ip_key("2001:db8::2", 128)
    assert per_ip_key("2001:db8:1:2::1", 60) == per_ip_key("2001:db8:1:f::1", 60)
    assert per_ip_key("2001:db8:1:2::1", 60) != per_ip_key("2001:db8:1:12::1", 60)
    assert per_ip_key("::ffff:192.0.2.1", 64) == per_ip_key("192.0.2.1", 64) != per_ip_key("192.0.2.2", 64)
    assert per_ip_key("-", 64) is None and per_ip_key("", 64) is None


def test_trusted_proxies_match_networks_of_both_families():
    t = TrustedProxies(("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"))
    assert "10.1.2.3" in t and "::ffff:10.1.2.3" in t and "192.0.2.7" in t and "2001:db8:5::1" in t
    assert "11.0.0.1" not in t and "192.0.2.8" not in t and "2001:db9::1" not in t and "-" not in t
    assert not TrustedProxies(()) and "10.0.0.1" not in TrustedProxies(())
