"""Behind a load balancer (README, "Behind a load balancer"), with real parts:
Debian's HAProxy in ``mode tcp`` with ``send-proxy-v2`` and ``send-proxy`` in
front of a real relay (its configuration is the README's block, the hosts
made loopback addresses), HAProxy in ``mode http`` with ``accept-proxy`` as
the origin side of RELAY_ORIGIN_PROXY_PROTOCOL=v2, and distinct clients on
distinct loopback addresses (127.0.0.2, 127.0.0.3, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from relay.proxy_protocol import V2_SIGNATURE
from tests.support.net import free_port, read_head, status_of, upgrade_request
from tests.support.relay import ROOT, Relay, wait_for
from tests.support.scrape import metric

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed (apt-get install haproxy)")


class HAProxy:
    """``haproxy -db -f <config>`` in the foreground, until stopped."""

    def __init__(self, config: str, tmp: Path, port: int, host: str = "127.0.0.1"):
        self.config, self.port, self.host = config, port, host
        self.cfg = tmp / f"haproxy-{port}.cfg"
        self.log = tmp / f"haproxy-{port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "HAProxy":
        self.cfg.write_text(self.config)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], stdout=out, stderr=subprocess.STDOUT)

        def accepting():
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited {self.proc.returncode}: {self.log.read_text()}")
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
                return s.connect_ex((self.host, self.port)) == 0
        wait_for(accepting, 10, what="haproxy accepting")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def readme_haproxy_config() -> str:
    text = (Path(ROOT) / "README.md").read_text()
    section = text.split("## Behind a load balancer", 1)[1]
    return re.search(r"```haproxy\n(.*?)```", section, re.S).group(1)


def readme_config(relay: Relay, port: int, send_proxy: str = "send-proxy-v2", relay_host: str = "127.0.0.1",
                  bind: str = "127.0.0.1") -> str:
    """The README's configuration, its hosts made this machine's loopback addresses."""
    cfg = readme_haproxy_config()
    assert "bind :80" in cfg and "server relay1 10.0.0.11:8080 send-proxy-v2 check port 9108" in cfg
    cfg = cfg.replace("bind :80", f"bind {bind}:{port}" if ":" not in bind else f"bind [{bind}]:{port}")
    cfg = "\n".join(line for line in cfg.splitlines() if "relay2" not in line) + "\n"
    relay_addr = f"[{relay_host}]" if ":" in relay_host else relay_host
    return (cfg.replace("10.0.0.11:8080", f"{relay_addr}:{relay.port}")
               .replace("port 9108", f"port {relay.metrics_port} addr 127.0.0.1")
               .replace("send-proxy-v2", send_proxy))


def connect_from(src: str, port: int, dst: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((dst, port))
    return s


def ws_from(src: str, port: int, path: str = "/headers", headers: dict | None = None, dst: str = "127.0.0.1"):
    host = f"[{dst}]" if ":" in dst else dst
    return ws_connect(f"ws://{host}:{port}{path}", sock=connect_from(src, port, dst), open_timeout=10,
                      additional_headers=headers or {})


def headers_seen(ws) -> dict[str, list[str]]:
    info = json.loads(ws.recv(timeout=10))
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def access_lines(relay: Relay, **want) -> list[dict]:
    out = []
    for line in relay.access:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if all(rec.get(k) == v for k, v in want.items()):
            out.append(rec)
    return out


def refused_silently(s: socket.socket, data: bytes, half_close: bool = False) -> bytes:
    """Send ``data``; everything the relay answers before closing (b"" when nothing)."""
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def v2_tcp(src: tuple[str, int], dst: tuple[str, int], tlvs: bytes = b"") -> bytes:
    if ":" in src[0]:
        block = socket.inet_pton(socket.AF_INET6, src[0]) + socket.inet_pton(socket.AF_INET6, dst[0]) \
            + struct.pack("!HH", src[1], dst[1]) + tlvs
        return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(block)) + block
    block = socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!HH", src[1], dst[1]) + tlvs
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


PROXIED = {"RELAY_PROXY_PROTOCOL": "on", "RELAY_TRUSTED_PROXIES": "127.0.0.1,::1", "RELAY_HANDSHAKE_TIMEOUT": "3"}


@pytest.fixture(scope="module")
def proxied(ws_origin):
    """A 2-worker relay that requires a PROXY header, from 127.0.0.1 and ::1 only."""
    with Relay(ws_origin.addr, workers=2, env=dict(PROXIED, RELAY_LISTEN="127.0.0.1:0")) as r:
        yield r


# -- HAProxy in front ------------------------------------------------------------------

@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_haproxy_in_front_the_origin_and_the_access_log_see_the_client(proxied, tmp_path, send_proxy):
    port = free_port()
    with HAProxy(readme_config(proxied, port, send_proxy), tmp_path, port):
        forged = {"X-Forwarded-For": "6.6.6.6", "X-Request-ID": "chosen-by-client"}
        with ws_from("127.0.0.2", port, "/headers/" + send_proxy, forged) as ws:
            seen = headers_seen(ws)
            ws.send("through haproxy")
            assert ws.recv(timeout=10) == "through haproxy"
        with ws_from("127.0.0.3", port, "/headers/" + send_proxy) as ws:
            other = headers_seen(ws)
    assert seen["x-forwarded-for"] == ["127.0.0.2"]  # the client's, not HAProxy's 127.0.0.1; the forgery gone
    assert other["x-forwarded-for"] == ["127.0.0.3"]
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"][0])  # 127.0.0.2 is no trusted proxy
    recs = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(access_lines(proxied, path="/headers/" + send_proxy)),
                    10, what="both access lines (written as each tunnel ends)")
    assert sorted(r["client"] for r in recs) == ["127.0.0.2", "127.0.0.3"]
    assert {r["status"] for r in recs} == {101}


def test_haproxy_over_ipv6_to_the_relay(ws_origin, tmp_path):
    """HAProxy reaches the relay over IPv6, so the v2 header about an IPv4
    client travels on an IPv6 connection; and an IPv6 client's header is TCP6."""
    env = dict(PROXIED, RELAY_LISTEN="[::1]:0", RELAY_TRUSTED_PROXIES="::1")
    with Relay(ws_origin.addr, workers=2, env=env) as r:
        port, port6 = free_port(), free_port("::1")
        with HAProxy(readme_config(r, port, relay_host="::1"), tmp_path, port), \
                HAProxy(readme_config(r, port6, relay_host="::1", bind="::1"), tmp_path, port6, host="::1"):
            with ws_from("127.0.0.2", port) as ws:
                assert headers_seen(ws)["x-forwarded-for"] == ["127.0.0.2"]
            with ws_from("::1", port6, dst="::1") as ws:
                assert headers_seen(ws)["x-forwarded-for"] == ["::1"]
        assert metric(r, "wsrelay_proxy_protocol_errors_total") == 0


# -- what a relay requiring the header refuses ----------------------------------------------

def test_a_forged_header_from_an_untrusted_address_is_refused(proxied, ws_origin):
    before = len(ws_origin.requests)
    untrusted = metric(proxied, "wsrelay_proxy_protocol_errors_total", reason="untrusted")
    for header in (v2_tcp(("203.0.113.9", 4000), ("127.0.0.1", proxied.port)),
                   b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n"):
        with connect_from("127.0.0.3", proxied.port) as s:
            assert refused_silently(s, header + upgrade_request("/headers")) == b""
    wait_for(lambda: metric(proxied, "wsrelay_proxy_protocol_errors_total", reason="untrusted") == untrusted + 2,
             10, what="two untrusted connections counted")
    assert len(ws_origin.requests) == before  # nothing reached the origin


@pytest.mark.parametrize("reason, data, half_close", [
    ("missing", upgrade_request("/headers"), False),                        # no header where one is required
    ("invalid", b"PROXY TCP4 192.0.2.1 127.0.0.1 080 80\r\n" + upgrade_request(), False),  # leading zero
    ("invalid", V2_SIGNATURE + b"\x21\x41\x00\x00" + upgrade_request(), False),  # family 4
    ("truncated", V2_SIGNATURE + b"\x21\x11\x00\x0c\x7f\x00", True),
    ("timeout", b"PROXY TCP4 192.0.2.1 ", False),                           # then silence past 3 s
])
def test_a_trusted_source_without_a_valid_header_is_refused_without_an_answer(proxied, reason, data, half_close):
    before = metric(proxied, "wsrelay_proxy_protocol_errors_total", reason=reason)
    t0 = time.monotonic()
    with connect_from("127.0.0.1", proxied.port) as s:
        assert refused_silently(s, data, half_close) == b""
    if reason == "timeout":
        assert 2.5 < time.monotonic() - t0 < 8
    wait_for(lambda: metric(proxied, "wsrelay_proxy_protocol_errors_total", reason=reason) == before + 1,
             10, what=f"{reason} counted")


def test_local_health_checks_tlvs_and_ipv6_addresses_in_the_header(proxied):
    """v2 LOCAL (a balancer's health check) is served with the connection's own
    address; TLVs as AWS's network load balancer sends them are skipped; an
    IPv6 address in a v2 header is the client's."""
    cases = [
        (V2_SIGNATURE + b"\x20\x00\x00\x00", "127.0.0.1"),
        (v2_tcp(("198.51.100.7", 50000), ("10.0.0.11", 8080),
                tlvs=b"\xea\x00\x17\x01vpce-08d2bf15fac5001c9" + b"\x04\x00\x00"), "198.51.100.7"),
        (v2_tcp(("2001:db8::7", 50000), ("2001:db8::1", 8080)), "2001:db8::7"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
        (b"PROXY TCP6 2001:db8:0:0::8 ::1 1 2\r\n", "2001:db8::8"),
    ]
    for header, client in cases:
        with connect_from("127.0.0.1", proxied.port) as s:
            s.sendall(header + upgrade_request("/headers"))
            head, rest = read_head(s)
            assert status_of(head) == 101, header
            while b"x-forwarded-for" not in rest.lower():
                rest += s.recv(65536)
            info = json.loads(rest[rest.index(b'{"'):rest.rindex(b"}") + 1])
            xff = [v for k, v in info["headers"] if k.lower() == "x-forwarded-for"]
            assert xff == [client], (header, xff)


def test_without_the_proxy_protocol_a_trusted_proxys_forwarding_is_kept(ws_origin):
    """RELAY_TRUSTED_PROXIES alone (an L7 proxy in front): its X-Forwarded-For
    is appended to and its X-Request-ID kept; anyone else's replaced."""
    with Relay(ws_origin.addr, workers=1, env={"RELAY_TRUSTED_PROXIES": "127.0.0.4/32"}) as r:
        sent = {"X-Forwarded-For": "203.0.113.50", "X-Request-ID": "lb-7f3a9c"}
        with ws_from("127.0.0.4", r.port, headers=sent) as ws:
            trusted = headers_seen(ws)
        with ws_from("127.0.0.5", r.port, headers=sent) as ws:
            other = headers_seen(ws)
    assert trusted["x-forwarded-for"] == ["203.0.113.50, 127.0.0.4"] and trusted["x-request-id"] == ["lb-7f3a9c"]
    assert other["x-forwarded-for"] == ["127.0.0.5"] and other["x-request-id"] != ["lb-7f3a9c"]


# -- the per-IP limit across workers -------------------------------------------------------

def burst(src: str, port: int, n: int) -> tuple[list[int], list[socket.socket]]:
    """``n`` upgrades from ``src`` sent at once; their statuses, and the sockets (open)."""
    socks = [connect_from(src, port) for _ in range(n)]
    for s in socks:
        s.sendall(upgrade_request("/"))
    return [status_of(read_head(s)[0]) for s in socks], socks


def test_per_ip_limit_holds_across_four_workers_through_haproxy(ws_origin, tmp_path):
    """60 concurrent upgrades from one address, a limit of 5, 4 workers: exactly
    5, three rounds (counted per worker, as before, 4 workers let up to 20 in)."""
    env = dict(PROXIED, RELAY_MAX_CLIENTS_PER_IP="5", RELAY_MAX_CLIENTS="1000")
    with Relay(ws_origin.addr, workers=4, env=env) as r:
        port = free_port()
        with HAProxy(readme_config(r, port), tmp_path, port):
            for round_ in range(3):
                statuses, socks = burst("127.0.0.2", port, 60)
                try:
                    assert statuses.count(101) == 5 and statuses.count(503) == 55, (round_, statuses)
                    assert metric(r, "wsrelay_clients") == 5
                    # another address is not held back by this one
                    ok, more = burst("127.0.0.3", port, 2)
                    assert ok == [101, 101]
                    for s in more:
                        s.close()
                finally:
                    for s in socks:
                        s.close()
                wait_for(lambda: metric(r, "wsrelay_clients") == 0, 15, what="every client given back")
            refusing = [w for w in range(4)
                        if metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_ip", worker=str(w))]
            assert len(refusing) >= 2, "the bursts never spread over workers: nothing was shown"
            assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_ip") == 3 * 55
            assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit") == 0


def test_a_killed_workers_per_ip_share_comes_back(ws_origin):
    """SIGKILL a worker holding tunnels of an address at its limit: once the
    supervisor reaps it, exactly that worker's share fits again."""
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MAX_CLIENTS_PER_IP": "4"}) as r:
        statuses, socks = burst("127.0.0.2", r.port, 4)
        try:
            assert statuses == [101] * 4
            assert burst("127.0.0.2", r.port, 1)[0] == [503]
            per_worker = {w: int(metric(r, "wsrelay_websocket_connections", worker=str(w))) for w in (0, 1)}
            victim = max(per_worker, key=per_worker.get)
            killed = per_worker[victim]
            pid = r.worker_pids()[victim]
            os.kill(pid, signal.SIGKILL)
            r.wait_log(f"worker {victim} (pid {pid}) died")
            wait_for(lambda: metric(r, "wsrelay_clients") == 4 - killed, 15, what="the dead worker's share back")
            statuses, more = burst("127.0.0.2", r.port, killed + 1)
            socks += more
            assert statuses.count(101) == killed and statuses.count(503) == 1, (per_worker, statuses)
        finally:
            for s in socks:
                s.close()


def test_a_full_per_ip_table_refuses_new_addresses_and_says_so(ws_origin, tmp_path):
    """README: the table is sized at start from RELAY_MAX_CLIENTS (4 here: 32
    entries); a reload that raises the limit past it gets a warning, and once
    full, clients of new addresses get 503 limit_ip (never let past), while
    known addresses still count up to their limit."""
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_MAX_CLIENTS=4\nRELAY_MAX_CLIENTS_PER_IP=2\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_MAX_CLIENTS=100\nRELAY_MAX_CLIENTS_PER_IP=2\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting", timeout=20)
        assert "more than the per-IP table holds (32 addresses x workers" in r.text()
        socks = []
        try:
            for n in range(1, 33):
                statuses, s = burst(f"127.0.1.{n}", r.port, 1)
                assert statuses == [101], n
                socks += s
            statuses, s = burst("127.0.1.33", r.port, 1)
            socks += s
            assert statuses == [503]
            r.wait_log("per-IP table full (32 entries)")
            assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_ip") == 1
            statuses, s = burst("127.0.1.1", r.port, 2)  # a known address: one more fits, then its limit
            socks += s
            assert sorted(statuses) == [101, 503]  # concurrent: either one may take the last place
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: metric(r, "wsrelay_clients") == 0, 15, what="every client given back")
        statuses, s = burst("127.0.1.33", r.port, 1)
        s[0].close()
        assert statuses == [101]


# -- PROXY protocol v2 towards the origins --------------------------------------------------

ORIGIN_SIDE = """defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend origin
    bind 127.0.0.1:{port} accept-proxy
    http-request set-header X-PP-Src %[src]:%[src_port]
    http-request set-header X-PP-Dst %[dst]:%[dst_port]
    use_backend plain if {{ path_beg /plain }}
    default_backend websockets

backend websockets
    server ws {ws}

backend plain
    server aio {aio}
"""


def test_origins_read_the_clients_address_from_a_v2_header(ws_origin, aio_origin, tmp_path):
    """RELAY_ORIGIN_PROXY_PROTOCOL=v2 with HAProxy's accept-proxy as the origin's
    front: each origin connection tells the client's address and port and the
    address it connected to; plain-HTTP origin connections serve one client
    connection only (requests of two clients interleaved on keep-alive)."""
    port = free_port()
    cfg = ORIGIN_SIDE.format(port=port, ws=ws_origin.addr, aio=aio_origin.addr)
    with HAProxy(cfg, tmp_path, port), \
            Relay(f"127.0.0.1:{port}", workers=1, env={"RELAY_ORIGIN_PROXY_PROTOCOL": "v2"}) as r:
        sock = connect_from("127.0.0.2", r.port)
        client_port = sock.getsockname()[1]
        with ws_connect(f"ws://127.0.0.1:{r.port}/headers", sock=sock, open_timeout=10) as ws:
            seen = headers_seen(ws)
        assert seen["x-pp-src"] == [f"127.0.0.2:{client_port}"]
        assert seen["x-pp-dst"] == [f"127.0.0.1:{r.port}"]
        assert seen["x-forwarded-for"] == ["127.0.0.2"]

        a, b = connect_from("127.0.0.2", r.port), connect_from("127.0.0.3", r.port)
        ports = {"a": a.getsockname()[1], "b": b.getsockname()[1]}
        with a, b:
            for i in range(3):
                for name, s in (("a", a), ("b", b)):
                    s.sendall(f"GET /plain/{name}{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    head, _ = read_head(s)
                    assert status_of(head) == 200
        src = {path: {k.lower(): v for k, v in h.items()}.get("x-pp-src")
               for _m, path, h, _b in aio_origin.seen if path.startswith("/plain/")}
        for i in range(3):
            assert src[f"/plain/a{i}"] == f"127.0.0.2:{ports['a']}"
            assert src[f"/plain/b{i}"] == f"127.0.0.3:{ports['b']}"



def test_health_checks_begin_with_a_v2_header_too(ws_origin, aio_origin, tmp_path):
    """An origin that expects a PROXY header on every connection (README,
    "Towards the origins") expects it on the health checks' too: with
    RELAY_ORIGIN_PROXY_PROTOCOL=v2 they begin with a v2 LOCAL header (the
    relay's own connection, as HAProxy's checks of a send-proxy-v2 server),
    pass, and the origin stays up."""
    port = free_port()
    cfg = ORIGIN_SIDE.format(port=port, ws=ws_origin.addr, aio=aio_origin.addr)
    env = {"RELAY_ORIGIN_PROXY_PROTOCOL": "v2", "RELAY_HEALTH_CHECK_PATH": "/plain/healthz",
           "RELAY_HEALTH_CHECK_INTERVAL": "0.2", "RELAY_HEALTH_CHECK_FALL": "1"}
    with HAProxy(cfg, tmp_path, port), Relay(f"127.0.0.1:{port}", workers=1, env=env) as r:
        def checks() -> list[dict]:
            return [{k.lower(): v for k, v in h.items()} for _m, path, h, _b in list(aio_origin.seen)
                    if path == "/plain/healthz"]
        wait_for(lambda: len(checks()) >= 3, 10, what="three health checks through accept-proxy")
        assert {c["user-agent"] for c in checks()} == {"wsrelay-health-check"}
        assert {c["x-pp-src"].rpartition(":")[0] for c in checks()} == {"127.0.0.1"}  # LOCAL: its own address
        assert metric(r, "wsrelay_origin_up", origin=f"127.0.0.1:{port}") == 1
        assert " down: " not in r.text()


def test_a_proxy_header_comes_before_the_tls_handshake(ws_origin, tmp_path):
    """On a TLS listener the balancer's PROXY header is the connection's first
    bytes, then the client's TLS handshake (HAProxy's accept-proxy on an ssl
    bind, send-proxy in mode tcp): the client's address reaches the origin with
    X-Forwarded-Proto https; a ClientHello where the header belongs is refused."""
    import ssl

    from tests.support.tls import client_context, issue, make_ca, tls_env

    ca = make_ca(tmp_path)
    pair = issue(ca, tmp_path, "localhost", "localhost")
    env = dict(PROXIED, RELAY_LISTEN="", **tls_env(pair))
    with Relay(ws_origin.addr, workers=2, env=env) as relay:
        sock = connect_from("127.0.0.1", relay.tls_port)
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
        with ws_connect(f"wss://localhost:{relay.tls_port}/headers/tls", sock=sock, ssl=client_context(tmp_path),
                        server_hostname="localhost", open_timeout=10) as ws:
            seen = headers_seen(ws)
            ws.send("behind the balancer, over TLS")
            assert ws.recv(timeout=10) == "behind the balancer, over TLS"
        assert seen["x-forwarded-for"] == ["203.0.113.7"]
        assert seen["x-forwarded-proto"] == ["https"]
        wait_for(lambda: access_lines(relay, path="/headers/tls", client="203.0.113.7"), 10, what="access line")
        assert access_lines(relay, path="/headers/tls")[0]["tls_version"] == "TLSv1.3"
        # a TLS client straight to the port, no header: its ClientHello is no PROXY header
        raw = connect_from("127.0.0.1", relay.tls_port)
        with pytest.raises((ssl.SSLError, OSError)):
            client_context(tmp_path).wrap_socket(raw, server_hostname="localhost").do_handshake()
        wait_for(lambda: metric(relay, "wsrelay_proxy_protocol_errors_total", reason="missing") >= 1,
                 10, what="the refusal counted")
