"""The access log (README, "Logs"): every request that got an answer has a
line — refusals of heads that did not even parse included — with an RFC 3339
end time, the client's User-Agent and X-Forwarded-For as received, and the
X-Request-ID the origin got (the edge's own, never a client's)."""

from __future__ import annotations

import datetime
import json
import re
import socket
import time

import pytest

from tests.support.net import raw_exchange, status_of, upgrade_request
from tests.support.raw_origins import RawOrigin, answer, echo_after_101, header
from tests.support.relay import Relay, wait_for


async def http_or_ws(origin, c):
    if b"upgrade: websocket" in c.head.lower():
        await echo_after_101(origin, c)
    else:
        await answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(origin, c)


@pytest.fixture(scope="module")
def origin(loop_thread):
    with RawOrigin(loop_thread, http_or_ws) as o:
        yield o


@pytest.fixture(scope="module")
def relay(origin, data_plane):
    with Relay(origin.addr, workers=1, env={"RELAY_HANDSHAKE_TIMEOUT": "0.5"}) as r:
        yield r


def line_for(relay, **want) -> dict:
    def find():
        for text in relay.access:
            rec = json.loads(text)
            if all(rec.get(k) == v for k, v in want.items()):
                return rec
        return None
    return wait_for(find, 5, what=f"an access log line with {want}")


@pytest.mark.parametrize("request_bytes, status, method, path", [
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "CONNECT", "127.0.0.1:22"),
    (b"GET /bad HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "GET", "/bad"),
    (b"GET /h2 HTTP/2.0\r\nHost: x\r\n\r\n", 505, "GET", "/h2"),
    (b"GET /big HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "GET", "/big"),
    (b"GET /" + b"l" * 20000 + b" HTTP/1.1\r\n\r\n", 414, "GET", "/" + "l" * 511),
])
def test_heads_refused_while_being_read_get_a_line(relay, request_bytes, status, method, path):
    assert status_of(raw_exchange(relay.port, request_bytes)) == status
    rec = line_for(relay, status=status, method=method, path=path)
    assert rec["outcome"] == "bad_request" and rec["client"] == "127.0.0.1"


def test_a_head_that_never_completes_is_logged_408(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        assert s.recv(100) == b""  # closed at the handshake timeout
    rec = line_for(relay, status=408)
    assert (rec["method"], rec["path"], rec["outcome"]) == ("GET", "/slow", "client_timeout")


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "upgrade"])
def test_fields_operators_look_for_first(relay, origin, upgrade):
    before = len(origin.heads)
    extra = "User-Agent: probe/1.0\r\nX-Forwarded-For: 198.51.100.4\r\nX-Request-ID: chosen-by-client\r\n"
    t0 = time.time()
    if upgrade:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(upgrade_request("/ws-log", extra=extra))
            assert status_of(s.recv(4096)) == 101
        path = "/ws-log"
    else:
        out = raw_exchange(relay.port, f"GET /http-log HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
                           .encode())
        assert status_of(out) == 200
        path = "/http-log"
    rec = line_for(relay, path=path)
    seen = origin.heads[before]
    request_id = header(seen, b"x-request-id")
    assert re.fullmatch(rb"[0-9a-f]{32}", request_id), seen  # the edge's own, not the client's
    assert seen.lower().count(b"x-request-id") == 1
    assert rec["request_id"] == request_id.decode()
    assert rec["user_agent"] == "probe/1.0" and rec["x_forwarded_for"] == "198.51.100.4"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec["time"]
    end = datetime.datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
    assert t0 - 1 <= end <= time.time() + 1


def test_request_ids_differ(relay, origin):
    before = len(origin.heads)
    for _ in range(20):
        raw_exchange(relay.port, b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    ids = {header(h, b"x-request-id") for h in origin.heads[before:]}
    assert len(ids) == 20


def test_origin_failures_reach_the_service_log_rate_limited(loop_thread):
    """Nothing listens on the origin's port: every client gets a 502 naming the
    origin in its access log line, and stderr says why, once (not per client)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again: nobody listens there
    with Relay(f"127.0.0.1:{dead}", workers=1) as r:
        for i in range(20):
            path = b"/ws" if i % 2 else b"/http"
            req = upgrade_request("/ws") if i % 2 else b"GET /http HTTP/1.1\r\nHost: x\r\n\r\n"
            assert status_of(raw_exchange(r.port, req)) == 502, path
        rec = line_for(r, status=502)
        assert rec["origin"] == f"127.0.0.1:{dead}" and rec["outcome"] == "origin_error"
        r.wait_log(f"origin 127.0.0.1:{dead} connect failed: Connection refused", timeout=5)
        assert r.text().count(f"origin 127.0.0.1:{dead} connect failed") == 1, r.text()
        assert "502 unless another origin answers" in r.text()


def test_a_silent_origin_is_named_with_its_timeout(silent_origin):
    with Relay(silent_origin.addr, workers=1, env={"RELAY_CONNECT_TIMEOUT": "0.3"}) as r:
        assert status_of(raw_exchange(r.port, upgrade_request("/ws"))) == 504
        r.wait_log(f"origin {silent_origin.addr} timeout: no answer to an upgrade within "
                   "RELAY_CONNECT_TIMEOUT=0.3s", timeout=5)
        assert line_for(r, status=504)["origin"] == silent_origin.addr


def test_data_plane_names_the_plane_that_relayed_the_session(relay, loop_thread, data_plane):
    """``data_plane`` (README "Logs"): which plane relayed a session's bytes;
    refusals, the relay's own or an origin's relayed, are ``python`` whichever
    plane read the head (the head phase in C hands an origin's refusal to the
    Python plane, and relays nothing of a refused upgrade)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(upgrade_request("/plane-101"))
        assert status_of(s.recv(4096)) == 101
    assert status_of(raw_exchange(relay.port, upgrade_request("/plane-426", version="8"))) == 426
    tunnels = "native" if data_plane.startswith("native") else "python"
    assert line_for(relay, path="/plane-101")["data_plane"] == tunnels
    assert line_for(relay, path="/plane-426", status=426)["data_plane"] == "python"
    refusing = answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
    with RawOrigin(loop_thread, refusing) as o, Relay(o.addr, workers=1) as r:
        out = raw_exchange(r.port, upgrade_request("/plane-503"))
        assert status_of(out) == 503 and out.endswith(b"busy")
        rec = line_for(r, path="/plane-503")
        assert (rec["outcome"], rec["data_plane"]) == ("origin_rejected", "python")


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "upgrade"])
def test_x_forwarded_for_is_logged_whole(relay, upgrade):
    """An L7 proxy in front (HAProxy's ``option forwardfor``) adds its own
    X-Forwarded-For line below the client's: the access log's
    ``x_forwarded_for`` is the field as received, its lines combined in order
    (RFC 9110 §5.3), not the first line alone (the one a client can forge)."""
    path = f"/xff-{'ws' if upgrade else 'http'}"
    extra = "X-Forwarded-For: 198.51.100.4\r\nX-Forwarded-For: 203.0.113.9, 192.0.2.1\r\n"
    if upgrade:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(upgrade_request(path, extra=extra))
            assert status_of(s.recv(4096)) == 101
    else:
        req = f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()
        assert status_of(raw_exchange(relay.port, req)) == 200
    assert line_for(relay, path=path)["x_forwarded_for"] == "198.51.100.4, 203.0.113.9, 192.0.2.1"


def test_a_refused_upgrade_names_the_pool_it_was_routed_to(origin):
    """``pool`` is the pool a request was routed to (README "Logs"), refused
    or not: an upgrade its pool's rules refuse (403 for its Origin, 403 for a
    pool without WebSockets, 503 at the per-IP limit) names it; one that no
    route takes (404) names none."""
    env = {"RELAY_POOL_FEED": origin.addr, "RELAY_POOL_FEED_ALLOWED_ORIGINS": "https://app.example.com",
           "RELAY_POOL_API": origin.addr, "RELAY_POOL_API_WEBSOCKET": "0", "RELAY_MAX_CLIENTS_PER_IP": "1",
           "RELAY_ROUTES": "/feed = feed, /api = api"}
    with Relay(None, workers=1, env=env) as r:
        evil = upgrade_request("/feed/evil", extra="Origin: https://evil.example\r\n")
        assert status_of(raw_exchange(r.port, evil)) == 403
        assert status_of(raw_exchange(r.port, upgrade_request("/api/ws"))) == 403
        assert status_of(raw_exchange(r.port, upgrade_request("/elsewhere"))) == 404
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as held:
            held.sendall(upgrade_request("/feed/held"))
            assert status_of(held.recv(4096)) == 101
            assert status_of(raw_exchange(r.port, upgrade_request("/feed/second"))) == 503
        assert line_for(r, path="/feed/evil")["pool"] == "feed"
        assert line_for(r, path="/api/ws")["pool"] == "api"
        assert line_for(r, path="/feed/second")["outcome"] == "limit_ip"
        assert line_for(r, path="/feed/second")["pool"] == "feed"
        assert line_for(r, path="/elsewhere")["pool"] == ""
