"""deploy/grafana-dashboard.json and deploy/alerts.yml against a real Prometheus
(Debian's ``prometheus`` package) scraping a real relay every second.

Every panel's query, with the dashboard's ``$instance`` variable set to the
relay's instance, returns a series with a number once the relay has carried
some traffic (frames mode, so the frames panels have data too); the
``instance`` variable's own query finds the relay; every alert rule
evaluates without error. ``promtool test rules`` pins down that the
global-limit alert ignores per-IP refusals (outcome ``limit_ip``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import textwrap
import urllib.parse
import urllib.request

import pytest
from websockets.asyncio.client import connect

from tests.support.net import raw_exchange, upgrade_request
from tests.support.relay import ROOT, Relay, wait_for

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana-dashboard.json")
ALERTS = os.path.join(ROOT, "deploy", "alerts.yml")


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query."""
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dashboard()["panels"]
            for t in p.get("targets", [])]


def test_every_query_is_per_instance():
    """Several hosts are never summed together, and legends say which host."""
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert "instance" in names
    for title, expr, legend in targets():
        assert 'instance=~"$instance"' in expr, title
        assert "{{instance}}" in legend, title
        if "sum by" in expr:
            assert "sum by (instance" in expr, title


def test_dashboard_charts_what_the_relay_exports():
    exprs = " ".join(e for _, e, _ in targets())
    for metric in ("wsrelay_handshake_seconds_bucket", "wsrelay_websocket_duration_seconds_bucket",
                   "wsrelay_accept_errors_total", "wsrelay_messages_total", "wsrelay_closes_total",
                   "wsrelay_ping_timeouts_total", "wsrelay_websocket_upgrades_total", "wsrelay_clients_limit"):
        assert metric in exprs, metric


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def prometheus(tmp_path):
    if PROMETHEUS is None:
        pytest.fail("prometheus missing: apt-get install prometheus (README, Development)")
    started = []

    def start(metrics_port: int) -> str:
        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(textwrap.dedent(f"""\
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            rule_files: ["{ALERTS}"]
            scrape_configs:
              - job_name: wsrelay
                static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
            """))
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        started.append((proc, log))
        base = f"http://127.0.0.1:{port}"

        def ready():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        wait_for(ready, 30, interval=0.2, what="Prometheus ready")
        return base

    yield start
    for proc, log in started:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def traffic(port: int, sessions: int = 20) -> None:
    async def session(i: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=10, close_timeout=5) as ws:
            for j in range(3):
                await ws.send(f"message {i}.{j}")
                await asyncio.wait_for(ws.recv(), 10)

    async def all_of_them() -> None:
        await asyncio.gather(*(session(i) for i in range(sessions)))
    asyncio.run(all_of_them())
    raw_exchange(port, upgrade_request("/", version="8"))  # a refusal: 426, outcome bad_request


def has_number(result: list) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_panel_returns_data_from_a_live_relay(ws_origin, prometheus):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MODE": "frames"}) as r:
        base = prometheus(r.metrics_port)
        instance = f"127.0.0.1:{r.metrics_port}"
        wait_for(lambda: api(base, "/api/v1/query", query='up{job="wsrelay"}')["result"], 30, interval=0.2,
                 what="a first scrape")
        # The dashboard's variable: label_values(wsrelay_build_info, instance).
        assert instance in api(base, "/api/v1/label/instance/values", **{"match[]": "wsrelay_build_info"})
        for _ in range(3):  # traffic over several scrapes, so rates and quantiles have something to show
            traffic(r.port)
        queries = {(title, expr.replace("$instance", instance.replace(".", "\\\\.")).replace("$__rate_interval", "1m"))
                   for title, expr, _ in targets()}
        missing = set(queries)

        def all_have_data() -> bool:
            for title, expr in list(missing):
                if has_number(api(base, "/api/v1/query", query=expr)["result"]):
                    missing.discard((title, expr))
            return not missing
        try:
            wait_for(all_have_data, 30, interval=0.5, what="data in every panel")
        except AssertionError:
            raise AssertionError(f"panels without data: {sorted(missing)}") from None
        # Another instance's filter matches nothing: hosts are kept apart.
        expr = next(e for _, e, _ in targets() if "wsrelay_clients{" in e)
        assert api(base, "/api/v1/query", query=expr.replace("$instance", "10\\\\.0\\\\.0\\\\.9:9108"))["result"] == []
        # Every alert rule evaluates against the live series.
        groups = api(base, "/api/v1/rules")["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        wait_for(lambda: all(rule.get("health") == "ok" for g in api(base, "/api/v1/rules")["groups"]
                             for rule in g["rules"]), 15, what="every rule evaluated")
        assert len(rules) >= 6


def test_global_limit_alert_ignores_per_ip_refusals(tmp_path):
    if PROMTOOL is None:
        pytest.fail("promtool missing: apt-get install prometheus")
    test = tmp_path / "alerts_test.yml"
    test.write_text(textwrap.dedent(f"""\
        rule_files: ["{ALERTS}"]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'wsrelay_websocket_upgrades_total{{instance="a:9108", worker="0", outcome="limit_ip"}}'
                values: '0+10x20'
              - series: 'wsrelay_websocket_upgrades_total{{instance="a:9108", worker="0", outcome="limit"}}'
                values: '0x20'
              - series: 'wsrelay_websocket_upgrades_total{{instance="b:9108", worker="0", outcome="limit"}}'
                values: '0+10x20'
            alert_rule_test:
              - eval_time: 15m
                alertname: WsrelayClientsAtLimit
                exp_alerts:
                  - exp_labels: {{severity: critical, instance: "b:9108"}}
                    exp_annotations:
                      summary: "wsrelay on b:9108 is refusing clients with 503 (global limit reached)"
        """))
    out = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_has_a_row_for_origins():
    exprs = " ".join(e for _, e, _ in targets())
    for metric in ("wsrelay_origin_up", "wsrelay_origin_connections", "wsrelay_origin_errors_total",
                   "wsrelay_origin_connect_seconds_bucket"):
        assert metric in exprs, metric
    assert any(p["type"] == "row" and p["title"].startswith("Origins") for p in dashboard()["panels"])


def test_origin_alerts_tell_one_origin_out_from_a_pool_out(tmp_path):
    """One origin of two out: a warning naming it; both out: the pool is down."""
    if PROMTOOL is None:
        pytest.fail("promtool missing: apt-get install prometheus")
    test = tmp_path / "alerts_test.yml"
    test.write_text(textwrap.dedent(f"""\
        rule_files: ["{ALERTS}"]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'wsrelay_origin_up{{instance="a:9108", pool="chat", origin="10.0.1.1:9000"}}'
                values: '1x20'
              - series: 'wsrelay_origin_up{{instance="a:9108", pool="chat", origin="10.0.1.2:9000"}}'
                values: '0x20'
              - series: 'wsrelay_origin_up{{instance="a:9108", pool="feed", origin="10.0.2.1:9000"}}'
                values: '0x20'
            alert_rule_test:
              - eval_time: 5m
                alertname: WsrelayOriginDown
                exp_alerts:
                  - exp_labels: {{severity: warning, instance: "a:9108", pool: chat, origin: "10.0.1.2:9000"}}
                    exp_annotations:
                      summary: "origin 10.0.1.2:9000 of pool chat is out on a:9108"
                  - exp_labels: {{severity: warning, instance: "a:9108", pool: feed, origin: "10.0.2.1:9000"}}
                    exp_annotations:
                      summary: "origin 10.0.2.1:9000 of pool feed is out on a:9108"
              - eval_time: 5m
                alertname: WsrelayPoolDown
                exp_alerts:
                  - exp_labels: {{severity: critical, instance: "a:9108", pool: feed}}
                    exp_annotations:
                      summary: "every origin of pool feed is out on a:9108"
        """))
    out = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
