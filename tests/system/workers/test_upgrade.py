"""Upgrades rolled out by SIGHUP (README: "Deploying", the upgrade row): every worker is a fresh interpreter
(workers/child.py), so a reload runs the code installed now; an installed
version whose shared-memory layout differs is refused like a bad env file.

The relay runs from a copy of the package tree in a temp dir (PYTHONPATH,
PYTHONSAFEPATH so the checkout in the current directory does not come first);
"upgrading" is editing that copy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
from websockets.sync.client import connect

from relay import shared_memory
from relay.config import Address, Settings, load
from tests.support.probes import echo_ok
from tests.support.relay import ROOT, Relay, wait_for
from tests.support.scrape import metric
from workers import child

LAYOUT_REFUSED = ("the installed wsrelay changed the shared-memory layout; "
                  "this upgrade needs `systemctl restart wsrelay`")


def installed_copy(tmp_path: Path, version: str) -> Path:
    tree = tmp_path / "site"
    for pkg in ("relay", "workers", "metrics"):
        shutil.copytree(Path(ROOT) / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    set_version(tree, version)
    return tree


def set_version(tree: Path, version: str) -> None:
    init = tree / "relay" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))


def copy_relay(tree: Path, origin: str, **kw) -> Relay:
    env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return Relay(origin, env=env, **kw)


def running(r: Relay, version: str, generation: int) -> int:
    return len(re.findall(rf"running wsrelay {re.escape(version)}, generation {generation}$", r.text(), re.M))


def test_sighup_runs_the_newly_installed_code_and_keeps_open_websockets(ws_origin, tmp_path):
    tree = installed_copy(tmp_path, "0.1.0+old")
    with copy_relay(tree, ws_origin.addr, workers=2) as r:
        assert "wsrelay 0.1.0+old listening" in r.text()  # the supervisor runs the copy
        wait_for(lambda: running(r, "0.1.0+old", 0) == 2, 10, what="generation 0 on the old code")
        with connect(r.url + "/held", open_timeout=5) as held:
            held.send("before")
            assert held.recv(timeout=5) == "before"
            set_version(tree, "0.1.0+upgraded")  # `pip install` of a new version
            r.signal(signal.SIGHUP)
            r.wait_log("reload: generation 1 accepting", timeout=20)
            assert running(r, "0.1.0+upgraded", 1) == 2, r.text()
            assert running(r, "0.1.0+upgraded", 0) == 0
            held.send("after the reload")  # served by an old worker, draining
            assert held.recv(timeout=5) == "after the reload"
        echo_ok(r)  # a new connection, served by the new code
        assert metric(r, "wsrelay_worker_restarts_total") == 0


def test_sighup_into_a_changed_shared_memory_layout_is_refused(ws_origin, tmp_path):
    tree = installed_copy(tmp_path, "0.1.0+old")
    layout = tree / "metrics" / "layout.py"
    original = layout.read_text()
    with copy_relay(tree, ws_origin.addr, workers=2) as r:
        old = r.worker_pids()
        with connect(r.url + "/held", open_timeout=5) as held:
            layout.write_text(original + "\nSIZE += 16  # a new version added gauges\n")
            r.signal(signal.SIGHUP)
            r.wait_log(LAYOUT_REFUSED, timeout=20)
            # Its sibling (same new code, failing the same way) is stopped, not restarted.
            r.wait_log(") finished (", timeout=10)
            held.send("still here")
            assert held.recv(timeout=5) == "still here"
        echo_ok(r)
        assert r.worker_pids() == old
        # No restart loop: nothing starts again, the restart counter stays at 0.
        starts = r.text().count(" started (pid ")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert r.text().count(" started (pid ") == starts
            time.sleep(0.1)
        assert r.text().count(LAYOUT_REFUSED) == 1
        assert metric(r, "wsrelay_worker_restarts_total") == 0
        assert "died" not in r.text()
        # Put the layout back: the next SIGHUP reloads as usual.
        layout.write_text(original)
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 2 accepting", timeout=20)
        assert running(r, "0.1.0+old", 2) == 2
        echo_ok(r)


def test_settings_cross_the_exec_unchanged():
    s = load({"RELAY_ORIGIN": "127.0.0.1:9,[::1]:10", "RELAY_LISTEN": "[::]:80,0.0.0.0:8080",
              "RELAY_MODE": "frames", "RELAY_METRICS_LISTEN": "", "RELAY_ALLOWED_ORIGINS": "*.example.com",
              "RELAY_IDLE_TIMEOUT": "2.5", "RELAY_LOG_LEVEL": "debug"})
    for settings in (s, Settings(origin=(Address("h", 1),))):
        assert msgspec.json.decode(msgspec.json.encode(settings), type=Settings) == settings


def _worker_with(handoff: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({child.ENV: handoff, "PYTHONPATH": ROOT})
    return subprocess.run([sys.executable, "-P", "-m", "workers.child"], env=env, capture_output=True,
                          text=True, timeout=30, cwd="/")


def test_a_worker_refuses_what_it_cannot_read_before_touching_shared_memory():
    r = _worker_with("not json")
    assert r.returncode == child.EXIT_HANDOFF, r.stderr
    assert "cannot read the supervisor's hand-off" in r.stderr
    r = _worker_with(msgspec.json.encode({"protocol": 99}).decode())
    assert r.returncode == child.EXIT_HANDOFF, r.stderr
    # Descriptors that are not open: only the layout check stands between them and use.
    h = child.Handoff(protocol=child.PROTOCOL, index=0, slot=0, generation=0, nslots=4, shared_fd=900, origins_fd=902,
                      ready_fd=901, sockets=(), layout="v0-h8-s1-0000", log_level=20,
                      settings=msgspec.Raw(b"{}"))
    r = _worker_with(msgspec.json.encode(h).decode())
    assert r.returncode == child.EXIT_LAYOUT, r.stderr
    assert shared_memory.fingerprint() in r.stderr and "v0-h8-s1-0000" in r.stderr


def test_a_worker_restarted_after_an_incompatible_install_stays_down_until_sighup(ws_origin, tmp_path):
    tree = installed_copy(tmp_path, "0.1.0+old")
    layout = tree / "metrics" / "layout.py"
    original = layout.read_text()
    with copy_relay(tree, ws_origin.addr, workers=2) as r:
        layout.write_text(original + "\nSIZE += 16  # a new version added gauges\n")
        victim = r.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        r.wait_log("cannot be replaced until the next SIGHUP", timeout=20)
        assert LAYOUT_REFUSED in r.text()
        echo_ok(r)  # worker 1 serves alone
        starts = r.text().count(" started (pid ")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert r.text().count(" started (pid ") == starts
            time.sleep(0.1)
        assert metric(r, "wsrelay_worker_restarts_total") == 1  # the SIGKILL, not the refusal
        layout.write_text(original)
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting", timeout=20)
        assert sorted(r.worker_pids()) == [0, 1]


SUPERVISOR_WITH_ANOTHER_LAYOUT = """\
import sys
from relay import shared_memory
from relay.cli import main
shared_memory.fingerprint = lambda: "v0-h8-s1-0000"  # as if the package changed right after it started
sys.exit(main(["run"]))
"""


def test_a_supervisor_whose_workers_cannot_join_exits_1_at_start(ws_origin):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_ORIGIN": ws_origin.addr, "RELAY_LISTEN": "127.0.0.1:0", "RELAY_WORKERS": "2",
                "RELAY_METRICS_LISTEN": ""})
    r = subprocess.run([sys.executable, "-c", SUPERVISOR_WITH_ANOTHER_LAYOUT], env=env, capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert f"cannot start: {LAYOUT_REFUSED}" in r.stderr
    assert r.stderr.count("started (pid") == 2, r.stderr  # no restart loop
