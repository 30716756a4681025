"""The command line as an operator uses it: check, bad settings, --version, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from relay.config import VARIABLES, load
from relay.errors import ConfigError
from tests.helpers import ROOT, wait_for


def wsrelay(*args, env=None, timeout=20):
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "relay", *args], env=e, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_version():
    out = wsrelay("--version")
    assert out.returncode == 0 and re.match(r"wsrelay \d+\.\d+", out.stdout)


def test_check_prints_effective_settings_as_json():
    out = wsrelay("check", env={"RELAY_ORIGIN": "ws://127.0.0.1:9000", "RELAY_WORKERS": "3"})
    assert out.returncode == 0, out.stderr
    settings = json.loads(out.stdout)
    assert settings["RELAY_ORIGIN"] == ["127.0.0.1:9000"]
    assert settings["RELAY_WORKERS"] == 3
    assert settings["RELAY_MAX_CLIENTS"] == 10000
    assert settings["RELAY_READ_TIMEOUT"] == 300
    assert set(VARIABLES) <= set(settings)


@pytest.mark.parametrize("var,value,expect", [
    ("RELAY_WORKERS", "many", "expected an integer"),
    ("RELAY_MAX_CLIENTS", "0", "expected an integer >= 1"),
    ("RELAY_LISTEN", "8080x", "expected"),
    ("RELAY_ORIGIN", "https://x:1", "TLS to the origin is not supported"),
    ("RELAY_HANDSHAKE_TIMEOUT", "-1", "seconds"),
    ("RELAY_MODE", "turbo", "tunnel, frames"),
    ("RELAY_ACCESS_LOG", "maybe", "expected 1 or 0"),
    ("RELAY_WS_PATHS", "ws", "starting with /"),
    ("RELAY_BOGUS", "1", "unknown setting"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_setting_is_one_clear_line_and_exit_2(command, var, value, expect):
    env = {"RELAY_ORIGIN": "127.0.0.1:9000", var: value}
    out = wsrelay(command, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert var in lines[0] and expect in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_missing_origin_is_reported():
    out = wsrelay("check")
    assert out.returncode == 2 and "RELAY_ORIGIN" in out.stderr


def test_env_file_overrides_environment(tmp_path):
    f = tmp_path / "wsrelay.env"
    f.write_text("# comment\nRELAY_ORIGIN=127.0.0.1:9001\nexport RELAY_WORKERS=4\nRELAY_WS_PATHS=\"/ws,/live\"\n")
    out = wsrelay("check", "--env-file", str(f), env={"RELAY_WORKERS": "1"})
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["RELAY_WORKERS"] == 4 and s["RELAY_WS_PATHS"] == ["/ws", "/live"]


def test_env_file_problems_name_the_line(tmp_path):
    f = tmp_path / "bad.env"
    f.write_text("RELAY_ORIGIN=127.0.0.1:9001\nthis is not a setting\n")
    out = wsrelay("check", "--env-file", str(f))
    assert out.returncode == 2 and f"{f}:2" in out.stderr
    out = wsrelay("check", "--env-file", str(tmp_path / "missing.env"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_several_problems_one_line_each():
    with pytest.raises(ConfigError) as e:
        load({"RELAY_ORIGIN": "x", "RELAY_WORKERS": "-1", "RELAY_IDLE_TIMEOUT": "soon"})
    assert len(e.value.lines) == 3


def test_listen_port_in_use_is_a_clear_error():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    out = wsrelay("run", env={"RELAY_ORIGIN": "127.0.0.1:9", "RELAY_LISTEN": f"127.0.0.1:{port}",
                              "RELAY_METRICS_LISTEN": ""})
    s.close()
    assert out.returncode == 2 and "RELAY_LISTEN" in out.stderr and "Traceback" not in out.stderr


def test_demo_as_a_user_runs_it():
    """`wsrelay demo`: prints the URL, proves a round trip, exits 0 on Ctrl-C."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    p = subprocess.Popen([sys.executable, "-m", "relay", "demo", "--port", "0"], env=e, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    import threading
    threading.Thread(target=lambda: [lines.append(x) for x in iter(p.stdout.readline, "")], daemon=True).start()
    try:
        wait_for(lambda: any("round trip OK" in x for x in lines) or p.poll() is not None, 30, what="demo")
        text = "".join(lines)
        assert "round trip OK" in text, text
        url = re.search(r"relay on (ws://127\.0\.0\.1:\d+/)", text).group(1)
        from tests.test_tunnel import run
        from websockets.asyncio.client import connect

        async def echo():
            async with connect(url) as ws:
                await ws.send("user message")
                return await ws.recv()
        assert run(echo()) == "user message"
        # the demo origin also serves the page with the long-polling fallback (tests/test_browser.py)
        import urllib.request
        with urllib.request.urlopen(url.replace("ws://", "http://"), timeout=10) as resp:
            page = resp.read()
        assert resp.status == 200 and b"new WebSocket" in page and b"/lp/poll" in page
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(30)
    assert code == 0
