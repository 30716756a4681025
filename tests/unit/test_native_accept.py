"""relay/native/ws_accept.c's Sec-WebSocket-Accept, held to the reference
(relay/handshake.py's accept_key: hashlib's SHA-1 and base64) on RFC 6455's
example and on random keys of every length across SHA-1's block boundaries."""

from __future__ import annotations

import os
import random

import pytest

from relay import native
from relay.handshake import accept_key

# skipped only where nothing asks for the extension: with WSRELAY_REQUIRE_NATIVE (CI) they run or fail
pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")


def test_rfc_6455_example():
    from relay.native._engine import websocket_accept

    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # §1.3


def test_random_keys_of_every_length_match_the_reference():
    from relay.native._engine import websocket_accept

    rnd = random.Random(1743)
    for n in list(range(0, 140)) + [1000, 4096]:  # key + 36-byte GUID crosses 55/56/64-byte edges
        for _ in range(5):
            key = bytes(rnd.getrandbits(8) for _ in range(n))
            assert websocket_accept(key) == accept_key(key), (n, key)
