"""The fast path's path and Origin rules (relay/native/fast_path.c) against
the reference, relay/handshake.py's ``path_allowed`` and ``origin_allowed``:
whatever hypothesis generates, C never allows a request Python refuses (it
may decline what Python allows: Python then decides), and it allows the
plain cases a deployment lives on, so the fast path is not a dead letter.

A difference in the first direction would be an upgrade the fast path
serves that wsrelay's rules forbid: a path or Origin rule bypassed.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay import native
from relay.handshake import origin_allowed, path_allowed
from relay.native.fast_path import _origins
from tests.unit.test_fuzz import FUZZ

pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")

if native.AVAILABLE:
    from relay.native._engine import fast_path_allows

# pieces paths and Origin values are made of, the tricky ones included
SEGMENTS = ["ws", "wsx", "chat", ".", "..", "%2e", "%2E%2e", "%2f", "", "a b", "x;y", "~", "%00", "é"]
PATHS = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))
PREFIXES = st.lists(st.sampled_from(["/ws", "/ws/", "/chat", "/chat/v2", "/a b"]), min_size=1, max_size=3)
HOSTS = ["app.example.com", "APP.example.com", "example.com", "evil.com", "app.example.com.evil.com", "[::1]"]
ORIGIN_VALUES = st.builds(lambda scheme, host, port, slash: f"{scheme}{host}{port}{slash}",
                          st.sampled_from(["https://", "http://", "HTTPS://", "", "null"]), st.sampled_from(HOSTS),
                          st.sampled_from(["", ":443", ":8443"]), st.sampled_from(["", "/"]))
ALLOWED = st.lists(st.sampled_from(["https://app.example.com", "example.com", "*.example.com", "*",
                                    "http://app.example.com:8443", "HTTPS://App.example.com", "https://evil.com/"]),
                   min_size=0, max_size=3)


def head(path: str, origin: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: relay", "Upgrade: websocket", "Connection: Upgrade"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def config_allowed(entries: list[str]) -> tuple[str, ...]:
    """RELAY_ALLOWED_ORIGINS as relay/config.py reads it."""
    return tuple(e.strip().lower().rstrip("/") for e in entries)


@FUZZ
@given(path=PATHS, prefixes=PREFIXES, any_path=st.booleans(), origin=st.none() | ORIGIN_VALUES, allowed=ALLOWED)
@example(path="/ws/%2e%2e/admin", prefixes=["/ws"], any_path=False, origin=None, allowed=[])
@example(path="/ws/../admin", prefixes=["/ws"], any_path=False, origin=None, allowed=[])
@example(path="/ws//x", prefixes=["/ws"], any_path=False, origin=None, allowed=[])
@example(path="/ws", prefixes=["/ws"], any_path=False, origin="https://app.example.com.evil.com",
         allowed=["https://app.example.com"])
def test_c_never_allows_what_python_refuses(path, prefixes, any_path, origin, allowed):
    try:
        raw = head(path, origin)
    except UnicodeEncodeError:
        return
    ws_paths = (b"/",) if any_path else tuple(p.encode() for p in prefixes)
    allowed_t = config_allowed(allowed)
    verdict = fast_path_allows(raw, () if any_path else ws_paths, _origins(allowed_t))
    if verdict is None:  # no head: nothing to judge
        return
    python = path_allowed(path.encode(), ws_paths) and origin_allowed(
        None if origin is None else origin.encode(), allowed_t)
    if verdict:
        assert python, (path, ws_paths, origin, allowed_t)


@pytest.mark.parametrize("path, prefixes, origin, allowed", [
    ("/", (), None, ()),
    ("/ws", (b"/ws",), None, ()),
    ("/ws/room/7?x=1", (b"/ws",), "https://app.example.com", ("https://app.example.com",)),
    ("/chat/v2/x", (b"/ws", b"/chat/"), "http://anything", ()),
    ("/live", (), "https://whatever.example", ("*",)),
    ("http://relay/ws/x", (b"/ws",), None, ()),         # absolute form: its path, as req.path
])
def test_c_allows_the_plain_cases(path, prefixes, origin, allowed):
    """What a browser sends to an allowed path and Origin is decided in C."""
    assert fast_path_allows(head(path, origin), prefixes, _origins(allowed)) is True


@pytest.mark.parametrize("path, prefixes, origin, allowed", [
    ("/wsx", (b"/ws",), None, ()),                       # not on a whole segment
    ("/ws/%2e%2e/admin", (b"/ws",), None, ()),           # decodes elsewhere: Python judges (and refuses)
    ("/ws/./x", (b"/ws",), None, ()),
    ("/ws", (b"/ws",), "https://evil.com", ("https://app.example.com",)),
    ("/ws", (b"/ws",), "http://example.com:80", ("example.com",)),  # host entries: Python's
])
def test_c_declines_the_rest(path, prefixes, origin, allowed):
    assert fast_path_allows(head(path, origin), prefixes, _origins(allowed)) is False
