"""Settings: every ``RELAY_*`` variable of SPEC §3 as one typed, validated value.

Sources, later wins: defaults, the process environment, then ``--env-file``
(the file is what a reload re-reads, so it must be able to change anything).
A bad value never becomes a traceback: :func:`load` raises
:class:`ConfigError` holding one line per problem, each naming the variable,
the value and what is expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from relay.errors import ConfigError

PREFIX = "RELAY_"


class Address(msgspec.Struct, frozen=True):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    listen: tuple[Address, ...] = (Address("0.0.0.0", 8080),)
    origin: tuple[Address, ...] = ()
    ws_paths: tuple[str, ...] = ("/",)
    workers: int = 0
    max_clients: int = 10000
    max_clients_per_ip: int = 0
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    idle_timeout: float = 0.0
    drain_timeout: float = 30.0
    max_header_bytes: int = 16384
    allowed_origins: tuple[str, ...] = ()
    metrics_listen: Address | None = Address("127.0.0.1", 9108)
    mode: Literal["tunnel", "frames"] = "tunnel"
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    max_message_bytes: int = 0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    backlog: int = 4096
    forwarded_proto: Literal["http", "https"] = "http"

    def effective_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def to_json(self) -> bytes:
        return msgspec.json.encode(_jsonable(self))


def _jsonable(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in s.__struct_fields__:
        v = getattr(s, name)
        if isinstance(v, Address):
            v = str(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], Address):
            v = [str(a) for a in v]
        out[PREFIX + name.upper()] = v
    out["effective_workers"] = s.effective_workers()
    return out


class _Bad(ValueError):
    """Raised by a field parser with what was expected."""


# --- field parsers: str -> typed value, or _Bad("expected ...") ---------------


def _address(text: str, default_host: str | None = None) -> Address:
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Bad("expected host:port, e.g. [::]:8080")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            if default_host is None:
                raise _Bad("expected host:port, e.g. 0.0.0.0:8080")
            host, port = default_host, text
        if ":" in host:
            raise _Bad("expected an IPv6 host in brackets, e.g. [::1]:8080")
    if not host and default_host is None:
        raise _Bad("expected host:port with a host")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise _Bad("expected a port number 0-65535")
    return Address(host or default_host or "", int(port))


def _listen(text: str) -> tuple[Address, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise _Bad("expected at least one host:port")
    return tuple(_address(p) for p in parts)


def _origins(text: str) -> tuple[Address, ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for scheme in ("ws://", "http://"):
            if part.startswith(scheme):
                part = part[len(scheme):]
                break
        else:
            if "://" in part:
                raise _Bad("expected host:port, ws://host:port or http://host:port (TLS to the origin is not supported)")
        part = part.rstrip("/")
        if "/" in part:
            raise _Bad("expected an origin without a path")
        out.append(_address(part))
    if not out:
        raise _Bad("expected at least one origin host:port")
    return tuple(out)


def _paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths or any(not p.startswith("/") for p in paths):
        raise _Bad("expected comma-separated URL paths starting with /")
    return paths


def _allowed_origins(text: str) -> tuple[str, ...]:
    items = tuple(p.strip().lower().rstrip("/") for p in text.split(",") if p.strip())
    for item in items:
        if any(c.isspace() for c in item) or (item.count("*") and not (item == "*" or item.startswith("*."))):
            raise _Bad("expected origins like https://app.example.com, example.com or *.example.com")
    return items


# Integers end up in int64 slots of shared memory: keep them well inside.
_INT_MAX = 10 ** 15


def _int(lo: int, hi: int = _INT_MAX) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            v = None
        if v is None or v < lo or v > hi:
            raise _Bad(f"expected an integer >= {lo} and <= {hi}")
        return v

    return parse


def _seconds(lo: float, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            v = None
        if v is None or v != v or v in (float("inf"),) or v < 0 or (v == 0 and not allow_zero) or (0 < v < lo):
            what = "a number of seconds" + (" (0 = off)" if allow_zero else f" >= {lo}")
            raise _Bad(f"expected {what}")
        return v

    return parse


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise _Bad("expected 1 or 0")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in choices:
            raise _Bad("expected one of " + ", ".join(choices))
        return t

    return parse


def _metrics_listen(text: str) -> Address | None:
    return _address(text) if text.strip() else None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": _listen,
    "origin": _origins,
    "ws_paths": _paths,
    "workers": _int(0, 1024),
    "max_clients": _int(1),
    "max_clients_per_ip": _int(0),
    "handshake_timeout": _seconds(0.05, False),
    "connect_timeout": _seconds(0.05, False),
    "read_timeout": _seconds(0.05, False),
    "idle_timeout": _seconds(0.05, True),
    "drain_timeout": _seconds(0.0, True),
    "max_header_bytes": _int(1024, 1 << 20),
    "allowed_origins": _allowed_origins,
    "metrics_listen": _metrics_listen,
    "mode": _choice("tunnel", "frames"),
    "ping_interval": _seconds(0.05, True),
    "ping_timeout": _seconds(0.05, False),
    "max_message_bytes": _int(0),
    "log_level": _choice("debug", "info", "warning", "error"),
    "access_log": _bool,
    "backlog": _int(1, 1 << 20),
    "forwarded_proto": _choice("http", "https"),
}

assert set(_PARSERS) == set(Settings.__struct_fields__), "every setting needs a parser"

#: Every variable wsrelay reads, for docs and for the env-file drift test.
VARIABLES: tuple[str, ...] = tuple(PREFIX + name.upper() for name in Settings.__struct_fields__)


def read_env_file(path: str) -> dict[str, str]:
    """Parse ``KEY=value`` lines; ``#`` comments, blank lines, ``export`` and quotes allowed."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError([f"--env-file {path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"--env-file {path}: not UTF-8 text"]) from None
    out: dict[str, str] = {}
    problems = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            problems.append(f"--env-file {path}:{n}: expected KEY=value, got {raw.strip()!r}")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    if problems:
        raise ConfigError(problems)
    return out


def load(environ: Mapping[str, str] | None = None, env_file: str | None = None,
         require_origin: bool = True) -> Settings:
    """Build :class:`Settings` from the environment and an optional env file."""
    source = dict(os.environ if environ is None else environ)
    if env_file:
        source.update(read_env_file(env_file))
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, text in source.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):].lower()
        parser = _PARSERS.get(name)
        if parser is None:
            problems.append(f"{key}: unknown setting (known: see `wsrelay check` or the README)")
            continue
        try:
            values[name] = parser(text)
        except _Bad as e:
            problems.append(f"{key}={text!r}: {e}")
    if require_origin and "origin" not in values and not any(p.startswith(PREFIX + "ORIGIN") for p in problems):
        problems.append(f"{PREFIX}ORIGIN is not set: expected the origin server, e.g. 127.0.0.1:9000")
    if problems:
        raise ConfigError(problems)
    return Settings(**values)
