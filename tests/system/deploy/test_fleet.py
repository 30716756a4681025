"""The fleet for real (README, "A fleet"): deploy/fleet/fleet.sh builds three
network-namespace hosts (2 workers each) leasing one limit of 100 from a
Redis in a fourth namespace, behind HAProxy (mode tcp, leastconn, /readyz
checks); the tests break it as an operator's night would and measure.

Each test prints its figures (``pytest -s`` shows them). Skipped only where
network namespaces cannot be created (not root, no CAP_SYS_ADMIN)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.support.fleet import HAPROXY, Fleet, counts, host_addr, namespaces_work
from tests.support.redis_server import needs_redis
from tests.support.relay import wait_for

TTL = 2.0
HEARTBEAT = min(TTL / 3, 1.0)
LIMIT = 100
LOCAL = 20

_why = namespaces_work()
pytestmark = [needs_redis, pytest.mark.slow,
              pytest.mark.skipif(_why is not None, reason=f"the fleet needs network namespaces: {_why}")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(str(tmp_path_factory.mktemp("fleet")), limit=LIMIT, ttl=TTL, local_limit=LOCAL, block=64)
    try:
        f.sh("down")  # leftovers of an interrupted run of this same name
        print("\n" + f.up())
        yield f
    finally:
        f.down()


@pytest.fixture
def at_rest(fleet):
    """Each test starts and ends with an idle fleet of three healthy hosts."""
    fleet.wait_at_rest()
    yield fleet
    fleet.close_all()
    fleet.wait_at_rest()


def figure(text: str) -> None:
    print(f"\nFLEET FIGURE: {text}")


def test_1_burst_through_haproxy_admits_exactly_the_fleet_limit(at_rest):
    f = at_rest
    for round_ in range(1, 4):
        t0 = time.monotonic()
        answers = f.burst(300)
        c = counts(answers)
        assert c[101] == LIMIT and c[503] == 300 - LIMIT, c
        refusals = [a for a in answers if a.status == 503]
        assert all(b"\r\nRetry-After: 5\r\n" in a.head for a in refusals)
        last = max(a.at for a in answers if a.status == 101) - t0
        assert sum(f.clients().values()) == LIMIT
        assert f.echo_all()
        # Redis agrees: the leases sum to the limit, and what hosts hold reaches it within a heartbeat.
        wait_for(lambda: sum(h for _, h in f.leases().values()) == LIMIT, 3, what="held in Redis")
        assert sum(lease for lease, _ in f.leases().values()) <= LIMIT
        figure(f"round {round_}: 300 concurrent upgrades: {c[101]} x 101, {c[503]} x 503 + Retry-After; "
               f"the 100th admitted {last * 1000:.0f} ms after the burst began; per host {f.clients()}")
        f.close_all()
        f.wait_at_rest()


def test_2_a_killed_hosts_slots_come_back_within_the_ttl(at_rest):
    f = at_rest
    assert counts(f.burst(300))[101] == LIMIT
    before = f.clients()
    victim = 2
    victim_id = f.host_id(victim)
    t_kill = time.monotonic()
    f.sh("kill", str(victim))
    # Its clients are gone with it; Redis forgets its lease within the TTL, and the others take the slots.
    wait_for(lambda: f.drop_dead() >= 0 and len(f.held) == LIMIT - before[victim], 10, what="victim's clients dropped")
    expired = full = None
    got = 0
    while full is None:
        now = time.monotonic() - t_kill
        assert now < TTL + 5, f"{got} of {before[victim]} slots back after {now:.1f}s"
        if expired is None and victim_id not in f.leases():
            expired = now
        got += counts(f.burst(30))[101]
        if got >= before[victim]:
            full = time.monotonic() - t_kill
    assert sum(f.clients().values()) == LIMIT and got == before[victim]
    assert expired is not None and expired <= TTL + 0.3, expired  # Redis's TTL, polled every burst
    assert full <= TTL + HEARTBEAT + 1.0, full  # then one grow call by the hosts refusing clients
    for _ in range(3):  # and not one more
        assert counts(f.burst(50))[101] == 0
    figure(f"host {victim} (holding {before[victim]} clients) SIGKILLed: Redis dropped its lease {expired:.2f} s "
           f"later (TTL {TTL:g} s), the others held all {LIMIT} slots {full:.2f} s after the kill; fleet {f.clients()}")
    f.close_all()
    f.sh("start", str(victim))


@pytest.mark.parametrize("policy", ["hold", "local", "closed"])
def test_3_a_host_cut_off_from_redis_applies_its_fallback(at_rest, policy):
    f = at_rest
    cut = 3
    env = f"{f.dir}/h{cut}.env"
    text = open(env).read()
    with open(env, "w") as fh:
        fh.write(re.sub(r"(?m)^RELAY_CLUSTER_FALLBACK=.*$", f"RELAY_CLUSTER_FALLBACK={policy}", text))
    reload(f, cut)
    f.wait_at_rest()
    # 10 clients straight to the host to be cut: it holds 10 of its lease.
    direct = f.burst(10, host=host_addr(cut), port=8080)
    assert counts(direct)[101] == 10
    f.sh("cut", str(cut))
    wait_for(lambda: f.metrics(cut).get("wsrelay_cluster_fallback") == 1, TTL + 3, what="the fallback")
    m = f.metrics(cut)
    lease, held = int(m["wsrelay_cluster_leased_slots"]), int(m["wsrelay_clients"])
    assert m["wsrelay_cluster_redis_up"] == 0 and held == 10
    expect_limit = {"hold": lease, "local": LOCAL, "closed": 0}[policy]
    assert m["wsrelay_clients_limit"] == expect_limit
    assert f.readyz(cut) == 200  # Redis is not the load balancer's business
    wait_for(lambda: f.host_id(cut) not in f.leases(), 3, what="Redis forgot the cut host")
    # Everyone hammers: the others fill the whole fleet limit, the cut host its fallback's.
    others = lambda: sum(n for i, n in f.clients().items() if i != cut)  # noqa: E731
    deadline = time.monotonic() + 20
    while others() < LIMIT:
        assert time.monotonic() < deadline, f"the others hold {others()} of {LIMIT}"
        f.burst(60)
        f.burst(20, host=host_addr(cut), port=8080)
    f.burst(40, host=host_addr(cut), port=8080)
    f.burst(60)
    cut_holds = f.clients()[cut]
    assert others() == LIMIT
    over = sum(f.clients().values()) - LIMIT
    bound = {"hold": lease, "local": max(held, LOCAL), "closed": held}[policy]
    assert over == cut_holds == bound, (over, cut_holds, bound)
    assert f.echo_all(direct[:10])  # the cut host's open tunnels keep serving
    figure(f"fallback={policy}: cut host leased {lease}, held {held}; after the TTL it admits up to "
           f"{expect_limit}; fleet {f.clients()}: over-admission {over} = formula {bound}")
    # The link back: the cut host re-registers what it holds, every host sheds its free slots,
    # nothing more is admitted until the fleet is under its limit.
    t = time.monotonic()
    f.sh("restore", str(cut))
    wait_for(lambda: f.leases().get(f.host_id(cut), (0, -1))[1] == cut_holds, 5, what="re-registered")
    wait_for(lambda: sorted(h for _, h in f.leases().values()) == sorted(f.clients().values())
             and all(lease == h for lease, h in f.leases().values()), 5, what="leases shrunk to what is held")
    converged = time.monotonic() - t
    assert counts(f.burst(60))[101] == 0
    figure(f"fallback={policy}: link restored, Redis true again (every lease = held, sum "
           f"{sum(h for _, h in f.leases().values())}) after {converged:.2f} s")
    f.close_all()
    f.wait_at_rest()
    assert counts(f.burst(300))[101] == LIMIT  # converged: the limit is exact again


def reload(f: Fleet, i: int) -> None:
    """SIGHUP to host i, and wait until its new generation accepts."""
    applied = lambda: open(f"{f.dir}/h{i}.log").read().count("reload: generation")  # noqa: E731
    before = applied()
    f.sh("reload", str(i))
    wait_for(lambda: applied() > before, 20, what=f"host {i} reloaded")


def test_4_redis_restarted_empty_gets_the_true_fleet_sum_back(at_rest):
    f = at_rest
    assert counts(f.burst(60))[101] == 60
    held = f.clients()
    f.sh("redis-kill")
    wait_for(lambda: all(f.metrics(i)["wsrelay_cluster_redis_up"] == 0 for i in (1, 2, 3)), 5, what="Redis down seen")
    t = time.monotonic()
    f.sh("redis-start")
    ids = {f.host_id(i): n for i, n in held.items()}
    wait_for(lambda: {h: v[1] for h, v in f.leases().items()} == ids, 5, what=f"hosts re-registered {ids}")
    took = time.monotonic() - t
    leases = f.leases()
    assert sum(h for _, h in leases.values()) == 60 and sum(lease for lease, _ in leases.values()) <= LIMIT
    c = counts(f.burst(300))
    assert c[101] == LIMIT - 60, c
    figure(f"Redis SIGKILLed and restarted empty with 60 clients open {held}: the fleet sum was true again "
           f"{took:.2f} s after Redis started; then exactly {c[101]} more admitted")


def test_5_reload_under_churn_refuses_nothing_and_leaks_no_lease(at_rest):
    f = at_rest
    ids = {i: f.host_id(i) for i in (1, 2, 3)}
    outcomes: list[int] = []
    stop = threading.Event()

    async def churn_loop():
        from tests.support.fleet import echo, upgrade

        while not stop.is_set():
            a = await upgrade(*HAPROXY)
            outcomes.append(a.status)
            if a.writer is not None:
                outcomes.append(200 if await echo(a) else -1)
                a.writer.close()

    async def churn(n: int):
        import asyncio

        await asyncio.gather(*(churn_loop() for _ in range(n)))

    done = threading.Thread(target=lambda: f.loop.run(churn(20), 120), daemon=True)
    done.start()
    wait_for(lambda: len(outcomes) > 200, 20, what="churn running")
    reload(f, 2)
    n_at_reload = len(outcomes)
    wait_for(lambda: len(outcomes) > n_at_reload + 400, 30, what="churn after the reload")
    stop.set()
    done.join(30)
    c = {s: outcomes.count(s) for s in set(outcomes)}
    assert set(c) == {101, 200} and c[101] == c[200], c  # every upgrade admitted and echoed
    f.wait_at_rest()
    assert {f.host_id(i) for i in (1, 2, 3)} == set(ids.values()) == set(f.leases())  # same ids, one lease each
    figure(f"SIGHUP to host 2 under churn (20 loops through HAProxy): {c[101]} upgrades, all 101 and echoed, "
           f"0 refused; afterwards leases {sorted(l for l, _ in f.leases().values())}, 0 held")
