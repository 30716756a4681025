"""TLS termination (README, "TLS") with real clients and real TLS: websockets
and aiohttp over wss://, openssl s_client for versions, ALPN, SNI and
resumption across workers, sslyze against Mozilla's intermediate profile.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import time

import pytest
from websockets.sync.client import connect  # plain ws:// only (see tests/tls_support.wss_echo)

from tests.support.relay import wait_for
from tests.support.scrape import metric
from tests.support.tls import ECDSA, client_context, issue, make_ca, names_for, s_client, tls_relay, wss_echo


@pytest.fixture(scope="module")
def relay(ws_origin, pki):
    d, _ca, pair = pki
    with tls_relay(ws_origin.addr, pair, workers=2) as r:
        yield r


def test_wss_echo_with_websockets_and_the_origin_told_https(relay, pki, ws_origin):
    d = pki[0]
    first, echo = wss_echo(f"wss://localhost:{relay.tls_port}/headers", client_context(d), "hello over TLS",
                           path_first=True)
    seen = json.loads(first)
    assert echo == "hello over TLS"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    # the plain listener (RELAY_LISTEN) still says what RELAY_FORWARDED_PROTO says
    with connect(f"ws://127.0.0.1:{relay.port}/headers", open_timeout=10) as ws:
        plain = {k.lower(): v for k, v in json.loads(ws.recv())["headers"]}
    assert plain["x-forwarded-proto"] == "http"
    wait_for(lambda: any('"tls_version":"TLSv1.3"' in line for line in relay.access), 10, what="access log line")
    line = next(json.loads(x) for x in relay.access if '"tls_version":"TLSv1.3"' in x)
    assert line["outcome"] == "upgraded" and line["tls_resumed"] is False


def test_wss_echo_with_aiohttp(relay, pki):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"wss://localhost:{relay.tls_port}/", ssl=client_context(pki[0])) as ws:
                await ws.send_bytes(b"x" * 100_000)
                msg = await ws.receive(timeout=10)
                return msg.data

    assert asyncio.run(main()) == b"x" * 100_000


def test_versions_below_tls12_are_refused_and_counted(relay):
    before = metric(relay, "wsrelay_tls_handshakes_total", outcome="failed_protocol")
    for flag in ("-tls1", "-tls1_1"):
        out = s_client(relay.tls_port, flag, "-cipher", "DEFAULT@SECLEVEL=0")
        assert "Cipher is (NONE)" in out, out
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        out = s_client(relay.tls_port, flag)
        assert f"Protocol  : {version}" in out and "HTTP/1.1 426" in out, out
    wait_for(lambda: metric(relay, "wsrelay_tls_handshakes_total", outcome="failed_protocol") >= before + 2,
             10, what="failed_protocol counted")


def test_alpn_is_http11_only_never_h2(relay):
    out = s_client(relay.tls_port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in out, out
    out = s_client(relay.tls_port, "-alpn", "h2")
    assert "No ALPN negotiated" in out and "h2" not in re.findall(r"ALPN protocol: (\S+)", out), out


def test_twenty_reconnects_all_resume_whichever_worker_accepts(relay, tmp_path):
    sess = tmp_path / "session"
    first = s_client(relay.tls_port, "-sess_out", str(sess))
    assert "New, TLSv1.3" in first, first

    def resumed_by_worker():
        return {w: metric(relay, "wsrelay_tls_handshakes_total", outcome="resumed", worker=str(w)) for w in (0, 1)}

    before = resumed_by_worker()
    cycles = reused = 0
    # at least 20, and until each of the 2 workers has resumed some (which
    # worker accepts is the kernel's and the balancer's choice: bounded at 200)
    while cycles < 20 or (cycles < 200 and not all(v > before[w] for w, v in resumed_by_worker().items())):
        out = s_client(relay.tls_port, "-sess_in", str(sess), "-sess_out", str(sess))
        cycles += 1
        reused += "Reused, TLSv1.3" in out
    after = resumed_by_worker()
    assert reused == cycles
    assert sum(after.values()) - sum(before.values()) == cycles
    assert all(after[w] > before[w] for w in (0, 1)), (before, after)  # both workers resumed tickets


def test_plain_http_on_the_tls_port_gets_nginxs_400(relay):
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"plain HTTP request was sent to a TLS port" in data
    assert metric(relay, "wsrelay_tls_handshakes_total", outcome="plain_http") >= 1


def test_garbage_and_truncated_hellos_get_a_close_and_nothing_else(ws_origin, pki):
    d, _ca, pair = pki
    with tls_relay(ws_origin.addr, pair, workers=1, RELAY_HANDSHAKE_TIMEOUT="1") as r:
        # A TLS record header with garbage in it: refused at once with one fatal
        # alert at most (RFC 8446 §6; OpenSSL writes it where it owns the
        # socket, as under nginx and HAProxy), then closed.
        with socket.create_connection(("127.0.0.1", r.tls_port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01\x00\x10" + b"\xff" * 16)
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            assert data == b"" or (len(data) == 7 and data[:2] == b"\x15\x03" and data[3:6] == b"\x00\x02\x02"), data
            assert time.monotonic() - t0 < 0.9
        # The first 40 bytes of a real ClientHello, then silence: closed at the handshake timeout.
        hello = ssl.create_default_context()
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = hello.wrap_bio(inc, out, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        client_hello = out.read()
        with socket.create_connection(("127.0.0.1", r.tls_port), timeout=10) as s:
            s.sendall(client_hello[:40])
            t0 = time.monotonic()
            assert s.recv(4096) == b""
            assert 0.8 < time.monotonic() - t0 < 5
        wait_for(lambda: metric(r, "wsrelay_tls_handshakes_total", outcome="timeout") == 1, 10,
                 what="the timeout counted")
        assert metric(r, "wsrelay_tls_handshakes_total", outcome="failed_other") == 1
        assert "Traceback" not in r.text()


def test_a_slow_client_is_dropped_at_the_handshake_timeout_others_unharmed(ws_origin, pki):
    d, _ca, pair = pki
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = out.read()

    async def main(port: int) -> float | None:
        from websockets.asyncio.client import connect as aconnect

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with aconnect(f"wss://localhost:{port}/", ssl=client_context(d), open_timeout=10) as other:
            t0 = time.monotonic()
            for byte in client_hello:  # one byte a second, never finishing within 3 s
                writer.write(bytes([byte]))
                await other.send("still here")
                assert await asyncio.wait_for(other.recv(), 2) == "still here"
                try:
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        return time.monotonic() - t0
                except asyncio.TimeoutError:
                    pass
                except ConnectionError:
                    return time.monotonic() - t0
        return None

    with tls_relay(ws_origin.addr, pair, workers=1, RELAY_HANDSHAKE_TIMEOUT="3") as r:
        closed_after = asyncio.run(main(r.tls_port))
        assert closed_after is not None and 2.5 < closed_after < 6, closed_after
        assert metric(r, "wsrelay_tls_handshakes_total", outcome="timeout") == 1


def test_sni_picks_the_certificate_by_name_wildcards_included(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    default = issue(ca, tmp_path, "default", "default.example")
    wild = issue(ca, tmp_path, "wild", "*.b.example")
    exact = issue(ca, tmp_path, "exact", "a.example", "www.a.example")
    with tls_relay(ws_origin.addr, default, wild, exact, workers=1) as r:
        assert "a.example" in names_for(r, "www.a.example")
        assert "*.b.example" in names_for(r, "x.b.example")
        assert "default.example" in names_for(r, "x.y.b.example")  # a wildcard is one label
        assert "default.example" in names_for(r, "unknown.example")
    with tls_relay(ws_origin.addr, default, wild, workers=1, RELAY_TLS_STRICT_SNI="1") as r:
        assert "Cipher is (NONE)" in s_client(r.tls_port, "-servername", "unknown.example")
        assert "*.b.example" in names_for(r, "q.b.example")
        wait_for(lambda: metric(r, "wsrelay_tls_handshakes_total", outcome="failed_sni") == 1, 10,
                 what="failed_sni")


def test_client_certificates_the_verified_subject_reaches_the_origin_never_the_clients(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    server = issue(ca, tmp_path, "localhost", "localhost")
    client_cert = ca.issue_cert("client-7", common_name="client-7", organization_name="Example, Inc.",
                                key_type=ECDSA)
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    env = {"RELAY_TLS_CLIENT_CA": str(tmp_path / "ca.pem"), "RELAY_TLS_CLIENT_HEADER": "X-Client-DN"}
    with tls_relay(ws_origin.addr, server, workers=1, **env) as r:
        ctx = client_context(tmp_path)
        ctx.load_cert_chain(str(tmp_path / "client.pem"))
        first, = wss_echo(f"wss://localhost:{r.tls_port}/headers", ctx, path_first=True,
                          additional_headers={"X-Client-DN": "CN=forged", "X-Client_DN": "CN=forged2"})
        headers = json.loads(first)["headers"]
        values = [v for k, v in headers if k.lower().replace("_", "-") == "x-client-dn"]
        from cryptography import x509

        expected = x509.load_pem_x509_certificate(client_cert.cert_chain_pems[0].bytes()).subject.rfc4514_string()
        assert values == [expected] and "O=Example\\, Inc." in expected, values  # RFC 4514, as nginx's $ssl_client_s_dn
        # without a client certificate: refused in the handshake, counted
        with pytest.raises(Exception):  # noqa: B017 - whichever way the client library reports it
            wss_echo(f"wss://localhost:{r.tls_port}/", client_context(tmp_path), "x")
        wait_for(lambda: metric(r, "wsrelay_tls_handshakes_total", outcome="failed_client_certificate") >= 1,
                 10, what="failed_client_certificate")
        # the plain listener never passes a client's own value on
        with connect(f"ws://127.0.0.1:{r.port}/headers", open_timeout=10,
                     additional_headers={"X-Client-DN": "CN=forged"}) as ws:
            headers = json.loads(ws.recv())["headers"]
        assert not [v for k, v in headers if k.lower() == "x-client-dn"]


def test_certificate_expiry_is_a_metric_one_series_per_certificate(relay, pki):
    from cryptography import x509

    from tests.support.scrape import samples

    leaf = x509.load_pem_x509_certificate(pki[2].cert.read_bytes())
    series = {labels: v for (n, labels), v in samples(relay).items()
              if n == "wsrelay_tls_certificate_expiry_timestamp_seconds"}
    assert series == {(("name", "localhost"),): leaf.not_valid_after_utc.timestamp()}


def test_an_origin_closing_closes_the_tls_client_at_once(relay, pki):
    """TLS has no half-close through uvloop: the origin's FIN becomes the
    client's close_notify and close, not a connection left open until the
    client gives up (websockets waits close_timeout for the server's close)."""
    from websockets.asyncio.client import connect as aconnect

    async def main():
        async with aconnect(f"wss://localhost:{relay.tls_port}/close/1000", ssl=client_context(pki[0]),
                            open_timeout=10, close_timeout=20) as ws:
            await asyncio.wait_for(ws.wait_closed(), 15)  # bounded far below close_timeout
            return ws.close_code

    assert asyncio.run(main()) == 1000


# -- which data plane relays TLS tunnels (README "TLS", relay/native/plane.py) ----------------

def _exchange(relay, directory, path: str) -> dict:
    """The same wss:// exchange on any relay: 100 KB, 4 KiB and 64 B
    echoed (random: permessage-deflate shrinks nothing), then the client
    closes; its access log line."""
    import random

    rng = random.Random(16)
    messages = (rng.randbytes(100_000), rng.randbytes(4096), rng.randbytes(64))
    assert wss_echo(f"wss://localhost:{relay.tls_port}{path}", client_context(directory), *messages) == list(messages)
    wait_for(lambda: any(f'"path":"{path}"' in line for line in relay.access), 10, what="access log line")
    return next(json.loads(x) for x in relay.access if f'"path":"{path}"' in x)


def test_tls_tunnels_run_on_the_native_plane_with_the_python_planes_byte_counts(ws_origin, pki):
    from relay import native

    if not native.TLS_AVAILABLE:
        pytest.skip("TLS in the native plane unavailable: " + native.TLS_WHY_NOT)
    d, _ca, pair = pki
    lines = {}
    for plane in ("auto", "python"):
        with tls_relay(ws_origin.addr, pair, workers=1, RELAY_DATA_PLANE=plane) as r:
            lines[plane] = _exchange(r, d, "/same")
    assert lines["auto"]["data_plane"] == "native" and lines["python"]["data_plane"] == "python"
    counts = {plane: (line["bytes_up"], line["bytes_down"]) for plane, line in lines.items()}
    assert counts["auto"] == counts["python"] and counts["auto"][0] > 100_000, counts


def test_client_certificate_tunnels_native_frames_mode_tls_python(ws_origin, tmp_path):
    """A client certificate matters at the handshake only: the pump takes
    those tunnels too. Frames mode stays on the Python plane, TLS or not."""
    from relay import native

    ca = make_ca(tmp_path)
    server = issue(ca, tmp_path, "localhost", "localhost")
    client_cert = ca.issue_cert("client-8", common_name="client-8", key_type=ECDSA)
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    ctx = client_context(tmp_path)
    ctx.load_cert_chain(str(tmp_path / "client.pem"))
    with tls_relay(ws_origin.addr, server, workers=1, RELAY_TLS_CLIENT_CA=str(tmp_path / "ca.pem")) as r:
        assert wss_echo(f"wss://localhost:{r.tls_port}/mtls", ctx, "with a certificate") == ["with a certificate"]
        wait_for(lambda: any('"path":"/mtls"' in x for x in r.access), 10, what="access log line")
        line = next(json.loads(x) for x in r.access if '"path":"/mtls"' in x)
        assert line["data_plane"] == ("native" if native.TLS_AVAILABLE else "python")
    with tls_relay(ws_origin.addr, server, workers=1, RELAY_MODE="frames") as r:
        line = _exchange(r, tmp_path, "/frames")
        assert line["data_plane"] == "python"


def test_open_wss_tunnels_live_through_a_reload_and_drain_with_close_notify(loop_thread, pki):
    """SIGHUP: the tunnel opened on generation 0 goes on while generation 1
    serves; SIGTERM: it is closed at the drain timeout, with close_notify."""
    from tests.support.net import upgrade_request
    from tests.support.raw_origins import RawOrigin
    from tests.support.tls import TlsConn

    d, _ca, pair = pki

    def upgraded(port: int, path: str) -> TlsConn:
        c = TlsConn(port, client_context(d))
        c.send(upgrade_request(path))
        assert c.read_head().startswith(b"HTTP/1.1 101")
        return c

    with RawOrigin(loop_thread) as origin, tls_relay(origin.addr, pair, workers=1, RELAY_DRAIN_TIMEOUT="2") as r:
        c = upgraded(r.tls_port, "/held")
        c.send(b"before")
        assert c.recv_exactly(6) == b"before"
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting", timeout=30)
        c.send(b"after the reload")
        assert c.recv_exactly(16) == b"after the reload"
        new = upgraded(r.tls_port, "/new")
        new.send(b"new")
        assert new.recv_exactly(3) == b"new"
        new.close_notify()
        assert new.read_to_end() == (b"", "close_notify")
        r.signal(signal.SIGTERM)
        started = time.monotonic()
        c.sock.settimeout(20)
        assert c.read_to_end() == (b"", "close_notify")
        assert time.monotonic() - started < 15
        assert r.proc.wait(20) == 0
        wait_for(lambda: any('"path":"/held"' in x for x in r.access), 10, what="the held tunnel's access log line")
        held = [json.loads(x) for x in r.access if '"path":"/held"' in x]
        assert len(held) == 1 and (held[0]["bytes_up"], held[0]["bytes_down"]) == (22, 22), held
