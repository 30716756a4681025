"""Adversarial review of TLS listeners' head phase in C (relay/native/handshake.c
"TLS", relay/native/front.py ``_offload``): reproducers of what it got wrong,
each run on both head phases (``WSRELAY_NATIVE_TLS_HANDSHAKE``), the Python one
being the reference.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.support.relay import ROOT
from tests.support.scrape import metric
from tests.support.tls import TlsConn, client_context, head_env, tls_relay


@pytest.fixture(scope="module")
def relay(aio_origin, pki, tls_head):
    """RELAY_IDLE_TIMEOUT=1: WebSocket tunnels idle 1 s are closed; plain HTTP is not a tunnel."""
    _d, _ca, pair = pki
    with tls_relay(aio_origin.addr, pair, workers=1, RELAY_IDLE_TIMEOUT="1", RELAY_HANDSHAKE_TIMEOUT="10",
                   **head_env(tls_head)) as r:
        yield r


def test_the_idle_timeout_does_not_cut_a_plain_request_over_tls(relay, pki):
    """A plain request whose origin takes longer than RELAY_IDLE_TIMEOUT to
    answer (a long poll) is answered: the idle timeout is the WebSocket
    tunnels' (README), not plain HTTP's (RELAY_READ_TIMEOUT). The C head phase
    relayed such a request through a pump tunnel that the idle sweep closed:
    the client got a bare close_notify (and the access log a 200)."""
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    try:
        conn.send(b"GET /poll?delay=2.5 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        data, how = conn.read_to_end()
    finally:
        conn.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"polled after 2.5"), (data, how)


def test_plain_http_over_tls_leaves_the_tunnel_byte_counter_alone(relay, pki):
    """wsrelay_bytes_total counts bytes relayed through tunnels: a plain
    download over TLS is none of them, and a counter never goes down. The C
    head phase counted the offloaded connection's bytes while it was open and
    took them back when it ended."""
    def down():
        return metric(relay, "wsrelay_bytes_total", direction="downstream")

    before = down()
    conn = TlsConn(relay.tls_port, client_context(pki[0]))
    seen = []
    try:
        conn.send(b"GET /big?mib=8 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        conn.read_head()
        # the client reads nothing for a while: the rest sits in buffers, the
        # worker publishes its byte counts every second
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            seen.append(down())
            time.sleep(0.2)
    finally:
        conn.reset()
    time.sleep(2.2)  # the connection's end, published (once a second)
    seen.append(down())
    assert all(a <= b for a, b in zip(seen, seen[1:])), f"wsrelay_bytes_total went down: {seen}"
    assert seen[-1] == before, f"plain HTTP counted as tunnel bytes: {before} -> {seen}"


def test_the_sanitizer_build_has_every_source_of_the_extension():
    """test_native_sanitizers.py builds the engine with ASan from its own list
    of sources; one missing (ws_accept.c) made the build's import fail in
    the sitecustomize, which only prints an error, so every run under "ASan"
    loaded the regular build and checked nothing."""
    from tests.system.relay import test_native_sanitizers

    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    block = re.search(r'Extension\(\s*"relay\.native\._engine".*?sources=\[(.*?)\]', setup, re.S)
    assert block, "relay.native._engine's Extension not found in setup.py"
    wanted = {os.path.basename(p) for p in re.findall(r'"([^"]+\.c)"', block.group(1))}
    have = {os.path.basename(p) for p in test_native_sanitizers.SOURCES}
    assert wanted <= have, f"missing from the ASan build: {sorted(wanted - have)}"
