"""Small probes of a running relay for the hardening tests: its workers'
descriptors, a WebSocket round trip, whether a socket was closed."""

from __future__ import annotations

import os
import select
import socket
import time

from websockets.sync.client import connect as ws_connect

from tests.support.relay import Relay


def worker_fds(relay: Relay) -> int:
    n = 0
    for pid in relay.worker_pids().values():
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def echo_ok(relay: Relay, text: str = "still here") -> float:
    """One WebSocket round trip through the relay; returns its duration."""
    t0 = time.monotonic()
    with ws_connect(relay.url + "/", open_timeout=5, close_timeout=2) as ws:
        ws.send(text)
        assert ws.recv(timeout=5) == text
    return time.monotonic() - t0


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True once the relay closes (EOF or reset) within ``timeout``; data is discarded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            return False
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False
