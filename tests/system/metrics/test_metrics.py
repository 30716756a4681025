"""Observability against the real supervisor: /metrics, /healthz, /readyz and
the JSON access log (README: "Observability"; issue 4)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest
from websockets.asyncio.client import connect

from tests.support.net import raw_exchange, read_head, status_of, upgrade_request
from tests.support.relay import ROOT, Relay, run, wait_for
from tests.support.scrape import get, samples, value
from tests.support.scrape import metric as total


@pytest.fixture(scope="module")
def mrelay(ws_origin, data_plane):
    env = {"RELAY_MAX_CLIENTS": "3", "RELAY_WS_PATHS": "/ok"}
    with Relay(ws_origin.addr, workers=2, env=env) as r:
        yield r


def test_every_worker_has_its_series_from_the_start(mrelay):
    s = samples(mrelay)
    for w in ("0", "1"):
        assert ("wsrelay_websocket_connections", (("worker", w),)) in s
        for outcome in ("upgraded", "origin_rejected", "bad_request", "forbidden", "limit", "origin_error",
                        "timeout", "draining", "limit_ip"):
            assert ("wsrelay_websocket_upgrades_total", (("outcome", outcome), ("worker", w))) in s
        for d in ("upstream", "downstream"):
            assert ("wsrelay_bytes_total", (("direction", d), ("worker", w))) in s
        assert ("wsrelay_handshake_seconds_count", (("worker", w),)) in s
        assert ("wsrelay_websocket_duration_seconds_count", (("worker", w),)) in s
        assert s[("wsrelay_worker_resident_memory_bytes", (("worker", w),))] > 1 << 20
        assert s[("wsrelay_worker_open_fds", (("worker", w),))] > 3
        assert s[("wsrelay_worker_cpu_seconds_total", (("worker", w),))] > 0
    assert s[("wsrelay_clients_limit", ())] == 3
    plane = "native" if Relay.data_plane != "python" and __import__("relay.native").native.AVAILABLE else "python"
    assert s[("wsrelay_build_info", (("data_plane", plane), ("version", __import__("relay").__version__)))] == 1
    assert ("wsrelay_worker_restarts_total", ()) in s


def test_traffic_is_counted_by_outcome_bytes_and_clients(mrelay):
    before = samples(mrelay)

    def delta(name, **labels):
        want = set(labels.items())
        return total(mrelay, name, **labels) - sum(
            v for (n, lbl), v in before.items() if n == name and want <= set(lbl))

    up = 300_000
    down = 0

    async def go():
        nonlocal down
        async with connect(mrelay.url + "/ok", max_size=None, compression=None) as a, \
                connect(mrelay.url + "/ok", compression=None) as b:
            payload = os.urandom(100_000)
            for _ in range(3):
                await a.send(payload)
                down += len(await a.recv())
            await b.send("x")
            await b.recv()
            # wsrelay_clients follows the open WebSockets within a second
            deadline = time.monotonic() + 1.0
            while value(mrelay, "wsrelay_clients") != 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert value(mrelay, "wsrelay_clients") == 2
            assert total(mrelay, "wsrelay_websocket_connections") == 2
            # byte counts of open tunnels are at most a second old
            deadline = time.monotonic() + 2
            while delta("wsrelay_bytes_total", direction="upstream") < up and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert delta("wsrelay_bytes_total", direction="upstream") >= up
            assert delta("wsrelay_bytes_total", direction="downstream") >= down
    run(go())
    # ...and drops with them within a second of the closes
    deadline = time.monotonic() + 1.0
    while value(mrelay, "wsrelay_clients") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(mrelay, "wsrelay_clients") == 0
    # 403 (path outside RELAY_WS_PATHS) and 503 (limit)
    assert status_of(raw_exchange(mrelay.port, upgrade_request("/nope"))) == 403
    held = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", mrelay.port), timeout=10)
        s.sendall(upgrade_request("/ok"))
        assert status_of(read_head(s)[0]) == 101
        held.append(s)
    assert status_of(raw_exchange(mrelay.port, upgrade_request("/ok"))) == 503
    for s in held:
        s.close()
    assert delta("wsrelay_websocket_upgrades_total", outcome="upgraded") == 5
    assert delta("wsrelay_websocket_upgrades_total", outcome="forbidden") == 1
    assert delta("wsrelay_websocket_upgrades_total", outcome="limit") == 1
    assert delta("wsrelay_http_requests_total", code="101") == 5
    assert delta("wsrelay_http_requests_total", code="403") == 1
    assert delta("wsrelay_handshake_seconds_count") == 5
    wait_for(lambda: value(mrelay, "wsrelay_clients") == 0, 5, what="clients back to 0")
    wait_for(lambda: delta("wsrelay_websocket_duration_seconds_count") == 5, 5, what="durations")


def test_origin_error_is_counted():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with Relay(f"127.0.0.1:{dead}", workers=2) as r:
        assert status_of(raw_exchange(r.port, upgrade_request("/"))) == 502
        assert total(r, "wsrelay_websocket_upgrades_total", outcome="origin_error") == 1
        assert total(r, "wsrelay_http_requests_total", code="502") == 1
        assert value(r, "wsrelay_clients") == 0  # the slot was given back at once


def test_promtool_accepts_the_exposition(mrelay):
    text = get(mrelay, "/metrics")[1]
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_health_and_readiness_through_a_drain(ws_origin):
    r = Relay(ws_origin.addr, workers=2, env={"RELAY_DRAIN_TIMEOUT": "3"}).start()
    try:
        assert get(r, "/healthz")[0] == 200
        assert get(r, "/readyz")[0] == 200
        assert get(r, "/nope")[0] == 404
        s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        s.sendall(upgrade_request("/"))
        assert status_of(read_head(s)[0]) == 101
        r.signal(signal.SIGTERM)
        wait_for(lambda: get(r, "/readyz")[0] == 503, 5, what="/readyz 503 while draining")
        assert get(r, "/healthz")[0] == 200
        s.close()
        assert r.proc.wait(10) == 0
    finally:
        r.stop()


def test_access_log_line_of_a_finished_session(ws_origin):
    with Relay(ws_origin.addr, workers=1) as r:
        async def go():
            async with connect(r.url + "/room/7?user=ann", compression=None) as ws:
                await ws.send("12345")
                assert await ws.recv() == "12345"
                await asyncio.sleep(0.3)
        t0 = time.time()
        run(go())
        wait_for(lambda: any('"outcome":"upgraded"' in x for x in r.access), 5, what="access log line")
        rec = json.loads(next(x for x in r.access if '"outcome":"upgraded"' in x))
        assert set(rec) >= {"time", "worker", "client", "path", "status", "outcome", "handshake_ms",
                            "duration_s", "bytes_up", "bytes_down", "origin"}
        assert rec["worker"] == 0 and rec["client"] == "127.0.0.1" and rec["path"] == "/room/7"
        assert rec["status"] == 101 and rec["origin"] == ws_origin.addr
        assert 0 < rec["handshake_ms"] < 5000
        assert 0.3 <= rec["duration_s"] < 10
        assert t0 - 1 <= _epoch(rec["time"]) <= time.time()
        # up: a masked 5-byte text frame (2+4+5) and a masked Close 1000 (2+4+2);
        # down: the echoed frame (2+5) and the origin's Close 1000 (2+2)
        assert rec["bytes_up"] == 11 + 8 and rec["bytes_down"] == 7 + 4, rec
        assert status_of(raw_exchange(r.port, upgrade_request("/", version="7"))) == 426
        wait_for(lambda: any('"status":426' in x for x in r.access), 5, what="refusal logged")


def test_access_log_can_be_turned_off(ws_origin):
    with Relay(ws_origin.addr, workers=1, env={"RELAY_ACCESS_LOG": "0"}) as r:
        async def go():
            async with connect(r.url + "/") as ws:
                await ws.send("x")
                await ws.recv()
        run(go())
        wait_for(lambda: value(r, "wsrelay_websocket_duration_seconds_count", worker="0") == 1, 5,
                 what="session end")
        assert r.access == []


def test_prometheus_config_and_alert_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "config", "deploy/prometheus.yml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["promtool", "check", "rules", "deploy/alerts.yml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_slow_and_idle_scrapers_never_stall_the_supervisor(ws_origin):
    """Scrapers that never read their answer, and more idle connections than
    the endpoint keeps: /healthz still answers at once and the relay serves."""
    with Relay(ws_origin.addr, workers=1) as r:
        size = len(get(r, "/metrics")[1])
        slow = []
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a tiny window, never read
            s.connect(("127.0.0.1", r.metrics_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.append(s)
        idle = [socket.create_connection(("127.0.0.1", r.metrics_port), timeout=5) for _ in range(100)]
        try:
            t0 = time.monotonic()
            assert get(r, "/healthz")[0] == 200
            assert time.monotonic() - t0 < 1.0, f"/healthz took {time.monotonic() - t0:.2f}s"
            with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
                s.sendall(upgrade_request("/"))
                assert status_of(read_head(s)[0]) == 101
            # the slow scrapers get their whole answer once they read
            s = slow[0]
            s.settimeout(10)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            assert got.startswith(b"HTTP/1.1 200") and len(got) > size // 2, (len(got), size)
        finally:
            for s in slow + idle:
                s.close()


def test_access_log_line_of_a_plain_http_request(aio_origin):
    with Relay(aio_origin.addr, workers=2) as r:
        t0 = time.time()
        body = b"hello origin"
        req = (b"POST /form?x=1 HTTP/1.1\r\nHost: relay.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
               % len(body)) + body
        out = raw_exchange(r.port, req)
        assert status_of(out) == 200 and out.endswith(body)
        wait_for(lambda: any('"method":"POST"' in x for x in r.access), 5, what="access log line")
        rec = json.loads(next(x for x in r.access if '"method":"POST"' in x))
        assert rec["worker"] in (0, 1) and rec["client"] == "127.0.0.1" and rec["path"] == "/form"
        assert rec["status"] == 200 and rec["outcome"] == "proxied" and rec["origin"] == aio_origin.addr
        assert rec["bytes_up"] == len(body) and rec["bytes_down"] == len(body)
        assert 0 <= rec["duration_s"] < 5 and t0 - 1 <= _epoch(rec["time"]) <= time.time()


def test_counters_never_go_backwards_for_a_worker_index_across_a_restart(ws_origin):
    """SIGKILL of a worker holding tunnels: every counter of its index keeps at
    least the value it had (the supervisor folds the dead worker's figures into
    the index's history); only the process's own CPU seconds restart, a reset
    rate() handles (README, Observability)."""
    with Relay(ws_origin.addr, workers=2) as r:
        held = []
        for i in range(10):
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            s.sendall(upgrade_request("/"))
            _, rest = read_head(s)
            msg = b"\x82\x80\x00\x00\x00\x00"  # an empty masked binary frame, echoed as \x82\x00
            for _ in range(i + 1):
                s.sendall(msg)
            got = rest
            while len(got) < 2 * (i + 1):
                got += s.recv(65536)
            held.append(s)
        by_worker = {w: value(r, "wsrelay_websocket_connections", worker=w) for w in "01"}
        victim = max(by_worker, key=by_worker.get)
        assert by_worker[victim] > 0
        # byte counts of open tunnels are published within a second: wait for all of them
        sent = sum(range(1, 11))
        wait_for(lambda: total(r, "wsrelay_bytes_total", direction="upstream") >= 6 * sent
                 and total(r, "wsrelay_bytes_total", direction="downstream") >= 2 * sent, 3,
                 what="bytes published")

        def counters() -> dict:
            return {k: v for k, v in samples(r).items()
                    if ("worker", victim) in k[1] and k[0] != "wsrelay_worker_cpu_seconds_total"
                    and (k[0].endswith(("_total", "_count", "_sum", "_bucket")))}
        before = counters()
        assert before[("wsrelay_websocket_upgrades_total", (("outcome", "upgraded"), ("worker", victim)))] > 0
        old = r.worker_pids()[int(victim)]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: r.worker_pids().get(int(victim)) not in (None, old), 10, what="worker replaced")
        wait_for(lambda: value(r, "wsrelay_worker_restarts_total") == 1, 5, what="restart counted")
        after = counters()
        went_back = {k: (before[k], after.get(k)) for k in before if after.get(k, -1) < before[k]}
        assert not went_back, went_back
        assert value(r, "wsrelay_websocket_connections", worker=victim) == 0
        for s in held:
            s.close()


def test_health_and_readiness_without_a_live_worker(ws_origin):
    """Workers that crash at start: /readyz is 503 (never ready) and /healthz
    503 while no worker is alive (between restarts)."""
    r = Relay(ws_origin.addr, workers=1, env={"WSRELAY_FAULT": "crash-on-start"}, tracebacks=True).start(wait_ready=False)
    try:
        r.wait_log("metrics on http://", timeout=15)
        r.metrics_port = int(re.search(r"metrics on http://[^ ]*?:(\d+)/", r.text()).group(1))
        r.wait_log("restarting in", count=2, timeout=15)
        wait_for(lambda: get(r, "/healthz")[0] == 503, 10, what="/healthz 503 with no live worker")
        assert get(r, "/readyz")[0] == 503
    finally:
        r.stop()


def _epoch(rfc3339: str) -> float:
    """The access log's time: RFC 3339 in UTC with milliseconds."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rfc3339), rfc3339
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
