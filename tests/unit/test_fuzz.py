"""Property tests for every sans-I/O parser (hypothesis), and the inputs the
fuzzers found, kept as regressions.

The invariants live in tests/fuzz/invariants.py, shared with the atheris
target an operator can run for hours (tests/fuzz/fuzz_heads.py):
any input parses or raises the parser's own error; fed whole or one byte at a
time the answer is the same; a request forwarded by the relay keeps its
meaning, its framing, and gains no header it did not carry.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.config import VARIABLES, Settings, load, read_env_file
from relay.errors import ConfigError, FramingError, HeadError
from relay.http_body import MAX_LINE, BodyScanner
from relay.headers import forward_head
from relay.http_head import body_framing, parse_request_head, parse_response_head
from tests.fuzz.invariants import (
    MAX_HEAD,
    check_body_scanner,
    check_forward_roundtrip,
    check_head_parser,
    check_request_semantics,
    check_response_semantics,
)

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies: raw bytes, and near-valid heads mutated at the seams ---------------

SEPS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\x00", b""]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"G\x00T", b"get", b"DELETE"]
TARGETS = [b"/", b"/ws", b"/ws/../admin", b"/a?b=c", b"*", b"http://127.0.0.1:1/x", b"HTTP://h",
           b"https://evil.example?x", b"ws://h:1", b"//h/p", b"/%2e%2e/", b"/\xff", b"x", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"HTTP/1", b"http/1.1", b"HTTP/0.9"]
NAMES = [b"Host", b"host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version",
         b"Content-Length", b"Transfer-Encoding", b"X-Forwarded-For", b"X-Forwarded-Host", b"Origin",
         b"Cookie", b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Connection", b"Content_Length", b"Host ",
         b" Host", b"X-\xff", b""]
VALUES = [b"websocket", b"Upgrade", b"upgrade, keep-alive", b"close", b"13", b"8", b"0", b"5", b"5, 5",
          b"5, 6", b"-1", b"+5", b"99999999999999999999", b"chunked", b"gzip, chunked", b"chunked, chunked",
          b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ=", b"a\x00b", b"a\rb", b"a\nb", b"\t x \t", b"\xff\xfe",
          b"host, content-length", b"Content-Length", b"x-forwarded-for", b"https://app.example.com",
          b"http://a.example.org:8080", b"1.2.3.4", b""]


@st.composite
def heads(draw, request: bool = True) -> bytes:
    """Something shaped like an HTTP head, with each seam open to mutation."""
    sep = st.sampled_from(SEPS)
    if request:
        first = draw(st.sampled_from(METHODS)) + draw(st.sampled_from([b" ", b"  ", b"\t"])) \
            + draw(st.sampled_from(TARGETS)) + draw(st.sampled_from([b" ", b"  "])) + draw(st.sampled_from(VERSIONS))
    else:
        first = draw(st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/2 ", b"ICY "])) \
            + draw(st.sampled_from([b"101", b"200", b"204", b"304", b"502", b"099", b"1000", b"abc"])) \
            + draw(st.sampled_from([b" Switching Protocols", b"", b" OK", b" \x00", b" \xff"]))
    parts = [draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n"])) + first]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=6)))
        colon = draw(st.sampled_from([b": ", b":", b" : ", b":\t", b""]))
        value = draw(st.one_of(st.sampled_from(VALUES), st.binary(max_size=12)))
        parts.append(draw(sep) + name + colon + value)
    end = draw(st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\r\n\r\n", b"\n\n", b"\r\n", b""]))
    tail = draw(st.sampled_from([b"", b"\x81\x05hello", b"GET / HTTP/1.1\r\n\r\n"]))
    return b"".join(parts) + end + tail


def chunked_bodies() -> st.SearchStrategy[bytes]:
    line = st.one_of(
        st.integers(0, 40).map(lambda n: b"%x" % n),
        st.sampled_from([b"0", b"00", b"ffffffffffffffff", b"1ffffffffffffffff", b"-1", b" 1", b"0x1", b"g", b""]))
    ext = st.sampled_from([b"", b";a=b", b" ;x", b";\x00", b"\t", b";" + b"e" * 10])
    eol = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])

    @st.composite
    def body(draw):
        out = b""
        for _ in range(draw(st.integers(0, 4))):
            size = draw(line)
            out += size + draw(ext) + draw(eol)
            try:
                n = int(size, 16)
            except ValueError:
                n = 3
            n = max(0, min(n, 40))
            out += draw(st.binary(min_size=n, max_size=n + 2)) + draw(eol)
        out += b"0" + draw(ext) + draw(eol)
        for _ in range(draw(st.integers(0, 2))):
            out += draw(st.sampled_from([b"X-T: 1", b" folded", b"no colon", b"X: a\rb", b"X: \x00"])) + draw(eol)
        out += draw(st.sampled_from([b"\r\n", b"\n", b""])) + draw(st.sampled_from([b"", b"NEXT"]))
        return out

    return body()


# -- the head parsers ------------------------------------------------------------

@FUZZ
@given(st.one_of(st.binary(max_size=300), heads()))
@example(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n")
@example(b"GET / HTTP/1.0\r\n\r\n")
@example(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
def test_request_head_whole_equals_incremental_and_only_head_errors(data):
    check_head_parser(parse_request_head, data)
    check_request_semantics(data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), heads(request=False)))
def test_response_head_whole_equals_incremental_and_only_head_errors(data):
    r = check_head_parser(parse_response_head, data)
    if r[0] == "error":
        assert r[1] == 502 and r[2] == "origin_error"
    check_response_semantics(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2 * MAX_HEAD), heads()), st.lists(st.integers(0, 2 * MAX_HEAD), max_size=6))
def test_request_head_any_cut_points(data, cuts):
    check_head_parser(parse_request_head, data, cuts=[c for c in cuts if c <= len(data)])


def test_size_limit_is_the_same_whole_and_trickled():
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert check_head_parser(parse_request_head, big)[:2] == ("error", 431)
    exact = b"GET / HTTP/1.1\r\nHost: x\r\nX: "
    exact += b"a" * (MAX_HEAD - len(exact) - 4) + b"\r\n\r\n"
    assert len(exact) == MAX_HEAD
    assert check_head_parser(parse_request_head, exact)[0] == "request"
    assert check_head_parser(parse_request_head, b"\r\n" * MAX_HEAD)[:2] == ("error", 431)


# -- valid requests round-trip through forward_head ---------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.text(TCHAR, min_size=1, max_size=12).map(str.encode)
value = st.binary(max_size=24).map(
    lambda b: bytes(c for c in b if c in (9, 32) or 0x21 <= c <= 0x7E or c >= 0x80).strip(b" \t"))
path = st.text("abcXYZ019-._~!$&'()*+,;=:@/%", max_size=20).map(lambda s: ("/" + s).encode())
query = st.one_of(st.just(b""), st.text("abc=&%?/", max_size=10).map(lambda s: ("?" + s).encode()))


@st.composite
def valid_requests(draw) -> bytes:
    method = draw(st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]), token))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    lines = [b"%s %s%s HTTP/%s" % (method, draw(path), draw(query), version)]
    fields = [(b"Host", draw(value))] if version == b"1.1" or draw(st.booleans()) else []
    fields += draw(st.lists(st.tuples(st.one_of(token, st.sampled_from(NAMES[:17])), value), max_size=8))
    if draw(st.booleans()):
        fields.append((b"Connection", b", ".join(draw(st.lists(st.one_of(token, st.sampled_from(NAMES[:14])),
                                                               max_size=3)))))
    hosts = [f for f in fields if f[0].lower() == b"host"]
    fields = [f for f in fields if f[0].lower() != b"host"]
    if hosts:
        fields.insert(draw(st.integers(0, len(fields))), hosts[0])
    lines += [n + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + v for n, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@FUZZ
@given(valid_requests(), st.sampled_from(["203.0.113.7", "::1", "127.0.0.1"]))
@example(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n", "127.0.0.1")
@example(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n", "127.0.0.1")
@example(b"GET / HTTP/1.0\r\n\r\n", "127.0.0.1")
def test_valid_requests_round_trip_through_forward_head(data, ip):
    try:
        req = parse_request_head(data, 1 << 16)
    except HeadError as e:
        # the strategy can build a duplicate Host or a bad Content-Length; nothing else
        assert e.status == 400
        return
    assert req is not None and req.head_len == len(data)
    try:
        body_framing(req)
    except HeadError:
        return
    check_forward_roundtrip(req, upgrade=False, client_ip=ip)


def test_round_trip_regressions_found_by_the_fuzzers():
    # A client naming Content-Length in Connection must not strip it on the
    # way to the origin while the relay still sends the body: the body would
    # be read by the origin as the next request (request smuggling).
    req = parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length, host\r\n"
                             b"Content-Length: 27\r\n\r\n", 4096)
    out = forward_head(req, "127.0.0.1", b"http", False)
    assert b"\r\nContent-Length: 27\r\n" in out and b"\r\nHost: x\r\n" in out
    # An HTTP/1.0 request without Host is forwarded as HTTP/1.1, which needs one.
    req = parse_request_head(b"GET / HTTP/1.0\r\n\r\n", 4096)
    again = parse_request_head(forward_head(req, "127.0.0.1", b"http", False), 4096)
    assert again is not None and again.get(b"host") == b"localhost"


# -- chunked bodies ----------------------------------------------------------------

@FUZZ
@given(st.one_of(st.just(-1), st.none(), st.integers(0, 64)),
       st.one_of(chunked_bodies(), st.binary(max_size=200)),
       st.one_of(st.none(), st.lists(st.integers(0, 400), max_size=8)))
def test_body_scanner_whole_equals_pieces_and_only_framing_errors(length, data, cuts):
    check_body_scanner(length, data, cuts)


@pytest.mark.parametrize("n", [MAX_LINE - 2, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1])
def test_chunk_line_cap_is_the_same_whole_and_trickled(n):
    """Found by test_body_scanner_*: a chunk-size line near the cap was
    accepted whole and refused when it arrived one byte at a time."""
    data = b"5;" + b"e" * (n - 2) + b"\r\nhello\r\n0\r\n\r\n"
    whole = check_body_scanner(-1, data)
    assert whole == ((len(data), True) if n <= MAX_LINE else ("error",))


def test_body_scanner_bounds_its_line_buffer():
    body = BodyScanner(-1)
    with pytest.raises(FramingError):
        for _ in range(MAX_LINE + 10):
            body.feed(b"1")
    assert len(body.line) <= MAX_LINE + 2


@pytest.mark.parametrize("trailer", [b"X: a\rb", b"X: a\x00b", b"X\x00: a", b"Bad Name: x"])
def test_trailer_lines_with_control_characters_are_refused(trailer):
    """A trailer is relayed as received: a bare CR in it could end a line at
    an origin that is lenient about CR."""
    with pytest.raises(FramingError):
        BodyScanner(-1).feed(b"0\r\n" + trailer + b"\r\n\r\n")


def test_body_framing_on_parsed_heads():
    for lengths in (b"Content-Length: 1, 1\r\n", b"Content-Length: 1\r\nContent-Length: 1\r\n"):
        req = parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n", 4096)
        with pytest.raises(HeadError) as e:  # forwarded as received, a list could read otherwise next hop
            body_framing(req)
        assert e.value.status == 400
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 4096)
    with pytest.raises(HeadError) as e:
        body_framing(resp, is_request=False)
    assert e.value.status == 502


# -- configuration ------------------------------------------------------------------

env_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:²", "[::1]:٣", "1e400", "nan", "-inf", "inf", "1" * 40, "0", "-1", "1_000",
                     "[]:80", "[::1", ":80", "ws://", "http://h:1/", "https://h:1", "*", "*.x", "a*b",
                     "127.0.0.1:65536", "0.0.0.0:0,", " , ", "TRUE", "frames", "Tunnel", "\x00", "1e-9"]),
)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(VARIABLES), st.text(max_size=12).map(lambda s: "RELAY_" + s)),
                       env_values, max_size=8),
       st.booleans())
@example({"RELAY_ORIGIN": "127.0.0.1:²"}, True)
@example({"RELAY_ORIGIN": "127.0.0.1:1", "RELAY_MAX_CLIENTS": "1" * 40}, True)
def test_config_load_raises_only_config_error(environ, require_origin):
    try:
        s = load(environ, require_origin=require_origin)
    except ConfigError as e:
        assert e.lines and all(isinstance(x, str) and x for x in e.lines)
        return
    assert isinstance(s, Settings)
    s.to_json()
    s.effective_workers()
    # every integer must fit the int64 slots of shared memory and the loop's timers
    for name in s.__struct_fields__:
        v = getattr(s, name)
        if isinstance(v, int):
            assert -(1 << 63) <= v < (1 << 63), (name, v)
        if isinstance(v, float):
            assert v == v and v >= 0, (name, v)


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.one_of(
                     st.sampled_from([b"RELAY_ORIGIN=127.0.0.1:1", b"export RELAY_MODE='frames'", b"# c",
                                      b"RELAY_WORKERS=\"2\"", b"=x", b"RELAY_X", b"\xff", b"RELAY_LISTEN=\"",
                                      b"A B=c", b"  ", b"RELAY_MAX_CLIENTS=5 # not a comment"]),
                     st.binary(max_size=20)), max_size=8).map(lambda ls: b"\n".join(ls))))
def test_env_file_raises_only_config_error(content):
    fd, path = tempfile.mkstemp(prefix="wsrelay-fuzz-", suffix=".env")
    try:
        os.write(fd, content)
        os.close(fd)
        try:
            values = read_env_file(path)
        except ConfigError as e:
            assert e.lines
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
        try:
            load({}, env_file=path, require_origin=False)
        except ConfigError:
            pass
    finally:
        os.unlink(path)


def test_config_regressions_found_by_the_fuzzers():
    # str.isdigit() accepts "²", which int() refuses: a traceback instead of a ConfigError.
    with pytest.raises(ConfigError) as e:
        load({"RELAY_ORIGIN": "127.0.0.1:²"})
    assert "RELAY_ORIGIN" in e.value.lines[0]
    # An integer too large for shared memory's int64 crashed `wsrelay run` at startup.
    with pytest.raises(ConfigError) as e:
        load({"RELAY_ORIGIN": "127.0.0.1:1", "RELAY_MAX_CLIENTS": "1" * 40})
    assert "RELAY_MAX_CLIENTS" in e.value.lines[0]


def test_response_framing_survives_connection_tokens():
    """The response side of the same smuggling: an origin's ``Connection:
    content-length`` must not strip the length the relay delimits the body by."""
    from relay.headers import response_head

    raw = b"HTTP/1.1 200 OK\r\nConnection: content-length, x-drop\r\nContent-Length: 2\r\nX-Drop: 1\r\n\r\n"
    resp = parse_response_head(raw, 4096)
    out = response_head(resp, raw, resp.tokens(b"connection"), True)
    assert b"\r\nContent-Length: 2\r\n" in out and b"X-Drop" not in out


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01", b"HTTP/2 101\r\n", b"\r\n",
                                  b"HTTP/1.1 101 Switching Protocols\n\n", b"HTTP/1.1 000 Zero\r\nX: y"])
def test_response_that_cannot_become_a_status_line_is_refused_before_it_ends(data):
    """Found by tests/system/relay/test_faults.py: an origin sending garbage and then
    waiting got a 504 after the connect timeout instead of a 502 at once."""
    with pytest.raises(HeadError) as e:
        parse_response_head(data, MAX_HEAD)
    assert e.value.status == 502
    # and every prefix of a valid head still means "need more"
    good = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    assert all(parse_response_head(good[:i], MAX_HEAD) is None for i in range(len(good)))
