"""The compiled head parsers and forward_head (relay/native/http_head.c)
against their references, relay/http_head.py and relay/headers.py: the same
heads, errors and forwarded bytes for anything hypothesis generates (raw
bytes, near-valid heads mutated at every seam, valid requests), whole and
cut anywhere, with the invariants of tests/fuzz/invariants.py.

The native head phase (relay/native/handshake.c) gives Python these parses,
so a difference here would be a request meaning one thing on one data plane
and another on the other. tests/fuzz/fuzz_heads.py runs the same checks
under atheris (targets ``native-request`` and ``native-response``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay import native
from relay.http_head import parse_request_head, parse_response_head
from tests.fuzz.invariants import MAX_HEAD, check_same_as_reference, check_same_forward
from tests.unit.test_fuzz import FUZZ, heads, valid_requests

pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")

if native.AVAILABLE:
    from relay.native._engine import forward_head as c_forward
    from relay.native._engine import parse_request_head as c_request
    from relay.native._engine import parse_response_head as c_response

EDGES = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET http://h:1 HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET HTTP://h?q HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET wss://[::1]:8/p?q HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET ws://u@h/ HTTP/1.1\r\nHost: y\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nA: b\n\n\r\n\r\n",
    b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad : 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX:\t a b \t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: Upgrade, , KEEP-alive\r\nHost: x\r\nconnection: x\r\n\r\n",
    b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n",
    b"\r\n" * 600,
]

RESPONSES = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 \r\n\r\n",
    b"HTTP/1.0 200\r\n\r\nbody",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 OK\r\n\r\n",
    b"\r\nHTTP/1.1 101 OK\r\n\r\n",
    b"HTTP/1.1 101 OK\n\n",
    b"HTTP/1.1 1010\r\n\r\n",
    b"HTTP/1.1 101 \x7f\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"ICY 200 OK\r\n",
    b"HTTP/1.1 101 OK\r",
    b"HTTP/1.1 101 OK\n",
    b"\n",
    b"HTTP/1.1 101 OK\r\nX: " + b"y" * 2000,
]


@pytest.mark.parametrize("data", EDGES)
def test_request_edges(data):
    check_same_as_reference(c_request, parse_request_head, data)
    check_same_forward(c_request, c_forward, data)


@pytest.mark.parametrize("data", RESPONSES)
def test_response_edges(data):
    check_same_as_reference(c_response, parse_response_head, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), heads()))
def test_request_heads_as_the_reference_parses_them(data):
    check_same_as_reference(c_request, parse_request_head, data)
    check_same_forward(c_request, c_forward, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), heads(request=False)))
def test_response_heads_as_the_reference_parses_them(data):
    check_same_as_reference(c_response, parse_response_head, data)


@FUZZ
@given(st.one_of(st.binary(max_size=2 * MAX_HEAD), heads()), st.lists(st.integers(0, 2 * MAX_HEAD), max_size=6))
def test_request_heads_cut_anywhere(data, cuts):
    check_same_as_reference(c_request, parse_request_head, data, cuts=[c for c in cuts if c <= len(data)])


@FUZZ
@given(valid_requests(), st.sampled_from(["203.0.113.7", "::1", "127.0.0.1"]))
@example(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: host, X_Forwarded_For\r\nX_Forwarded_For: 1\r\n\r\n", "::1")
def test_valid_requests_are_forwarded_as_the_reference_forwards_them(data, ip):
    check_same_as_reference(c_request, parse_request_head, data, cuts=(), max_bytes=1 << 16)
    check_same_forward(c_request, c_forward, data, client_ip=ip, max_bytes=1 << 16)


def test_views_are_what_the_relay_asks_of_a_head():
    req = c_request(b"GET /ws?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly", 4096)
    from relay.handshake import is_upgrade, validate_upgrade

    assert is_upgrade(req) and validate_upgrade(req) == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert (req.method, req.target, req.path, req.version, req.authority) == (b"GET", b"/ws?x=1", b"/ws", b"1.1", None)
    with pytest.raises(TypeError):
        req.get("host")  # names are bytes, as for the reference


# -- Request.websocket(): is_upgrade + validate_upgrade in one C call -----------------
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
#: around 16 bytes: 21-24 characters of the alphabet with 0-3 "=" (only 22 + "==" is 16 bytes)
_KEY_EDGES = [b"A" * n + b"=" * p for n in (21, 22, 23, 24) for p in range(4)]
_KEYS = st.one_of(
    st.sampled_from([b"AAAAAAAAAAAAAAAAAAAAAB==", b"dGhlIHNhbXBsZSBub25jZQ=", b"dGhlIHNhbXBsZSBub25jZQ",
                     b"dGhlIHNhbXBsZSBub25jZQ===", b"dGhl IHNhbXBsZSBub25jZQ==", b"////////////////////////",
                     b"dGhlIHNhbXBsZSBub25jZQA=", b"", b"x-y_AAAAAAAAAAAAAAAAAA==", b"dGhlIHNhbXBsZSBub25jZQ===",
                     *_KEY_EDGES]),
    # 20-26 characters of the alphabet, then 0-3 "=": every length and padding around 16 bytes
    st.tuples(st.text(alphabet=_B64, min_size=20, max_size=26), st.integers(0, 3)).map(
        lambda t: (t[0] + "=" * t[1]).encode()),
    st.text(alphabet=_B64 + "=-_ !", min_size=20, max_size=26).map(str.encode),
)
#: a valid upgrade's fields, and what each may become instead
_WS_FIELDS = {
    b"Upgrade": (b"websocket", st.sampled_from([b"WebSocket", b"h2c", b"h2c, websocket", b"websockets", b""])),
    b"Connection": (b"Upgrade", st.sampled_from([b"keep-alive, upgrade", b"close", b"upgrade,", b"upgradex", b""])),
    b"Sec-WebSocket-Version": (b"13", st.sampled_from([b"8", b"13, 8", b"013", b""])),
    b"Sec-WebSocket-Key": (b"dGhlIHNhbXBsZSBub25jZQ==", _KEYS),
    b"Content-Length": (None, st.sampled_from([b"0", b"5", b"00", b""])),
    b"Transfer-Encoding": (None, st.sampled_from([b"chunked", b"identity", b""])),
    b"Origin": (None, st.sampled_from([b"https://a.example", b"null", b""])),
}


@st.composite
def upgrade_requests(draw) -> bytes:
    """A valid upgrade with a few defects: the method or version changed, a
    field dropped, doubled, recased or given another value (or an optional
    one added), in any order."""
    method = b"GET" if draw(st.integers(0, 11)) else draw(st.sampled_from([b"POST", b"get", b"HEAD"]))
    version = b"1.1" if draw(st.integers(0, 11)) else b"1.0"
    fields = [b"Host: x"]
    for name, (good, others) in _WS_FIELDS.items():
        # 0: another value (the key: often, its rule has most edges), 1: absent/present, 2: twice, else as valid
        kind = draw(st.integers(-3 if name == b"Sec-WebSocket-Key" else 0, 11))
        kind = max(kind, 0)
        value = draw(others) if kind == 0 or (good is None and kind == 1) else good
        copies = (0 if good is not None else 1) if kind == 1 else 2 if kind == 2 else 0 if value is None else 1
        for _ in range(copies):
            v = value if value is not None else draw(others)
            spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
            fields.append(spelled + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + v)
    fields = draw(st.permutations(fields))
    return b"%s /ws HTTP/%s\r\n" % (method, version) + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _reference_websocket(req):
    from relay.errors import HeadError
    from relay.handshake import is_upgrade, validate_upgrade

    if not is_upgrade(req):
        return None
    try:
        return validate_upgrade(req)
    except HeadError as e:
        return (e.status, str(e))


@FUZZ
@given(st.one_of(upgrade_requests(), heads()))
def test_websocket_is_is_upgrade_then_validate_upgrade(data):
    """The head phase in C asks req.websocket() where the Python plane asks
    is_upgrade and validate_upgrade: the same answer, key or refusal, for
    every head both parse."""
    from relay.errors import HeadError

    try:  # that both parsers agree on every head is test_request_heads_as_the_reference_parses_them's
        ref = parse_request_head(data, MAX_HEAD)
        view = c_request(data, MAX_HEAD)
    except HeadError:
        return
    if ref is None or view is None:
        return
    assert view.websocket() == _reference_websocket(ref), data


def test_websocket_answers_of_each_kind():
    good = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert c_request(good, MAX_HEAD).websocket() == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert c_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", MAX_HEAD).websocket() is None
    assert c_request(good.replace(b"13", b"8"), MAX_HEAD).websocket() == (426, "unsupported WebSocket version")
    assert c_request(good.replace(b"GET", b"POST"), MAX_HEAD).websocket() == (
        400, "a WebSocket upgrade must be GET over HTTP/1.1")


@pytest.mark.parametrize("key", _KEY_EDGES + [b"dGhlIHNhbXBsZSBub25jZQ==", b"AAAAAAAAAAAAAAAAAAAAA/==", b"-" * 22 + b"=="])
def test_websocket_keys_around_16_bytes(key):
    head = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
    assert c_request(head, MAX_HEAD).websocket() == _reference_websocket(parse_request_head(head, MAX_HEAD))
