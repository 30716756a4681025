"""deploy/'s unit files and sysctl file (README: "Deploying"): ``systemd-analyze
verify`` with no warning at all (a typo in a directive is only a warning
there, so any output fails), and the numbers agree with the code (drain
timeout, fd limit, sysctl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay import config
from tests.support.relay import ROOT
from tests.system.deploy.support import (
    one,
    parse_unit,
    runnable_copy,
    seconds,
    verify,
    wsrelay_bin,
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
