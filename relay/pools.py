"""Routes and origin pools as settings (README, "Routes and origins"), sans-I/O.

- ``RELAY_ROUTES``: a table of ``[host]/path = pool`` entries, one per line
  (in a quoted value) or comma-separated; blanks align it, a line starting
  with ``#`` inside the value is a comment.
- ``RELAY_POOL_<NAME>=origins``: a named pool; ``RELAY_POOL_<NAME>_<SETTING>``
  one of its settings (:data:`POOL_SETTINGS`), which otherwise is the global
  ``RELAY_<SETTING>``.
- The default pool is ``RELAY_ORIGIN`` with the global settings; without
  it, a request no route matches gets 404.

A request takes the routes of its Host first (exact, then ``*.`` wildcards,
the longest suffix first), then the routes for any host, the longest path
prefix first, matched on whole segments; then the default pool
(relay/routes.py matches at run time).

Sans-I/O and below relay/config.py, which calls it: the settings are read
here through their attributes, and the field parsers come from the caller.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Callable
from typing import Any, NamedTuple

POOL_PREFIX = "RELAY_POOL_"
#: the pool of RELAY_ORIGIN
DEFAULT = "default"
#: settings a pool may set for itself (RELAY_POOL_<NAME>_<SETTING>); each but
#: ``websocket`` defaults to the global RELAY_<SETTING>
POOL_SETTINGS = ("websocket", "allowed_origins", "connect_timeout", "read_timeout", "balance", "max_conns",
                 "max_fails", "fail_timeout", "slowstart", "health_check_path", "health_check_interval",
                 "health_check_timeout", "health_check_rise", "health_check_fall")
# longest first, so RELAY_POOL_X_HEALTH_CHECK_TIMEOUT is not read as a setting "timeout"
_SUFFIXES = sorted(POOL_SETTINGS, key=len, reverse=True)

_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_]*\Z")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\Z|\[[0-9a-f:.]+\]\Z")
_ROUTE = re.compile(r"(\S+?)\s*=\s*(\S+)\Z")
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]+\Z")
EXAMPLE = "/chat = chat, or feed.example.com/ = feed"


class RouteError(ValueError):
    """RELAY_ROUTES is wrong: ``lines``, one problem per entry."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


def parse_routes(text: str) -> list[tuple[str, str, str]]:
    """``RELAY_ROUTES`` -> (host, path, pool) in the order written; raises
    :class:`RouteError` naming every bad entry."""
    routes: list[tuple[str, str, str]] = []
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for item in (i.strip() for i in line.split(",")):
            if not item:
                continue
            try:
                route = _route(item)
            except ValueError as e:
                problems.append(f"{item!r}: {e}")
                continue
            if route[:2] in seen:
                problems.append(f"{item!r}: {route[0]}{route[1]} is routed twice")
            seen.add(route[:2])
            routes.append(route)
    if problems:
        raise RouteError(problems)
    return routes


def _route(item: str) -> tuple[str, str, str]:
    if "#" in item:
        raise ValueError("an inline comment? A comment must be a line of its own inside the quoted value")
    m = _ROUTE.match(item)
    if m is None:
        raise ValueError(f"expected [host]/path = pool, e.g. {EXAMPLE} (entries are separated by "
                         f"commas or lines)")
    where, pool = m.group(1), m.group(2).lower()
    slash = where.find("/")
    if slash < 0:
        raise ValueError(f"a route's path starts with /, e.g. {EXAMPLE}")
    host, path = where[:slash].lower().rstrip("."), where[slash:]
    if host and not _HOST.match(host):
        raise ValueError("expected a host name (app.example.com, *.example.com or an address), without a port")
    if not _PATH_CHARS.match(path) or path != "/" and posixpath.normpath(path) != path.rstrip("/"):
        raise ValueError("expected a plain path prefix: no %-escapes, no . or .. segments, no //")
    if not _POOL_NAME.match(pool):
        raise ValueError("expected a pool name of letters, digits and _")
    return host, path.rstrip("/") or "/", pool


def resolve(pool_vars: dict[str, str], parse: Callable[[str, str | None, str], Any],
            problems: list[str]) -> dict[str, dict[str, Any]]:
    """The ``RELAY_POOL_*`` variables -> each named pool's own values
    (``origins`` and the settings it sets), sorted by name; bad ones become
    lines in ``problems``. ``parse(key, setting, text)`` turns a value into
    its type (``setting`` None: the origins), or raises ValueError holding
    the problem's line."""
    origins: dict[str, Any] = {}
    own: dict[str, dict[str, Any]] = {}
    first_key: dict[str, str] = {}
    for key in sorted(pool_vars):
        text = pool_vars[key]
        rest = key[len(POOL_PREFIX):]
        setting = next((s for s in _SUFFIXES if rest.lower().endswith("_" + s) and len(rest) > len(s) + 1), None)
        name = (rest[:-len(setting) - 1] if setting else rest).lower()
        if not _POOL_NAME.match(name):
            problems.append(f"{key}: expected {POOL_PREFIX}<NAME>=host:port,... with a name of letters, "
                            f"digits and _ (then {POOL_PREFIX}<NAME>_<SETTING> for its settings)")
            continue
        if name == DEFAULT:
            problems.append(f"{key}: the default pool is RELAY_ORIGIN, with the global settings; name this pool "
                            f"otherwise")
            continue
        first_key.setdefault(name, f"{POOL_PREFIX}{rest[:len(name)]}")
        try:
            value = parse(key, setting, text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if setting is None:
            origins[name] = value
        else:
            own.setdefault(name, {})[setting] = value
    for name in sorted(set(own) - set(origins)):
        if not any(p.startswith(first_key[name] + ":") for p in problems):
            problems.append(f"{first_key[name]}: pool {name} has settings but no origins: set "
                            f"{first_key[name]}=host:port,...")
    return {name: {"origins": origins[name], **own.get(name, {})} for name in sorted(origins)}


def check_routes(routes, pools, has_default: bool, problems: list[str]) -> None:
    """Every route names a pool that exists, and every pool gets a route
    (``routes``: relay.config.Route, ``pools``: relay.config.PoolSettings)."""
    names = {p.name for p in pools}
    before = len(problems)
    for r in routes:
        if r.pool == DEFAULT:
            if not has_default:
                problems.append(f"RELAY_ROUTES: {str(r)!r}: the default pool is RELAY_ORIGIN, which is not set")
        elif r.pool not in names:
            close = difflib.get_close_matches(r.pool, sorted(names), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"RELAY_ROUTES: {str(r)!r}: no pool named {r.pool} ({hint}define it with "
                            f"{POOL_PREFIX}{r.pool.upper()}=host:port,...)")
    if len(problems) > before:
        return  # a misspelt pool name: that is the one problem to name
    used = {r.pool for r in routes}
    for p in pools:
        if p.name not in used:
            problems.append(f"{POOL_PREFIX}{p.name.upper()}: no route in RELAY_ROUTES sends requests to pool "
                            f"{p.name} (e.g. RELAY_ROUTES=/{p.name} = {p.name})")


# -- what the settings amount to ---------------------------------------------------------

def effective(settings) -> list:
    """Every pool requests can go to (relay.config.PoolSettings): the default
    one first (RELAY_ORIGIN, if set), then the named ones."""
    default = settings.default_pool()
    return ([default] if default is not None else []) + list(settings.pools)


def keys(settings) -> list[str]:
    """The origin table's entries these settings need (relay/origins/table.py)."""
    from relay.origins.table import key

    return [key(p.name, str(a)) for p in effective(settings) for a in dict.fromkeys(p.origins)]


def host_order(host: str) -> tuple:
    """Exact hosts before wildcards; among wildcards the longest suffix first."""
    return (host.startswith("*."), -len(host), host)


class Row(NamedTuple):
    host: str    # "" = any host
    path: str
    pool: str    # "" = none: 404
    origins: tuple[str, ...]

    def to_dict(self, shown: Callable[[str, Any], Any]) -> dict[str, Any]:
        """``shown(setting, value)``: how ``wsrelay check`` shows a value (redacted, ...)."""
        return {"host": self.host or "*", "path": self.path, "pool": self.pool or None,
                "origins": shown("origin", self.origins)}


def table(settings) -> list[Row]:
    """The routes in the order a request tries them, ending with what takes
    the rest (the default pool, or nothing: 404)."""
    origins = {p.name: tuple(str(a) for a in p.origins) for p in effective(settings)}
    routes = sorted(settings.routes, key=lambda r: (r.host == "", host_order(r.host) if r.host else (),
                                                    -len(r.path), r.path))
    rows = [Row(r.host, r.path, r.pool, origins.get(r.pool, ())) for r in routes]
    default = DEFAULT if settings.origin else ""
    rows.append(Row("", "(anything else)", default, origins.get(default, ())))
    return rows


def describe(pool, shown: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A pool's effective settings, for ``wsrelay check`` and ``/config``
    (``shown(setting, value)``: how a value is shown, secrets redacted)."""
    out: dict[str, Any] = {"origins": shown("origin", pool.origins)}
    for name in POOL_SETTINGS:
        out[name] = shown(name, getattr(pool, name))
    return out


def variables(settings, shown: Callable[[str, Any], Any]) -> dict[str, Any]:
    """The RELAY_POOL_* variables the settings amount to (each pool's own values only)."""
    out: dict[str, Any] = {}
    base = {n: getattr(settings, n) for n in POOL_SETTINGS if n != "websocket"}
    base["websocket"] = True
    for p in settings.pools:
        key = POOL_PREFIX + p.name.upper()
        out[key] = shown("origin", p.origins)
        for name in POOL_SETTINGS:
            v = getattr(p, name)
            if v != base[name]:
                out[f"{key}_{name.upper()}"] = shown(name, v)
    return out


def render(rows: list[Row]) -> str:
    """The route table for a person (``wsrelay check`` on a terminal)."""
    head = ("HOST", "PATH", "POOL", "ORIGINS")
    cells = [(r.host or "*", r.path, r.pool or "(none: 404)", ", ".join(r.origins)) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = ["routes, in the order a request tries them (its Host's first, then any host's; "
             "the longest path first):"]
    for c in [head, *cells]:
        lines.append("  " + "  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3])
    return "\n".join(lines)
