"""Whether a request can be served, and by which pool, decided from its head
alone, before anything is started for it (README, "What happens at the
edge", "Routes and origins").

:func:`admit_upgrade` and :func:`admit_request` either return what serving
needs — the pool the request is routed to among it, chosen once here
(relay/routes.py) — or raise a :class:`~relay.errors.RelayError` carrying the answer
(400, 403, 426, 503, …). They touch no socket; the only state they change
is the admission slot an upgrade takes last, once every other check passed,
so a refused upgrade never holds one. The caller owns that slot from then on
and gives it back exactly once (relay/upgrade.py, then the tunnel's end).

Both planes ask here: the pure-Python client connection (relay/client.py)
and, for connections whose head the native plane read, the native glue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.errors import Refused
from relay.handshake import origin_allowed, path_allowed, validate_upgrade
from relay.http_head import Request, body_framing

if TYPE_CHECKING:
    from relay.context import Context
    from relay.origins.balance import OriginPool


def route(ctx: "Context", req: Request) -> "OriginPool":
    """The pool ``req`` goes to. Raises Refused(404) when no route matches and
    there is no default pool, HeadError(400) for a path that routes elsewhere
    once decoded."""
    pool = ctx.router.route(req.path, req.authority or req.get(b"host"))
    if pool is None:
        raise Refused(404, "no route", "no_route")
    return pool


def admit_upgrade(ctx: "Context", req: Request, client_ip: str, first: bool,
                  key: bytes | None = None) -> tuple[bytes, "OriginPool"]:
    """Check an upgrade request, route it and take an admission slot for it.

    ``first``: the connection's first request (served even while draining:
    its client connected before the drain began, so a reload refuses
    nothing). Returns the client's ``Sec-WebSocket-Key`` and the pool.
    Raises :class:`~relay.errors.HeadError` (400, 426: RFC 6455 §4.2.1) or
    :class:`~relay.errors.Refused` (404 no route, 403 path, ``Origin`` or a
    pool without WebSockets, 503 draining or at the limit). ``key``: the
    Sec-WebSocket-Key when the request was validated already (the head phase
    in C: its view's ``websocket()`` is ``validate_upgrade`` in C).
    """
    if key is None:
        key = validate_upgrade(req)
    pool = route(ctx, req)
    if (not pool.websocket or not path_allowed(req.path, ctx.ws_paths)
            or not origin_allowed(req.get(b"origin"), pool.allowed_origins)):
        raise _routed(Refused(403, "path or Origin not allowed", "forbidden"), pool)
    if ctx.draining and not first:
        raise _routed(Refused(503, "draining", "draining"), pool)
    refused = ctx.admission.take(client_ip)  # "limit" or "limit_ip": counted apart (deploy/alerts.yml)
    if refused:
        raise _routed(Refused(503, "client limit reached", refused), pool)
    return key, pool


def _routed(e: Refused, pool: "OriginPool") -> Refused:
    """``e``, naming the pool the request was routed to (the access log's ``pool``)."""
    e.pool = pool.name
    return e


def admit_request(ctx: "Context", req: Request, first: bool) -> tuple[int, "OriginPool"]:
    """Check and route a plain HTTP request; returns its body length (RFC 9112
    §6.3: ``-1`` chunked, ``0`` none) and its pool. ``first`` as for
    :func:`admit_upgrade`. Raises :class:`~relay.errors.HeadError` (400,
    ambiguous framing) or :class:`~relay.errors.Refused` (404 no route, 503
    draining)."""
    length = body_framing(req, is_request=True)
    pool = route(ctx, req)
    if ctx.draining and not first:
        raise _routed(Refused(503, "draining", "draining"), pool)
    return length or 0, pool
