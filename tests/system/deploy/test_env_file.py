"""deploy/wsrelay.env: lists exactly ``relay.config.VARIABLES``, with their
real defaults, sets only what a first deployment must, and ``wsrelay check``
refuses it until the origin is set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config
from tests.support.relay import ROOT
from tests.system.deploy.support import clean_env

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
