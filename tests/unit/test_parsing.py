"""Sans-I/O parsing and validation: every refusal path, without sockets."""

from __future__ import annotations

import re

import pytest

from relay.errors import FramingError, HeadError
from relay.http_body import BodyScanner
from relay.handshake import (
    accept_key,
    check_upgrade_response,
    is_upgrade,
    origin_allowed,
    path_allowed,
    validate_upgrade,
)
from relay.headers import forward_head
from relay.http_head import (
    body_framing,
    keeps_alive,
    parse_request_head,
    parse_response_head,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GOOD = (b"GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        b"Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n")


def parse(data: bytes, max_bytes: int = 16384):
    return parse_request_head(data, max_bytes)


def refused(data: bytes, max_bytes: int = 16384) -> int:
    with pytest.raises(HeadError) as e:
        req = parse(data, max_bytes)
        assert req is not None, "incomplete"
        validate_upgrade(req)
    return e.value.status


def test_valid_upgrade_parses_and_validates():
    req = parse(GOOD)
    assert req.method == b"GET" and req.target == b"/chat?x=1" and req.path == b"/chat"
    assert req.head_len == len(GOOD)
    assert is_upgrade(req)
    assert validate_upgrade(req) == KEY


def test_incomplete_head_needs_more_and_every_prefix_is_incomplete():
    for i in range(len(GOOD)):
        assert parse(GOOD[:i]) is None
    assert parse(GOOD + b"\x81\x05hello").head_len == len(GOOD)


def test_leading_empty_lines_are_skipped():
    req = parse(b"\r\n\r\n" + GOOD)
    assert req is not None and req.head_len == len(GOOD) + 4


def test_rfc6455_accept_key_example():
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("data,status", [
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nNo-Colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\tfolded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\nc: d\r\n\r\n", 400),  # bare LF
    (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\x00c\r\n\r\n", 400),
    (b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET nonsense HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 400),
])
def test_malformed_request_heads(data, status):
    with pytest.raises(HeadError) as e:
        parse(data)
    assert e.value.status == status


def test_431_when_head_exceeds_limit_complete_or_not():
    with pytest.raises(HeadError) as e:
        parse(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 1024)
    assert e.value.status == 431
    with pytest.raises(HeadError) as e:
        parse(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 1024)
    assert e.value.status == 431


def test_absolute_form_is_rewritten_never_routed():
    req = parse(b"GET http://evil.example:22/ws?q=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert req.target == b"/ws?q=1"
    req = parse(b"GET http://evil.example HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert req.target == b"/"


@pytest.mark.parametrize("mutate,status", [
    (lambda d: d.replace(b"GET ", b"POST "), 400),
    (lambda d: d.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    (lambda d: d.replace(b"keep-alive, Upgrade", b"keep-alive"), 400),
    (lambda d: d.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    (lambda d: d.replace(b"Sec-WebSocket-Version: 13\r\n", b""), 400),
    (lambda d: d.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13"), 426),
    (lambda d: d.replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), 400),
    (lambda d: d.replace(KEY, b"not-base64!!"), 400),
    (lambda d: d.replace(KEY, b"c2hvcnQ="), 400),
    (lambda d: d.replace(b"Origin", b"Sec-WebSocket-Key: " + KEY + b"\r\nOrigin"), 400),
    (lambda d: d.replace(b"Origin", b"Content-Length: 5\r\nOrigin"), 400),
    (lambda d: d.replace(b"Origin", b"Transfer-Encoding: chunked\r\nOrigin"), 400),
])
def test_rfc6455_refusals(mutate, status):
    assert refused(mutate(GOOD)) == status


def test_header_names_and_tokens_are_case_insensitive():
    data = GOOD.replace(b"Upgrade: websocket", b"UPGRADE: WebSocket").replace(b"keep-alive, Upgrade", b"UPGRADE")
    req = parse(data)
    assert is_upgrade(req) and validate_upgrade(req) == KEY


@pytest.mark.parametrize("path,allowed", [
    (b"/ws", True), (b"/ws/room", True), (b"/wsx", False), (b"/", False), (b"/ws/../admin", False),
    (b"/ws/%2e%2e/admin", False), (b"/ws/%2E%2E/admin", False), (b"/chat/", True), (b"/chat/x", True),
    (b"/chat", False), (b"//ws", False),
])
def test_path_prefixes(path, allowed):
    assert path_allowed(path, (b"/ws", b"/chat/")) is allowed


def test_root_prefix_allows_everything():
    assert path_allowed(b"/anything/at/all", (b"/",))


@pytest.mark.parametrize("origin,allowed", [
    (None, True), (b"https://app.example.com", True), (b"https://APP.example.com", True),
    (b"http://app.example.com", False), (b"https://sub.example.org", True), (b"https://example.org", False),
    (b"https://example.org.evil.net", False), (b"https://x.example.org:8443", True), (b"null", False),
    (b"https://host.only.net", True), (b"http://host.only.net:81", True), (b"\xff", False),
])
def test_allowed_origins(origin, allowed):
    assert origin_allowed(origin, ("https://app.example.com", "*.example.org", "host.only.net")) is allowed
    assert origin_allowed(origin, ())


def test_forward_head_keeps_end_to_end_headers_and_sets_forwarded():
    req = parse(GOOD.replace(b"Origin", b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
                                           b"Keep-Alive: 5\r\nCookie: a=b\r\nOrigin"))
    out = forward_head(req, "10.0.0.9", b"http", upgrade=True)
    lines = out.split(b"\r\n")
    assert lines[0] == b"GET /chat?x=1 HTTP/1.1"
    assert b"Cookie: a=b" in lines and b"Sec-WebSocket-Protocol: chat, superchat" in lines
    assert b"Upgrade: websocket" in lines and b"Connection: Upgrade" in lines
    assert b"X-Forwarded-For: 10.0.0.9" in lines  # the client's claim replaced: it is no trusted proxy
    assert b"X-Forwarded-Proto: http" in lines and b"X-Forwarded-Proto: https" not in lines
    assert b"X-Forwarded-Host: server.example.com" in lines
    assert not any(line.lower().startswith(b"keep-alive") for line in lines)
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1


def test_forward_head_appends_to_a_trusted_proxys_x_forwarded_for():
    """RELAY_TRUSTED_PROXIES, as nginx's set_real_ip_from: a trusted proxy's
    list is kept and the address it connected from appended; anything else it
    sets that the edge owns is still replaced."""
    req = parse(GOOD.replace(b"Origin", b"X-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\n"
                                           b"X-Forwarded-Proto: https\r\nOrigin"))
    lines = forward_head(req, "10.0.0.9", b"http", upgrade=True, trusted=True).split(b"\r\n")
    assert b"X-Forwarded-For: 1.2.3.4, 5.6.7.8, 10.0.0.9" in lines
    assert b"X-Forwarded-Proto: http" in lines and b"X-Forwarded-Proto: https" not in lines


def test_request_id_is_kept_only_from_a_trusted_proxy_and_only_when_sane():
    from relay.headers import request_id_for

    def rid(extra: bytes, trusted: bool) -> bytes:
        return request_id_for(parse(b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"), trusted)
    assert rid(b"X-Request-ID: lb-7f3a\r\n", True) == b"lb-7f3a"
    assert rid(b"X-Request-ID: lb-7f3a\r\n", False) != b"lb-7f3a"
    for bad in (b"X-Request-ID: a b\r\n", b"X-Request-ID: " + b"x" * 201 + b"\r\n",
                b"X-Request-ID: 1\r\nX-Request-ID: 2\r\n", b"X-Request-ID:\r\n", b"X-Request-ID: \xff\r\n"):
        assert re.fullmatch(rb"[0-9a-f]{32}", rid(bad, True)), bad


def test_forward_head_drops_headers_named_by_connection():
    req = parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\n")
    out = forward_head(req, "127.0.0.1", b"http", upgrade=False)
    assert b"X-Secret" not in out and b"X-Kept: 2" in out and b"Connection: keep-alive" in out


def test_response_head_and_101_checks():
    resp = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00", 65536)
    assert resp.status == 101
    check_upgrade_response(resp, KEY)
    with pytest.raises(HeadError) as e:
        check_upgrade_response(resp, b"x3JJHMbDL1EzLkh9GBhXDw==")
    assert e.value.status == 502


@pytest.mark.parametrize("data", [b"HTTP/1.1 1O1 x\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 101\r\nBad\r\n\r\n",
                                  b"\r\nHTTP/1.1 200 OK\r\n\r\n"])
def test_malformed_origin_heads_are_502(data):
    with pytest.raises(HeadError) as e:
        parse_response_head(data, 65536)
    assert e.value.status == 502


@pytest.mark.parametrize("headers,expected", [
    (b"", None), (b"Content-Length: 10\r\n", 10), (b"Transfer-Encoding: chunked\r\n", -1),
])
def test_body_framing(headers, expected):
    req = parse(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert body_framing(req) == expected


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5, 6\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",  # forwarded as received: refused, as nginx does
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 0x10\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
])
def test_ambiguous_framing_is_400(headers):
    req = parse(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    with pytest.raises(HeadError) as e:
        body_framing(req)
    assert e.value.status == 400


def test_chunked_scanner_any_split():
    body = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n"
    tail = b"NEXT REQUEST"
    for split in range(len(body) + 1):
        sc = BodyScanner(-1)
        n1 = sc.feed(body[:split])
        n2 = sc.feed(body[split:] + tail)
        assert sc.done and n1 + n2 == len(body), split


@pytest.mark.parametrize("body", [b"zz\r\n", b"5\r\nhelloXX\r\n", b"5\nhello\r\n", b"1" * 5000])
def test_chunked_scanner_rejects_bad_framing(body):
    with pytest.raises(FramingError):
        BodyScanner(-1).feed(body)


def test_dechunking_scanner_gives_the_chunk_data_at_any_split():
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
    for split in range(len(body) + 1):
        sc = BodyScanner(-1, dechunk=True)
        first, second = body[:split], body[split:] + b"NEXT"
        sc.feed(first)
        out = sc.payload(first)
        sc.feed(second)
        out += sc.payload(second)
        assert sc.done and out == b"hello world", split


@pytest.mark.parametrize("head, keep", [
    (b"HTTP/1.1 200 OK\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: x-foo\r\nConnection: Keep-Alive\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\n\r\n", False),
])
def test_persistence_rfc9112_9_3(head, keep):
    resp = parse_response_head(head, 16384)
    assert keeps_alive(resp) is keep
    req = parse(head.replace(b"HTTP/1.1 200 OK", b"GET / HTTP/1.1\r\nHost: x", 1)
                .replace(b"HTTP/1.0 200 OK", b"GET / HTTP/1.0", 1))
    assert keeps_alive(req) is keep


def test_request_line_alone_over_the_limit_is_414_the_head_is_431():
    for data in (b"GET /" + b"a" * 2000, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        with pytest.raises(HeadError) as e:
            parse(data, 1024)
        assert e.value.status == 414
    with pytest.raises(HeadError) as e:
        parse(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000, 1024)
    assert e.value.status == 431
    with pytest.raises(HeadError) as e:
        parse(b"\r\n" * 600, 1024)  # empty lines only: nothing is a request line
    assert e.value.status == 431


def test_length_scanner():
    sc = BodyScanner(10)
    assert sc.feed(b"12345") == 5 and not sc.done
    assert sc.feed(b"67890abc") == 5 and sc.done
    assert BodyScanner(0).done


@pytest.mark.parametrize("status", [400, 403, 426, 431, 502, 503, 504, 505])
def test_every_refusal_is_a_short_answer_with_connection_close(status):
    from relay.responses import refusal

    out = refusal(status)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in lines
    assert b"Content-Length: %d" % len(body) in lines and 0 < len(body) < 64
    assert (b"Sec-WebSocket-Version: 13" in lines) is (status == 426)
    assert (b"Retry-After: 5" in lines) is (status == 503)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\nHost: x\n\n",                       # bare-LF head: refused at once, not waited on
    b"GET / HTTP/1.1\r\nHost: x\n\n",
    b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",           # a fragment is not in a request-target
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",                   # empty Host (nginx refuses it too)
    b"GET / HTTP/1.1\r\nHost: exa mple\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x:80:80\r\n\r\n",
    b"GET http://user@x/ HTTP/1.1\r\nHost: x\r\n\r\n",    # userinfo: RFC 9110 §4.2.4
])
def test_heads_refused_by_the_differential_findings(data):
    with pytest.raises(HeadError) as e:
        parse(data)
    assert e.value.status == 400


def test_absolute_form_authority_becomes_host():
    """RFC 9112 §3.2.2: a proxy forwarding absolute-form generates Host from the target."""
    req = parse(b"GET http://Other.Test:8080/x?y HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (req.target, req.authority) == (b"/x?y", b"Other.Test:8080")
    out = forward_head(req, "127.0.0.1", b"http", upgrade=False)
    assert b"\r\nHost: Other.Test:8080\r\n" in out and b"example.test" not in out
    assert b"\r\nX-Forwarded-Host: Other.Test:8080\r\n" in out
    again = parse(b"GET / HTTP/1.0\r\n\r\n")  # no Host at all: the origin's address
    assert b"\r\nHost: 10.0.0.5:9000\r\n" in forward_head(again, "127.0.0.1", b"http", False,
                                                         default_host=b"10.0.0.5:9000")


def test_refusals_to_head_carry_no_body():
    from relay.responses import refusal
    for status in (400, 403, 431, 503):
        full, head_only = refusal(status), refusal(status, head_request=True)
        assert full.startswith(head_only) and head_only.endswith(b"\r\n\r\n") and len(full) > len(head_only)
