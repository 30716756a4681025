"""Header policy, sans-I/O: what of a head crosses the relay, in either
direction (RFC 9110 §7.6.1, §7.6.2; the X-Forwarded-* de facto standard).

- :func:`forward_head` builds the request head sent to the origin: every
  end-to-end line byte for byte, hop-by-hop ones dropped, ``X-Forwarded-*``
  set by the edge.
- :func:`response_head` builds the response head sent to the client: the
  origin's lines minus its hop-by-hop ones, plus the relay's own
  ``Connection``.
"""

from __future__ import annotations

import re

from relay.http_head import CRLF, Request, Response
from relay.logs import new_request_id

# RFC 9110 §7.6.1: never forwarded as received. Upgrade and Connection are
# re-added for upgrades; Proxy-Connection is a legacy hop-by-hop header.
# Not Trailer: RFC 9110 §6.6.2 makes it end-to-end (RFC 2616 listed it), and
# it must travel with the trailer section it announces; it is dropped only
# where that section is (a chunked response de-chunked for an HTTP/1.0 client).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te",
    b"transfer-encoding", b"upgrade",
})
# The edge owns these: what a client claims is replaced, except from a
# trusted proxy (RELAY_TRUSTED_PROXIES), whose X-Forwarded-For gets the
# client's address appended (nginx's set_real_ip_from) and whose X-Request-ID
# is kept (Envoy's edge does the same): anyone else could otherwise forge the
# address an origin trusts, or pick the id that origins log and correlate by.
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"})
# A peer may name any header in Connection to have it dropped (RFC 9110
# §7.6.1), but never these: without Content-Length the origin would read the
# body the relay still forwards as the next request (request smuggling), and
# without Host or the key the forwarded request would not be the one we checked.
NEVER_NAMED = frozenset({b"host", b"content-length", b"transfer-encoding", b"sec-websocket-key",
                         b"sec-websocket-version"})


_DROP = HOP_BY_HOP - {b"transfer-encoding"}  # never drop the framing we relay the body by
# A de-chunked body (for an HTTP/1.0 client) is delimited by close: its
# Transfer-Encoding goes, and the trailer section with the Trailer field.
_DROP_DECHUNKED = HOP_BY_HOP | {b"trailer"}
_KEEP_END = b"Connection: keep-alive\r\n\r\n"
_CLOSE_END = b"Connection: close\r\n\r\n"


def response_head(resp: Response, raw: bytes, conn_tokens: set[bytes], keep: bool,
                   dechunk: bool = False) -> bytes:
    """The origin's head with its hop-by-hop fields (RFC 9110 §7.6.1: those
    listed and those its ``Connection`` names) replaced by the relay's own
    ``Connection``: ``keep-alive`` or ``close``, whichever the relay will do."""
    drop = _DROP_DECHUNKED if dechunk else _DROP
    if conn_tokens:
        drop = drop | (conn_tokens - NEVER_NAMED)
    end = _KEEP_END if keep else _CLOSE_END
    for name, _line, _v in resp.fields:
        if name in drop:
            break
    else:  # nothing to drop (the common case): the head as received
        return raw[:-2] + end
    lines = [raw[: raw.find(CRLF)]]
    lines.extend(line for name, line, _v in resp.fields if name not in drop)
    lines.append(end)
    return CRLF.join(lines)


#: an X-Request-ID a trusted proxy may hand on: visible ASCII, as ids are (a
#: UUID, 32 hex digits, HAProxy's unique-id-format), 1-200 bytes
_REQUEST_ID = re.compile(rb"[!-~]{1,200}\Z")


def request_id_for(req: Request, trusted: bool) -> bytes:
    """The request's X-Request-ID: a trusted proxy's own when it sent exactly
    one well-formed value, else a new one (relay/logs.new_request_id)."""
    if trusted:
        ids = req.get_all(b"x-request-id")
        if len(ids) == 1 and _REQUEST_ID.match(ids[0]):
            return ids[0]
    return new_request_id()


def x_forwarded_for(req: Request) -> bytes | None:
    """The request's X-Forwarded-For as received, for the access log: its field
    lines combined in order (RFC 9110 §5.3), so a proxy's own line below a
    client's is logged too; None without one."""
    values = req.get_all(b"x-forwarded-for")
    if len(values) < 2:
        return values[0] if values else None
    return b", ".join(values)


# Names whose underscore spelling never reaches the origin (see forward_head).
NO_UNDERSCORE = FORWARDED | HOP_BY_HOP | {b"content-length"}


def forward_head(req: Request, client_ip: str, proto: bytes, upgrade: bool, request_id: bytes = b"",
                 default_host: bytes = b"localhost", trusted: bool = False,
                 own: tuple[bytes, bytes] | None = None) -> bytes:
    """The head to send to the origin, built in one join.

    Header lines pass through byte for byte, except the hop-by-hop ones, those
    the Connection header names, and the X-Forwarded-* family and
    X-Request-ID (underscore spellings included), which the edge sets itself
    (``request_id``, when given). ``X-Forwarded-For`` is ``client_ip`` alone,
    or, from a ``trusted`` proxy, the list it sent with ``client_ip`` appended. For an upgrade, ``Connection: Upgrade`` and
    the client's Upgrade line are kept; for plain HTTP the origin connection
    is kept alive. An HTTP/1.0 request without Host gets ``default_host`` (the
    origin's address, as nginx's ``$proxy_host``): the origin reads HTTP/1.1,
    which requires one. ``own``: a header the edge owns besides those
    (``RELAY_TLS_CLIENT_HEADER``): ``(lowercase name, line to send or b"")``;
    a client's own lines of it are dropped, underscore spellings included.
    """
    named = req.tokens(b"connection") - NEVER_NAMED
    drop = HOP_BY_HOP | FORWARDED | named
    if own is not None:
        drop = drop | {own[0]}
    lines = [b"%s %s HTTP/1.1" % (req.method, req.target)]
    xff = []
    host = None
    for name, line, value in req.fields:
        if name in drop:
            if name == b"x-forwarded-for":
                if trusted:
                    xff.append(value)
            elif upgrade and name == b"upgrade":
                lines.append(line)
            elif not upgrade and name == b"transfer-encoding":
                lines.append(line)  # the body is relayed as received, still chunked
            continue
        if b"_" in name and (name.replace(b"_", b"-") in NO_UNDERSCORE
                             or (own is not None and name.replace(b"_", b"-") == own[0])):
            # CGI and many WSGI/Rack servers read X_Forwarded_For as
            # X-Forwarded-For: a client could forge what the edge sets, and
            # Transfer_Encoding or Content_Length would frame the body otherwise
            # at such an origin (smuggling). Other names with underscores pass,
            # as HAProxy does (nginx drops them all).
            continue
        if name == b"host":
            if req.authority is not None:
                # RFC 9112 §3.2.2: a proxy forwarding an absolute-form request
                # generates Host from its target, not the client's Host (nginx too).
                continue
            host = value
        lines.append(line)
    if req.authority is not None:
        host = req.authority
        lines.append(b"Host: " + host)
    if host is None:
        # HTTP/1.0 without Host, forwarded as HTTP/1.1 (RFC 9112 §3.2, §3.3:
        # the server's default authority); not X-Forwarded-Host: the client named none
        lines.append(b"Host: " + default_host)
    xff.append(client_ip.encode("ascii"))
    lines.append(b"X-Forwarded-For: " + b", ".join(xff))
    lines.append(b"X-Forwarded-Proto: " + proto)
    if host:
        lines.append(b"X-Forwarded-Host: " + host)
    if request_id:
        lines.append(b"X-Request-ID: " + request_id)
    if own is not None and own[1]:
        lines.append(own[1])
    lines.append(b"Connection: Upgrade" if upgrade else b"Connection: keep-alive")
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)
