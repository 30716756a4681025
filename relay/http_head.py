"""HTTP/1.1 message heads, sans-I/O: bytes in, a value, ``None`` (need more
bytes) or :class:`HeadError` out. Nothing here touches a socket.

Errors (relay/errors.py): :class:`HeadError` with the status to answer,
400, 414, 431 or 505 from :func:`parse_request_head` (the client's fault),
502 from :func:`parse_response_head` (the origin's).

The parser is strict where leniency lets a request mean two things to two
hops (RFC 9112 §2.2, §3, §5, §6.1, §6.3, §11.2): no bare LF, no obsolete line
folding, no whitespace before the colon, no control characters in values,
exactly one Host, never both Content-Length and Transfer-Encoding.
The head is kept as its raw lines so what we forward is what we received.
"""

from __future__ import annotations

import re

from relay.errors import HeadError

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

# RFC 9110 §5.6.2 token; §5.5 field values: VCHAR, obs-text, SP and HTAB.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# '#' too: a fragment is never part of a request-target (RFC 9112 §3.2).
_BAD_TARGET = re.compile(rb"[\x00-\x20#\x7f]")
# RFC 9110 §7.2 Host = uri-host [ ":" port ] (RFC 3986 §3.2.2): an IP literal
# or a reg-name, never empty here (an http(s) target has an authority; nginx
# refuses an empty Host too).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]*)?\Z")
BARE_LF_END = b"\n\n"
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\Z")


class Head:
    """Fields shared by requests and responses: raw header lines and lookups."""

    __slots__ = ("_index", "fields", "head_len")

    def __init__(self, fields: list[tuple[bytes, bytes, bytes]], head_len: int):
        #: (lowercased name, raw line, value) per header line, in order.
        self.fields = fields
        #: bytes of the buffer the head took, terminator included.
        self.head_len = head_len
        self._index: dict[bytes, list[bytes]] | None = None

    def _lookup(self) -> dict[bytes, list[bytes]]:
        # Built on the first lookup: a handshake asks a dozen questions of the
        # same head, each of which would otherwise scan every field.
        index = self._index
        if index is None:
            index = self._index = {}
            for name, _line, value in self.fields:
                if name in index:
                    index[name].append(value)
                else:
                    index[name] = [value]
        return index

    def get(self, lname: bytes) -> bytes | None:
        values = self._lookup().get(lname)
        return values[0] if values else None

    def get_all(self, lname: bytes) -> list[bytes]:
        return list(self._lookup().get(lname, ()))

    def tokens(self, lname: bytes) -> set[bytes]:
        """Comma-separated, case-insensitive tokens of every line of a header."""
        out: set[bytes] = set()
        for value in self._lookup().get(lname, ()):
            out.update(t.strip().lower() for t in value.split(b","))
        out.discard(b"")
        return out


class Request(Head):
    __slots__ = ("method", "target", "path", "version", "authority")

    def __init__(self, method: bytes, target: bytes, path: bytes, version: bytes,
                 fields: list[tuple[bytes, bytes, bytes]], head_len: int, authority: bytes | None = None):
        super().__init__(fields, head_len)
        self.method = method
        #: origin-form target (absolute-form is rewritten): path and query.
        self.target = target
        #: the path alone, without the query.
        self.path = path
        #: b"1.1" or b"1.0".
        self.version = version
        #: the host[:port] of an absolute-form target, which replaces Host
        #: when the request is forwarded (RFC 9112 §3.2.2); None for origin-form.
        self.authority = authority


class Response(Head):
    __slots__ = ("status", "version")

    def __init__(self, status: int, fields: list[tuple[bytes, bytes, bytes]], head_len: int,
                 version: bytes = b"1.1"):
        super().__init__(fields, head_len)
        self.status = status
        #: b"1.1" or b"1.0", from the status line.
        self.version = version


def keeps_alive(head: Request | Response) -> bool:
    """Whether the connection persists after this message (RFC 9112 §9.3).

    A ``close`` option ends it; otherwise HTTP/1.1 persists by default and
    HTTP/1.0 only with the ``keep-alive`` option (§9.3, and RFC 7230 §A.1.2
    for the HTTP/1.0 keep-alive mechanism). The caller still ends a
    connection whose message has no length (a body delimited by close).
    """
    tokens = head.tokens(b"connection")
    if b"close" in tokens:
        return False
    return head.version == b"1.1" or b"keep-alive" in tokens


def _head_bounds(buf: bytes | bytearray, max_bytes: int, who: int) -> tuple[int, int] | None:
    """(start, end) of the head lines, skipping leading empty lines (RFC 9112 §2.2).
    ``who``: 400 for a request head (too large: 431), 502 for a response's."""
    start = 0
    while buf.startswith(CRLF, start):
        start += 2
    end = buf.find(HEAD_END, start)
    lf = buf.find(BARE_LF_END, start, end if end >= 0 else len(buf))
    if lf >= 0:
        # A head ended by bare LFs: refused (README), not waited on until the
        # handshake timeout; RFC 9112 §2.2 lets a recipient refuse bare LF. The
        # same answer whether or not a CRLF CRLF follows (whole or trickled).
        raise HeadError(who, "bare LF in the head", "bad_request" if who == 400 else "origin_error")
    if end < 0:
        if len(buf) <= max_bytes:
            return None
    elif end + 4 <= max_bytes:
        return start, end
    if who == 400:
        raise HeadError(431, "request head too large")
    raise HeadError(502, "origin response head too large", "origin_error")


def _fields(lines: list[bytes], who: int) -> list[tuple[bytes, bytes, bytes]]:
    outcome = "bad_request" if who == 400 else "origin_error"
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # Covers obs-fold (leading SP/HT), whitespace before the colon, no colon.
            raise HeadError(who, "malformed header line", outcome)
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HeadError(who, "control character in a header value", outcome)
        fields.append((name.lower(), line, value))
    return fields


def parse_request_head(buf: bytes | bytearray, max_bytes: int) -> Request | None:
    """Parse a request head at the start of ``buf``; ``None`` until it is complete.

    RFC 9112 §3 (request line), §5 (fields), §3.2 (exactly one Host in 1.1).
    Raises :class:`HeadError` with 414 when the request line alone passes
    ``max_bytes``, 431 when the whole head does, 505 for a version other
    than HTTP/1.x, 400 for anything malformed.
    """
    try:
        bounds = _head_bounds(buf, max_bytes, 400)
    except HeadError as e:
        if e.status != 431:
            raise
        # The request line alone does not fit: 414, as nginx answers when it
        # overflows large_client_header_buffers (RFC 9110 §15.5.15).
        start = 0
        while buf.startswith(CRLF, start):
            start += 2
        eol = buf.find(CRLF, start)
        if (eol if eol >= 0 else len(buf)) - start > max_bytes - 4:
            raise HeadError(414, "request target too long") from None
        raise
    if bounds is None:
        return None
    start, end = bounds
    lines = bytes(buf[start:end]).split(CRLF)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HeadError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or _BAD_TARGET.search(target):
        raise HeadError(400, "malformed request line")
    m = _VERSION.match(version)
    if m is None:
        raise HeadError(400, "malformed HTTP version")
    if m.group(1) != b"1":
        raise HeadError(505, "HTTP version not supported")
    version = b"1.1" if m.group(2) != b"0" else b"1.0"
    if method == b"CONNECT":
        raise HeadError(400, "CONNECT is not relayed: wsrelay is not a forward proxy")
    target, authority = _origin_form(method, target)
    fields = _fields(lines[1:], 400)
    req = Request(method, target, target.partition(b"?")[0], version, fields, end + 4, authority)
    hosts = req.get_all(b"host")
    if len(hosts) > 1 or (version == b"1.1" and not hosts):
        raise HeadError(400, "a request needs exactly one Host header")
    if hosts and not _HOST.match(hosts[0]):
        raise HeadError(400, "invalid Host")
    return req


def _origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """RFC 9112 §3.2: accept absolute-form but never route by it; forward
    origin-form. Returns (origin-form target, the absolute form's authority)."""
    if target.startswith(b"/"):
        return target, None
    if target == b"*" and method == b"OPTIONS":
        return target, None
    lower = target[:8].lower()
    for scheme in (b"http://", b"https://", b"ws://", b"wss://"):
        if lower.startswith(scheme):
            rest = target[len(scheme):]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            authority = rest if cut < 0 else rest[:cut]
            if not _HOST.match(authority):
                # userinfo included: RFC 9110 §4.2.4 says to treat it as an error
                raise HeadError(400, "malformed authority in the request target")
            if cut < 0:
                return b"/", authority
            rest = rest[cut:]
            return (rest if rest.startswith(b"/") else b"/" + rest), authority
    raise HeadError(400, "malformed request target")


def body_framing(head: Head, is_request: bool = True) -> int | None:
    """How the message body is delimited (RFC 9112 §6.3).

    Returns the Content-Length, ``-1`` for chunked, or ``None`` when there is
    no length (for requests: no body; for responses: read until close).
    Ambiguous framing raises :class:`HeadError` (400 for requests, 502 for
    responses), so it is never passed on.
    """
    status, outcome = (400, "bad_request") if is_request else (502, "origin_error")
    te = head.get_all(b"transfer-encoding")
    cl = head.get_all(b"content-length")
    if te:
        if cl:
            raise HeadError(status, "both Content-Length and Transfer-Encoding", outcome)
        if isinstance(head, Request) and head.version == b"1.0":
            raise HeadError(status, "Transfer-Encoding in an HTTP/1.0 request", outcome)
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings != [b"chunked"]:
            # Other codings are legal but nothing on the web sends them to a
            # relay; refusing keeps framing unambiguous (RFC 9112 §6.1).
            raise HeadError(status if is_request else 502, "unsupported Transfer-Encoding", outcome)
        return -1
    if cl:
        # One line, one value. RFC 9110 §8.6 lets a recipient accept a list of
        # identical values, but the relay forwards the line as received: the
        # next hop might read "5, 5" otherwise. Refused, as nginx does.
        if len(cl) != 1 or b"," in cl[0]:
            raise HeadError(status, "Content-Length repeated or a list", outcome)
        value = cl[0]
        if not value.isdigit() or len(value) > 18:
            raise HeadError(status, "invalid Content-Length", outcome)
        return int(value)
    return None


def _check_status_start(buf: bytes | bytearray) -> None:
    """Refuse, before the head is complete, an answer that cannot become a
    status line: an origin sending garbage gets its 502 at once, not a 504
    when the connect timeout fires."""
    first = bytes(buf[:9])
    if not (b"HTTP/1.1 ".startswith(first) or b"HTTP/1.0 ".startswith(first)):
        raise HeadError(502, "malformed origin status line", "origin_error")
    eol = buf.find(b"\n")
    if eol >= 0 and (buf[eol - 1:eol] != b"\r" or not _STATUS_LINE.match(bytes(buf[:eol - 1]))):
        raise HeadError(502, "malformed origin status line", "origin_error")


def parse_response_head(buf: bytes | bytearray, max_bytes: int) -> Response | None:
    """Parse the origin's status line and fields (RFC 9112 §4); 502 when malformed."""
    bounds = _head_bounds(buf, max_bytes, 502)
    if bounds is None:
        _check_status_start(buf)
        return None
    start, end = bounds
    if start:
        raise HeadError(502, "origin response starts with empty lines", "origin_error")
    lines = bytes(buf[:end]).split(CRLF)
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise HeadError(502, "malformed origin status line", "origin_error")
    return Response(int(m.group(2)), _fields(lines[1:], 502), end + 4, b"1.0" if m.group(1) == b"0" else b"1.1")
