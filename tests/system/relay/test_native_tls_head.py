"""TLS listeners' head phase in C (relay/native/handshake.c "TLS"): the TLS
handshake, the head read through SSL, refusals sealed and closed with
close_notify, and what the Python plane serves (plain requests over TLS, an
origin's refusal with its body) relayed to it decrypted over a socket pair.
Each test runs on both head phases (``WSRELAY_NATIVE_TLS_HANDSHAKE``) and
asserts the same: the C one must be indistinguishable from relay/client.py's.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from tests.support.relay import wait_for
from tests.support.scrape import metric
from tests.support.tls import TlsConn, client_context, head_env, s_client, tls_relay, wss_echo

OUTCOMES = ("full", "resumed", "failed_protocol", "failed_cipher", "failed_sni", "failed_client_certificate",
            "failed_other", "plain_http", "client_abort", "timeout")


@pytest.fixture(scope="module")
def relay(aio_origin, pki, tls_head):
    _d, _ca, pair = pki
    with tls_relay(aio_origin.addr, pair, workers=1, RELAY_HANDSHAKE_TIMEOUT="1",
                   RELAY_ACCESS_LOG="1",
                   **head_env(tls_head)) as r:
        yield r


def outcomes(relay) -> dict[str, float]:
    return {o: metric(relay, "wsrelay_tls_handshakes_total", outcome=o) for o in OUTCOMES}


def read_response(conn: TlsConn) -> tuple[bytes, bytes]:
    """One response with a Content-Length body: (head, body)."""
    while b"\r\n\r\n" not in conn.plain:
        assert conn._fill(), bytes(conn.plain)
    head, _, rest = bytes(conn.plain).partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        assert conn._fill()
        head, _, rest = bytes(conn.plain).partition(b"\r\n\r\n")
    del conn.plain[:len(head) + 4 + length]
    return head, rest[:length]


def test_the_startup_log_says_which_head_phase_reads_tls(relay, tls_head):
    assert ("TLS handshakes in C" in relay.text()) == (tls_head == "native"), relay.text()


def test_plain_requests_over_tls_reach_the_origin_as_the_client_said_them(relay, aio_origin, pki):
    """Keep-alive requests on one TLS connection, then a POST with a body: the
    Python plane serves them behind the pump, told the client's address and
    TLS facts (X-Forwarded-For, X-Forwarded-Proto, the access log)."""
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /one?x=1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        head, body = read_response(conn)
        assert head.startswith(b"HTTP/1.1 200") and b"X-Echo-Method: GET" in head, head
        conn.send(b"POST /two HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
        head, body = read_response(conn)
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello", (head, body)
    finally:
        conn.sock.close()
    seen = {path: headers for _m, path, headers, _b in aio_origin.seen if path in ("/one?x=1", "/two")}
    for headers in seen.values():
        h = {k.lower(): v for k, v in headers.items()}
        assert h["x-forwarded-proto"] == "https" and h["x-forwarded-for"] == "127.0.0.1", h
    assert set(seen) == {"/one?x=1", "/two"}
    wait_for(lambda: any('"/two"' in line for line in relay.access), 10, what="the access log line")
    line = next(json.loads(x) for x in relay.access if '"/two"' in x)
    assert line["client"] == "127.0.0.1" and line["status"] == 200, line
    assert line["tls_version"] == "TLSv1.3", line


def test_an_upgrade_after_plain_requests_on_one_tls_connection_relays_frames(relay, pki):
    """A plain request first (served by the Python plane behind the pump), then
    an upgrade on the same connection: its tunnel relays frames both ways."""
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n")
        head, _ = read_response(conn)
        assert head.startswith(b"HTTP/1.1 200"), head
        conn.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        while b"\r\n\r\n" not in conn.plain:
            assert conn._fill(), bytes(conn.plain)
        head, _, rest = bytes(conn.plain).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        del conn.plain[:len(head) + 4]
        mask = b"\x01\x02\x03\x04"
        payload = b"over one TLS connection"
        conn.send(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while len(conn.plain) < 2 + len(payload):
            assert conn._fill(), bytes(conn.plain)
        assert bytes(conn.plain[:2 + len(payload)]) == bytes([0x81, len(payload)]) + payload
    finally:
        conn.sock.close()


def test_an_origins_refusal_of_a_wss_upgrade_reaches_the_client_with_its_body(relay, pki):
    """The origin answers an upgrade with a 200 and a body (no WebSocket
    there): the client gets that answer whole over TLS, counted origin_rejected."""
    before = metric(relay, "wsrelay_websocket_upgrades_total", outcome="origin_rejected")
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /not-ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head, _body = read_response(conn)
    finally:
        conn.sock.close()
    assert head.startswith(b"HTTP/1.1 200") and b"X-Echo-Method: GET" in head, head
    wait_for(lambda: metric(relay, "wsrelay_websocket_upgrades_total", outcome="origin_rejected") == before + 1, 10,
             what="origin_rejected counted")


def test_a_refused_upgrade_is_sealed_then_closed_with_close_notify(relay, pki):
    """The relay's own refusal (a bad Sec-WebSocket-Version: 426) comes as
    records, then close_notify (a TLS client can tell it from a truncation)."""
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
        while conn._fill():
            pass
    finally:
        conn.sock.close()
    assert bytes(conn.plain).startswith(b"HTTP/1.1 426"), bytes(conn.plain)
    assert conn.close_notify_seen


def test_a_head_not_finished_in_time_ends_with_close_notify(relay, pki):
    """RELAY_HANDSHAKE_TIMEOUT (1 s here) after the accept, a head still not
    complete gets no answer: the connection ends with close_notify, then FIN."""
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\n")  # and no more
        t0 = time.monotonic()
        while conn._fill():
            pass
        assert 0.5 < time.monotonic() - t0 < 5
    finally:
        conn.sock.close()
    assert bytes(conn.plain) == b"" and conn.close_notify_seen


def test_wss_echo_and_its_tunnel_through_the_head_phase(relay, pki):
    first, echo = wss_echo(f"wss://localhost:{relay.tls_port}/ws", client_context(pki[0]), "hello", "again")
    assert (first, echo) == ("hello", "again")


def test_each_handshake_outcome_is_counted_once(relay, pki, tmp_path):
    """Full, resumed, refused versions and ciphers, plain HTTP, a client gone
    mid-handshake, one too slow: each counted under its outcome, exactly."""
    before = outcomes(relay)
    sess = tmp_path / "session"
    assert "New, TLSv1.3" in s_client(relay.tls_port, "-sess_out", str(sess))
    assert "Reused, TLSv1.3" in s_client(relay.tls_port, "-sess_in", str(sess))
    assert "Cipher is (NONE)" in s_client(relay.tls_port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Cipher is (NONE)" in s_client(relay.tls_port, "-tls1_2", "-cipher", "AES128-SHA")
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = out.read()
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        s.sendall(client_hello[:40])  # then gone
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        s.sendall(client_hello[:40])  # then silent: the handshake timeout (1 s) ends it
        t0 = time.monotonic()
        assert s.recv(4096) == b""
        assert 0.8 < time.monotonic() - t0 < 5
    want = {"full": 1, "resumed": 1, "failed_protocol": 1, "failed_cipher": 1, "plain_http": 1,
            "client_abort": 1, "timeout": 1}
    wait_for(lambda: {o: outcomes(relay)[o] - before[o] for o in OUTCOMES} == {o: want.get(o, 0) for o in OUTCOMES},
             10, what=f"exactly {want}")
