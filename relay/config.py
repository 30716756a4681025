"""Settings: every ``RELAY_*`` variable of the README's "Settings" table as
one typed, validated value.

Sources, later wins: defaults, the process environment, then ``--env-file``
(the file is what a reload re-reads, so it must be able to change anything;
its syntax is systemd's ``EnvironmentFile=``, :mod:`relay.envfile`). A bad
value never becomes a traceback: :func:`load` raises :class:`ConfigError`
holding one line per problem — every problem of the file and of the values
at once — each naming the variable, the value and what is expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from relay import envfile, pools
from relay.errors import ConfigError

PREFIX = "RELAY_"


class Address(msgspec.Struct, frozen=True):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Route(msgspec.Struct, frozen=True):
    """One entry of ``RELAY_ROUTES`` (README, "Routes and origins"): requests
    whose Host is ``host`` (``""``: any, ``*.example.com``: its subdomains)
    and whose path starts with ``path`` on whole segments go to ``pool``."""

    host: str
    path: str
    pool: str

    def __str__(self) -> str:
        return f"{self.host}{self.path} = {self.pool}"


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A named origin pool (``RELAY_POOL_<NAME>``) with every setting resolved:
    its own ``RELAY_POOL_<NAME>_<SETTING>`` where set, else the global one."""

    name: str
    origins: tuple[Address, ...]
    websocket: bool = True
    allowed_origins: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    balance: str = "least_conn"
    max_conns: int = 0
    max_fails: int = 3
    fail_timeout: float = 10.0
    slowstart: float = 10.0
    health_check_path: str = ""
    health_check_interval: float = 5.0
    health_check_timeout: float = 2.0
    health_check_rise: int = 2
    health_check_fall: int = 3


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
    pid_file: str = ""
    data_plane: Literal["auto", "native", "python"] = "auto"
    tls_listen: tuple[Address, ...] = ()
    tls_cert: tuple[str, ...] = ()
    tls_key: tuple[str, ...] = ()
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    tls_ticket_keys: str = ""
    tls_strict_sni: bool = False
    tls_client_ca: str = ""
    tls_client_verify: Literal["required", "optional"] = "required"
    tls_client_header: str = "X-SSL-Client-S-DN"
    routes: tuple[Route, ...] = ()
    balance: str = "least_conn"
    max_conns: int = 0
    max_fails: int = 3
    fail_timeout: float = 10.0
    slowstart: float = 10.0
    health_check_path: str = ""
    health_check_interval: float = 5.0
    health_check_timeout: float = 2.0
    health_check_rise: int = 2
    health_check_fall: int = 3
    # A fleet: one client limit across hosts, leased from Redis (README, "A fleet").
    cluster_redis: str = ""
    cluster_limit: int = 0
    cluster_name: str = "wsrelay"
    cluster_block: int = 64
    cluster_lease_ttl: float = 10.0
    cluster_fallback: Literal["hold", "local", "closed"] = "hold"
    cluster_local_limit: int = 0
    proxy_protocol: Literal["off", "on"] = "off"
    trusted_proxies: tuple[str, ...] = ()
    per_ip_v6_prefix: int = 64
    origin_proxy_protocol: Literal["off", "v2"] = "off"
    #: the named pools, resolved (RELAY_POOL_<NAME>[_<SETTING>]); not a variable of its own
    pools: tuple[PoolSettings, ...] = ()

    def effective_data_plane(self) -> str:
        """What serves tunnels: "native" or "python" (relay/native)."""
        from relay import native

        return native.resolve(self.data_plane, self.mode)

    def effective_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def default_pool(self) -> PoolSettings | None:
        """RELAY_ORIGIN as a pool with the global settings; None when it is not set."""
        if not self.origin:
            return None
        return PoolSettings(name=pools.DEFAULT, origins=self.origin,
                            **{n: getattr(self, n) for n in pools.POOL_SETTINGS if n != "websocket"})

    def to_dict(self) -> dict[str, Any]:
        """``{"RELAY_X": value, ..., "effective_workers": n, "effective_routes":
        [...], "effective_pools": {...}}``, the fields in :data:`SECRETS`
        replaced by :data:`REDACTED` when set: what ``wsrelay check`` prints
        and ``/config`` serves."""
        out: dict[str, Any] = {}
        for name in self.__struct_fields__:
            if name not in DERIVED:
                out[PREFIX + name.upper()] = _shown(name, getattr(self, name))
        out.update(pools.variables(self, _shown))
        out["effective_workers"] = self.effective_workers()
        out["effective_data_plane"] = self.effective_data_plane()
        if self.effective_data_plane() != self.data_plane and self.data_plane != "python" and self.mode == "tunnel":
            from relay import native

            out["native_unavailable"] = native.WHY_NOT
        if self.effective_data_plane() == "native":
            from relay import native

            fast = native.fast_path_status(self)  # README "The fast path"
            if fast is not None:
                out["effective_fast_path"] = fast
        out["effective_routes"] = [r.to_dict(_shown) for r in pools.table(self)]
        out["effective_pools"] = {p.name: pools.describe(p, _shown) for p in pools.effective(self)}
        return out

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_dict())


def _shown(name: str, v: Any) -> Any:
    """A setting's value as ``wsrelay check`` and ``/config`` show it."""
    if isinstance(v, Address):
        v = str(v)
    elif isinstance(v, tuple) and v and isinstance(v[0], (Address, Route, str)):
        v = [str(a) for a in v]
    elif isinstance(v, tuple):
        v = list(v)
    if name in SECRETS and v:
        v = REDACTED
    elif name == "cluster_redis" and v:
        v = redact_url(v)
    return v


#: Settings a reload (SIGHUP) cannot change: the supervisor keeps the running
#: value and logs a warning (README, "Settings").
RESTART_ONLY: tuple[str, ...] = ("metrics_listen", "pid_file", "cluster_redis", "cluster_name")

#: Settings whose values are never printed or served (``wsrelay check``,
#: ``/config``, logs): a credential added later goes here. None exists yet.
SECRETS: frozenset[str] = frozenset()
REDACTED = "(redacted)"


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced by :data:`REDACTED`
    (``redis://:s3cret@h:6379`` -> ``redis://:(redacted)@h:6379``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:{REDACTED}@{hosts}"


class _Bad(ValueError):
    """Raised by a field parser with what was expected."""


# --- field parsers: str -> typed value, or _Bad("expected ...") ---------------


def _address(text: str, example: str = "0.0.0.0:8080") -> Address:
    text = text.strip()
    v6_example = "[::1]:9000" if example.startswith("10.") else "[::]:8080"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Bad(f"expected host:port, e.g. {v6_example}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise _Bad(f"expected host:port, e.g. {example}")
        if ":" in host:
            raise _Bad(f"expected an IPv6 host in brackets, e.g. {v6_example}")
    if not host:
        raise _Bad(f"expected host:port with a host, e.g. {example}")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise _Bad("expected a port number 0-65535")
    return Address(host, int(port))


def _listen(text: str) -> tuple[Address, ...]:
    """Addresses; empty is allowed (checked with RELAY_TLS_LISTEN in :func:`load`)."""
    return tuple(_address(p) for p in text.split(",") if p.strip())


def _files(text: str) -> tuple[str, ...]:
    """Comma-separated file paths: absolute, or relative to systemd's
    $CREDENTIALS_DIRECTORY (LoadCredential=), resolved when read."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _file(text: str) -> str:
    return text.strip()


def _header_name(text: str) -> str:
    t = text.strip()
    if not t or any(not (c.isalnum() or c in "-") for c in t):
        raise _Bad("expected a header name of letters, digits and '-', e.g. X-SSL-Client-S-DN")
    return t


_ORIGIN_EXAMPLE = "10.0.0.5:9000"


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
        out.append(_address(part, _ORIGIN_EXAMPLE))
    if not out:
        raise _Bad(f"expected at least one origin host:port, e.g. {_ORIGIN_EXAMPLE}")
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
    return _address(text, "127.0.0.1:9108") if text.strip() else None


def _pid_file(text: str) -> str:
    text = text.strip()
    if text and not text.startswith("/"):
        raise _Bad("expected an absolute path, e.g. /run/wsrelay.pid (empty: none)")
    return text


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: RELAY_BALANCE: least connections, round-robin, or a consistent hash of a cookie or header
BALANCE_EXAMPLE = "least_conn, round_robin, cookie:NAME or header:NAME"


def _balance(text: str) -> str:
    t = text.strip()
    if t.lower() in ("least_conn", "round_robin"):
        return t.lower()
    kind, sep, name = t.partition(":")
    if sep and kind.lower() in ("cookie", "header") and _TOKEN.match(name):
        # header names are case-insensitive (RFC 9110 §5.1), cookie names are not (RFC 6265 §5.4)
        return f"{kind.lower()}:{name.lower() if kind.lower() == 'header' else name}"
    raise _Bad(f"expected {BALANCE_EXAMPLE}")


def _check_path(text: str) -> str:
    t = text.strip()
    if t and (not t.startswith("/") or any(not (0x21 <= ord(c) < 0x7f) or c == "#" for c in t)):
        raise _Bad("expected a URL path starting with /, e.g. /healthz (empty: no active health checks)")
    return t


def _routes(text: str) -> tuple[Route, ...]:
    try:
        return tuple(Route(*r) for r in pools.parse_routes(text))
    except pools.RouteError as e:
        raise _Bad("; ".join(e.lines)) from None
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


def _cluster_redis(text: str) -> str:
    """A Redis URL (redis-py's ``from_url`` forms), or ``redis+sentinel://h1:26379,h2:26379/service[/db]``;
    empty: cluster mode off. Only the form is checked here (no I/O)."""
    text = text.strip()
    if not text:
        return ""
    if not text.startswith(_REDIS_SCHEMES):
        raise _Bad("expected redis://host:6379[/db], rediss://…, unix:///path/redis.sock or "
                   "redis+sentinel://host:26379[,host:26379]/service (empty: cluster mode off)")
    scheme, _, rest = text.partition("://")
    hosts = rest.rpartition("@")[2]
    if scheme == "unix" and not hosts.startswith("/"):
        raise _Bad("expected unix:///absolute/path/redis.sock")
    if scheme == "redis+sentinel" and (not hosts.partition("/")[2].strip("/") or not hosts.partition("/")[0]):
        raise _Bad("expected redis+sentinel://host:26379[,host:26379]/service[/db]: sentinels and the service name")
    if scheme in ("redis", "rediss") and not hosts.split("/")[0].split("?")[0]:
        raise _Bad("expected redis://host:6379[/db] with a host")
    return text


def _cluster_name(text: str) -> str:
    text = text.strip()
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in text) or len(text) > 64:
        raise _Bad("expected 1-64 letters, digits, '-', '_' or '.' (the fleet's key prefix in Redis)")
    return text


def _trusted_proxies(text: str) -> tuple[str, ...]:
    """CIDR networks or single addresses (nginx's set_real_ip_from), normalised."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part)
        except ValueError:
            try:
                loose = ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise _Bad("expected IP networks in CIDR notation or addresses, e.g. "
                           "10.0.0.0/8,2001:db8::/32,192.0.2.7") from None
            raise _Bad(f"{part} has host bits set: did you mean {loose}?") from None
        out.append(str(net))
    return tuple(out)


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
    "pid_file": _pid_file,
    "data_plane": _choice("auto", "native", "python"),
    "tls_listen": _listen,
    "tls_cert": _files,
    "tls_key": _files,
    "tls_min_version": _choice("1.2", "1.3"),
    "tls_ticket_keys": _file,
    "tls_strict_sni": _bool,
    "tls_client_ca": _file,
    "tls_client_verify": _choice("required", "optional"),
    "tls_client_header": _header_name,
    "routes": _routes,
    "balance": _balance,
    "max_conns": _int(0),
    "max_fails": _int(0, 1000),
    "fail_timeout": _seconds(0.05, False),
    "slowstart": _seconds(0.05, True),
    "health_check_path": _check_path,
    "health_check_interval": _seconds(0.05, False),
    "health_check_timeout": _seconds(0.05, False),
    "health_check_rise": _int(1, 100),
    "health_check_fall": _int(1, 100),
    "cluster_redis": _cluster_redis,
    "cluster_limit": _int(0),
    "cluster_name": _cluster_name,
    "cluster_block": _int(1, 1 << 20),
    "cluster_lease_ttl": _seconds(0.5, False),
    "cluster_fallback": _choice("hold", "local", "closed"),
    "cluster_local_limit": _int(0),
    "proxy_protocol": _choice("off", "on"),
    "trusted_proxies": _trusted_proxies,
    "per_ip_v6_prefix": _int(1, 128),
    "origin_proxy_protocol": _choice("off", "v2"),
}

#: fields that are not a variable of their own (RELAY_POOL_<NAME>... variables, relay/pools.py)
DERIVED = frozenset({"pools"})
#: what RELAY_POOL_<NAME>_<SETTING> values parse with: the global setting's parser
_POOL_PARSERS = {**{name: _PARSERS[name] for name in pools.POOL_SETTINGS if name != "websocket"},
                 "websocket": _bool}
assert set(_PARSERS) == set(Settings.__struct_fields__) - DERIVED, "every setting needs a parser"

#: Every variable wsrelay reads, for docs and for the env-file drift test
#: (besides the RELAY_POOL_<NAME>... family of relay/pools.py).
VARIABLES: tuple[str, ...] = tuple(PREFIX + name.upper() for name in Settings.__struct_fields__
                                   if name not in DERIVED)


def read_env_file_all(path: str) -> tuple[dict[str, str], list[str]]:
    """The assignments of an env file and its problems (``--env-file PATH:N: ...``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {}, [f"--env-file {path}: cannot read: {e.strerror}"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {}, [f"--env-file {path}: not UTF-8 text"]
    assignments, problems = envfile.parse(text)
    return ({a.key: a.value for a in assignments},
            [f"--env-file {path}:{p.removeprefix('line ')}" for p in problems])


def read_env_file(path: str) -> dict[str, str]:
    """Parse ``path`` as systemd's EnvironmentFile= would (:mod:`relay.envfile`);
    raises :class:`ConfigError` with every problem of the file."""
    values, problems = read_env_file_all(path)
    if problems:
        raise ConfigError(problems)
    return values


def _quote(text: str) -> str:
    return msgspec.json.encode(text).decode()


def _whitespace(text: str) -> str | None:
    """Whitespace inside a value (around commas is fine): the usual cause is an
    inline comment, which neither wsrelay nor systemd's EnvironmentFile= has."""
    if not any(c.isspace() for p in text.split(",") for c in p.strip()):
        return None
    if "#" in text:
        return "contains whitespace — an inline comment? Comments must start the line"
    return "contains whitespace (list items are separated by commas)"


def _unknown(key: str) -> str:
    close = difflib.get_close_matches(key, VARIABLES, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"{key}: unknown setting ({hint}every setting is listed in the README's Settings table "
            f"and in deploy/wsrelay.env)")


def load_one(name: str, environ: Mapping[str, str] | None = None, env_file: str | None = None) -> Any:
    """One setting (``"metrics_listen"``), from the same sources as :func:`load`,
    without judging the others: what ``wsrelay status|reload|stop`` need from a
    file that may have been edited since the relay started."""
    key = PREFIX + name.upper()
    source = dict(os.environ if environ is None else environ)
    if env_file:
        values, problems = read_env_file_all(env_file)
        if problems and not values:
            raise ConfigError(problems)
        source.update(values)
    if key not in source:
        return getattr(Settings(), name)
    text = source[key]
    reason = _whitespace(text)
    if reason is None:
        try:
            return _PARSERS[name](text)
        except _Bad as e:
            reason = f": {e}"
    raise ConfigError([f"{key}: {_quote(text)}{reason if reason.startswith(':') else ' ' + reason}"])


def _pool_value(key: str, setting: str | None, text: str) -> Any:
    """A RELAY_POOL_<NAME>[_<SETTING>] value, or ValueError with the problem's line."""
    reason = _whitespace(text)
    if reason is None:
        try:
            return (_origins if setting is None else _POOL_PARSERS[setting])(text)
        except _Bad as e:
            reason = f": {e}"
    raise ValueError(f"{key}: {_quote(text)}{reason if reason.startswith(':') else ' ' + reason}")


def load(environ: Mapping[str, str] | None = None, env_file: str | None = None,
         require_origin: bool = True) -> Settings:
    """Build :class:`Settings` from the environment and an optional env file.

    Raises :class:`ConfigError` with one line per problem, all of them: the
    env file's syntax, unknown variables, bad values, a missing origin."""
    source = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    unreadable = False
    if env_file:
        values_from_file, problems = read_env_file_all(env_file)
        source.update(values_from_file)
        unreadable = bool(problems) and problems[0].startswith(f"--env-file {env_file}: ")
    values: dict[str, Any] = {}
    pool_vars: dict[str, str] = {}
    for key, text in source.items():
        if not key.startswith(PREFIX):
            continue
        if key.startswith(pools.POOL_PREFIX):
            pool_vars[key] = text
            continue
        name = key[len(PREFIX):].lower()
        parser = _PARSERS.get(name)
        if parser is None:
            problems.append(_unknown(key))
            continue
        if name == "routes":  # a table: blanks align it; one problem per bad entry
            try:
                values[name] = tuple(Route(*r) for r in pools.parse_routes(text))
            except pools.RouteError as e:
                problems += [f"{key}: {line}" for line in e.lines]
            continue
        reason = _whitespace(text)
        if reason is None:
            try:
                values[name] = parser(text)
                continue
            except _Bad as e:
                reason = f": {e}"
        problems.append(f"{key}: {_quote(text)}{reason if reason.startswith(':') else ' ' + reason}")
    own = pools.resolve(pool_vars, _pool_value, problems)
    defaults = Settings()
    base = {n: values.get(n, getattr(defaults, n)) for n in pools.POOL_SETTINGS if n != "websocket"}
    values["pools"] = tuple(PoolSettings(name=name, **{**base, **v}) for name, v in own.items())
    if not _named(problems, "ORIGIN", "ROUTES") and not any(p.startswith(pools.POOL_PREFIX) for p in problems):
        pools.check_routes(values.get("routes", ()), values["pools"], "origin" in values, problems)
    if (require_origin and not unreadable and "origin" not in values and not values.get("routes")
            and not _named(problems, "ORIGIN", "ROUTES")):
        problems.append(f"{PREFIX}ORIGIN is not set: expected the origin server(s), e.g. {_ORIGIN_EXAMPLE}")
    if "data_plane" in values:
        from relay import native

        why = native.problem(values["data_plane"], values.get("mode", "tunnel"))
        if why:
            problems.append(f"{PREFIX}DATA_PLANE=native: {why}")
    problems.extend(_listeners(values, problems))
    problems += _cluster_problems(values, problems)
    if values.get("proxy_protocol") == "on" and not values.get("trusted_proxies") \
            and not any(p.startswith(PREFIX + "TRUSTED_PROXIES") for p in problems):
        # The spec (HAProxy's doc/proxy-protocol.txt §5): accepting the header
        # from anyone lets anyone spoof their address.
        problems.append(f"{PREFIX}PROXY_PROTOCOL=on needs {PREFIX}TRUSTED_PROXIES: the load balancers' "
                        f"addresses, e.g. 10.0.0.0/8 (a PROXY header from anyone else is refused)")
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _named(problems: list[str], *names: str) -> bool:
    """Whether a problem is about one of these variables (``ORIGIN`` is
    RELAY_ORIGIN, not RELAY_ORIGIN_PROXY_PROTOCOL): the checks that build on
    them stand aside rather than repeat it."""
    wanted = {PREFIX + n for n in names}
    return any(p.split(":", 1)[0].split(" ", 1)[0] in wanted for p in problems)


def _listeners(values: dict[str, Any], problems: list[str]) -> list[str]:
    """What RELAY_LISTEN and RELAY_TLS_* say together (either listen list may
    be empty, not both; TLS needs as many keys as certificates)."""
    if any(p.startswith((PREFIX + "LISTEN", PREFIX + "TLS_")) for p in problems):
        return []
    listen = values.get("listen", Settings.__struct_defaults__[0])
    tls = values.get("tls_listen", ())
    certs, keys = values.get("tls_cert", ()), values.get("tls_key", ())
    out = []
    if not listen and not tls:
        out.append(f"{PREFIX}LISTEN and {PREFIX}TLS_LISTEN are both empty: expected at least one "
                   f"address to listen on, e.g. {PREFIX}LISTEN=0.0.0.0:8080")
    if tls and not certs:
        out.append(f"{PREFIX}TLS_CERT is not set: {PREFIX}TLS_LISTEN needs a certificate "
                   f"(PEM, the chain in order) and its key in {PREFIX}TLS_KEY")
    elif len(certs) != len(keys):
        out.append(f"{PREFIX}TLS_KEY: {len(keys)} key(s) for {len(certs)} certificate(s) in {PREFIX}TLS_CERT: "
                   f"expected one key per certificate, in the same order")
    if not tls and (certs or keys or values.get("tls_client_ca") or values.get("tls_ticket_keys")):
        out.append(f"{PREFIX}TLS_CERT, _KEY, _CLIENT_CA and _TICKET_KEYS need {PREFIX}TLS_LISTEN: "
                   f"without it nothing serves TLS")
    overlap = {a for a in set(listen) & set(tls) if a.port != 0}  # port 0: any free one, never the same
    if overlap:
        out.append(f"{PREFIX}TLS_LISTEN: {sorted(map(str, overlap))[0]} is in {PREFIX}LISTEN too: "
                   f"an address is either plain or TLS")
    return out


def resolve(path: str, environ: Mapping[str, str] | None = None) -> str:
    """A RELAY_TLS_* file path as opened: a relative one is relative to
    systemd's $CREDENTIALS_DIRECTORY (LoadCredential=) when set."""
    env = os.environ if environ is None else environ
    base = env.get("CREDENTIALS_DIRECTORY")
    if path and not os.path.isabs(path) and base:
        return os.path.join(base, path)
    return path
#: cluster mode's settings besides RELAY_CLUSTER_REDIS (README, "A fleet")
CLUSTER_SETTINGS = ("cluster_limit", "cluster_name", "cluster_block", "cluster_lease_ttl", "cluster_fallback",
                    "cluster_local_limit")


def _cluster_problems(values: dict[str, Any], problems: list[str]) -> list[str]:
    """What cluster mode needs once ``RELAY_CLUSTER_REDIS`` is set: a fleet
    limit, and the optional redis client (``pip install 'wsrelay[cluster]'``).
    Without it, a cluster setting is refused: the operator meant a fleet limit
    that would silently not apply (as RELAY_TLS_* without RELAY_TLS_LISTEN)."""
    if not values.get("cluster_redis"):
        defaults = Settings()  # the env file's defaults, uncommented, are no fleet either
        given = [PREFIX + n.upper() for n in CLUSTER_SETTINGS if n in values and values[n] != getattr(defaults, n)]
        if given and not any(p.startswith(PREFIX + "CLUSTER_REDIS") for p in problems):
            return [f"{', '.join(given)} need{'s' if len(given) == 1 else ''} {PREFIX}CLUSTER_REDIS: without it "
                    f"there is no fleet and the host applies RELAY_MAX_CLIENTS alone"]
        return []
    out = []
    if not values.get("cluster_limit") and not any(p.startswith(PREFIX + "CLUSTER_LIMIT") for p in problems):
        out.append(f"{PREFIX}CLUSTER_LIMIT is not set: expected the fleet-wide limit of concurrent WebSocket "
                   f"clients (an integer >= 1) when {PREFIX}CLUSTER_REDIS is set")
    import importlib.util

    if importlib.util.find_spec("redis") is None:
        out.append(f"{PREFIX}CLUSTER_REDIS is set but the redis client is not installed: "
                   "pip install 'wsrelay[cluster]'")
    return out
