"""The WebSocket opening handshake as the relay sees it, sans-I/O.

- :func:`is_upgrade` tells a WebSocket upgrade from plain HTTP.
- :func:`validate_upgrade` applies RFC 6455 §4.2.1 (400, or 426 for another version).
- :func:`path_allowed` and :func:`origin_allowed` are the 403 checks.
- :func:`forward_head` builds the head sent to the origin: every end-to-end
  header intact, hop-by-hop ones dropped (RFC 9110 §7.6.1), X-Forwarded-* set.
- :func:`check_upgrade_response` verifies the origin's 101 (RFC 6455 §4.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
from urllib.parse import unquote_to_bytes

from relay.errors import HeadError
from relay.http_head import CRLF, Request, Response

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# RFC 9110 §7.6.1: never forwarded as received. Upgrade and Connection are
# re-added for upgrades; Proxy-Connection is a legacy hop-by-hop header.
# Not Trailer: RFC 9110 §6.6.2 makes it end-to-end (RFC 2616 listed it), and
# it must travel with the trailer section it announces; it is dropped only
# where that section is (a chunked response de-chunked for an HTTP/1.0 client).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te",
    b"transfer-encoding", b"upgrade",
})
# The edge owns these: what a client claims is replaced, except that
# X-Forwarded-For gets the client's address appended (as nginx does).
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# A peer may name any header in Connection to have it dropped (RFC 9110
# §7.6.1), but never these: without Content-Length the origin would read the
# body the relay still forwards as the next request (request smuggling), and
# without Host or the key the forwarded request would not be the one we checked.
NEVER_NAMED = frozenset({b"host", b"content-length", b"transfer-encoding", b"sec-websocket-key",
                         b"sec-websocket-version"})


def is_upgrade(req: Request) -> bool:
    """A request that asks for a WebSocket (``Upgrade: websocket``), valid or not."""
    return b"websocket" in req.tokens(b"upgrade")


def validate_upgrade(req: Request) -> bytes:
    """RFC 6455 §4.2.1 checks; returns the Sec-WebSocket-Key or raises HeadError."""
    if req.method != b"GET" or req.version != b"1.1":
        raise HeadError(400, "a WebSocket upgrade must be GET over HTTP/1.1")
    if b"upgrade" not in req.tokens(b"connection"):
        raise HeadError(400, "Connection header lacks the Upgrade token")
    if req.get(b"content-length") not in (None, b"0") or req.get(b"transfer-encoding") is not None:
        raise HeadError(400, "an upgrade request carries no body")
    versions = req.get_all(b"sec-websocket-version")
    if len(versions) != 1 or versions[0] != b"13":
        if not versions:
            raise HeadError(400, "Sec-WebSocket-Version missing")
        raise HeadError(426, "unsupported WebSocket version")
    keys = req.get_all(b"sec-websocket-key")
    if len(keys) != 1:
        raise HeadError(400, "exactly one Sec-WebSocket-Key is required")
    try:
        raw = base64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HeadError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    return keys[0]


def _prefix_match(path: bytes, prefixes: tuple[bytes, ...]) -> bool:
    for p in prefixes:
        if path == p or p.endswith(b"/") and path.startswith(p) or path.startswith(p + b"/"):
            return True
    return False


def path_allowed(path: bytes, prefixes: tuple[bytes, ...]) -> bool:
    """Prefix match on whole path segments (``/ws`` allows ``/ws`` and ``/ws/x``,
    not ``/wsx``), on the raw path and on its decoded, dot-resolved form, so
    ``/ws/../admin`` or ``/ws/%2e%2e/admin`` cannot slip past."""
    if b"/" in prefixes:  # the default: every origin-form path, decoded or not
        return path.startswith(b"/")
    if not _prefix_match(path, prefixes):
        return False
    decoded = unquote_to_bytes(path)
    normal = posixpath.normpath(decoded)
    if decoded.endswith(b"/") and not normal.endswith(b"/"):
        normal += b"/"
    if normal.startswith(b"//"):
        normal = b"/" + normal.lstrip(b"/")
    return _prefix_match(normal, prefixes)


def origin_allowed(origin: bytes | None, allowed: tuple[str, ...]) -> bool:
    """Match ``Origin`` against ``RELAY_ALLOWED_ORIGINS``.

    Entries: ``*`` (any), ``https://app.example.com`` (exact scheme and host),
    ``app.example.com`` (that host, any scheme or port), ``*.example.com``
    (strict subdomains). An empty list allows every origin. A request with no
    ``Origin`` is allowed: browsers always send one on upgrades, so its absence
    means a non-browser client, which cross-site hijacking cannot involve.
    """
    if not allowed or origin is None:
        return True
    try:
        value = origin.decode("ascii").strip().lower().rstrip("/")
    except UnicodeDecodeError:
        return False
    _scheme, sep, hostport = value.partition("://")
    host = hostport if sep else value
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for entry in allowed:
        if entry == "*" or entry == value:
            return True
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif "://" not in entry and entry == host:
            return True
    return False


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def check_upgrade_response(resp: Response, key: bytes) -> None:
    """RFC 6455 §4.1: a 101 must carry the Accept that matches our client's key."""
    if b"websocket" not in resp.tokens(b"upgrade") or b"upgrade" not in resp.tokens(b"connection"):
        raise HeadError(502, "origin's 101 lacks Upgrade: websocket", "origin_error")
    if resp.get(b"sec-websocket-accept") != accept_key(key):
        raise HeadError(502, "origin's 101 has a wrong Sec-WebSocket-Accept", "origin_error")


def forward_head(req: Request, client_ip: str, proto: bytes, upgrade: bool) -> bytes:
    """The head to send to the origin, built in one join.

    Header lines pass through byte for byte, except the hop-by-hop ones, those
    the Connection header names, and the X-Forwarded-* family (underscore
    spellings included), which the edge sets itself. For an upgrade,
    ``Connection: Upgrade`` and the client's Upgrade line are kept; for plain
    HTTP the origin connection is kept alive.
    """
    named = req.tokens(b"connection") - NEVER_NAMED
    drop = HOP_BY_HOP | FORWARDED | named
    lines = [b"%s %s HTTP/1.1" % (req.method, req.target)]
    xff = []
    host = None
    for name, line, value in req.fields:
        if name in drop:
            if name == b"x-forwarded-for":
                xff.append(value)
            elif upgrade and name == b"upgrade":
                lines.append(line)
            elif not upgrade and name == b"transfer-encoding":
                lines.append(line)  # the body is relayed as received, still chunked
            continue
        if b"_" in name and name.replace(b"_", b"-") in FORWARDED:
            # CGI and many WSGI/Rack servers read X_Forwarded_For as
            # X-Forwarded-For: a client could forge what the edge sets. Other
            # names with underscores pass, as HAProxy does (nginx drops them all).
            continue
        if name == b"host":
            host = value
        lines.append(line)
    if host is None:
        # HTTP/1.0 without Host, forwarded as HTTP/1.1: an empty one (RFC 9112 §3.2)
        lines.append(b"Host: ")
    xff.append(client_ip.encode("ascii"))
    lines.append(b"X-Forwarded-For: " + b", ".join(xff))
    lines.append(b"X-Forwarded-Proto: " + proto)
    if host:
        lines.append(b"X-Forwarded-Host: " + host)
    lines.append(b"Connection: Upgrade" if upgrade else b"Connection: keep-alive")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)
