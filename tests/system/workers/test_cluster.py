"""Cluster mode on loopback (README, "A fleet"): real relays leasing slots of
one fleet limit from a real redis-server the tests start, kill and restart.
The fleet of network-namespace hosts behind HAProxy is tests/system/deploy/test_fleet.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.redis_server import RedisServer, needs_redis
from tests.support.relay import ROOT, Relay, wait_for
from tests.support.scrape import get, metric

pytestmark = needs_redis


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(str(tmp_path)).start()
    yield r
    r.kill()


def cluster_env(redis: RedisServer, limit: int, **extra: str) -> dict[str, str]:
    env = {"RELAY_CLUSTER_REDIS": redis.url, "RELAY_CLUSTER_LIMIT": str(limit),
           "RELAY_CLUSTER_NAME": "t", "RELAY_CLUSTER_LEASE_TTL": "2"}
    env.update({f"RELAY_CLUSTER_{k.upper()}": v for k, v in extra.items()})
    return env


def upgrade(port: int) -> tuple[int, bytes, socket.socket | None]:
    """One upgrade on a raw socket: (status, head, the open socket after a 101)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(upgrade_request())
    head, _ = read_head(s)
    status = status_of(head)
    if status != 101:
        s.close()
        return status, head, None
    return status, head, s


def echo(s: socket.socket, text: bytes = b"hi") -> bool:
    """A masked text frame out, the origin's echo back (unmasked)."""
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
    data = b""
    while len(data) < 2 + len(text):
        chunk = s.recv(64)
        if not chunk:
            return False
        data += chunk
    return data[2:] == text


def fill(relays: list[Relay], limit: int, timeout: float = 10.0) -> tuple[list[socket.socket], list[bytes]]:
    """Upgrades spread over ``relays`` until ``limit`` are open (leases grow
    beside the handshakes, so early refusals are expected): the open sockets
    and the heads of the refusals."""
    held: list[socket.socket] = []
    refused: list[bytes] = []
    deadline = time.monotonic() + timeout
    i = 0
    while len(held) < limit:
        assert time.monotonic() < deadline, f"only {len(held)} of {limit} admitted in {timeout}s"
        status, head, s = upgrade(relays[i % len(relays)].port)
        i += 1
        if s is not None:
            held.append(s)
        else:
            assert status == 503, head
            refused.append(head)
            time.sleep(0.01)
    return held, refused


def test_two_relays_admit_exactly_the_fleet_limit(ws_origin, redis_server):
    env = cluster_env(redis_server, 10)
    with Relay(ws_origin.addr, env=env) as a, Relay(ws_origin.addr, env=env) as b:
        wait_for(lambda: len(redis_server.leases("t")) == 2, what="both hosts registered")
        held, _ = fill([a, b], 10)
        try:
            # The fleet is full: every further upgrade, on either host, is a 503 + Retry-After.
            for i in range(20):
                status, head, s = upgrade((a, b)[i % 2].port)
                assert status == 503 and b"Retry-After: 5" in head, head
            assert sum(lease for lease, _ in redis_server.leases("t").values()) == 10
            # What each host holds reaches Redis at its next call (a heartbeat: TTL/3).
            wait_for(lambda: sum(h for _, h in redis_server.leases("t").values()) == 10, 3, what="held in Redis")
            assert metric(a, "wsrelay_clients") + metric(b, "wsrelay_clients") == 10
            assert metric(a, "wsrelay_cluster_leased_slots") + metric(b, "wsrelay_cluster_leased_slots") == 10
            assert metric(a, "wsrelay_cluster_redis_up") == 1 and metric(a, "wsrelay_cluster_limit") == 10
            assert all(echo(s) for s in held)
        finally:
            for s in held:
                s.close()
        # Given back: the leases shrink to the headroom of an idle fleet, and the fleet fills again.
        wait_for(lambda: sum(h for _, h in redis_server.leases("t").values()) == 0, what="held back to 0")
        wait_for(lambda: sum(lease for lease, _ in redis_server.leases("t").values()) <= 6, 5,
                 what="idle leases shrink")
        held, _ = fill([a, b], 10)
        for s in held:
            s.close()


def test_clients_at_one_host_get_the_slots_an_idle_host_leased(ws_origin, redis_server):
    """Every slot of an idle fleet is leased ahead (half each here); when all
    clients come to one host, the idle one gives its slots back (the fleet is
    marked starved by the host refusing clients) and the busy host reaches
    the whole fleet limit."""
    env = cluster_env(redis_server, 10)
    with Relay(ws_origin.addr, env=env) as a, Relay(ws_origin.addr, env=env) as b:
        wait_for(lambda: sorted(lease for lease, _ in redis_server.leases("t").values()) == [5, 5], 10,
                 what="the idle fleet leased 5 + 5")
        t = time.monotonic()
        held, refused = fill([a], 10)  # retries on 503 every 10 ms
        took = time.monotonic() - t
        assert len(refused) > 0  # a's own 5 were not enough at first
        assert upgrade(a.port)[0] == 503 and upgrade(b.port)[0] == 503
        assert metric(b, "wsrelay_cluster_leased_slots") == 0
        assert took < 4, took  # a heartbeat and a second of idleness, with room to spare
        for s in held:
            s.close()


def test_a_stopped_relay_gives_its_lease_back_at_once(ws_origin, redis_server):
    env = cluster_env(redis_server, 10, lease_ttl="30")
    with Relay(ws_origin.addr, env=env) as a, Relay(ws_origin.addr, env=env) as b:
        wait_for(lambda: len(redis_server.leases("t")) == 2, what="both hosts registered")
        a.stop()
        assert "lease given back" in a.text()
        assert len(redis_server.leases("t")) == 1  # not after the 30 s TTL: now
        held, _ = fill([b], 10)
        for s in held:
            s.close()


@pytest.mark.parametrize("policy", ["hold", "local", "closed"])
def test_redis_down_then_back_empty(ws_origin, redis_server, policy):
    """Redis killed: the lease holds until its TTL, then the fallback policy
    applies; open tunnels keep echoing and /readyz stays 200 throughout.
    Redis restarted empty: the host re-registers what it holds."""
    env = cluster_env(redis_server, 10, fallback=policy, local_limit="3", lease_ttl="1")
    with Relay(ws_origin.addr, env=env) as a:
        held, _ = fill([a], 2)
        wait_for(lambda: redis_server.leases("t") and list(redis_server.leases("t").values())[0][1] == 2,
                 what="2 held, in Redis")
        lease = metric(a, "wsrelay_cluster_leased_slots")
        assert lease >= 2
        redis_server.kill()
        wait_for(lambda: metric(a, "wsrelay_cluster_fallback") == 1, 5, what="the fallback")
        assert metric(a, "wsrelay_cluster_redis_up") == 0
        assert metric(a, "wsrelay_cluster_lease_errors_total", reason="connection") > 0
        expected = {"hold": lease, "local": 3, "closed": 0}[policy]
        assert metric(a, "wsrelay_clients_limit") == expected
        assert f"RELAY_CLUSTER_FALLBACK={policy}" in a.text()
        assert all(echo(s) for s in held)
        assert get(a, "/readyz")[0] == 200
        # What the policy admits now: up to its limit, counting the 2 open tunnels.
        opened = []
        for _ in range(12):
            status, head, s = upgrade(a.port)
            if s is None:
                assert status == 503
            else:
                opened.append(s)
        assert len(opened) == max(0, expected - 2)
        held += opened
        redis_server.start()  # empty: nothing persisted
        total = len(held)
        wait_for(lambda: [h for _, h in redis_server.leases("t").values()] == [total], 5,
                 what="the host re-registered what it holds")
        wait_for(lambda: metric(a, "wsrelay_cluster_fallback") == 0 and metric(a, "wsrelay_cluster_redis_up") == 1,
                 what="leasing again")
        assert metric(a, "wsrelay_clients_limit") == metric(a, "wsrelay_cluster_leased_slots") >= total
        assert all(echo(s) for s in held)
        for s in held:
            s.close()


def test_reload_applies_a_new_fleet_limit_and_keeps_the_lease(ws_origin, redis_server, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_CLUSTER_LIMIT=10\nRELAY_ORIGIN={ws_origin.addr}\n")
    env = cluster_env(redis_server, 10)
    del env["RELAY_CLUSTER_LIMIT"]
    with Relay(None, env=env, args=("--env-file", str(env_file))) as a:
        held, _ = fill([a], 3)
        wait_for(lambda: redis_server.leases("t") and list(redis_server.leases("t").values())[0][1] == 3,
                 what="3 held, in Redis")
        (host,) = redis_server.leases("t")
        env_file.write_text(f"RELAY_CLUSTER_LIMIT=4\nRELAY_CLUSTER_REDIS=unix:///elsewhere.sock\n"
                            f"RELAY_ORIGIN={ws_origin.addr}\n")
        a.signal(signal.SIGHUP)
        a.wait_log("reload: generation 1 accepting")
        assert "RELAY_CLUSTER_REDIS changes need a restart" in a.text()
        more, _ = fill([a], 1)
        for _ in range(5):
            assert upgrade(a.port)[0] == 503
        assert list(redis_server.leases("t")) == [host]  # the same host id, one lease
        wait_for(lambda: redis_server.leases("t")[host] == (4, 4), 3, what="lease 4, held 4")
        for s in held + more:
            s.close()


def test_check_says_whether_redis_answers(redis_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(cluster_env(redis_server, 10), RELAY_ORIGIN="127.0.0.1:9", RELAY_LISTEN="127.0.0.1:0",
               RELAY_METRICS_LISTEN="")
    run = lambda: subprocess.run([sys.executable, "-m", "relay", "check"], env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=20, cwd=ROOT)
    out = run()
    assert out.returncode == 0 and "answers (PING" in out.stderr and "fleet 't': 0 hosts" in out.stderr, out.stderr
    redis_server.kill()
    out = run()
    assert out.returncode == 0 and "does not answer" in out.stderr and "RELAY_CLUSTER_FALLBACK=hold" in out.stderr


@pytest.mark.parametrize("env,expect", [
    ({"RELAY_CLUSTER_REDIS": "redis://127.0.0.1:6379"}, "RELAY_CLUSTER_LIMIT is not set"),
    ({"RELAY_CLUSTER_REDIS": "http://127.0.0.1:6379", "RELAY_CLUSTER_LIMIT": "5"}, "expected redis://"),
    ({"RELAY_CLUSTER_REDIS": "redis+sentinel://h:26379", "RELAY_CLUSTER_LIMIT": "5"}, "the service name"),
    ({"RELAY_CLUSTER_FALLBACK": "open"}, "hold, local, closed"),
    ({"RELAY_CLUSTER_NAME": "a b"}, "RELAY_CLUSTER_NAME"),
    # a fleet limit without Redis would silently not apply
    ({"RELAY_CLUSTER_LIMIT": "100"}, "RELAY_CLUSTER_LIMIT needs RELAY_CLUSTER_REDIS"),
    ({"RELAY_CLUSTER_LIMIT": "100", "RELAY_CLUSTER_FALLBACK": "closed"},
     "RELAY_CLUSTER_LIMIT, RELAY_CLUSTER_FALLBACK need RELAY_CLUSTER_REDIS"),
])
def test_bad_cluster_settings_are_one_clear_line(env, expect):
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(env, RELAY_ORIGIN="127.0.0.1:9")
    out = subprocess.run([sys.executable, "-m", "relay", "check"], env=e, capture_output=True, text=True,
                         timeout=20, cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and expect in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_an_unreachable_sentinel_is_one_short_line():
    """redis-py's Sentinel error embeds every connection's repr (kilobytes): the note keeps one line of it."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(RELAY_ORIGIN="127.0.0.1:9", RELAY_CLUSTER_LIMIT="10", RELAY_LISTEN="127.0.0.1:0", RELAY_METRICS_LISTEN="",
             RELAY_CLUSTER_REDIS="redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/svc")
    out = subprocess.run([sys.executable, "-m", "relay", "check"], env=e, capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    note = [line for line in out.stderr.splitlines() if "does not answer" in line]
    assert out.returncode == 0 and len(note) == 1 and len(note[0]) < 500, out.stderr
    assert ":pw@" not in out.stderr  # the password never shown


def test_redis_password_is_redacted():
    from relay.config import load

    s = load({"RELAY_ORIGIN": "127.0.0.1:9", "RELAY_CLUSTER_REDIS": "redis://user:s3cret@10.0.0.9:6379/2",
              "RELAY_CLUSTER_LIMIT": "5"})
    assert s.to_dict()["RELAY_CLUSTER_REDIS"] == "redis://user:(redacted)@10.0.0.9:6379/2"
    assert "s3cret" not in s.to_json().decode()


def test_cluster_alerts_fire_on_redis_down_and_a_fleet_near_its_limit(tmp_path):
    """deploy/alerts.yml's cluster rules, on the series a cluster-mode relay exports (promtool test rules)."""
    import shutil
    import textwrap

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: apt-get install prometheus")
    alerts = os.path.join(ROOT, "deploy", "alerts.yml")
    test = tmp_path / "cluster_alerts_test.yml"
    test.write_text(textwrap.dedent(f"""\
        rule_files: ["{alerts}"]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'wsrelay_cluster_redis_up{{instance="a:9108", cluster="edge"}}'
                values: '1 1 0 0 0 0'
              - series: 'wsrelay_cluster_redis_up{{instance="b:9108", cluster="edge"}}'
                values: '1 1 1 1 1 1'
              - series: 'wsrelay_cluster_clients{{instance="a:9108", cluster="edge"}}'
                values: '50+10x10'
              - series: 'wsrelay_cluster_clients{{instance="b:9108", cluster="edge"}}'
                values: '50+9x10'
              - series: 'wsrelay_cluster_limit{{instance="a:9108", cluster="edge"}}'
                values: '100x10'
              - series: 'wsrelay_cluster_limit{{instance="b:9108", cluster="edge"}}'
                values: '100x10'
            alert_rule_test:
              - eval_time: 2m
                alertname: WsrelayClusterRedisDown
                exp_alerts: []
              - eval_time: 4m
                alertname: WsrelayClusterRedisDown
                exp_alerts:
                  - exp_labels: {{severity: critical, instance: "a:9108", cluster: edge}}
                    exp_annotations:
                      summary: "wsrelay on a:9108 cannot reach the Redis of fleet edge"
              - eval_time: 5m
                alertname: WsrelayFleetNearLimit
                exp_alerts: []
              - eval_time: 10m
                alertname: WsrelayFleetNearLimit
                exp_alerts:
                  - exp_labels: {{severity: warning, cluster: edge}}
                    exp_annotations:
                      summary: "fleet edge is at 150% of its client limit"
        """))
    out = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_leases_through_sentinel(ws_origin, tmp_path):
    """RELAY_CLUSTER_REDIS=redis+sentinel://…: the master is found through a
    real Sentinel (redis-server --sentinel) and leases land there."""
    from tests.support.net import free_port
    from tests.support.redis_server import REDIS_SERVER

    master = RedisServer(str(tmp_path), port=free_port()).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor fleet 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        import redis

        def answers():
            try:
                with redis.Redis(port=port, socket_timeout=1) as s:
                    return s.sentinel_get_master_addr_by_name("fleet") is not None
            except redis.RedisError:
                return False
        wait_for(answers, 10, what="the sentinel")
        env = {"RELAY_CLUSTER_REDIS": f"redis+sentinel://127.0.0.1:{port}/fleet", "RELAY_CLUSTER_LIMIT": "4",
               "RELAY_CLUSTER_NAME": "t"}
        with Relay(ws_origin.addr, env=env) as a:
            wait_for(lambda: len(master.leases("t")) == 1, what="a lease on the master")
            held, _ = fill([a], 4)
            assert upgrade(a.port)[0] == 503
            for s in held:
                s.close()
    finally:
        sentinel.kill()
        sentinel.wait(10)
        master.kill()
