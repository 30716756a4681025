"""No open proxy, no header injection (README: "What happens at the edge": the relay never chooses a
destination from the request).

A "victim" server listens on another loopback port and counts connections:
absolute-form targets, CONNECT, forged Host and X-Forwarded-Host, userinfo
tricks, IPv6 literals must never reach it. The configured origin is a raw
server that keeps every head it receives, so the tests can check exactly
what a smuggled CR, LF or NUL produced there: a refusal at the edge, or
nothing at all — never an extra header line.
"""

from __future__ import annotations

import socket

import pytest

from tests.support.net import raw_exchange, read_head, status_of, upgrade_request
from tests.support.raw_origins import RawOrigin, answer, count_only, echo_after_101
from tests.support.relay import Relay


async def http_or_ws(origin: RawOrigin, c) -> None:
    if b"upgrade: websocket" in c.head.lower():
        await echo_after_101(origin, c)
    else:
        await answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(origin, c)


@pytest.fixture(scope="module")
def victim(loop_thread):
    with RawOrigin(loop_thread, count_only) as v:
        yield v


@pytest.fixture(scope="module")
def origin(loop_thread):
    with RawOrigin(loop_thread, http_or_ws) as o:
        yield o


@pytest.fixture(scope="module")
def relay(origin, data_plane):
    with Relay(origin.addr, workers=2) as r:
        yield r


def last_head(origin: RawOrigin, before: int) -> bytes:
    assert len(origin.heads) == before + 1, "the request did not reach the configured origin exactly once"
    return origin.heads[-1]


def _targets(victim_port: int) -> list[str]:
    v = f"127.0.0.1:{victim_port}"
    return [f"http://{v}/", f"http://{v}", f"HTTP://{v}/x?y", f"ws://{v}/", f"wss://{v}/", f"https://{v}/",
            f"http://user@{v}/", f"http://{v}@127.0.0.1/", f"//{v}/", f"http://[::1]:{victim_port}/",
            f"http://localhost:{victim_port}/"]


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "upgrade"])
def test_absolute_form_targets_never_reach_another_server(relay, origin, victim, upgrade):
    for target in _targets(victim.port):
        before = len(origin.heads)
        host = f"127.0.0.1:{victim.port}"
        if upgrade:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                s.sendall(upgrade_request(target, host=host))
                head, _ = read_head(s)
            status = status_of(head)
        else:
            out = raw_exchange(relay.port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                               .encode())
            status = status_of(out)
        if status in (200, 101):
            seen = last_head(origin, before)
            line = seen.split(b"\r\n", 1)[0]
            assert line.split(b" ")[1].startswith(b"/"), line  # origin-form only
            assert f"127.0.0.1:{victim.port}".encode() not in line or target.startswith("//"), line
        else:
            assert status in (400, 403), (target, status)
    assert victim.connections == 0


@pytest.mark.parametrize("request_line", [
    "CONNECT 127.0.0.1:{port} HTTP/1.1", "CONNECT [::1]:{port} HTTP/1.1", "connect 127.0.0.1:{port} HTTP/1.1",
    "CONNECT http://127.0.0.1:{port}/ HTTP/1.1", "GET 127.0.0.1:{port} HTTP/1.1", "OPTIONS * HTTP/1.1",
    "PROXY TCP4 127.0.0.1 127.0.0.1 1 {port}",
])
def test_connect_and_authority_forms_are_refused(relay, victim, request_line):
    line = request_line.format(port=victim.port)
    out = raw_exchange(relay.port, f"{line}\r\nHost: 127.0.0.1:{victim.port}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(out) in (200, 400), out[:200]  # OPTIONS * goes to the origin; the rest is refused
    assert victim.connections == 0


@pytest.mark.parametrize("extra", [
    "X-Forwarded-Host: 127.0.0.1:{port}\r\n", "Forwarded: host=127.0.0.1:{port}\r\n",
    "X-Original-URL: http://127.0.0.1:{port}/\r\n", "X-Rewrite-URL: http://127.0.0.1:{port}/\r\n",
    "X-Host: 127.0.0.1:{port}\r\n", "X-Forwarded-Server: 127.0.0.1:{port}\r\n",
])
def test_forged_host_headers_do_not_route(relay, origin, victim, extra):
    before = len(origin.heads)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(upgrade_request("/", host=f"127.0.0.1:{victim.port}", extra=extra.format(port=victim.port)))
        head, _ = read_head(s)
    assert status_of(head) == 101
    seen = last_head(origin, before)
    # the relay sets X-Forwarded-Host from Host itself; a client's own is not passed on
    assert seen.lower().count(b"x-forwarded-host:") == 1
    assert victim.connections == 0


SMUGGLED = [
    ("cr-in-xff", "X-Forwarded-For: 1.2.3.4\rX-Injected: yes\r\n"),
    ("lf-in-xff", "X-Forwarded-For: 1.2.3.4\nX-Injected: yes\r\n"),
    ("nul-in-xff", "X-Forwarded-For: 1.2.3.4\x00X-Injected: yes\r\n"),
    ("cr-in-value", "X-Custom: a\rX-Injected: yes\r\n"),
    ("lf-in-value", "X-Custom: a\nX-Injected: yes\r\n"),
    ("nul-in-value", "Cookie: a=b\x00\r\nX-Injected: yes\r\n"),
    ("obs-fold", "X-Custom: a\r\n X-Injected: yes\r\n"),
    ("tab-fold", "X-Custom: a\r\n\tX-Injected: yes\r\n"),
    ("cr-in-host", None),
    ("lf-in-name", "X-Custom\nX-Injected: yes\r\n"),
    ("space-before-colon", "X-Injected : yes\r\n"),
    ("del-in-value", "X-Custom: a\x7fb\r\n"),
]


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "upgrade"])
@pytest.mark.parametrize("name,extra", SMUGGLED, ids=[n for n, _ in SMUGGLED])
def test_control_characters_never_inject_a_header_at_the_origin(relay, origin, name, extra, upgrade):
    before = len(origin.heads)
    if extra is None:
        host, extra = "relay.test\rX-Injected: yes", ""
    else:
        host = "relay.test"
    if upgrade:
        data = upgrade_request("/", host=host, extra=extra)
    else:
        data = f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
    out = raw_exchange(relay.port, data)
    assert status_of(out) == 400, out[:200]
    assert len(origin.heads) == before, "a head with a control character was forwarded"
    assert not any(b"X-Injected" in h for h in origin.heads[before:])


def test_encoded_crlf_in_the_target_is_forwarded_encoded(relay, origin):
    before = len(origin.heads)
    out = raw_exchange(relay.port, b"GET /a%0d%0aX-Injected:%20yes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 200
    seen = last_head(origin, before)
    assert seen.startswith(b"GET /a%0d%0aX-Injected:%20yes HTTP/1.1\r\n")
    assert b"\r\nX-Injected" not in seen


def test_forwarded_headers_are_the_edges_own(relay, origin):
    """A client that is no trusted proxy (RELAY_TRUSTED_PROXIES) cannot set
    X-Forwarded-For, X-Forwarded-Proto or X-Forwarded-Host, or repeat them:
    X-Forwarded-For is its own address alone (nginx with set_real_ip_from)."""
    before = len(origin.heads)
    extra = ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
             "x-forwarded-proto: https\r\nConnection: x-forwarded-for, close\r\n")
    out = raw_exchange(relay.port, f"GET / HTTP/1.1\r\nHost: good\r\n{extra}\r\n".encode())
    assert status_of(out) == 200
    seen = last_head(origin, before)
    lines = [ln.lower() for ln in seen.split(b"\r\n")]
    assert [ln for ln in lines if ln.startswith(b"x-forwarded-for:")] == [b"x-forwarded-for: 127.0.0.1"]
    assert [ln for ln in lines if ln.startswith(b"x-forwarded-proto:")] == [b"x-forwarded-proto: http"]
    assert [ln for ln in lines if ln.startswith(b"x-forwarded-host:")] == [b"x-forwarded-host: good"]


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "upgrade"])
def test_underscore_spellings_of_forwarded_headers_are_dropped(relay, origin, upgrade):
    """CGI and many WSGI servers read ``X_Forwarded_For`` as ``X-Forwarded-For``:
    passed on, it would let a client forge what the edge sets. Other names with
    underscores pass untouched."""
    before = len(origin.heads)
    extra = "X_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Proto: https\r\nx_forwarded_host: evil\r\nX_App_Token: t\r\n"
    if upgrade:
        request = upgrade_request("/", extra=extra)
    else:
        request = f"GET / HTTP/1.1\r\nHost: good\r\n{extra}\r\n".encode()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(request)
        head, _ = read_head(s)
    assert status_of(head) == (101 if upgrade else 200)
    seen = last_head(origin, before).lower()
    assert b"6.6.6.6" not in seen and b"https" not in seen and b"evil" not in seen
    assert b"\r\nx_app_token: t\r\n" in seen
    assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in seen


def test_underscore_spellings_of_framing_headers_are_dropped(relay, origin):
    """Found by the differential harness: ``Transfer_Encoding: chunked`` (or
    ``Content_Length``) passed on; an origin that maps ``_`` to ``-`` would read
    a chunked body where the relay forwarded none (request smuggling)."""
    before = len(origin.heads)
    data = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent_Length: 40\r\n"
            b"Keep_Alive: 1\r\nX_Kept: 1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(data)
        head, _ = read_head(s)
    assert status_of(head) == 200
    seen = last_head(origin, before).lower()
    assert b"transfer_encoding" not in seen and b"content_length" not in seen and b"keep_alive" not in seen
    assert b"\r\nx_kept: 1\r\n" in seen


def test_smuggling_through_connection_tokens_is_neutralised(relay, origin):
    """Found by the fuzzers: ``Connection: content-length`` used to strip the
    length while the relay still sent the body, which the origin would then
    read as a second request."""
    before = len(origin.heads)
    inner = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length, host\r\nContent-Length: %d\r\n\r\n"
            % len(inner)) + inner
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(data)
        head, _ = read_head(s)
    assert status_of(head) == 200
    seen = last_head(origin, before)
    assert b"\r\nContent-Length: %d\r\n" % len(inner) in seen
    assert b"\r\nHost: x\r\n" in seen
