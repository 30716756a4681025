"""deploy/ (README: "Deploying") and the supervisor's side of the systemd contract.

- The unit files pass ``systemd-analyze verify`` with no warning at all (a
  typo in a directive is only a warning there, so any output fails), and the
  unit's numbers agree with the code (drain timeout, fd limit, sysctl).
- The env file lists exactly ``relay.config.VARIABLES``, with their real
  defaults, and ``wsrelay check`` accepts it.
- ``deploy/install.sh --root`` builds the expected tree, a second run changes
  nothing, the installed ``wsrelay`` serves, edited config files survive.
- sd_notify as Type=notify/WatchdogSec/NotifyAccess=main need it, on a real
  AF_UNIX datagram socket; socket activation with a real inherited socket.
- MemoryDenyWriteExecute and the syscall/address-family filters hold for the
  real process: run under PR_SET_MDWE, and under strace against the lists
  ``systemd-analyze`` itself prints.

No systemd is needed at run time: only ``systemd-analyze`` (package systemd)
and, for one test, ``strace``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

from relay import config
from tests.helpers import ROOT, Relay, wait_for

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


# -- the unit files --------------------------------------------------------------------

@needs_analyze
def test_units_verify_without_a_single_warning(tmp_path):
    assert verify(runnable_copy(tmp_path, UNIT.read_text(), wsrelay_bin())) == ""


@needs_analyze
@pytest.mark.parametrize("bad", ["ProtectSystm=strict", "LimitNOFILE=lots", "SystemCallFilter=@system-servic",
                                 "RestrictAddressFamilies=AF_INTE", "Type=notfy", "TimeoutStopSec=45x"])
def test_verify_catches_a_bad_directive(tmp_path, bad):
    """The check above is not vacuous: one typo makes it fail."""
    text = UNIT.read_text().replace("\n[Install]", f"\n{bad}\n\n[Install]")
    out = verify(runnable_copy(tmp_path, text, wsrelay_bin()))
    key, _, value = bad.partition("=")
    assert out, f"systemd-analyze verify accepted {bad}"
    assert key in out or value in out, out


@needs_analyze
def test_unit_is_hardened(tmp_path):
    """``systemd-analyze security`` rates the sandbox: exposure at most 2.0 of 10."""
    service = runnable_copy(tmp_path, UNIT.read_text(), wsrelay_bin())[0]
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager",
                        str(service)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_unit_agrees_with_the_code():
    unit = parse_unit(UNIT.read_text())
    d = config.Settings()
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecStart") == f"{PREFIX}/bin/wsrelay run --env-file /etc/wsrelay/wsrelay.env"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # SIGTERM to the supervisor alone: it drains its workers itself.
    assert one(unit, "Service", "KillMode") == "mixed"
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > d.drain_timeout + SUPERVISOR_KILL_GRACE
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()  # bad configuration
    assert seconds(one(unit, "Service", "WatchdogSec")) >= 10
    # 2 fds per tunnel: one worker must be able to hold every client of the default limit.
    nofile = int(one(unit, "Service", "LimitNOFILE"))
    assert nofile >= 2 * d.max_clients + 1024
    assert one(unit, "Service", "DynamicUser") == "yes"
    assert one(unit, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID",
                "ProtectClock", "ProtectHostname"):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "UMask") == "0077"
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
    # The fd limit must be allowed by the sysctl file's per-process ceiling.
    assert nofile <= int(sysctl_settings()["fs.nr_open"])


def test_socket_unit_matches_the_defaults():
    unit = parse_unit(SOCKET_UNIT.read_text())
    d = config.Settings()
    assert one(unit, "Socket", "ListenStream") == str(d.listen[0])
    # Never shared: with SO_REUSEPORT another process could join the address.
    assert "ReusePort" not in unit["Socket"]
    assert int(one(unit, "Socket", "Backlog")) == d.backlog


# -- the env file --------------------------------------------------------------------------

ENV_LINE = re.compile(r"^(#?)(RELAY_[A-Z0-9_]+)=(.*)$")


def env_entries() -> list[tuple[bool, str, str, int]]:
    """(commented, key, value, line index) of every setting line."""
    out = []
    for i, line in enumerate(ENV_FILE.read_text().splitlines()):
        m = ENV_LINE.match(line)
        if m:
            out.append((m.group(1) == "#", m.group(2), m.group(3), i))
    return out


def test_untouched_env_file_fails_check_until_the_origin_is_set(tmp_path):
    """Shipped with RELAY_ORIGIN set, check passed on the untouched file and
    "check, then enable --now" started a relay answering 502 to everything."""
    r = subprocess.run([sys.executable, "-m", "relay", "check", "--env-file", str(ENV_FILE)],
                       capture_output=True, text=True, timeout=30, env=clean_env(), cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "wsrelay: RELAY_ORIGIN is not set: expected the origin server(s), e.g. 10.0.0.5:9000"]
    # Uncommenting the example line is all it takes.
    edited = tmp_path / "wsrelay.env"
    edited.write_text(ENV_FILE.read_text().replace("#RELAY_ORIGIN=", "RELAY_ORIGIN=", 1))
    r = subprocess.run([sys.executable, "-m", "relay", "check", "--env-file", str(edited)],
                       capture_output=True, text=True, timeout=30, env=clean_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    effective = json.loads(r.stdout)
    assert effective["RELAY_ORIGIN"] and effective["RELAY_LISTEN"]


def test_env_file_lists_every_variable_exactly_once():
    keys = [key for _, key, _, _ in env_entries()]
    assert len(keys) == len(set(keys)), "a variable appears twice"
    assert set(keys) == set(config.VARIABLES), (
        f"missing from deploy/wsrelay.env: {sorted(set(config.VARIABLES) - set(keys))}; "
        f"unknown to relay.config: {sorted(set(keys) - set(config.VARIABLES))}")


def test_env_file_sets_only_what_a_first_deployment_must_and_documents_every_line():
    lines = ENV_FILE.read_text().splitlines()
    active = {key for commented, key, _, _ in env_entries() if not commented}
    assert active == {"RELAY_LISTEN"}
    for _, key, _, i in env_entries():
        above = lines[i - 1] if i else ""
        assert above.startswith("# ") and not ENV_LINE.match(above), f"{key} has no explanation above it"


def test_env_file_defaults_are_the_real_defaults():
    """Uncommenting every line changes nothing: the documented defaults are the code's."""
    entries = env_entries()
    everything = config.load({key: value for _, key, value, _ in entries})
    first = config.load({key: value for commented, key, value, _ in entries if not commented},
                        require_origin=False)
    assert everything == config.Settings(origin=everything.origin, listen=first.listen)
    assert first == config.Settings()


# -- the sysctl file -------------------------------------------------------------------------

def sysctl_settings() -> dict[str, str]:
    out = {}
    for raw in SYSCTL_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {raw!r}"
        out[key.strip()] = value.strip()
    return out


def test_sysctl_keys_exist_and_values_make_sense():
    settings = sysctl_settings()
    assert {"net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.ip_local_port_range",
            "fs.file-max", "fs.nr_open", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_reuse",
            "net.core.netdev_max_backlog"} <= set(settings)
    for key, value in settings.items():
        assert Path("/proc/sys", *key.split(".")).exists(), f"{key}: no such kernel setting"
        assert all(part.isdigit() for part in value.split()), f"{key} = {value}"
    d = config.Settings()
    assert int(settings["net.core.somaxconn"]) >= d.backlog
    low, high = map(int, settings["net.ipv4.ip_local_port_range"].split())
    assert high - low >= 50000
    # The ephemeral range must not swallow the ports wsrelay itself listens on.
    assert not low <= d.listen[0].port <= high and not low <= d.metrics_listen.port <= high
    assert int(settings["fs.file-max"]) >= int(settings["fs.nr_open"])
    assert settings["net.ipv4.tcp_tw_reuse"] == "1"
    # Every setting is explained by a comment right above it.
    lines = SYSCTL_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


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
    served is pinned down in tests/test_lifecycle.py."""
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


@pytest.fixture
def notify():
    n = NotifySocket()
    yield n
    n.close()


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


# -- the installer ------------------------------------------------------------------------------

def _hidden(path: str) -> bool:
    """Hidden from the service by the unit's ProtectHome=yes."""
    return (os.path.realpath(path) + "/").startswith(("/home/", "/root/", "/run/user/"))


def _python_ok(python: str) -> bool:
    """Python >= 3.11 with this interpreter's ABI (it will import our compiled dependencies)."""
    r = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 11), sys.implementation.cache_tag)"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split() == ["True", sys.implementation.cache_tag]


def service_python() -> str:
    """An interpreter the service could run: this one unless ProtectHome=yes hides it
    (a pyenv, uv or conda Python under /root or /home), else Debian's /usr/bin/python3."""
    if not _hidden(sys.executable) and not _hidden(sys.base_prefix):
        return sys.executable
    if os.path.exists("/usr/bin/python3") and _python_ok("/usr/bin/python3"):
        return "/usr/bin/python3"
    pytest.skip("no Python >= 3.11 outside home directories (apt-get install python3 python3-venv)")


def install_env() -> dict[str, str]:
    """The environment install.sh runs in: this interpreter's packages on PYTHONPATH
    (with --no-deps nothing is downloaded, and another interpreter needs them)."""
    import site

    return clean_env(PYTHONPATH=os.pathsep.join(site.getsitepackages()))


def run_install(src: Path, root: Path, *args: str, python: str | None = None, check: bool = True,
                env: dict | None = None) -> str:
    r = subprocess.run(["bash", str(src / "deploy" / "install.sh"), "--root", str(root),
                        *(["--python", python or service_python()] if python != "" else []),
                        "--system-site-packages", "--no-deps", *args],
                       capture_output=True, text=True, timeout=300, env=env or install_env())
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    return r


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below root: type, mode, size, mtime, content hash or link target."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                what = ("link", os.readlink(p))
            elif os.path.isdir(p):
                what = ("dir",)
            else:
                with open(p, "rb") as f:
                    what = ("file", hashlib.sha256(f.read()).hexdigest())
            out[os.path.relpath(p, root)] = (*what, st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """install.sh run from a copy of this checkout (others may edit the real one meanwhile)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(DEPLOY, src / "deploy", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(Path(ROOT) / name, src / name)
    for package in ("relay", "workers", "metrics"):
        shutil.copytree(Path(ROOT) / package, src / package, ignore=ignore)
    root = base / "root"
    first = run_install(src, root)
    _see_this_environment(root / PREFIX.lstrip("/"))
    return src, root, first


def installed_python(root: Path) -> Path:
    return root / PREFIX.lstrip("/") / "bin" / "python"


def test_install_produces_the_expected_tree(installed):
    src, root, first = installed
    venv = root / PREFIX.lstrip("/")
    for rel in ("etc/systemd/system/wsrelay.service", "etc/systemd/system/wsrelay.socket",
                "etc/wsrelay/wsrelay.env", "etc/sysctl.d/60-wsrelay.conf"):
        p = root / rel
        assert p.is_file(), rel
        assert p.stat().st_mode & 0o777 == 0o644, rel  # readable by the service's dynamic user
        assert f"installed /{rel}" in first
    assert (root / "etc/wsrelay/wsrelay.env").read_bytes() == ENV_FILE.read_bytes()
    assert (root / "etc/sysctl.d/60-wsrelay.conf").read_bytes() == SYSCTL_FILE.read_bytes()
    assert os.readlink(root / "usr/local/bin/wsrelay") == f"{PREFIX}/bin/wsrelay"
    assert os.access(venv / "bin" / "wsrelay", os.X_OK)
    unit = parse_unit((root / "etc/systemd/system/wsrelay.service").read_text())
    assert one(unit, "Service", "ExecStart").startswith(f"{PREFIX}/bin/wsrelay run --env-file ")
    # The venv's own copy of the package, not this checkout's.
    r = subprocess.run([str(installed_python(root)), "-c", "import relay, workers; print(relay.__file__)"],
                       capture_output=True, text=True, timeout=30, cwd=root, env=clean_env())
    assert r.stdout.strip().startswith(str(venv)), r.stdout + r.stderr
    out = subprocess.run([str(venv / "bin" / "wsrelay"), "--version"], capture_output=True, text=True,
                         timeout=30, cwd=root, env=clean_env()).stdout
    assert out.strip() == f"wsrelay {__import__('relay').__version__}"


@needs_analyze
def test_installed_unit_verifies(installed, tmp_path):
    _, root, _ = installed
    text = (root / "etc/systemd/system/wsrelay.service").read_text()
    assert verify(runnable_copy(tmp_path, text, str(root / PREFIX.lstrip("/") / "bin" / "wsrelay"))) == ""


def test_install_twice_changes_nothing(installed):
    src, root, _ = installed
    before = tree(root)
    second = run_install(src, root)
    assert tree(root) == before
    assert "installed" not in second.replace("unchanged", ""), second


def test_install_with_another_prefix(tmp_path, installed):
    """--prefix moves the venv, the unit's ExecStart and the symlink with it. (The venv
    is the one installed above, copied there: creating one is tested already.)"""
    src, first_root, _ = installed
    root = tmp_path / "root"
    shutil.copytree(first_root / PREFIX.lstrip("/"), root / "srv/relay", symlinks=True)
    out = run_install(src, root, "--prefix", "/srv/relay")
    assert "unchanged /srv/relay" in out  # the copied venv was recognised as up to date
    assert (root / "srv/relay/bin/wsrelay").exists()
    unit = parse_unit((root / "etc/systemd/system/wsrelay.service").read_text())
    assert one(unit, "Service", "ExecStart").startswith("/srv/relay/bin/wsrelay ")
    assert os.readlink(root / "usr/local/bin/wsrelay") == "/srv/relay/bin/wsrelay"
    assert "installed" in out


def test_installed_wsrelay_serves_through_its_env_file(installed, ws_origin, tmp_path):
    _, root, _ = installed
    venv = root / PREFIX.lstrip("/")
    _see_this_environment(venv)
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text((root / "etc/wsrelay/wsrelay.env").read_text()
                        + f"\nRELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:0\n"
                          "RELAY_METRICS_LISTEN=127.0.0.1:0\nRELAY_WORKERS=1\n")
    cmd = [str(venv / "bin" / "wsrelay"), "run", "--env-file", str(env_file)]
    r = CmdRelay(cmd, None, cwd=str(tmp_path))
    r.env = clean_env(PYTHONUNBUFFERED="1")  # every setting comes from the file
    with r:
        round_trip(r.port)
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/readyz", timeout=5) as resp:
            assert resp.status == 200


def _see_this_environment(venv: Path) -> None:
    """When the tests run in a venv or the installed venv uses another interpreter,
    --system-site-packages does not see this environment's packages: point the
    installed venv at them (after its own)."""
    if sys.prefix == sys.base_prefix and service_python() == sys.executable:
        return
    import site

    lib = next((venv / "lib").glob("python3*/site-packages"))
    (lib / "zz-test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def test_second_run_after_an_edit_writes_no_dist_file(installed, tmp_path):
    """The same checkout again after the operator edited the env file: there is
    no new version to merge (the old installer wrote a .dist and said there was)."""
    src, root, _ = installed
    root2 = tmp_path / "root"
    shutil.copytree(root, root2, symlinks=True)
    env = root2 / "etc/wsrelay/wsrelay.env"
    env.write_text(env.read_text() + "RELAY_ORIGIN=10.0.0.5:9000\n")
    out = run_install(src, root2)
    assert not (root2 / "etc/wsrelay/wsrelay.env.dist").exists()
    assert "kept edited /etc/wsrelay/wsrelay.env\n" in out
    assert ".dist" not in out and "new version" not in out
    assert "RELAY_ORIGIN=10.0.0.5:9000" in env.read_text()


def test_root_is_for_inspection_only(installed):
    """The staged venv's scripts name the staging directory: the installer says so."""
    _, root, first = installed
    venv = root / PREFIX.lstrip("/")
    assert f"--root: {root} is for inspection only" in first
    assert (venv / "bin" / "wsrelay").read_text().splitlines()[0] == f"#!{venv}/bin/python"


@pytest.fixture
def home_python():
    """An interpreter under a home directory, as pyenv, uv or conda install them:
    this one if it is (pyenv's, on the development machines), else a copy in /home."""
    if _hidden(sys.base_prefix):
        yield sys.executable
        return
    if not os.access("/home", os.W_OK):
        pytest.skip("/home is not writable")
    home = tempfile.mkdtemp(prefix="wsrelay-test-", dir="/home")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", f"{home}/py"], check=True,
                       timeout=120)
        yield f"{home}/py/bin/python"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_interpreter_hidden_by_protecthome_is_refused(home_python, tmp_path):
    """The unit's ProtectHome=yes hides /root and /home: a venv made from a pyenv
    Python there cannot start (status 127). Refused, with what to do instead."""
    r = run_install(Path(ROOT), tmp_path / "root", python=home_python, check=False)
    assert r.returncode == 1
    assert "ProtectHome=yes hides from the service" in r.stderr and "--python /usr/bin/python3" in r.stderr
    assert not (tmp_path / "root" / PREFIX.lstrip("/")).exists()


def test_default_interpreter_avoids_a_hidden_python3(home_python, tmp_path, installed):
    """python3 first on PATH is a pyenv one: the default becomes /usr/bin/python3."""
    if not (os.path.exists("/usr/bin/python3") and _python_ok("/usr/bin/python3")):
        pytest.skip("no Debian python3 >= 3.11")
    src, _, _ = installed
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(home_python)
    env = install_env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    out = run_install(src, tmp_path / "root", python="", env=env)
    assert "hidden from the service by ProtectHome=yes: using /usr/bin/python3" in out
    venv_python = tmp_path / "root" / PREFIX.lstrip("/") / "bin" / "python"
    assert not _hidden(os.path.realpath(venv_python))


def test_install_keeps_edited_config_and_uninstalls(installed, tmp_path):
    src, root, _ = installed
    # A private copy of the installed tree, so the tests above keep theirs.
    root2 = tmp_path / "root"
    shutil.copytree(root, root2, symlinks=True)
    # The venv's scripts name their interpreter by absolute path: this copy
    # reuses the original venv's files but must not need them to be re-created.
    env = root2 / "etc/wsrelay/wsrelay.env"
    env.write_text(env.read_text() + "RELAY_ORIGIN=10.0.0.5:9000\n")
    edited = env.read_bytes()
    sysctl = root2 / "etc/sysctl.d/60-wsrelay.conf"
    # A new version of both files in the source.
    src2 = tmp_path / "src"
    shutil.copytree(src, src2)
    for rel in ("deploy/wsrelay.env", "deploy/sysctl.d/60-wsrelay.conf"):
        with open(src2 / rel, "a") as f:
            f.write("# a newer version\n")
    out = run_install(src2, root2)
    assert env.read_bytes() == edited, "an edited env file was overwritten"
    assert (root2 / "etc/wsrelay/wsrelay.env.dist").read_bytes() == (src2 / "deploy/wsrelay.env").read_bytes()
    assert "kept edited /etc/wsrelay/wsrelay.env" in out
    # Not edited: upgraded in place, no .dist.
    assert sysctl.read_bytes() == (src2 / "deploy/sysctl.d/60-wsrelay.conf").read_bytes()
    assert not (root2 / "etc/sysctl.d/60-wsrelay.conf.dist").exists()
    # And still idempotent in that state.
    before = tree(root2)
    run_install(src2, root2)
    assert tree(root2) == before

    out = run_install(src2, root2, "--uninstall")
    left = sorted(str(p.relative_to(root2)) for p in root2.rglob("*") if not p.is_dir())
    assert left == ["etc/wsrelay/wsrelay.env"], left
    assert "kept edited /etc/wsrelay/wsrelay.env" in out
    run_install(src2, root2, "--uninstall", "--purge")
    left = sorted(str(p.relative_to(root2)) for p in root2.rglob("*") if not p.is_dir())
    assert left == [], left


# -- the sandbox, checked on the real process ---------------------------------------------------

MDWE = """\
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""
WX_MAP = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"


def _mdwe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", MDWE, sys.executable, *argv], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def _mdwe_supported() -> bool:
    return _mdwe("-c", "pass").returncode == 0


@pytest.mark.skipif(not _mdwe_supported(), reason="PR_SET_MDWE needs Linux >= 6.3")
def test_memory_deny_write_execute_holds(ws_origin):
    """The kernel refuses any writable+executable mapping (inherited across fork and
    exec): CPython, uvloop, picows and msgspec load, serve and reload without one."""
    # The harness works: a writable+executable mapping is refused under it, not without.
    assert _mdwe("-c", WX_MAP).returncode != 0
    assert subprocess.run([sys.executable, "-c", WX_MAP], timeout=30).returncode == 0
    with CmdRelay([sys.executable, "-c", MDWE, sys.executable, "-m", "relay", "run"], ws_origin.addr,
                  workers=2, env={"RELAY_MODE": "frames"}) as r:
        round_trip(r.port)
        r.signal(signal.SIGHUP)
        wait_reloaded(r, 2)
        round_trip(r.port)


def syscall_groups() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    current = None
    for line in subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"], capture_output=True,
                               text=True, timeout=30).stdout.splitlines():
        if line.startswith("@"):
            current = out.setdefault(line.strip(), set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip())
    return out


def expand(groups: dict[str, set[str]], name: str) -> set[str]:
    out = set()
    for item in groups[name]:
        out |= expand(groups, item) if item.startswith("@") else {item}
    return out


def unit_syscall_filter() -> set[str]:
    """What the unit's SystemCallFilter= lines allow (@default is always allowed)."""
    groups = syscall_groups()
    allowed = expand(groups, "@default")
    for value in parse_unit(UNIT.read_text())["Service"]["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(groups, item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


STRACE_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\((.*))")

# Reads outside /proc/<pid> that ProcSubset=pid turns into ENOENT, each known to be harmless.
PROC_TOLERATED = {
    # prometheus_client's default ProcessCollector, probed at import: it disables
    # itself without /proc/stat; the supervisor exports its own registry anyway.
    "/proc/stat",
    # libuv's kernel version probe (an Ubuntu file): falls back to uname(2).
    "/proc/version_signature",
}


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True,
                          timeout=30).returncode == 0


@needs_analyze
@pytest.mark.skipif(not _strace_works(), reason="strace missing (apt-get install strace) or ptrace not allowed")
def test_sandbox_allows_everything_the_relay_does(ws_origin, tmp_path, notify):
    """Every system call of a full life (start, tunnel, metrics, reload, drain) is in
    the unit's SystemCallFilter; sockets only of RestrictAddressFamilies; no mapping
    that MemoryDenyWriteExecute refuses (systemd's rules: no PROT_WRITE|PROT_EXEC
    mmap, no mprotect to PROT_EXEC); /proc only below a pid (ProcSubset=pid); no
    file opened for writing (ProtectSystem=strict)."""
    log = tmp_path / "strace.log"
    cmd = ["strace", "-f", "-qq", "-s", "256", "-o", str(log), sys.executable, "-m", "relay", "run"]
    r = CmdRelay(cmd, ws_origin.addr, workers=2,
                 env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"})
    with r:
        sup = r.supervisor_pid
        round_trip(r.port)
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=10) as resp:
            assert b"wsrelay_websocket_connections" in resp.read()
        notify.wait("WATCHDOG=1", timeout=5)
        os.kill(sup, signal.SIGHUP)
        wait_reloaded(r, 2, timeout=60)  # every syscall is a ptrace stop: slow on a loaded machine
        round_trip(r.port)
        os.kill(sup, signal.SIGTERM)
        assert r.proc.wait(30) == 0

    allowed = unit_syscall_filter()
    used, families, bad_maps, proc_paths, writes = set(), set(), [], set(), set()
    for line in log.read_text().splitlines():
        m = STRACE_LINE.match(line)
        if not m:
            continue
        name = m.group(2) or m.group(3)
        used.add(name)
        if m.group(2):  # "<... name resumed>": the arguments were on the "<unfinished ...>" line
            continue
        args = m.group(4)
        if name in ("socket", "socketpair"):
            families.add(args.split(",")[0])
        elif name in ("mmap", "mmap2") and "PROT_WRITE" in args and "PROT_EXEC" in args:
            bad_maps.append(line)
        elif name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in args:
            bad_maps.append(line)
        elif name in ("open", "openat"):
            pm = re.search(r'"(/[^"]*)"', args)
            path = pm.group(1) if pm else ""
            if path.startswith("/proc/") and not re.match(r"/proc/(self|thread-self|\d+)(/|$)", path):
                if path not in PROC_TOLERATED:
                    proc_paths.add(path)
            # ProtectSystem=strict: nothing is writable but /dev and /tmp (CPython's
            # bytecode cache fails quietly on a read-only tree: not a write we need).
            if re.search(r"O_WRONLY|O_RDWR|O_CREAT", args) and not path.startswith(("/dev/", "/tmp/")) \
                    and "__pycache__" not in path:
                writes.add(path)
    assert "epoll_wait" in used or "epoll_pwait" in used, "the trace did not cover the workers"
    assert used - allowed == set(), f"calls SystemCallFilter= would refuse: {sorted(used - allowed)}"
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX"}, families
    assert bad_maps == [], bad_maps[:5]
    assert proc_paths == set(), f"hidden by ProcSubset=pid: {proc_paths}"
    assert writes == set(), f"read-only under ProtectSystem=strict: {writes}"
