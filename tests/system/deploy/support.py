"""What the deploy/ tests share: where deploy/ is, a unit-file reader,
systemd-analyze, a relay started by any command line, an sd_notify socket.

No systemd is needed at run time: only ``systemd-analyze`` (package systemd)
and, for one test, ``strace``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.support.relay import ROOT, Relay

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



def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
    env.update(extra)
    return env


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def wsrelay_bin() -> str:
    path = Path(sys.executable).with_name("wsrelay")
    return str(path) if path.exists() else shutil.which("wsrelay")


def verify(paths: list[Path]) -> str:
    """Everything ``systemd-analyze verify`` says; "" means the units are clean."""
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
                       capture_output=True, text=True, timeout=60, cwd=paths[0].parent)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and not out:
        out = f"exit status {r.returncode}"
    return out


def runnable_copy(tmp: Path, unit_text: str, exec_start: str) -> list[Path]:
    """The units with ExecStart pointing at a real wsrelay binary, in ``tmp``."""
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={exec_start}", unit_text)
    service = tmp / "wsrelay.service"
    service.write_text(text)
    sock = tmp / "wsrelay.socket"
    sock.write_text(SOCKET_UNIT.read_text())
    return [service, sock]


# -- a relay started by any command --------------------------------------------------------------

class CmdRelay(Relay):
    """:class:`Relay` started with another command line (installed binary, wrapper) and fds."""

    def __init__(self, cmd: list[str], origin: str | None, pass_fds: tuple[int, ...] = (),
                 cwd: str = ROOT, **kw):
        super().__init__(origin, **kw)
        self.cmd = cmd
        self.pass_fds = pass_fds
        self.cwd = cwd

    def start(self, wait_ready: bool = True) -> "CmdRelay":
        self.proc = subprocess.Popen([*self.cmd, *self.args], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=self.cwd, pass_fds=self.pass_fds)
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.log), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.access), daemon=True).start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        self.wait_log("ready:", timeout=30)
        self.port = int(re.search(r"listening on [^ ]*?:(\d+)", self.text()).group(1))
        m = re.search(r"metrics on http://[^ ]*?:(\d+)/", self.text())
        self.metrics_port = int(m.group(1)) if m else 0

    @property
    def supervisor_pid(self) -> int:
        """From the log (the process may run under a wrapper such as strace)."""
        return int(re.search(r"wsrelay\[(\d+)\] INFO wsrelay \S+ listening", self.text()).group(1))


def wait_reloaded(r: Relay, old_workers: int, timeout: float = 20) -> None:
    """The new generation accepts and the old one has exited.

    Waiting for the old workers keeps these tests about systemd; that a
    connection accepted by an old worker just before its SIGTERM is still
    served is pinned down in tests/system/workers/test_lifecycle.py."""
    r.wait_log("reload: generation 1 accepting", timeout=timeout)
    r.wait_log(") finished (", timeout=timeout, count=old_workers)


def round_trip(port: int, text: str = "hello through wsrelay", timeout: float = 10) -> str:
    async def go():
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=timeout, close_timeout=2) as ws:
            await ws.send(text)
            return await asyncio.wait_for(ws.recv(), timeout)
    answer = asyncio.run(go())
    assert answer == text
    return answer


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                out.append(int(name))
    return out


def listening_inode(port: int) -> str:
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def polls_listening_socket(pid: int, inode: str) -> bool:
    """Whether the process has the listening socket in one of its epoll sets."""
    try:
        fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"}
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                polled = {int(m) for m in re.findall(r"(?m)^tfd:\s+(\d+)", f.read())}
            if polled & fds:
                return True
    except OSError:
        pass
    return False


class NotifySocket:
    """The systemd end of NOTIFY_SOCKET: a datagram socket that learns each sender's pid."""

    def __init__(self, abstract: bool = False):
        self.dir = tempfile.mkdtemp(prefix="wsrelay-notify-")  # short: AF_UNIX paths have 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"wsrelay-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[float, int, str]] = []  # (monotonic time, sender pid, text)

    def receive(self, timeout: float) -> tuple[float, int, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        msg = (time.monotonic(), pid, data.decode())
        self.messages.append(msg)
        return msg

    def wait(self, line: str, timeout: float = 20) -> tuple[float, int, str]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(deadline - time.monotonic())
            if msg is not None and line in msg[2].split("\n"):
                return msg
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {line} within {timeout}s; got {[m[2] for m in self.messages]}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
