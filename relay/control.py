"""``wsrelay status``, ``wsrelay reload`` and ``wsrelay stop``: the running
relay seen and steered from the command line (README: "Seeing what runs").

- ``status`` reads ``/config`` from ``RELAY_METRICS_LISTEN`` and prints the
  version, pid, generation, workers, how the last reload ended and the
  effective settings (``--json``: /config as served).
- ``reload`` and ``stop`` signal the supervisor named by ``RELAY_PID_FILE``
  (outside systemd; under it, ``systemctl reload|stop wsrelay``): SIGHUP,
  then, when /config is reachable, the reload's outcome; SIGTERM, then
  waiting for the drain to end.

Both read only the setting they need from the environment and ``--env-file``,
so an env file edited since the start (even a broken one) does not stop them.
Exit codes: 0 done, 1 the reload was refused or the relay did not stop in
time, 2 a bad or missing setting, 3 no relay running (as LSB init scripts).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from relay.config import load_one
from relay.errors import ConfigError

NOT_RUNNING = 3


def _say(text: str, command: str) -> None:
    print(f"wsrelay {command}: {text}", file=sys.stderr)


def _loopback(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def fetch_config(env_file: str | None, timeout: float = 5.0) -> dict:
    """/config of the relay at RELAY_METRICS_LISTEN; ConfigError, or OSError if none answers."""
    addr = load_one("metrics_listen", env_file=env_file)
    if addr is None:
        raise ConfigError(["RELAY_METRICS_LISTEN is empty: status reads /config from the metrics listener"])
    url = f"http://{_loopback(addr.host)}:{addr.port}/config"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def _age(started: str) -> str:
    try:
        t = time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except (ValueError, TypeError):
        return "?"
    s = max(0, int(time.time() - t))
    return f"{s // 86400}d {s // 3600 % 24}h" if s >= 86400 else f"{s // 3600}h {s // 60 % 60}m" if s >= 3600 \
        else f"{s // 60}m {s % 60}s"


def describe(cfg: dict) -> str:
    """The human-readable status of a /config document."""
    gen = cfg["generation"]
    workers = cfg.get("workers", [])
    current = [w for w in workers if w["generation"] == gen and not w["draining"]]
    ready = sum(w["ready"] for w in current)
    draining = len(workers) - len(current)
    lines = [f"wsrelay {cfg['version']}: running, pid {cfg['pid']}, up {_age(cfg['started'])}, "
             f"generation {gen}{' (reload in progress)' if cfg.get('reloading') else ''}",
             f"workers: {ready} of {len(current)} accepting"
             + (f", {draining} of an older generation draining" if draining else ""),
             f"env file: {cfg.get('env_file') or '(none: environment only)'}"]
    last = cfg.get("last_reload")
    if last is None:
        lines.append("last reload: none since the start")
    elif last["result"] == "applied":
        lines.append(f"last reload: {last['time']} applied")
    else:
        lines.append(f"last reload: {last['time']} REFUSED, still serving the settings below:")
        lines += [f"  {p}" for p in last["problems"]]
    lines.append(f"settings (generation {gen}):")
    lines += [f"  {k}={_value(v)}" for k, v in cfg["settings"].items() if k.startswith("RELAY_")]
    return "\n".join(lines)


def _value(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "" if v is None else str(v)


def status(env_file: str | None, as_json: bool) -> int:
    try:
        cfg = fetch_config(env_file)
    except ConfigError as e:
        for line in e.lines:
            _say(line, "status")
        return 2
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        _say(f"no wsrelay answers on RELAY_METRICS_LISTEN ({reason}): not running?", "status")
        return NOT_RUNNING
    print(json.dumps(cfg, indent=2) if as_json else describe(cfg))
    return 0


def _supervisor(env_file: str | None, command: str) -> int | None:
    """The running supervisor's pid from RELAY_PID_FILE, or None (said why)."""
    from workers import pidfile

    try:
        path = load_one("pid_file", env_file=env_file)
    except ConfigError as e:
        for line in e.lines:
            _say(line, command)
        return None
    if not path:
        _say("RELAY_PID_FILE is not set: it names the relay to signal (under systemd: "
             f"systemctl {command} wsrelay)", command)
        return None
    pid = pidfile.read(path)
    if pid is None or not pidfile.is_supervisor(pid):
        _say(f"no wsrelay running: {path} " + ("does not exist" if not os.path.exists(path)
                                                else f"names no live wsrelay (pid {pid})"), command)
        return None
    return pid


def reload(env_file: str | None, timeout: float = 60.0) -> int:
    pid = _supervisor(env_file, "reload")
    if pid is None:
        return NOT_RUNNING
    try:
        before = fetch_config(env_file, timeout=2).get("last_reload")
    except (ConfigError, OSError, ValueError):
        before = False  # no /config: we cannot tell how it ends
    os.kill(pid, signal.SIGHUP)
    print(f"wsrelay reload: sent SIGHUP to pid {pid}")
    if before is False:
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            last = fetch_config(env_file, timeout=2).get("last_reload")
        except (ConfigError, OSError, ValueError):
            continue
        if last and (before is None or last["count"] != before["count"]):
            if last["result"] == "applied":
                print("wsrelay reload: applied: a new generation accepts, the old one drains")
                return 0
            for p in last["problems"]:
                _say(f"refused, still serving the running settings: {p}", "reload")
            return 1
    _say(f"no outcome within {timeout:g}s: see `wsrelay status`", "reload")
    return 1


def stop(env_file: str | None) -> int:
    pid = _supervisor(env_file, "stop")
    if pid is None:
        return NOT_RUNNING
    try:
        drain = load_one("drain_timeout", env_file=env_file)
    except ConfigError:
        drain = 30.0
    os.kill(pid, signal.SIGTERM)
    print(f"wsrelay stop: sent SIGTERM to pid {pid}: draining (up to {drain:g}s)")
    from workers import pidfile

    deadline = time.monotonic() + drain + 10
    while time.monotonic() < deadline:
        if not pidfile.is_supervisor(pid):
            print("wsrelay stop: stopped")
            return 0
        time.sleep(0.1)
    _say(f"pid {pid} still runs after {drain + 10:g}s", "stop")
    return 1
