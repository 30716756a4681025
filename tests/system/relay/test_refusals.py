"""Every refusal of the README's "What happens at the edge", from raw sockets against the real relay."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support.net import raw_exchange, read_head, status_of, upgrade_request
from tests.support.relay import Relay, wait_for


@pytest.fixture(scope="module")
def strict_relay(ws_origin, data_plane):
    env = {"RELAY_WS_PATHS": "/ws,/chat/", "RELAY_ALLOWED_ORIGINS": "https://app.example.com,*.example.org",
           "RELAY_MAX_HEADER_BYTES": "2048", "RELAY_HANDSHAKE_TIMEOUT": "2"}
    with Relay(ws_origin.addr, workers=2, env=env) as r:
        yield r


def refusal(relay, data: bytes) -> tuple[int, bytes]:
    out = raw_exchange(relay.port, data)
    head = out.split(b"\r\n\r\n")[0]
    assert b"Connection: close" in head, head
    return status_of(out), head


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n Folded: yes\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    # the first Origin is allowed, the second is what an origin reading the last one would trust
    upgrade_request("/ws", extra="Origin: https://app.example.com\r\nOrigin: https://evil.example.com\r\n"),
], ids=["garbage", "no-colon", "obs-fold", "space-before-colon", "no-host", "no-key", "short-key",
        "post", "no-upgrade-token", "connect", "two-origins"])
def test_400(strict_relay, data):
    assert refusal(strict_relay, data)[0] == 400


def test_426_names_version_13(strict_relay):
    status, head = refusal(strict_relay, upgrade_request("/ws", version="8"))
    assert status == 426
    assert b"Sec-WebSocket-Version: 13" in head


@pytest.mark.parametrize("path", ["/", "/wsx", "/other/ws", "/ws/../admin", "/ws/%2e%2e/admin", "/chat"])
def test_403_path_outside_ws_paths(strict_relay, path):
    assert refusal(strict_relay, upgrade_request(path))[0] == 403


@pytest.mark.parametrize("origin", ["https://evil.example.com", "http://app.example.com",
                                    "https://example.org", "https://example.org.evil.net"])
def test_403_forbidden_origin(strict_relay, origin):
    assert refusal(strict_relay, upgrade_request("/ws", extra=f"Origin: {origin}\r\n"))[0] == 403


@pytest.mark.parametrize("origin", ["https://app.example.com", "https://a.example.org", "http://b.c.example.org:8080"])
def test_allowed_origins_pass(strict_relay, origin):
    with socket.create_connection(("127.0.0.1", strict_relay.port), timeout=10) as s:
        s.sendall(upgrade_request("/chat/room1", extra=f"Origin: {origin}\r\n"))
        head, _ = read_head(s)
    assert status_of(head) == 101


def test_431_oversized_head_is_answered_after_reading_it(strict_relay):
    big = upgrade_request("/ws", extra="X-Filler: " + "a" * 3000 + "\r\n")
    status, _ = refusal(strict_relay, big)
    assert status == 431
    # A head that never ends but keeps growing gets the same answer.
    with socket.create_connection(("127.0.0.1", strict_relay.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"b" * 5000)
        assert status_of(s.recv(4096)) == 431


def test_505_for_http2_request_line(strict_relay):
    assert refusal(strict_relay, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")[0] == 505


def test_503_at_the_client_limit_with_retry_after(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MAX_CLIENTS": "1"}) as r:
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as held:
            held.sendall(upgrade_request("/"))
            assert status_of(read_head(held)[0]) == 101
            status, head = refusal(r, upgrade_request("/"))
            assert status == 503
            assert b"Retry-After: 5" in head
        # The slot comes back when the tunnel closes.
        def admitted():
            with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
                s.sendall(upgrade_request("/"))
                return status_of(read_head(s)[0]) == 101
        wait_for(admitted, 10, interval=0.1, what="slot given back")


def test_502_when_origin_is_down():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with Relay(f"127.0.0.1:{port}", workers=1) as r:
        status, _ = refusal(r, upgrade_request("/"))
        assert status == 502


def test_failover_to_the_next_origin(ws_origin):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with Relay(f"127.0.0.1:{dead},{ws_origin.addr}", workers=1) as r:
        for _ in range(4):  # round-robin starts on each origin in turn; all succeed
            with socket.create_connection(("127.0.0.1", r.port), timeout=10) as c:
                c.sendall(upgrade_request("/"))
                assert status_of(read_head(c)[0]) == 101


def test_504_when_origin_never_answers(silent_origin):
    with Relay(silent_origin.addr, workers=1, env={"RELAY_CONNECT_TIMEOUT": "1"}) as r:
        t0 = time.monotonic()
        status, _ = refusal(r, upgrade_request("/"))
        assert status == 504
        assert 0.8 < time.monotonic() - t0 < 5


def test_slowloris_dropped_while_others_are_served(strict_relay):
    """A client trickling its head is dropped at RELAY_HANDSHAKE_TIMEOUT (2 s);
    meanwhile other clients upgrade normally."""
    slow = socket.create_connection(("127.0.0.1", strict_relay.port), timeout=10)
    slow.sendall(b"GET /ws HTTP/1.1\r\n")
    closed_at = []

    def trickle():
        t0 = time.monotonic()
        try:
            for _ in range(100):
                slow.sendall(b"X-A: b\r\n")
                time.sleep(0.1)
                if time.monotonic() - t0 > 8:
                    break
        except OSError:
            pass
        closed_at.append(time.monotonic() - t0)

    t = threading.Thread(target=trickle)
    t.start()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", strict_relay.port), timeout=10) as c:
            c.sendall(upgrade_request("/ws"))
            assert status_of(read_head(c)[0]) == 101
    t.join(15)
    slow.close()
    assert closed_at and closed_at[0] < 5, closed_at
