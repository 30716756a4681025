"""What the running relay tells its operator (README: "Seeing what runs"):
/config and ``wsrelay status``, RELAY_PID_FILE with ``wsrelay reload|stop``,
process titles, and log lines fit for the journal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from relay import __version__, config
from tests.support.relay import ROOT, Relay, wait_for


def wsrelay(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "relay", *args], env=e, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def get_config(r: Relay) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/config", timeout=5) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.load(resp)


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_config_and_status_show_what_runs_after_a_refused_reload(ws_origin, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WS_PATHS=/ws\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        cfg = get_config(r)
        assert cfg["version"] == __version__ and cfg["pid"] == r.proc.pid
        assert cfg["generation"] == 0 and cfg["last_reload"] is None and cfg["env_file"] == str(env_file)
        assert cfg["settings"]["RELAY_WS_PATHS"] == ["/ws"]
        assert [w["ready"] for w in cfg["workers"]] == [True]
        status_env = {"RELAY_METRICS_LISTEN": f"127.0.0.1:{r.metrics_port}"}

        # A refused reload: the old settings keep running, and both say so.
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WS_PATHS=/live  # new app\n")
        r.signal(signal.SIGHUP)
        wait_for(lambda: get_config(r)["last_reload"], 10, what="the reload's outcome in /config")
        cfg = get_config(r)
        assert cfg["generation"] == 0 and cfg["settings"]["RELAY_WS_PATHS"] == ["/ws"]
        assert cfg["last_reload"]["result"] == "refused"
        assert cfg["last_reload"]["problems"][0].startswith('RELAY_WS_PATHS: "/live  # new app" contains whitespace')
        out = wsrelay("status", env=status_env)
        assert out.returncode == 0, out.stderr
        assert f"wsrelay {__version__}: running, pid {r.proc.pid}," in out.stdout
        assert "REFUSED, still serving the settings below:" in out.stdout
        assert '  RELAY_WS_PATHS: "/live  # new app" contains whitespace' in out.stdout
        assert "\n  RELAY_WS_PATHS=/ws\n" in out.stdout

        # An applied one.
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WS_PATHS=/live\n")
        r.signal(signal.SIGHUP)
        wait_for(lambda: (get_config(r)["last_reload"] or {}).get("count") == 2, 20, what="second reload")
        cfg = get_config(r)
        assert cfg["generation"] == 1 and cfg["last_reload"]["result"] == "applied"
        assert cfg["settings"]["RELAY_WS_PATHS"] == ["/live"]
        out = wsrelay("status", "--json", env=status_env)
        assert json.loads(out.stdout)["settings"]["RELAY_WS_PATHS"] == ["/live"]
    # Nothing runs there any more: exit 3, one line.
    out = wsrelay("status", env=status_env)
    assert out.returncode == 3 and out.stdout == ""
    assert out.stderr.startswith("wsrelay status: no wsrelay answers on RELAY_METRICS_LISTEN")


def test_secret_settings_are_redacted(monkeypatch):
    """No setting is secret yet; one marked so never shows in check or /config."""
    s = config.load({"RELAY_ORIGIN": "10.0.0.5:9000"})
    assert s.to_dict()["RELAY_ORIGIN"] == ["10.0.0.5:9000"]
    monkeypatch.setattr(config, "SECRETS", frozenset({"origin"}))
    assert s.to_dict()["RELAY_ORIGIN"] == config.REDACTED
    assert b"10.0.0.5" not in s.to_json()


def test_pid_file_reload_and_stop(ws_origin, tmp_path):
    pid_file = tmp_path / "wsrelay.pid"
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_PID_FILE={pid_file}\n")
    ctl = {"RELAY_METRICS_LISTEN": "", "RELAY_PID_FILE": str(pid_file)}
    # A stale file (a live pid that is not a wsrelay: this test) is replaced.
    pid_file.write_text(f"{os.getpid()}\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        assert pid_file.read_text() == f"{r.proc.pid}\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
        # A second relay with the same pid file refuses to start, whatever its address.
        second = wsrelay("run", "--env-file", str(env_file),
                         env={"RELAY_LISTEN": "127.0.0.1:0", "RELAY_METRICS_LISTEN": ""}, timeout=20)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"wsrelay: RELAY_PID_FILE: {pid_file} names a running wsrelay (pid {r.proc.pid}): "
            f"stop it first (wsrelay stop) or use another pid file"]
        assert pid_file.read_text() == f"{r.proc.pid}\n"

        # wsrelay reload: the outcome, read from /config at the metrics address.
        ctl["RELAY_METRICS_LISTEN"] = f"127.0.0.1:{r.metrics_port}"
        env_file.write_text(env_file.read_text() + "RELAY_MODE=turbo\n")
        out = wsrelay("reload", "--env-file", str(env_file), env=ctl)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"sent SIGHUP to pid {r.proc.pid}" in out.stdout
        assert 'refused, still serving the running settings: RELAY_MODE: "turbo": expected' in out.stderr
        env_file.write_text(env_file.read_text().replace("turbo", "frames"))
        out = wsrelay("reload", "--env-file", str(env_file), env=ctl)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "applied" in out.stdout
        assert get_config(r)["settings"]["RELAY_MODE"] == "frames"

        out = wsrelay("stop", "--env-file", str(env_file), env=ctl)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip().endswith("stopped")
        assert r.proc.wait(10) == 0
    assert not pid_file.exists()
    out = wsrelay("stop", env=ctl)
    assert out.returncode == 3 and "no wsrelay running" in out.stderr


def test_reload_without_a_pid_file_says_what_to_do():
    out = wsrelay("reload")
    assert out.returncode == 3
    assert "RELAY_PID_FILE is not set" in out.stderr and "systemctl reload wsrelay" in out.stderr


def test_process_titles(ws_origin, tmp_path):
    """ps showed `python3 -B -P -m workers.child`."""
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\n")
    with Relay(None, workers=2, args=("--env-file", str(env_file))) as r:
        assert cmdline(r.proc.pid) == "wsrelay: supervisor"
        wait_for(lambda: len(r.worker_pids()) == 2, 10, what="2 workers")
        titles = sorted(cmdline(pid) for pid in r.worker_pids().values())
        assert titles == ["wsrelay: worker 0 (generation 0)", "wsrelay: worker 1 (generation 0)"]
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting", timeout=20)
        wait_for(lambda: sorted(cmdline(p) for p in r.worker_pids().values())
                 == ["wsrelay: worker 0 (generation 1)", "wsrelay: worker 1 (generation 1)"], 20,
                 what="generation 1 titles")


LOG_LINE = re.compile(r"^<(\d)>wsrelay\[\d+\] (DEBUG|INFO|WARNING|ERROR) ")


@pytest.mark.parametrize("journal", [True, False])
def test_no_timestamp_of_ours_on_the_journal(ws_origin, tmp_path, journal):
    """systemd.exec(5): JOURNAL_STREAM names stderr's device:inode when it is the
    journal, which stamps each line itself: ours would be a second timestamp."""
    log = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_ORIGIN=ws_origin.addr, RELAY_LISTEN="127.0.0.1:0", RELAY_METRICS_LISTEN="",
               RELAY_WORKERS="1", RELAY_WS_PATHS="/ws")
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
        p = subprocess.Popen([sys.executable, "-m", "relay", "run"], env=env, cwd=ROOT, stderr=f,
                             stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: "ready:" in log.read_text(), 20, what="ready")
        p.send_signal(signal.SIGHUP)  # with RELAY_WS_PATHS unchanged: a reload, logged by every process
        wait_for(lambda: "reload: generation 1" in log.read_text(), 20, what="reload")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    lines = log.read_text().splitlines()
    assert len(lines) > 5
    if journal:
        assert all(LOG_LINE.match(line) for line in lines), lines
        assert any(line.startswith("<6>") and "running wsrelay" in line for line in lines)  # a worker's line
        assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)
    else:
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} wsrelay\[", line) for line in lines), lines
