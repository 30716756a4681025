"""The WebSocket opening handshake as the relay sees it, sans-I/O.

- :func:`is_upgrade` tells a WebSocket upgrade from plain HTTP.
- :func:`validate_upgrade` applies RFC 6455 §4.2.1 (400, or 426 for another version).
- :func:`path_allowed` and :func:`origin_allowed` are the 403 checks.
- :func:`check_upgrade_response` verifies the origin's 101 (RFC 6455 §4.1).
- :func:`negotiated_deflate` reads what permessage-deflate the 101 agreed
  (RFC 7692 §7.1), for the frames-mode message limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
from urllib.parse import unquote_to_bytes

from relay.deflate import ExtensionError, PerMessageDeflate, parse_extensions
from relay.errors import HeadError
from relay.http_head import Request, Response

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

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
    if len(req.get_all(b"origin")) > 1:
        # RFC 6454 §7: one Origin. The relay checks the first against
        # RELAY_ALLOWED_ORIGINS; an origin reading another would see an
        # Origin nobody checked.
        raise HeadError(400, "more than one Origin header")
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


def negotiated_deflate(resp: Response) -> PerMessageDeflate | None:
    """The permessage-deflate parameters of the origin's 101, or None when it
    agreed no extension. Raises HeadError(502, outcome ``origin_error``) when
    the 101 agreed something a message limit cannot measure through: another
    extension, or parameters RFC 7692 §7.1 forbids (relay.deflate.parse_extensions)."""
    values = resp.get_all(b"sec-websocket-extensions")
    if not values:
        return None
    try:
        return parse_extensions(values)
    except ExtensionError as e:
        raise HeadError(502, f"origin's 101: {e}", "origin_error") from None
