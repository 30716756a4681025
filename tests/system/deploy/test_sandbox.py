"""The unit's sandbox holds for the real process: MemoryDenyWriteExecute
(run under PR_SET_MDWE) and the syscall/address-family filters (under strace,
against the lists ``systemd-analyze`` itself prints)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.relay import ROOT
from tests.system.deploy.support import CmdRelay, parse_unit, round_trip, wait_reloaded

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
