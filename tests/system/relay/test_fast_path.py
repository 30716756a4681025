"""The fast path (relay/native/fast_path.py, fast_path.c): plain upgrades
decided in C, without calling Python, when the settings allow it (here
mostly with the access log off; its lines are the last section). Against
the real relay and real origins:

- it is on (the startup line) and serves (the worker's last line counts
  the upgrades it decided), and off where a setting needs Python;
- it counts what Python counts: the same /metrics after the same sessions
  with it on and off (WSRELAY_NATIVE_FAST_PATH=0), gauges back to zero;
- what is not plain is Python's, with the same answers: refusals by path,
  Origin and version, the limit, a failed connect (failover), an origin
  that refuses or does not answer; the relay's count of clients and of
  origin connections returns to zero after each.

The tunnel, endings, fault, exhaustion and lifecycle suites also run with
it (tests/conftest.py FAST_TOO).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
from websockets.sync.client import connect

from relay import native
from tests.support.net import free_port, raw_exchange, read_head, status_of, upgrade_request
from tests.support.relay import Relay, wait_for
from tests.support.scrape import metric, samples

# Skipped only where the extension could not be built and nobody asked for it:
# .ci/run sets WSRELAY_REQUIRE_NATIVE, so in CI these run (or fail).
pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")

FAST = {"RELAY_ACCESS_LOG": "0", "RELAY_DATA_PLANE": "native"}
OFF = {**FAST, "WSRELAY_NATIVE_FAST_PATH": "0"}


def decided(r: Relay) -> tuple[int, int, int]:
    """(decided, upgraded there, handed to Python) from the workers' last lines."""
    total = [0, 0, 0]
    for m in re.finditer(r"the fast path decided (\d+) upgrades in C \((\d+) upgraded there, (\d+) handed to Python\)",
                         r.text()):
        for i in range(3):
            total[i] += int(m.group(i + 1))
    return total[0], total[1], total[2]


def settled(r: Relay) -> None:
    """Every count that a session holds is back to zero."""
    wait_for(lambda: metric(r, "wsrelay_clients") == 0 and metric(r, "wsrelay_websocket_connections") == 0
             and metric(r, "wsrelay_origin_connections") == 0, 10, what="clients, tunnels and origin counts at 0")


def sessions(r: Relay, n: int, path: str = "/fast") -> None:
    for i in range(n):
        with connect(r.url + path, open_timeout=5) as ws:
            ws.send(f"m{i}" * 10)
            assert ws.recv(timeout=5) == f"m{i}" * 10


def test_wsrelay_check_says_whether_it_applies():
    """`wsrelay check` (and /config) give effective_fast_path: on, or off and why."""
    import subprocess
    import sys

    def check(**env) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        e.update({"RELAY_ORIGIN": "127.0.0.1:9", "RELAY_LISTEN": "127.0.0.1:0", "RELAY_METRICS_LISTEN": "", **env})
        out = subprocess.run([sys.executable, "-m", "relay", "check"], env=e, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert check(RELAY_ACCESS_LOG="0")["effective_fast_path"] == "on"
    assert check()["effective_fast_path"] == "on"  # the access log on too: C writes its lines
    assert check(RELAY_ACCESS_LOG="0", RELAY_MAX_CONNS="10")["effective_fast_path"] == "off: RELAY_MAX_CONNS is set"
    assert "effective_fast_path" not in check(RELAY_ACCESS_LOG="0", RELAY_MODE="frames")  # the Python plane


def test_on_by_its_settings_and_counted_in_the_last_line(ws_origin):
    with Relay(ws_origin.addr, workers=1, env=FAST) as r:
        assert "common upgrades decided in C" in r.text()
        sessions(r, 5)
        settled(r)
    assert decided(r) == (5, 5, 0)
    with Relay(ws_origin.addr, workers=1, env={"RELAY_DATA_PLANE": "native"}) as r:  # the defaults
        assert "common upgrades decided in C" in r.text()
        sessions(r, 1)
        settled(r)
    assert decided(r) == (1, 1, 0)
    with Relay(ws_origin.addr, workers=1, env=OFF) as r:
        assert "fast path off: WSRELAY_NATIVE_FAST_PATH=0" in r.text()
        sessions(r, 1)
    assert decided(r) == (0, 0, 0) and "the fast path decided" not in r.text()


@pytest.mark.parametrize("env, why", [
    ({"RELAY_MAX_CLIENTS_PER_IP": "5"}, "RELAY_MAX_CLIENTS_PER_IP is set"),
    ({"RELAY_BALANCE": "header:X-User"}, "RELAY_BALANCE=header:x-user"),
    ({"WSRELAY_NATIVE_FAST_PATH": "0"}, "WSRELAY_NATIVE_FAST_PATH=0"),
])
def test_off_where_a_setting_needs_it_off(ws_origin, env, why):
    with Relay(ws_origin.addr, workers=1, env={**FAST, **env}) as r:
        assert f"fast path off: {why}" in r.text()
        sessions(r, 2)
    assert decided(r) == (0, 0, 0)


def counted(r: Relay) -> dict:
    """The samples a session changes, summed over workers (which worker
    accepts is the kernel's choice), timings left out (they differ run to run)."""
    keep = ("wsrelay_websocket_upgrades_total", "wsrelay_http_requests_total", "wsrelay_handshake_seconds_count",
            "wsrelay_websocket_duration_seconds_count", "wsrelay_bytes_total", "wsrelay_origin_connect_seconds_count",
            "wsrelay_clients", "wsrelay_websocket_connections", "wsrelay_origin_connections",
            "wsrelay_origin_errors_total")
    out: dict = {}
    for (name, labels), v in samples(r).items():
        if name in keep and v:
            k = (name, tuple(kv for kv in labels if kv[0] != "worker"))
            out[k] = out.get(k, 0) + v
    return out


def test_counts_as_the_reference_does(ws_origin):
    """The same sessions, the fast path on and off: the same /metrics
    (upgrades, 101s, handshake and duration counts, bytes both ways, origin
    connects), and while sessions are open the same gauges."""
    seen = {}
    for name, env in (("python", OFF), ("fast", FAST)):  # the reference first: the fast path is held to it
        with Relay(ws_origin.addr, workers=2, env=env) as r:
            sessions(r, 6)
            held = [connect(r.url + "/held", open_timeout=5) for _ in range(3)]
            for ws in held:
                ws.send("x" * 100)
                assert ws.recv(timeout=5) == "x" * 100
            wait_for(lambda: metric(r, "wsrelay_websocket_connections") == 3, 5, what="3 tunnels open")
            open_now = (metric(r, "wsrelay_clients"), metric(r, "wsrelay_origin_connections"))
            for ws in held:
                ws.close()
            settled(r)
            if name == "python":
                seen[name] = (open_now, published(r))
            else:  # polled until it is the reference's (a timeout shows the difference)
                reference = seen["python"][1]
                wait_for(lambda: counted(r) == reference, 10, what=f"the reference's /metrics {reference}")
                seen[name] = (open_now, counted(r))
        assert decided(r)[0] == (9 if name == "fast" else 0)
    assert seen["fast"][0] == seen["python"][0] == (3, 3)
    fast, python = seen["fast"][1], seen["python"][1]
    assert fast == python, {k: (fast.get(k), python.get(k)) for k in set(fast) | set(python)
                            if fast.get(k) != python.get(k)}
    assert metric_of(fast, "wsrelay_websocket_upgrades_total", outcome="upgraded") == 9


def published(r: Relay) -> dict:
    """counted(r) once every worker's 1 s sweep has published the bytes of
    the sessions that ended: the same two scrapes a sweep apart."""
    last = [counted(r)]

    def same() -> bool:
        time.sleep(1.1)  # a sweep's period: what changes, changes within it
        now = counted(r)
        stable, last[0] = now == last[0], now
        return stable
    wait_for(same, 10, what="bytes published by every worker's sweep")
    return last[0]


def status_for(r: Relay, request: bytes) -> int:
    """The status of the answer to ``request`` (a 101's connection is closed after its head)."""
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
        s.sendall(request)
        head, _ = read_head(s)
    return status_of(head)


def metric_of(snapshot: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in snapshot.items() if n == name and want <= set(lbl))


def test_refusals_are_decided_by_the_rules_in_full(ws_origin):
    """Paths, Origins and versions the rules refuse: Python's answers and
    outcomes; what the rules allow in their plain form: the fast path's."""
    env = {**FAST, "RELAY_WS_PATHS": "/ws", "RELAY_ALLOWED_ORIGINS": "https://app.example.com,example.org"}
    with Relay(ws_origin.addr, workers=1, env=env) as r:
        cases = [
            (upgrade_request("/ws/room"), 101),
            (upgrade_request("/ws/room", extra="Origin: https://app.example.com\r\n"), 101),
            (upgrade_request("/ws", extra="Origin: http://example.org:8080\r\n"), 101),   # a host entry: Python
            (upgrade_request("/ws", extra="Origin: https://evil.example\r\n"), 403),
            (upgrade_request("/wsx"), 403),
            (upgrade_request("/ws/%2e%2e/admin"), 403),
            (upgrade_request("/ws", version="8"), 426),
        ]
        for request, want in cases:
            assert status_for(r, request) == want, request
        wait_for(lambda: metric(r, "wsrelay_websocket_upgrades_total", outcome="forbidden") == 3, 5,
                 what="3 forbidden")
        assert metric(r, "wsrelay_websocket_upgrades_total", outcome="bad_request") == 1
        settled(r)
    assert decided(r)[:2] == (2, 2)


def test_a_failed_connect_is_handed_over_and_fails_over(ws_origin):
    """Two origins, one refusing connections: an upgrade the fast path sent to
    it first is handed to Python, which counts the failure and logs it;
    the engine has asked the next origin already, and the client gets its 101."""
    dead = f"127.0.0.1:{free_port()}"
    with Relay(f"{dead},{ws_origin.addr}", workers=1, env=FAST) as r:
        sessions(r, 4)
        r.wait_log(f"origin {dead} connect failed", timeout=5)
        assert metric(r, "wsrelay_origin_errors_total", reason="connect") >= 1
        settled(r)
    fast, upgraded, adopted = decided(r)
    assert fast == 4 and adopted >= 1 and upgraded + adopted == 4


def test_an_origin_refusing_the_upgrade_is_relayed(aio_origin):
    """The aiohttp origin answers an upgrade to /echo with a plain 200: the
    answer is relayed, body and all (HandedOverRefusal), counted origin_rejected."""
    with Relay(aio_origin.addr, workers=1, env=FAST) as r:
        out = raw_exchange(r.port, upgrade_request("/echo"), timeout=5)
        assert status_of(out) == 405 or status_of(out) == 200, out[:200]
        wait_for(lambda: metric(r, "wsrelay_websocket_upgrades_total", outcome="origin_rejected") == 1, 5,
                 what="origin_rejected counted")
        settled(r)
    assert decided(r) == (1, 0, 1)


def test_an_origin_that_does_not_answer_is_a_504(silent_origin):
    with Relay(silent_origin.addr, workers=1, env={**FAST, "RELAY_CONNECT_TIMEOUT": "0.5"}) as r:
        assert status_of(raw_exchange(r.port, upgrade_request("/"), timeout=5)) == 504
        assert metric(r, "wsrelay_websocket_upgrades_total", outcome="timeout") == 1
        settled(r)
    assert decided(r) == (1, 0, 1)


def test_at_the_limit_the_lock_decides_and_refuses(ws_origin):
    """RELAY_MAX_CLIENTS=3: the fast path admits while far from the limit;
    near it Python decides (the lock), so the fourth client gets the 503."""
    with Relay(ws_origin.addr, workers=1, env={**FAST, "RELAY_MAX_CLIENTS": "3"}) as r:
        held = [connect(r.url + "/held", open_timeout=5) for _ in range(3)]
        assert status_of(raw_exchange(r.port, upgrade_request("/"), timeout=5)) == 503
        assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit") == 1
        held.pop().close()
        wait_for(lambda: metric(r, "wsrelay_clients") == 2, 5, what="a client given back")
        held.append(connect(r.url + "/again", open_timeout=5))
        for ws in held:
            ws.close()
        settled(r)


def test_idle_tunnels_are_closed_and_counted(ws_origin):
    with Relay(ws_origin.addr, workers=1, env={**FAST, "RELAY_IDLE_TIMEOUT": "1"}) as r:
        s = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        s.sendall(upgrade_request("/idle"))
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.settimeout(5)
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the relay, idle
        assert time.monotonic() - started < 4
        s.close()
        settled(r)
        assert metric(r, "wsrelay_websocket_duration_seconds_count") == 1
    assert decided(r) == (1, 1, 0)


def test_a_drain_waits_for_its_tunnels_then_closes_them(ws_origin):
    """SIGTERM: fast-path tunnels (no Python object) are waited for like any
    other, and closed when RELAY_DRAIN_TIMEOUT ends."""
    with Relay(ws_origin.addr, workers=1, env={**FAST, "RELAY_DRAIN_TIMEOUT": "2"}) as r:
        ws = connect(r.url + "/draining", open_timeout=5)
        r.proc.send_signal(15)
        r.wait_log("draining: 1 tunnels", timeout=5)
        ws.send("still")
        assert ws.recv(timeout=5) == "still"
        started = time.monotonic()
        with pytest.raises(Exception):
            ws.recv(timeout=10)
        assert 0.5 < time.monotonic() - started < 8
        assert r.proc.wait(timeout=10) == 0
    assert decided(r) == (1, 1, 0)


def test_wss_upgrades_take_it_too(ws_origin, pki):
    """On a TLS listener whose handshake runs in C, the upgrade is decided in
    C as on a plain one, X-Forwarded-Proto: https; its tunnel, relayed by the
    TLS engine with the client's SSL, is counted when it ends."""
    from tests.support.tls import client_context, tls_env

    directory, _ca, pair = pki
    with Relay(ws_origin.addr, workers=1, env={**FAST, **tls_env(pair)}) as r:
        ctx = client_context(directory)
        for _ in range(3):
            with connect(f"wss://localhost:{r.tls_port}/headers", ssl=ctx, open_timeout=5) as ws:
                seen = dict((k.lower(), v) for k, v in json.loads(ws.recv(timeout=5))["headers"])
                assert seen["x-forwarded-proto"] == "https"
        settled(r)
        assert metric(r, "wsrelay_websocket_duration_seconds_count") == 3
        assert metric(r, "wsrelay_tls_handshakes_total", outcome="full") >= 1
    assert decided(r) == (3, 3, 0)


def test_a_wss_upgrade_the_origin_refuses_is_relayed_over_tls(aio_origin, pki):
    """Handed over with its SSL: Python relays the origin's answer through
    the TLS offload (relay/native/front.py _offload), as if it had decided."""
    from tests.support.tls import client_context, tls_env

    directory, _ca, pair = pki
    with Relay(aio_origin.addr, workers=1, env={**FAST, **tls_env(pair)}) as r:
        raw = socket.create_connection(("127.0.0.1", r.tls_port), timeout=5)
        with client_context(directory).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(upgrade_request("/echo"))
            head, _ = read_head(s)
        assert status_of(head) in (200, 405), head
        wait_for(lambda: metric(r, "wsrelay_websocket_upgrades_total", outcome="origin_rejected") == 1, 5,
                 what="origin_rejected counted")
        settled(r)
    assert decided(r) == (1, 0, 1)


@pytest.mark.parametrize("trusted", ["127.0.0.1/32", "10.0.0.0/8"])
def test_the_origin_gets_the_same_head_as_when_python_decides(ws_origin, trusted):
    """X-Forwarded-For, X-Forwarded-Proto and X-Request-ID as Python's
    on_head has them forwarded: a trusted proxy's (127.0.0.1 here) kept and
    appended to, an untrusted client's replaced; a trusted one's single
    well-formed X-Request-ID kept, two of them replaced by a new one."""
    sent = [("X-Forwarded-For", "203.0.113.7"), ("X-Request-ID", "edge-42")]
    seen = {}
    for name, env in (("fast", FAST), ("python", OFF)):
        with Relay(ws_origin.addr, workers=1, env={**env, "RELAY_TRUSTED_PROXIES": trusted}) as r:
            heads = []
            for extra in (sent, sent + [("X-Request-ID", "again")]):
                with connect(r.url + "/headers", additional_headers=extra, open_timeout=5) as ws:
                    got = dict((k.lower(), v) for k, v in json.loads(ws.recv(timeout=5))["headers"]
                               if k.lower().startswith("x-"))
                assert got.pop("x-forwarded-host") == f"127.0.0.1:{r.port}"  # the Host the client sent
                heads.append(got)
        seen[name] = heads
        assert decided(r)[0] == (2 if name == "fast" else 0)
    for fast, python in zip(seen["fast"], seen["python"]):
        if len(python["x-request-id"]) == 32:  # new ones: random, of the same form
            assert len(fast["x-request-id"]) == 32 and int(fast["x-request-id"], 16) >= 0
            fast = {**fast, "x-request-id": "new"}
            python = {**python, "x-request-id": "new"}
        assert fast == python
    first = seen["fast"][0]
    if trusted == "127.0.0.1/32":
        assert first["x-forwarded-for"] == "203.0.113.7, 127.0.0.1" and first["x-request-id"] == "edge-42"
    else:
        assert first["x-forwarded-for"] == "127.0.0.1" and first["x-request-id"] != "edge-42"


def test_upgrades_before_a_named_origin_resolves_are_pythons(ws_origin):
    """RELAY_ORIGIN by host name: until a worker's first lookup answers, C has
    no address for it, and on_head sends upgrades to the Python plane (which
    looks the name up itself). The fast path declines them too, rather than
    fail them with 502 and count the failures against a healthy origin
    (found by the adversarial review: every start, reload and restart)."""
    port = free_port()
    n = 12
    statuses: list[int] = []

    def client() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            except OSError:
                time.sleep(0.002)  # nothing listens yet: the relay is starting
                continue
            with s:
                s.settimeout(10)
                s.sendall(upgrade_request("/early"))
                statuses.append(status_of(read_head(s)[0]))
            return

    import threading

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    origin = f"localhost:{ws_origin.addr.rsplit(':', 1)[1]}"
    r = Relay(origin, workers=2, env={**FAST, "RELAY_LISTEN": f"127.0.0.1:{port}"})
    try:
        r.start()
        for t in threads:
            t.join(25)
        assert statuses == [101] * n, statuses
        assert "connect failed" not in r.text() and " down: " not in r.text()
    finally:
        r.stop()


# -- the access log ------------------------------------------------------------------------

LOGGED = {"RELAY_DATA_PLANE": "native", "RELAY_TRUSTED_PROXIES": "127.0.0.1/32"}


def records(r: Relay, n: int) -> list[dict]:
    wait_for(lambda: len([x for x in list(r.access) if x.startswith("{")]) >= n, 10, what=f"{n} access-log lines")
    return [json.loads(x) for x in list(r.access) if x.startswith("{")]


def logged_session(r: Relay, extra: bytes, path: str, payload: bytes) -> None:
    """A raw upgrade with ``extra`` header lines, one message echoed, then a close."""
    from tests.support.raw_origins import mask_frame, read_frame
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
        s.sendall(upgrade_request(path)[:-2] + extra + b"\r\n")
        head, rest = read_head(s)
        assert status_of(head) == 101
        s.sendall(mask_frame(payload))
        assert read_frame(s, rest)[1] == payload
        s.sendall(mask_frame(b"\x03\xe8", opcode=8))
        read_frame(s)  # the origin's close
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


def test_access_log_lines_are_the_references(ws_origin):
    """With the access log on, the fast path writes each tunnel's line in C
    (relay/native/access_log.c): the same lines as Python's for the same
    sessions (WSRELAY_NATIVE_FAST_PATH=0), field for field, odd bytes in the
    User-Agent, X-Forwarded-For lines, a trusted X-Request-ID and a path
    with a query among them; only the times differ."""
    cases = [
        (b"", "/plain", b"x" * 10),
        (b'User-Agent: Mozilla/5.0 "quoted" \\ caf\xe9\tx\r\n', "/ua", b"y" * 200),
        (b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n", '/xff?q=1&r="2"', b"z"),
        (b"X-Request-ID: trusted-id-42\r\nUser-Agent: " + b"u" * 600 + b"\r\n", "/long/" + "p" * 600, b"w" * 5000),
        (b"".join(b"X-Forwarded-For: 10.0.0.%d\r\n" % i for i in range(12)), "/chain", b"v"),  # past C's 8 on the stack
    ]
    seen = {}
    for name, env in (("python", {**LOGGED, "WSRELAY_NATIVE_FAST_PATH": "0"}), ("fast", LOGGED)):
        with Relay(ws_origin.addr, workers=1, env=env) as r:
            for extra, path, payload in cases:
                logged_session(r, extra, path, payload)
            seen[name] = records(r, len(cases))
        assert decided(r)[1] == (len(cases) if name == "fast" else 0)
    for python, fast in zip(seen["python"], seen["fast"], strict=True):
        for rec in (python, fast):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec.pop("time"))
            assert 0 < rec.pop("handshake_ms") < 5000 and 0 <= rec.pop("duration_s") < 10
            rid = rec.pop("request_id")
            assert rid == "trusted-id-42" or re.fullmatch(r"[0-9a-f]{32}", rid)
        assert fast.pop("data_plane") == python.pop("data_plane") == "native"
        assert fast == python
    assert [x["x_forwarded_for"] for x in seen["fast"]][2] == "203.0.113.7, 10.0.0.1, 10.0.0.2"
    assert seen["fast"][4]["x_forwarded_for"] == ", ".join(f"10.0.0.{i}" for i in range(12))
    assert seen["fast"][1]["user_agent"] == 'Mozilla/5.0 "quoted" \\ caf\xe9\tx'
    assert len(seen["fast"][3]["user_agent"]) == 512 and seen["fast"][3]["path"] == "/long/" + "p" * 506


def test_an_upgrade_handed_to_python_is_logged_by_python(ws_origin):
    """A failed connect (an origin down, asked first by turns) goes to Python
    with C's X-Request-ID: its line says so (tries 2, the origin that served)."""
    dead = free_port()
    env = {**LOGGED, "RELAY_ORIGIN": f"127.0.0.1:{dead},{ws_origin.addr}", "RELAY_MAX_FAILS": "0"}
    with Relay(None, workers=1, env=env) as r:
        for i in range(4):
            logged_session(r, f"X-Request-ID: session-{i}\r\n".encode(), "/over", b"hi")
        recs = records(r, 4)
    assert decided(r)[2] >= 1
    assert [x["request_id"] for x in recs] == [f"session-{i}" for i in range(4)]
    over = [x for x in recs if x["tries"] == 2]
    assert len(over) == decided(r)[2]
    for rec in recs:
        assert (rec["status"], rec["outcome"], rec["origin"], rec["pool"]) == (101, "upgraded", ws_origin.addr, "default")
        assert rec["bytes_up"] > 0 and rec["data_plane"] == "native"


def test_wss_lines_name_the_tls_version(ws_origin, pki):
    from tests.support.tls import client_context, tls_env

    directory, _ca, pair = pki
    with Relay(ws_origin.addr, workers=1, env={**LOGGED, **tls_env(pair)}) as r:
        with connect(f"wss://localhost:{r.tls_port}/secure", ssl=client_context(directory), open_timeout=5) as ws:
            ws.send("s")
            assert ws.recv(timeout=5) == "s"
        rec = records(r, 1)[0]
    assert decided(r)[1] == 1
    assert (rec["tls_version"], rec["tls_resumed"], rec["path"], rec["status"]) == ("TLSv1.3", False, "/secure", 101)


# -- routes ---------------------------------------------------------------------------------

def test_routed_upgrades_are_decided_in_c_by_the_gates_router(origins):
    """With RELAY_ROUTES, C asks the gate's Router (relay/routes.py) for the
    pool and decides for each pool it can: the same origins and access-log
    pools as Python's routing; a pool it cannot decide for (RELAY_MAX_CONNS,
    WebSockets refused) and paths that route elsewhere decoded stay Python's."""
    from tests.support.origin_process import hello_over_ws
    a, b, c = origins
    env = {"RELAY_DATA_PLANE": "native", "RELAY_POOL_CHAT": f"{b.addr},{c.addr}", "RELAY_POOL_FEED": c.addr,
           "RELAY_POOL_FEED_MAX_CONNS": "100", "RELAY_POOL_API": c.addr, "RELAY_POOL_API_WEBSOCKET": "0",
           "RELAY_ROUTES": "/chat = chat, /feed = feed, /api = api, chat.example.com/ = chat"}
    cases = [("/", "relay.test", {"a"}, "default"), ("/chatx", "relay.test", {"a"}, "default"),
             ("/chat/room", "relay.test", {"b", "c"}, "chat"), ("/x", "CHAT.example.com:443", {"b", "c"}, "chat"),
             ("/feed/1", "relay.test", {"c"}, "feed")]
    with Relay(a.addr, workers=1, env=env) as r:
        assert "common upgrades decided in C, except pool " in r.text()
        assert "pool feed: RELAY_MAX_CONNS is set" in r.text() and "pool api: the pool refuses WebSockets" in r.text()
        for path, host, origins, _pool in cases:
            status, hello = hello_over_ws(r.port, path, host)
            assert status == 101 and hello["origin"] in origins, (path, host, hello)
        assert hello_over_ws(r.port, "/api/ws")[0] == 403
        assert hello_over_ws(r.port, "/chat/%2e%2e/api")[0] == 400  # routes elsewhere once decoded
        lines = records(r, len(cases) + 2)
        settled(r)
    upgraded = {(x["path"], x["pool"]) for x in lines if x["status"] == 101}
    assert upgraded == {(path, pool) for path, _h, _o, pool in cases}
    # four of the five in C: the feed pool (RELAY_MAX_CONNS) is Python's, as are the refusals
    assert decided(r) == (4, 4, 0)
    assert "3 were Python's to decide" in r.text()
