"""The supervisor's side of the systemd contract: sd_notify as
Type=notify/WatchdogSec/NotifyAccess=main need it, on a real AF_UNIX datagram
socket; socket activation with a real inherited socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.support.relay import ROOT, Relay, wait_for
from tests.system.deploy.support import (
    CmdRelay,
    NotifySocket,
    children,
    listening_inode,
    polls_listening_socket,
    round_trip,
    wait_reloaded,
)

DEPLOY = Path(ROOT) / "deploy"
UNIT = DEPLOY / "wsrelay.service"
SOCKET_UNIT = DEPLOY / "wsrelay.socket"
ENV_FILE = DEPLOY / "wsrelay.env"
SYSCTL_FILE = DEPLOY / "sysctl.d" / "60-wsrelay.conf"
INSTALL = DEPLOY / "install.sh"
PREFIX = "/opt/wsrelay"

# The supervisor SIGKILLs workers this long after the drain timeout
# (workers/supervisor.py, _on_term): systemd must wait longer than both.
SUPERVISOR_KILL_GRACE = 5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze missing (apt-get install systemd)")




# -- sd_notify --------------------------------------------------------------------------------

def test_notify_ready_watchdog_reload_stopping(ws_origin, notify):
    """What Type=notify, NotifyAccess=main and WatchdogSec=30 need, in order."""
    r = CmdRelay([sys.executable, "-m", "relay", "run"], ws_origin.addr, workers=2,
                 env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
    r.start(wait_ready=False)
    with r:
        t_ready = notify.wait("READY=1")[0]
        # READY=1 means accepting: every worker exists and polls the listening
        # socket. (libuv adds it to epoll on the loop iteration right after the
        # worker reports, so allow that iteration, and not much more.)
        workers = children(r.proc.pid)
        assert len(workers) == 2
        r.wait_log("listening on")
        port = int(re.search(r"listening on [^ ]*?:(\d+)", r.text()).group(1))
        inode = listening_inode(port)
        wait_for(lambda: all(polls_listening_socket(pid, inode) for pid in workers),
                 max(0.01, t_ready + 0.25 - time.monotonic()), interval=0.005,
                 what="workers polling the listening socket at READY=1")
        round_trip(port)
        r.wait_ready()
        # Before READY=1 at most watchdog pings (sent once a first worker is up;
        # systemd only arms the watchdog timer earlier, which the pings keep fed).
        assert {m[2] for m in notify.messages[:-1]} <= {"WATCHDOG=1"}, notify.messages

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s: never a gap systemd would kill for.
        pings = [notify.wait("WATCHDOG=1", timeout=2)[0] for _ in range(6)]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 0.4, gaps  # what systemd would kill for
        assert sorted(gaps)[len(gaps) // 2] > 0.1, gaps  # every WATCHDOG_USEC/2, not a busy loop

        # SIGHUP: RELOADING=1, then READY=1 once the new generation accepts.
        r.signal(signal.SIGHUP)
        t_reloading = notify.wait("RELOADING=1")[0]
        t_ready = notify.wait("READY=1")[0]
        assert t_ready >= t_reloading
        wait_reloaded(r, 2)
        round_trip(r.port)

        # SIGTERM: STOPPING=1 as the drain starts, then a clean exit.
        r.signal(signal.SIGTERM)
        notify.wait("STOPPING=1")
        assert r.proc.wait(20) == 0

    # Drain what is left, then check every message came from the main process.
    while notify.receive(0.05):
        pass
    assert {pid for _, pid, _ in notify.messages} == {r.proc.pid}, "NotifyAccess=main would drop these"
    statuses = [m[2] for m in notify.messages if "WATCHDOG=1" not in m[2]]
    assert statuses[0].startswith("READY=1")
    assert [s.split("\n")[0] for s in statuses] == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_a_manager_that_stops_reading_does_not_stop_the_supervisor(ws_origin, notify):
    """A notify socket nobody reads fills (net.unix.max_dgram_qlen datagrams,
    here at once); the supervisor drops what does not fit
    rather than block on it, and reloads and stops as ever. (It used to
    block in send() for good: found as a hung reload in the sandbox test,
    whose notify socket is read only while it waits.)"""
    with CmdRelay([sys.executable, "-m", "relay", "run"], ws_origin.addr, workers=1,
                  env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "20000"}) as r:
        notify.wait("READY=1")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as s:
            s.connect(notify.address)
            for _ in range(100_000):  # its queue full now, not read from here on
                try:
                    s.send(b"X=1")
                except BlockingIOError:
                    break
            else:
                pytest.fail("the notify socket's queue never filled")
        r.signal(signal.SIGHUP)
        wait_reloaded(r, 1)
        round_trip(r.port)
        r.signal(signal.SIGTERM)
        assert r.proc.wait(20) == 0


def test_watchdog_meant_for_another_pid_is_not_ours(ws_origin, notify):
    """sd_watchdog_enabled(3): WATCHDOG_PID names the process the watchdog is for."""
    with CmdRelay([sys.executable, "-m", "relay", "run"], ws_origin.addr, workers=1,
                  env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) as r:
        notify.wait("READY=1")
        round_trip(r.port)
        deadline = time.monotonic() + 0.5  # 5 watchdog periods
        while (msg := notify.receive(deadline - time.monotonic())) is not None:
            assert "WATCHDOG=1" not in msg[2]



# -- socket activation ----------------------------------------------------------------------------

ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
pid = str(os.getpid())  # what systemd does: the exec'd process keeps this pid
os.environ.update(LISTEN_PID=pid, LISTEN_FDS="1", LISTEN_FDNAMES="wsrelay.socket", WATCHDOG_PID=pid)
os.execv(sys.executable, [sys.executable, "-m", "relay", *sys.argv[2:]])
"""


def test_socket_activation_serves_on_the_passed_socket(ws_origin):
    n = NotifySocket(abstract=True)
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    try:
        # RELAY_LISTEN names an address this host cannot bind: only the
        # passed socket can make this relay work.
        cmd = [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "run"]
        with CmdRelay(cmd, ws_origin.addr, workers=2, pass_fds=(listener.fileno(),),
                      env={"RELAY_LISTEN": "192.0.2.1:9", "NOTIFY_SOCKET": n.address,
                           "WATCHDOG_USEC": "400000"}) as r:
            listener.close()  # the relay holds the only copy now, as with systemd's socket unit
            assert "(socket-activated)" in r.text()
            assert r.port == port
            n.wait("READY=1")
            for i in range(4):
                round_trip(port, f"activated {i}")
            # WATCHDOG_PID equal to the supervisor's pid: the watchdog is ours.
            n.wait("WATCHDOG=1", timeout=2)
            assert {pid for _, pid, _ in n.messages} == {r.proc.pid}
            # The socket is the one we passed: a reload keeps serving on it.
            r.signal(signal.SIGHUP)
            wait_reloaded(r, 2)
            round_trip(port, "after reload")
    finally:
        listener.close()
        n.close()


def test_listen_fds_for_another_pid_are_ignored(ws_origin):
    """sd_listen_fds(3): LISTEN_PID not ours (e.g. inherited) means the fds are not for us."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    with Relay(ws_origin.addr, workers=1, env=env) as r:
        assert "(bound)" in r.text()
        round_trip(r.port)
