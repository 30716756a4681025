"""The command line as an operator uses it: check, bad settings, --version, demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from relay.config import VARIABLES, load
from relay.errors import ConfigError
from tests.support.relay import ROOT, Demo, wait_for


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
    f.write_text("# comment\nRELAY_ORIGIN=127.0.0.1:9001\nRELAY_WORKERS=4\nRELAY_WS_PATHS=\"/ws,/live\"\n")
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


def test_check_reports_every_problem_one_line_each(tmp_path):
    """The old check stopped at the env file's first problem."""
    f = tmp_path / "bad.env"
    f.write_text("RELAY_WS_PATHS=/ws  # only the app socket\nnot a setting\nexport RELAY_MODE=frames\n"
                 "RELAY_WORKERS=many\nRELAY_ORIGIN='127.0.0.1:9001 # primary'\n")
    out = wsrelay("check", "--env-file", str(f))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 5, out.stderr
    assert all(line.startswith("wsrelay: ") for line in lines)
    text = out.stderr
    assert f"{f}:2: expected KEY=value" in text and f"{f}:3: `export`" in text
    assert 'RELAY_WS_PATHS: "/ws  # only the app socket" contains whitespace — an inline comment? ' \
           'Comments must start the line' in text
    assert 'RELAY_ORIGIN: "127.0.0.1:9001 # primary" contains whitespace — an inline comment?' in text
    assert 'RELAY_WORKERS: "many": expected an integer' in text


def test_unknown_variable_points_somewhere_that_works():
    """The old message said "see `wsrelay check`", which refuses to run while it is set."""
    out = wsrelay("check", env={"RELAY_ORIGIN": "127.0.0.1:9000", "RELAY_WS_PATH": "/ws"})
    assert out.returncode == 2
    assert "wsrelay check" not in out.stderr
    assert "did you mean RELAY_WS_PATHS?" in out.stderr and "README" in out.stderr


def test_check_json_is_indented_on_a_terminal():
    import pty

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_ORIGIN="127.0.0.1:9000", RELAY_LISTEN="127.0.0.1:0", RELAY_METRICS_LISTEN="")
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "relay", "check"], env=env, cwd=ROOT, stdout=slave,
                             stderr=subprocess.PIPE)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(20) == 0
    finally:
        os.close(master)
    text = out.decode().replace("\r\n", "\n")
    assert text.startswith("{\n  \"RELAY_LISTEN\": [")
    assert json.loads(text)["RELAY_ORIGIN"] == ["127.0.0.1:9000"]
    # Not a terminal: one line, for scripts.
    out = wsrelay("check", env={"RELAY_ORIGIN": "127.0.0.1:9000"})
    assert out.stdout.count("\n") == 1


def test_check_says_when_a_listen_address_is_taken():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = wsrelay("check", env={"RELAY_ORIGIN": "127.0.0.1:9000", "RELAY_LISTEN": f"127.0.0.1:{port}",
                                    "RELAY_METRICS_LISTEN": ""})
        # check probed without keeping anything: the holder still listens alone
        taken.settimeout(5)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = taken.accept()
            conn.close()
    assert out.returncode == 0, out.stderr  # the running relay about to be reloaded holds it: fine
    assert json.loads(out.stdout)["RELAY_LISTEN"] == [f"127.0.0.1:{port}"]
    line = out.stderr.strip()
    assert line.startswith(f"wsrelay: note: RELAY_LISTEN: 127.0.0.1:{port} is already in use by pid {os.getpid()} ")
    assert "\n" not in line
    # A free address: no note.
    out = wsrelay("check", env={"RELAY_ORIGIN": "127.0.0.1:9000", "RELAY_LISTEN": "127.0.0.1:0",
                                "RELAY_METRICS_LISTEN": ""})
    assert out.returncode == 0 and out.stderr == ""


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
    from websockets.asyncio.client import connect

    from tests.support.relay import run

    with Demo("--port", "0") as demo:
        demo.wait_ready()
        text = demo.text()
        assert "round trip OK" in text, text
        url = demo.url("ws")
        assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/", url)

        async def echo():
            async with connect(url) as ws:
                await ws.send("user message")
                return await ws.recv()
        assert run(echo()) == "user message"
        # the demo origin also serves the page with the polling fallback (tests/system/relay/test_browser.py)
        import urllib.request
        with urllib.request.urlopen(demo.url("page"), timeout=10) as resp:
            page = resp.read()
        assert resp.status == 200 and b"new WebSocket" in page and b"/poll/recv" in page
        code = demo.stop()
    assert code == 0


def test_demo_honours_the_settings_run_reads(tmp_path):
    """The demo built its settings in code and read no RELAY_* variable: with
    RELAY_WS_PATHS=/elsewhere it still allowed upgrades on /ws."""
    from tests.support.net import raw_exchange, status_of, upgrade_request

    env_file = tmp_path / "demo.env"
    env_file.write_text("RELAY_MODE=frames\n")
    with Demo("--port", "0", "--env-file", str(env_file),
              env={"RELAY_WS_PATHS": "/elsewhere", "RELAY_WORKERS": "1", "RELAY_ORIGIN": "10.0.0.5:9000"}) as demo:
        demo.wait_ready()
        text = demo.text()
        port = int(re.search(r"relay on ws://127\.0\.0\.1:(\d+)/elsewhere ", text).group(1))
        assert "RELAY_ORIGIN ignored" in text
        assert ", 1 workers," in text and "mode frames" in text
        assert "it will fall back to polling" in text
        assert status_of(raw_exchange(port, upgrade_request("/ws"))) == 403
    with Demo("--port", "0", env={"RELAY_WORKERS": "many", "RELAY_WS_PATHS": "ws"}) as demo:
        assert demo.proc.wait(20) == 2
        wait_for(lambda: len(demo.lines) >= 2, 5, what="two lines")
    assert len(demo.lines) == 2, demo.text()
    assert demo.lines[0].startswith('wsrelay: RELAY_WORKERS: "many": expected an integer')
    assert demo.lines[1].startswith('wsrelay: RELAY_WS_PATHS: "ws": expected')


def readme_demo_session() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    quick = text.split("## Quick start", 1)[1]
    block = re.search(r"```\n(\d{4}-.*?)```", quick, re.S).group(1)
    return block.replace("^C", "").splitlines()


def test_readme_demo_session_is_real_output():
    """Every line `wsrelay demo` prints, through Ctrl-C, is in the README's
    session and the other way round (timestamps, pids and ports aside; the
    order of the workers' own lines varies)."""
    def norm(lines: list[str]) -> list[str]:
        return sorted(re.sub(r"\d+", "N", line) for line in lines if line.strip())

    with Demo("--port", "0") as demo:
        demo.wait_ready()
        assert demo.stop() == 0
        wait_for(lambda: "wsrelay stopped" in demo.text(), 5, what="the last line")
    assert norm(demo.lines) == norm(readme_demo_session())


ROUTED = {"RELAY_ORIGIN": "10.0.0.5:9000", "RELAY_POOL_CHAT": "10.0.1.1:9000, 10.0.1.2:9000",
          "RELAY_POOL_API": "10.0.3.1:8000", "RELAY_POOL_API_WEBSOCKET": "0",
          "RELAY_ROUTES": "\n  /chat = chat\n  /api  = api\n  admin.example.com/ = api\n"}


def test_check_prints_the_route_table():
    out = wsrelay("check", env=ROUTED)
    assert out.returncode == 0, out.stderr
    settings = json.loads(out.stdout)
    assert [(r["host"], r["path"], r["pool"]) for r in settings["effective_routes"]] == [
        ("admin.example.com", "/", "api"), ("*", "/chat", "chat"), ("*", "/api", "api"),
        ("*", "(anything else)", "default")]
    assert settings["effective_pools"]["chat"]["origins"] == ["10.0.1.1:9000", "10.0.1.2:9000"]
    assert settings["RELAY_POOL_API_WEBSOCKET"] is False


def test_check_on_a_terminal_shows_the_route_table_to_a_person():
    import pty

    leader, follower = pty.openpty()
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(ROUTED)
    proc = subprocess.run([sys.executable, "-m", "relay", "check"], env=e, stdout=follower,
                          stderr=subprocess.PIPE, timeout=20, cwd=ROOT)
    os.close(follower)
    text = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        text += chunk
    os.close(leader)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(text.decode())["RELAY_ROUTES"]  # stdout stays JSON
    lines = proc.stderr.decode().split("routes, in the order a request tries them")[1].splitlines()
    assert [line.split()[:3] for line in lines[1:6]] == [
        ["HOST", "PATH", "POOL"], ["admin.example.com", "/", "api"], ["*", "/chat", "chat"],
        ["*", "/api", "api"], ["*", "(anything", "else)"]]


def test_check_refuses_a_route_to_a_pool_that_does_not_exist():
    out = wsrelay("check", env={**ROUTED, "RELAY_ROUTES": "/chat = caht"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "wsrelay: RELAY_ROUTES: '/chat = caht': no pool named caht (did you mean chat? define it with "
        "RELAY_POOL_CAHT=host:port,...)"]


def test_a_reader_that_goes_away_gets_no_traceback():
    """``wsrelay check | head -c 100``: the reader leaves before the output is
    written; the command ends quietly (exit 1, as Python's docs advise for
    SIGPIPE), with nothing on stderr but what it had to say anyway."""
    r, w = os.pipe()
    os.close(r)  # the reader has gone: every write is EPIPE
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    e.update(RELAY_ORIGIN="127.0.0.1:9000", RELAY_LISTEN="127.0.0.1:0")
    try:
        out = subprocess.run([sys.executable, "-m", "relay", "check"], env=e, stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=20, cwd=ROOT)
    finally:
        os.close(w)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 1
