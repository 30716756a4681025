"""Origin port exhaustion for real (issue 8): the relay runs in a private
network namespace (``unshare -rn``) whose ephemeral port range is four ports
wide, so its fifth concurrent connection to the origin fails with
EADDRNOTAVAIL. That client gets a 502 (upgrade and plain HTTP alike), the
four open tunnels keep echoing, the worker does not crash, and once tunnels
close new ones succeed again.

The namespace is the test's own: the host's port range is never touched.
Listeners and clients use fixed ports outside the range, so only the
relay's connections to its origin draw on it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.support.relay import ROOT

pytestmark = pytest.mark.slow

RANGE = (40000, 40003)
ORIGIN_PORT, RELAY_PORT, METRICS_PORT = 18101, 18102, 18103


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(["unshare", "-rn", "sh", "-c",
                            f"echo '{RANGE[0]} {RANGE[1]}' > /proc/sys/net/ipv4/ip_local_port_range"],
                           capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user+network namespaces (unshare -rn)")
def test_origin_port_exhaustion_is_a_502_and_nothing_else():
    r = subprocess.run(["unshare", "-rn", sys.executable, "-m", "tests.system.relay.test_port_exhaustion"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tunnels"] == RANGE[1] - RANGE[0] + 1, result
    assert result["over_limit_upgrades"] == [502, 502, 502], result
    assert result["over_limit_http"] == 502, result
    assert result["tunnels_still_echo"] is True, result
    assert result["clients_while_exhausted"] == result["tunnels"], result
    assert result["after_close"] == 101, result
    assert result["clients_at_end"] == 0, result
    assert result["relay_alive"] and not result["traceback"], result["log_tail"]
    assert "EADDRNOTAVAIL" in result["errno_seen"] or "assign requested address" in result["errno_seen"], result


# -- what runs inside the namespace ------------------------------------------------------

def _loopback_up() -> None:
    import fcntl
    import struct

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def _scenario() -> dict:
    from tests.support.net import read_head, status_of, upgrade_request
    from tests.support.relay import LoopThread, Relay, wait_for
    from tests.support.raw_origins import RawOrigin, mask_frame
    from tests.support.scrape import metric

    _loopback_up()
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{RANGE[0]} {RANGE[1]}")
    next_port = iter(range(20000, 30000))

    def client() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", next(next_port)))  # outside the range: only the relay uses it up
        s.settimeout(10)
        s.connect(("127.0.0.1", RELAY_PORT))
        return s

    def upgrade() -> tuple[int, socket.socket, bytes]:
        s = client()
        s.sendall(upgrade_request("/"))
        head, rest = read_head(s)
        return status_of(head), s, rest

    def echoes(s: socket.socket, rest: bytes, text: bytes) -> bool:
        frame = mask_frame(text)  # the raw origin echoes bytes as they came
        s.sendall(frame)
        got = rest
        while len(got) < len(frame):
            chunk = s.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == frame

    lt = LoopThread()
    origin = RawOrigin(lt)
    origin.port = ORIGIN_PORT
    origin.start()
    out: dict = {}
    env = {"RELAY_LISTEN": f"127.0.0.1:{RELAY_PORT}", "RELAY_METRICS_LISTEN": f"127.0.0.1:{METRICS_PORT}",
           "RELAY_CONNECT_TIMEOUT": "3"}
    with Relay(origin.addr, workers=1, env=env) as relay:
        # Take every port of the range with tunnels.
        tunnels = []
        for i in range(RANGE[1] - RANGE[0] + 1):
            status, s, rest = upgrade()
            if status != 101:
                s.close()
                break
            assert echoes(s, rest, b"tunnel %d" % i)
            tunnels.append(s)
        out["tunnels"] = len(tunnels)
        # what the relay's connect to the origin meets now (it does not log it per client)
        with socket.socket() as p:
            try:
                p.connect(("127.0.0.1", ORIGIN_PORT))
                out["errno_seen"] = "connected: the range is not used up"
            except OSError as e:
                out["errno_seen"] = f"{e.errno} {e.strerror}"
        out["over_limit_upgrades"] = []
        for _ in range(3):
            status, s, _ = upgrade()
            out["over_limit_upgrades"].append(status)
            s.close()
        s = client()
        s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out["over_limit_http"] = status_of(read_head(s)[0])
        s.close()
        out["tunnels_still_echo"] = all(echoes(t, b"", b"still %d" % i) for i, t in enumerate(tunnels))
        out["clients_while_exhausted"] = metric(relay, "wsrelay_clients")
        for t in tunnels:
            t.close()
        wait_for(lambda: metric(relay, "wsrelay_clients") == 0, 10, what="clients back to 0")

        # Ports come back (loopback TIME_WAIT is reused for new connects): new tunnels work.
        def one_more() -> int:
            status, s, rest = upgrade()
            ok = status == 101 and echoes(s, rest, b"again")
            s.close()
            return 101 if ok else status
        try:
            out["after_close"] = wait_for(lambda: one_more() == 101 and 101, 30, interval=0.5,
                                          what="a new tunnel once the ports are free")
        except AssertionError:
            out["after_close"] = one_more()
        wait_for(lambda: metric(relay, "wsrelay_clients") == 0, 10, what="clients back to 0")
        out["clients_at_end"] = metric(relay, "wsrelay_clients")
        out["relay_alive"] = relay.proc.poll() is None and len(relay.worker_pids()) == 1
        out["traceback"] = "Traceback" in relay.text()
        out["log_tail"] = relay.text()[-2000:]
    origin.stop()
    lt.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(_scenario()))
    sys.stdout.flush()
    os._exit(0)
