"""Resource exhaustion: out of file descriptors in a worker, out of ports (or
any connect error) towards the origin.

The EMFILE test runs a real relay whose workers have RLIMIT_NOFILE=64 and
opens more connections than that: the worker must not spin, must keep
serving the tunnels it has, count the failures, and accept again as soon as
descriptors are free.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support import relay as launcher
from tests.support.net import read_head, status_of, upgrade_request
from tests.support.probes import echo_ok
from tests.support.relay import Relay, wait_for
from tests.support.scrape import metric

NOFILE = 64
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture
def low_fd_relay(ws_origin, monkeypatch):
    real = subprocess.Popen

    def popen(*args, **kwargs):
        kwargs["preexec_fn"] = _low_nofile
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    with Relay(ws_origin.addr, workers=1, env={"RELAY_HANDSHAKE_TIMEOUT": "60"}) as r:
        monkeypatch.setattr(launcher.subprocess, "Popen", real)
        yield r


def test_emfile_does_not_spin_keeps_serving_and_recovers(low_fd_relay):
    r = low_fd_relay
    pid = r.worker_pids()[0]
    with ws_connect(r.url + "/", open_timeout=5) as tunnel:
        tunnel.send("before")
        assert tunnel.recv(timeout=5) == "before"
        flood: list[socket.socket] = []
        try:
            # Twice the worker's descriptors: the kernel completes every
            # handshake into the backlog; the worker runs out part way.
            for _ in range(2 * NOFILE):
                s = socket.create_connection(("127.0.0.1", r.port), timeout=5)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head: held until the timeout
                flood.append(s)
            wait_for(lambda: metric(r, "wsrelay_accept_errors_total") >= 1, 10, what="accept errors counted")
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            # the open tunnel keeps echoing while accept() fails
            for i in range(30):
                tunnel.send(f"during {i}")
                assert tunnel.recv(timeout=5) == f"during {i}"
                time.sleep(0.1)  # spread the echoes over the 3 s CPU measurement window
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            assert cpu < 0.5, f"worker used {cpu:.0%} CPU while out of file descriptors"
            assert r.proc.poll() is None and r.worker_pids() == {0: pid}, "worker died or was restarted"
        finally:
            for s in flood:
                s.close()
        # descriptors free again: new connections are served (the backlog drains)
        wait_for(lambda: _upgrade_ok(r), 15, interval=0.2, what="new upgrades served after the flood")
        assert echo_ok(r) < 2.0
        tunnel.send("after")
        assert tunnel.recv(timeout=5) == "after"
    logged = [line for line in r.log if "accept" in line and ("EMFILE" in line or "descriptors" in line)]
    assert 1 <= len(logged) <= 3, logged  # logged once per interval, not once per failure


def _upgrade_ok(r: Relay) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=2) as s:
            s.sendall(upgrade_request("/"))
            head, _ = read_head(s)
        return status_of(head) == 101
    except OSError:
        return False


def test_origin_connect_errors_of_any_kind_are_502(ws_origin, loop_thread):
    """Refused, unreachable address, no route: always a 502, never a crash."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: refused
    # 127.0.0.1:0 cannot be connected to (EADDRNOTAVAIL / ECONNREFUSED depending on the kernel)
    for origin in (f"127.0.0.1:{dead}", "127.0.0.1:0"):
        with Relay(origin, workers=1, env={"RELAY_CONNECT_TIMEOUT": "2"}) as r:
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
                    s.sendall(upgrade_request("/"))
                    head, _ = read_head(s)
                assert status_of(head) == 502
            assert metric(r, "wsrelay_clients") == 0
