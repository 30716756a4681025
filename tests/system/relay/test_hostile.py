"""Hostile clients against the real relay: slowloris heads and bodies,
hundreds of half-open connections, frames before the 101, resets right after
the upgrade, garbage frames in tunnel mode. None of them disturbs another
client, none leaks a slot, memory stays bounded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.probes import closed_by_peer, echo_ok, worker_fds
from tests.support.raw_origins import RawOrigin, mask_frame, read_frame
from tests.support.relay import Relay, wait_for
from tests.support.scrape import metric

HANDSHAKE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def relay(ws_origin, data_plane):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)}) as r:
        echo_ok(r)  # warm both the relay and the origin
        r.baseline = (r.rss(), worker_fds(r))  # for test_memory_bounded_after_the_hostile_tests
        yield r


# -- slow and half-open clients ------------------------------------------------------

def test_slowloris_head_is_dropped_at_handshake_timeout_while_others_are_served(relay):
    head = upgrade_request("/") + b"X-Padding: " + b"p" * 200 + b"\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    started = time.monotonic()
    dropped_at = None
    served = []
    try:
        for i, byte in enumerate(head):
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                dropped_at = time.monotonic() - started
                break
            if closed_by_peer(s, 0.02):
                dropped_at = time.monotonic() - started
                break
            if i % 10 == 0:
                served.append(echo_ok(relay))
            assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 5, "slowloris never dropped"
    finally:
        s.close()
    assert dropped_at is not None, "the whole head was trickled without being dropped"
    assert HANDSHAKE_TIMEOUT - 0.2 <= dropped_at <= HANDSHAKE_TIMEOUT + 2.5, dropped_at
    assert served and max(served) < 1.0, served


def test_trickled_body_on_plain_http_is_relayed_and_does_not_block_others(aio_origin, relay):
    body = b"0123456789abcdefghij"
    with Relay(aio_origin.addr, workers=1, env={"RELAY_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)}) as r:
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            t0 = time.monotonic()
            for i, byte in enumerate(body):
                s.sendall(bytes([byte]))
                time.sleep(0.05)  # the trickle itself is the test input, not a wait for readiness
                if i == len(body) // 2:
                    # another client of the same single worker is served meanwhile
                    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as other:
                        other.sendall(b"GET /poll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        assert status_of(read_head(other)[0]) == 200
            head, rest = read_head(s)
            assert status_of(head) == 200
            while len(rest) < len(body):
                chunk = s.recv(65536)
                assert chunk
                rest += chunk
            assert rest == body
            # a trickled body is not a trickled head: the head timeout does not apply to it
            assert time.monotonic() - t0 < 10


def test_hundreds_of_half_open_heads_are_dropped_and_do_not_disturb(relay):
    n = 500
    rss0, fds0 = relay.rss(), worker_fds(relay)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConn")
            socks.append(s)
        # the relay has them all (each worker holds its share) and still serves others
        wait_for(lambda: worker_fds(relay) >= fds0 + n, 10, what="half-open connections accepted")
        assert echo_ok(relay) < 1.0
        rss_held = relay.rss()
        # every one is dropped at the handshake timeout
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 10
        for s in socks:
            assert closed_by_peer(s, max(0.1, deadline - time.monotonic())), "half-open head not dropped"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: worker_fds(relay) <= fds0 + 4, 10, what="worker fds back to their level")
    assert echo_ok(relay) < 1.0
    # 500 half-open heads cost well under 20 KiB each while held, and are given back
    assert rss_held - rss0 < n * 20 * 1024, (rss0, rss_held)
    assert relay.rss() - rss0 < 8 * 1024 * 1024, (rss0, relay.rss())


# -- clients that do not wait ----------------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["same-packet", "before-101"])
def test_frames_sent_before_the_101_reach_the_origin_and_echo_back(relay, split):
    frames = [mask_frame(b"early %d" % i) for i in range(3)]
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        if split:
            s.sendall(upgrade_request("/"))
            for f in frames:
                s.sendall(f)
        else:
            s.sendall(upgrade_request("/") + b"".join(frames))
        head, rest = read_head(s)
        assert status_of(head) == 101
        for i in range(3):
            opcode, payload, rest = read_frame(s, rest)
            assert (opcode, payload) == (1, b"early %d" % i)


@pytest.mark.parametrize("when", ["after-101", "before-101"])
def test_reset_right_after_the_upgrade_gives_the_slot_back(relay, when):
    linger = struct.pack("ii", 1, 0)
    before = metric(relay, "wsrelay_websocket_upgrades_total")
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        s.sendall(upgrade_request("/") + mask_frame(b"bye"))
        if when == "after-101":
            read_head(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()  # RST
    wait_for(lambda: metric(relay, "wsrelay_websocket_upgrades_total") >= before + 40, 10,
             what="40 upgrades counted")
    wait_for(lambda: metric(relay, "wsrelay_clients") == 0, 10, what="wsrelay_clients back to 0")
    wait_for(lambda: metric(relay, "wsrelay_websocket_connections") == 0, 10, what="no open tunnels")
    assert echo_ok(relay) < 1.0


# -- garbage in tunnel mode ----------------------------------------------------------

@pytest.fixture(scope="module")
def raw_echo(loop_thread):
    with RawOrigin(loop_thread) as o:
        yield o


def test_oversized_and_malformed_frames_pass_through_untouched(raw_echo):
    """In tunnel mode frames are not the relay's business: every byte goes
    through as sent, whatever it claims to be."""
    garbage = [
        b"\xff" * 64,                                          # reserved bits, opcode 0xF, huge length
        struct.pack("!BBQ", 0x82, 0xFF, (1 << 63) - 1),        # a 2^63-1 byte frame header
        struct.pack("!BBQ", 0x82, 0x7F, 1 << 63),              # length with the top bit set (invalid)
        b"\x83\x80\x00\x00\x00\x00",                           # reserved opcode 3
        b"\x09\xfe\xff\xff" + b"\x00" * 4 + b"x" * 200,        # fragmented ping, 65535 claimed
        bytes(range(256)) * 64,                                # 16 KiB of everything
    ]
    with Relay(raw_echo.addr, workers=1) as r:
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(upgrade_request("/"))
            head, rest = read_head(s)
            assert status_of(head) == 101
            sent = b"".join(garbage)
            for g in garbage:
                s.sendall(g)
            got = rest
            deadline = time.monotonic() + 10
            while len(got) < len(sent) and time.monotonic() < deadline:
                got += s.recv(65536)
            assert got == sent
        # a 1 MiB burst in one write is relayed whole as well
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(upgrade_request("/"))
            head, rest = read_head(s)
            blob = bytes(range(256)) * 4096
            threading.Thread(target=s.sendall, args=(blob,), daemon=True).start()
            got = rest
            deadline = time.monotonic() + 10
            while len(got) < len(blob) and time.monotonic() < deadline:
                got += s.recv(1 << 20)
            assert got == blob


# -- per-IP limit ------------------------------------------------------------------------

def test_max_clients_per_ip_refuses_with_503_and_counts_limit_ip(ws_origin):
    """Counted as outcome limit_ip, never limit: the global-limit alert
    (deploy/alerts.yml, WsrelayClientsAtLimit) must not fire on one busy address."""
    with Relay(ws_origin.addr, workers=1, env={"RELAY_MAX_CLIENTS_PER_IP": "3"}) as r:
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(ws_connect(r.url + "/", open_timeout=5))
            with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
                s.sendall(upgrade_request("/"))
                head, _ = read_head(s)
            assert status_of(head) == 503 and b"Retry-After: 5" in head
            assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_ip") == 1
            assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit") == 0
            assert metric(r, "wsrelay_clients") == 3
        # the count is given back as tunnels close: three more fit, twice over
        wait_for(lambda: metric(r, "wsrelay_clients") == 0, 10, what="clients back to 0")
        for _ in range(2):
            with contextlib.ExitStack() as stack:
                for _ in range(3):
                    stack.enter_context(ws_connect(r.url + "/", open_timeout=5))
            wait_for(lambda: metric(r, "wsrelay_clients") == 0, 10, what="clients back to 0")
        assert metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_ip") == 1
        assert echo_ok(r) < 1.0


def test_memory_bounded_after_the_hostile_tests(relay):
    """The whole module's abuse left the relay serving, its slots free, and its
    memory and descriptors back near where they were before it."""
    assert metric(relay, "wsrelay_clients") == 0
    rss0, fds0 = relay.baseline
    wait_for(lambda: worker_fds(relay) <= fds0 + 4, 10, what="worker fds back to their level")
    assert relay.rss() - rss0 < 16 * 1024 * 1024, (rss0, relay.rss())
    assert echo_ok(relay) < 1.0
    assert relay.proc.poll() is None

