"""The fast path's tables (relay/native/fast_path.c; README "Architecture"):
what of a worker's rules the common upgrade needs, compiled once when the
worker starts, so C decides that upgrade without calling Python.

Python keeps every rule. C says yes only to the plain case of each — a path
under ``RELAY_WS_PATHS``, no ``Origin`` or one listed with its scheme,
every origin of the pool up at full weight, room under ``RELAY_MAX_CLIENTS``
without the lock — and counts what Python would count, in the same shared
memory. Any other request is decided by relay/native/front.py's ``on_head``
as before; any other outcome after a yes (a failed connect, another answer
than a valid 101, an origin taken out meanwhile) is handed to Python with
what C took (``NativeFront.on_adopt``).

The fast path applies when the worker's settings leave nothing per request
that only Python does: no ``RELAY_MAX_CLIENTS_PER_IP`` (its table takes a
lock), and for each pool it decides for, least connections (or one origin)
without ``RELAY_MAX_CONNS`` (:func:`decided_pools`; the other pools'
upgrades are Python's); with ``RELAY_ROUTES``, the gate's own Router picks
the pool (:func:`router`). On plain listeners and on TLS ones whose
handshake runs in C (README "TLS", **Head phase**), whose tunnels go to the
TLS engine as Python's would. :func:`why_not` says why when it applies to
no pool (the startup line, ``wsrelay check``).
"""

from __future__ import annotations

import os

from metrics import layout
from relay import pools
from relay.origins import table as origin_table
from relay.routes import Router

#: the most origins (in all), pools, path prefixes and Origin entries the tables hold (fast_path.h)
MAX_MEMBERS = 64
MAX_POOLS = 16
MAX_RULES = 32


def why_not(settings) -> str | None:
    """Why the fast path cannot decide upgrades with ``settings``
    (relay.config.Settings), or None: it decides for at least one pool."""
    if os.environ.get("WSRELAY_NATIVE_FAST_PATH", "1") == "0":
        return "WSRELAY_NATIVE_FAST_PATH=0"
    if len(settings.trusted_proxies) > MAX_RULES:
        return f"more than {MAX_RULES} RELAY_TRUSTED_PROXIES"
    if settings.max_clients_per_ip:
        return "RELAY_MAX_CLIENTS_PER_IP is set"
    if "/" not in settings.ws_paths and len(settings.ws_paths) > MAX_RULES:
        return f"more than {MAX_RULES} RELAY_WS_PATHS"
    if decided_pools(settings):
        return None
    reasons = [(p.name, _pool_why_not(p)) for p in pools.effective(settings)]
    if len(reasons) == 1:
        return reasons[0][1]
    return "; ".join(f"pool {name}: {why}" for name, why in reasons)


def _pool_why_not(pool) -> str | None:
    """Why the fast path leaves a pool's upgrades (relay.pools.Pool) to Python, or None."""
    if not pool.websocket:
        return "the pool refuses WebSockets"
    if ":" in pool.balance or (pool.balance != "least_conn" and len(pool.origins) > 1):
        return f"RELAY_BALANCE={pool.balance}"
    if pool.max_conns:
        return "RELAY_MAX_CONNS is set"
    if len(set(pool.origins)) > MAX_MEMBERS:
        return f"more than {MAX_MEMBERS} origins"
    if len(pool.allowed_origins) > MAX_RULES:
        return f"more than {MAX_RULES} RELAY_ALLOWED_ORIGINS"
    return None


def decided_pools(settings) -> list[str]:
    """The pools whose upgrades the fast path decides, in order: each one
    :func:`_pool_why_not` finds nothing against, while the tables have room
    (MAX_POOLS, MAX_MEMBERS in all); the others are Python's."""
    out, members = [], 0
    for p in pools.effective(settings):
        n = len(set(p.origins))
        if _pool_why_not(p) is None and len(out) < MAX_POOLS and members + n <= MAX_MEMBERS:
            out.append(p.name)
            members += n
    return out


def _origins(allowed: tuple[str, ...]) -> tuple[bytes, ...] | None:
    """RELAY_ALLOWED_ORIGINS as C matches it: None (any), or the entries with a
    scheme that match byte for byte after origin_allowed's folding (lower
    case, no final "/"); a request whose Origin is none of them goes to Python."""
    if not allowed or "*" in allowed:
        return None
    return tuple(e.encode() for e in allowed if "://" in e and e == e.lower() and not e.endswith("/") and e.isascii())


def install(front, tls: bool = False) -> None:
    """Give the engine of ``front`` (relay.native.front.NativeFront) its
    tables, where :func:`why_not` finds nothing against it. ``tls``: the
    front reads TLS listeners' heads too, whose tunnels the plane's TLS engine relays.

    With routes, C asks :func:`router`'s table which pool a request goes to
    (relay/routes.py, the same Router the gate uses, over the pools' places)."""
    ctx = front.ctx
    shared = ctx.admission.fast_path()
    if why_not(ctx.settings) is not None or shared is None:  # shared: None with a per-IP limit
        return
    clients, slot, header = shared
    names = decided_pools(ctx.settings)
    decided = [ctx.pools[name] for name in names]
    table = ctx.table
    metrics, counts, (hs_buckets, dur_buckets) = ctx.counters.fast_path()
    tables = tuple((tuple((front.index[m], m.base, m.cell, m.state, m.hist) for m in pool.members),
                    _origins(pool.allowed_origins), float(pool.settings.slowstart), float(pool.connect_timeout))
                   for pool in decided)
    front.engine.fast_path(
        on_adopt=front.on_adopt, metrics=metrics, counts=counts,
        buckets=(hs_buckets, dur_buckets, layout.CONNECT_BUCKETS),
        clients=clients, slot=slot, header=header,
        in_use=table.header[origin_table.IN_USE:origin_table.IN_USE + 1],
        conns=table.conns, state=table.state, connect=table.connect, pools=tables,
        health=(layout.O_CHECK, layout.O_CHECK_SINCE, layout.O_DOWN_UNTIL, layout.O_EJECTED),
        paths=() if b"/" in ctx.ws_paths else ctx.ws_paths,
        tls_engine=ctx.native.tls_engine() if tls else None,
        trusted=tuple((net.to_bytes(16, "big"), mask.to_bytes(16, "big")) for net, mask in ctx.trusted.networks_int()),
        # the access log's lines for its tunnels are written in C (relay/native/access_log.c)
        access=(ctx.access.worker, tuple(name.encode() for name in names),
                tuple(m.name.encode() for pool in decided for m in pool.members))
        if ctx.access.enabled else None,
        router=router(ctx.settings, names) if ctx.settings.routes else None)


def left_to_python(settings) -> list[tuple[str, str]]:
    """(pool, why) for each pool whose upgrades Python decides though the
    fast path is on (the startup line, ``wsrelay check``)."""
    decided = set(decided_pools(settings))
    return [(p.name, _pool_why_not(p) or "no room left in the fast path's tables")
            for p in pools.effective(settings) if p.name not in decided]


def router(settings, names: list[str]):
    """``route(path, host) -> int``: the place in ``names`` of the pool a
    request goes to, by RELAY_ROUTES as relay/gate.py routes it (the same
    Router), -1 for a pool the fast path leaves to Python, None for no route
    (404); raises HeadError for a path that routes elsewhere once decoded.
    C calls it with the path (no query) and the Host field (or None)."""
    place = {name: i for i, name in enumerate(names)}
    known = {p.name for p in pools.effective(settings)}
    table = Router(((r.host, r.path, place.get(r.pool, -1)) for r in settings.routes),
                   place.get(pools.DEFAULT, -1) if pools.DEFAULT in known else None)
    return table.route
