"""The env file reads as systemd's EnvironmentFile= reads it (relay/envfile.py).

The reference is systemd itself: ``load_env_file()`` in the installed
libsystemd-shared, the function PID 1 calls for EnvironmentFile=, through
ctypes. Any file our parser accepts must give the same variables as systemd
(after PID 1 drops assignments whose name is invalid, as it does).
"""

from __future__ import annotations

import ctypes
import glob
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import envfile
from relay.config import load
from relay.errors import ConfigError

_LIB = sorted(glob.glob("/usr/lib/*/systemd/libsystemd-shared-*.so") + glob.glob("/lib/*/systemd/libsystemd-shared-*.so"))


def _systemd():
    if not _LIB:
        return None
    lib = ctypes.CDLL(_LIB[-1])
    f = lib.load_env_file
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_char_p))]
    f.restype = ctypes.c_int
    return f


LOAD_ENV_FILE = _systemd()
needs_systemd = pytest.mark.skipif(LOAD_ENV_FILE is None, reason="libsystemd-shared missing (apt-get install systemd)")


def systemd_reads(text: str) -> dict[str, str]:
    """What systemd's EnvironmentFile= puts in the environment for this file."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(text.encode())
        f.flush()
        ret = ctypes.POINTER(ctypes.c_char_p)()
        assert LOAD_ENV_FILE(None, f.name.encode(), ctypes.byref(ret)) >= 0
        out = {}
        i = 0
        while ret and ret[i]:
            key, _, value = ret[i].decode().partition("=")
            if envfile._NAME.match(key):  # PID 1 drops the others (strv_env_clean_with_callback)
                out[key] = value
            i += 1
        return out


def we_read(text: str) -> tuple[dict[str, str], list[str]]:
    assignments, problems = envfile.parse(text)
    return {a.key: a.value for a in assignments}, problems


CASES = [
    "A=1\n",
    "A=/ws  # only the app socket\n",
    "  A = spaced value  \n",
    "A='single # quoted'\n",
    'A="double \\" \\\\ \\$ \\x"\n',
    "A=\"a\" b\n",
    "A='multi\nline'\n",
    "A=continued\\\nline\n",
    "A=1\r\nB=2\r\n",
    "# comment\n; comment too\nA=1\n",
    "A=1\nA=2\n",
    "A=\n",
    "A=1",
    "A=trailing\\ \n",
]


@needs_systemd
@pytest.mark.parametrize("text", CASES)
def test_same_values_as_systemd(text):
    ours, problems = we_read(text)
    assert problems == []
    assert ours == systemd_reads(text)


@needs_systemd
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="AB_=#; \t\n\r'\"\\$`x/", max_size=40))
def test_any_file_we_accept_systemd_reads_alike(text):
    ours, problems = we_read(text)
    if not problems:
        assert ours == systemd_reads(text)


@needs_systemd
@pytest.mark.parametrize("text,problem", [
    ("export A=1\n", "`export` is not part of the syntax"),
    ("A\n", "expected KEY=value"),
    ("1A=x\n", "not a variable name"),
    ("A='never closed\n", "quote is never closed"),
    ("# a comment \\\nA=1\n", "comment ending in a backslash"),
])
def test_what_systemd_would_drop_is_refused(text, problem):
    """Lines systemd silently ignores (or reads differently across versions)
    are problems for us, never a different value."""
    _, problems = we_read(text)
    assert len(problems) == 1 and problem in problems[0], problems
    assert problems[0].startswith("line ")


def write(tmp_path, text: str) -> str:
    p = tmp_path / "wsrelay.env"
    p.write_text(text)
    return str(p)


def test_inline_comment_is_named(tmp_path):
    """The path would have been "/ws  # only the app socket" (and every
    upgrade to /ws a 403): refused, naming the likely cause."""
    path = write(tmp_path, "RELAY_ORIGIN=127.0.0.1:9001\nRELAY_WS_PATHS=/ws  # only the app socket\n")
    with pytest.raises(ConfigError) as e:
        load({}, env_file=path)
    assert e.value.lines == ['RELAY_WS_PATHS: "/ws  # only the app socket" contains whitespace — an inline comment? '
                             'Comments must start the line']


@pytest.mark.parametrize("var,value", [
    ("RELAY_ORIGIN", "127.0.0.1:9001 # primary"),
    ("RELAY_LISTEN", "0.0.0.0:80 # public"),
    ("RELAY_WORKERS", "4 # one per core"),
    ("RELAY_ALLOWED_ORIGINS", "https://app.example.com # prod"),
    ("RELAY_MODE", "frames # for pings"),
    ("RELAY_METRICS_LISTEN", "127.0.0.1:9108 # local"),
])
def test_every_setting_names_an_inline_comment(tmp_path, var, value):
    path = write(tmp_path, f"RELAY_ORIGIN=127.0.0.1:9001\n{var}={value}\n")
    with pytest.raises(ConfigError) as e:
        load({}, env_file=path)
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith(f'{var}: "{value}" contains whitespace — an inline comment?')


@pytest.mark.parametrize("var,value", [
    ("RELAY_WS_PATHS", "/ws, /live x"),
    ("RELAY_LISTEN", "127.0.0.1 :80"),
    ("RELAY_ORIGIN", "10.0.0.5: 9000"),
])
def test_no_whitespace_inside_paths_or_addresses(var, value):
    env = {"RELAY_ORIGIN": "127.0.0.1:9001", var: value}
    with pytest.raises(ConfigError) as e:
        load(env)
    assert e.value.lines == [f'{var}: "{value}" contains whitespace (list items are separated by commas)']


def test_blanks_around_commas_are_fine():
    s = load({"RELAY_ORIGIN": "10.0.0.5:9000, 10.0.0.6:9000", "RELAY_WS_PATHS": "/ws, /live"})
    assert [str(a) for a in s.origin] == ["10.0.0.5:9000", "10.0.0.6:9000"]
    assert s.ws_paths == ("/ws", "/live")


def test_comment_at_line_start_and_quotes_work(tmp_path):
    path = write(tmp_path, "# the app socket only\nRELAY_ORIGIN='127.0.0.1:9001'\n  ; note\nRELAY_WS_PATHS=\"/ws\"\n")
    s = load({}, env_file=path)
    assert s.ws_paths == ("/ws",) and str(s.origin[0]) == "127.0.0.1:9001"


def test_every_problem_of_the_file_and_its_values_at_once(tmp_path):
    path = write(tmp_path, "export RELAY_WORKERS=2\nnot a setting\nRELAY_MODE=turbo\nRELAY_WS_PATH=/ws\n")
    with pytest.raises(ConfigError) as e:
        load({}, env_file=path)
    lines = e.value.lines
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"--env-file {path}:1: `export`")
    assert lines[1].startswith(f"--env-file {path}:2: expected KEY=value")
    assert any(x.startswith('RELAY_MODE: "turbo": expected one of tunnel, frames') for x in lines)
    assert any(x.startswith("RELAY_WS_PATH: unknown setting (did you mean RELAY_WS_PATHS?") for x in lines)
    assert any(x.startswith("RELAY_ORIGIN is not set") for x in lines)


def test_origin_error_gives_an_origin_example():
    with pytest.raises(ConfigError) as e:
        load({"RELAY_ORIGIN": "backend"})
    assert e.value.lines == ['RELAY_ORIGIN: "backend": expected host:port, e.g. 10.0.0.5:9000']


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.env"
    p.write_bytes(b"RELAY_ORIGIN=caf\xe9:1\n")
    with pytest.raises(ConfigError) as e:
        load({}, env_file=str(p))
    assert e.value.lines == [f"--env-file {p}: not UTF-8 text"]


def test_shipped_env_file_reads_alike_in_systemd():
    from tests.support.relay import ROOT

    text = open(os.path.join(ROOT, "deploy", "wsrelay.env")).read()
    ours, problems = we_read(text)
    assert problems == []
    if LOAD_ENV_FILE is not None:
        assert ours == systemd_reads(text)
