"""What a proxy did with one input, reduced to its meaning — sans-I/O.

Bytes in, values out; nothing here touches a socket, so every rule is unit
tested on its own (tests/differential/test_normalise.py).

Two views of one proxy's run of one case:

- :func:`origin_view`: what the recording origin received, connection by
  connection, parsed as a lenient origin server would read it (RFC 9112, but
  tolerating bare LF and obsolete folding, so raw bytes a proxy let through
  show up as the extra requests or header lines they would become) into
  :class:`Message` values: method, origin-form target, the host it names
  (Host, lowercased, without port), the header multiset minus the fields
  each proxy legitimately owns (:data:`PROXY_OWNED`), the body after
  de-framing, trailers, and whether the proxy appended its own
  ``X-Forwarded-For`` entry — a request that reached the origin without it
  was never parsed by the proxy (raw bytes that became a request: the
  signature of request smuggling). Bytes after a message the origin answered
  with ``101`` are the tunnel; bytes that parse as no request are
  ``leftover``; a request sent on a connection after the origin's answer
  ended it (RFC 9112 §9.3) is marked ``after_close``.
- :func:`client_view`: what the client received: interim and final responses
  (status, header multiset, de-framed body, trailers), tunnel bytes after a
  ``101``, unparseable ``leftover``, and whether the proxy closed. A response
  is the origin's when it carries the origin's ``X-Origin`` marker or a
  status below 400; otherwise the proxy made it (a refusal or an error).

Each view is a plain value; :mod:`tests.differential.compare` judges them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: the address the harness's clients connect from (every proxy appends it to X-Forwarded-For)
CLIENT_IP = b"127.0.0.1"

#: Request fields a proxy owns, sets or may drop without changing what the
#: request asks for: routing (Host is rewritten by nginx's ``$host``; the host
#: it names is compared apart, see Message.authority), hop-by-hop fields and
#: framing (RFC 9110 §7.6.1; bodies are compared after de-framing instead),
#: ``Expect`` (nginx answers it itself), the ``X-Forwarded-*`` family
#: (X-Forwarded-For is kept apart, see Message.xff) and ``X-Request-ID``,
#: which wsrelay's edge sets on every request (README).
PROXY_OWNED = frozenset({
    b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"x-real-ip", b"via", b"x-request-id",
})

#: Response fields a proxy owns or re-frames: compared nowhere.
RESPONSE_OWNED = frozenset({b"connection", b"content-length", b"transfer-encoding", b"date", b"server"})

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"\r?\n")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_STATUS = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?:[ \t][^\r\n]*)?\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\Z")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Unparseable(Exception):
    """The bytes at this point are no message a lenient peer would accept."""


# -- heads ------------------------------------------------------------------------

def _skip_blank(data: bytes, pos: int) -> int:
    """RFC 9112 §2.2: a server ignores empty lines before a request line."""
    while True:
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
        else:
            return pos


def _head(data: bytes, pos: int) -> tuple[list[bytes], int] | None:
    """The head's lines from ``pos`` (a bare LF ends a line too) and where it ends."""
    m = _HEAD_END.search(data, pos)
    if m is None:
        return None
    return _LINE.split(data[pos:m.start()]), m.end()


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(lowercased name, value) per field; obs-fold joined with one SP (RFC 9112 §5.2)."""
    out: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise Unparseable("folded line before any field")
            name, value = out[-1]
            out[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" "))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # RFC 9112 §5.1: whitespace before the colon MUST be refused
            raise Unparseable(f"bad field line {line[:60]!r}")
        out.append((name.lower(), value.strip(b" \t")))
    return out


def _tokens(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [t.strip().lower() for n, v in fields if n == name for t in v.split(b",") if t.strip()]


def _framing(fields: list[tuple[bytes, bytes]]) -> int | None:
    """RFC 9112 §6.3 for a request: -1 chunked, a Content-Length, or 0."""
    te = _tokens(fields, b"transfer-encoding")
    if te:
        if te[-1] != b"chunked":
            raise Unparseable("a request whose final coding is not chunked")
        return -1
    lengths = {v.strip() for n, value in fields if n == b"content-length" for v in value.split(b",")}
    if not lengths:
        return 0
    if len(lengths) != 1:
        raise Unparseable("conflicting Content-Length")
    value = lengths.pop()
    if not value.isdigit():
        raise Unparseable("invalid Content-Length")
    return int(value)


def _chunked(data: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int, bool]:
    """De-chunk from ``pos``: (body, trailers, end, complete). Lenient: bare LF
    ends a line, leading zeros and extensions are accepted; no size limit (a
    huge size is a body that never completes)."""
    body = bytearray()
    while True:
        m = _LINE.search(data, pos)
        if m is None:
            return bytes(body), [], len(data), False
        line = data[pos:m.start()]
        size = _CHUNK_SIZE.match(line)
        if size is None:
            raise Unparseable(f"bad chunk-size line {line[:40]!r}")
        n = int(size.group(1), 16)
        pos = m.end()
        if n == 0:
            break
        if len(data) - pos < n:
            body += data[pos:]
            return bytes(body), [], len(data), False
        body += data[pos:pos + n]
        pos += n
        m = _LINE.match(data, pos)
        if m is None:
            if len(data) - pos < 2 and b"\r\n".startswith(data[pos:]):
                return bytes(body), [], len(data), False
            raise Unparseable("chunk data longer than its size")
        pos = m.end()
    trailers = []
    while True:
        m = _LINE.search(data, pos)
        if m is None:
            return bytes(body), [], len(data), False
        line = data[pos:m.start()]
        pos = m.end()
        if not line:
            return bytes(body), trailers, pos, True
        trailers.extend(_fields([line]))


# -- what the origin received --------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """One request as the origin read it.

    ``headers`` and ``trailers`` are sorted (name, value) multisets without
    :data:`PROXY_OWNED`; ``xff`` the client's own X-Forwarded-For entries;
    ``proxied`` whether the last entry is the client's address, i.e. a proxy
    parsed this request and appended it; ``complete`` False when the
    connection ended inside the body; ``after_close`` when it came on a
    connection the origin's previous answer had ended."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    xff: tuple[bytes, ...] = ()
    proxied: bool = True
    complete: bool = True
    after_close: bool = False
    version: bytes = b"1.1"
    #: the host the origin is told (Host, lowercased, without a port: what
    #: nginx's $host keeps), b"" when there is none
    authority: bytes = b""

    def key(self) -> tuple:
        """What two proxies must agree on for "the same request" (not the version:
        nginx forwards HTTP/1.0 requests as 1.1, which asks for the same thing)."""
        return (self.method, self.target, self.authority, self.headers, self.body, self.trailers, self.xff,
                self.proxied, self.complete, self.after_close)

    def short(self) -> str:
        extra = "" if self.proxied else " NOT-PROXIED"
        extra += "" if self.complete else " TRUNCATED"
        extra += " AFTER-CLOSE" if self.after_close else ""
        return (f"{self.method.decode('latin-1')} {self.target.decode('latin-1')}"
                f" body={self.body[:40]!r}{'...' if len(self.body) > 40 else ''}{extra}")


def host_name(value: bytes | None) -> bytes:
    """The host part of a Host value, lowercased: proxies may rewrite case and
    port (nginx's ``$host`` drops both), not which host the request names."""
    if not value:
        return b""
    value = value.strip().lower()
    if value.startswith(b"["):
        return value[:value.find(b"]") + 1]
    return value.split(b":", 1)[0]


def origin_form(target: bytes) -> bytes:
    """RFC 9112 §3.2.2: an absolute-form target means its path and query."""
    m = _SCHEME.match(target)
    if m is None:
        return target
    rest = target[m.end():]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
    if cut < 0:
        return b"/"
    rest = rest[cut:]
    return rest if rest.startswith(b"/") else b"/" + rest


def _multiset(fields: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(sorted((n, v) for n, v in fields if n not in drop))


@dataclass
class ParsedRequests:
    messages: list[Message]
    #: (start, end) of each message in the parsed bytes
    spans: list[tuple[int, int]]
    leftover: bytes
    #: why parsing stopped at ``leftover`` (empty when it is just incomplete)
    reason: str = ""


def parse_requests(data: bytes, stop_after: int | None = None) -> ParsedRequests:
    """Requests in ``data`` in order, as a lenient origin reads them.

    Stops after ``stop_after`` messages (the rest is then ``leftover``, for the
    caller to treat as tunnel bytes), at a head that is not complete yet, or
    at bytes no server would take as a request (``reason`` says why)."""
    messages: list[Message] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data) and (stop_after is None or len(messages) < stop_after):
        start = _skip_blank(data, pos)
        if start >= len(data):
            pos = start
            break
        head = _head(data, start)
        if head is None:
            return ParsedRequests(messages, spans, data[start:])
        lines, end = head
        try:
            parts = lines[0].split()
            if len(parts) != 3 or not _VERSION.match(parts[2]) or not _TOKEN.match(parts[0]):
                raise Unparseable(f"bad request line {lines[0][:60]!r}")
            method, target, version = parts
            fields = _fields(lines[1:])
            length = _framing(fields)
            if length == -1:
                body, trailers, pos, complete = _chunked(data, end)
            else:
                body = data[end:end + length]
                complete = len(body) == length
                trailers = []
                pos = end + len(body)
        except Unparseable as e:
            return ParsedRequests(messages, spans, data[start:], str(e))
        xff = [x.strip() for n, v in fields if n == b"x-forwarded-for" for x in v.split(b",")]
        proxied = bool(xff) and xff[-1] == CLIENT_IP
        if proxied:
            xff.pop()
        host = next((v for n, v in fields if n == b"host"), None)
        messages.append(Message(method, origin_form(target), _multiset(fields, PROXY_OWNED), body,
                                _multiset(trailers, frozenset()), tuple(xff), proxied, complete,
                                version=version[5:], authority=host_name(host)))
        spans.append((start, pos))
        if not complete:
            break
    return ParsedRequests(messages, spans, data[pos:])


# -- responses (what the origin sent, what the client received) --------------------------

@dataclass(frozen=True)
class ReqInfo:
    """What a response's framing depends on: the request's method and version."""
    method: bytes = b"GET"
    version: bytes = b"1.1"


@dataclass(frozen=True)
class Reply:
    status: int
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # sorted, every field
    body: bytes
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    complete: bool = True
    #: the origin's marker (``X-Origin``), None on the proxy's own answers
    origin: bytes | None = None
    #: RFC 9112 §9.3: the connection persists after this response, by its own head
    persistent: bool = True
    #: (start, end) in the parsed bytes
    span: tuple[int, int] = (0, 0)

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101

    @property
    def from_origin(self) -> bool:
        return self.origin is not None or self.status < 400

    def end_to_end(self) -> tuple[tuple[bytes, bytes], ...]:
        return tuple((n, v) for n, v in self.headers if n not in RESPONSE_OWNED)

    def announces_close(self) -> bool:
        return not self.persistent

    def short(self) -> str:
        who = f"origin {self.origin.decode('latin-1')}" if self.origin else (
            "origin" if self.from_origin else "proxy")
        return (f"{self.status} ({who}) body={self.body[:40]!r}{'...' if len(self.body) > 40 else ''}"
                f"{'' if self.complete else ' TRUNCATED'}")


@dataclass
class ParsedReplies:
    replies: list[Reply]
    #: bytes after a 101 (None: no 101)
    tunnel: bytes | None
    leftover: bytes
    reason: str = ""


def parse_replies(data: bytes, requests: list[ReqInfo], eof: bool) -> ParsedReplies:
    """Responses in ``data``, each final one matched to the next of ``requests``.

    Framing as a client of that request reads it (RFC 9112 §6.3): no body for
    HEAD, 1xx, 204, 304; a response to an HTTP/1.0 request is read as an
    HTTP/1.0 client does, which knows no transfer coding (RFC 9112 §6.1: a
    server must not send one), so chunk lines would be part of its body.
    With ``eof`` a body that runs to the end is complete only if it is
    delimited by the close."""
    replies: list[Reply] = []
    pos = 0
    finals = 0
    while pos < len(data):
        start = pos
        head = _head(data, pos)
        if head is None:
            return ParsedReplies(replies, None, data[pos:])
        lines, end = head
        req = requests[finals] if finals < len(requests) else ReqInfo()
        try:
            m = _STATUS.match(lines[0])
            if m is None:
                raise Unparseable(f"bad status line {lines[0][:60]!r}")
            status = int(m.group(3))
            version = m.group(1) + b"." + m.group(2)
            fields = _fields(lines[1:])
            conn = _tokens(fields, b"connection")
            persistent = b"close" not in conn and (version == b"1.1" or b"keep-alive" in conn)
            origin = next((v for n, v in fields if n == b"x-origin"), None)
            te = _tokens(fields, b"transfer-encoding") if req.version != b"1.0" else []
            trailers: list = []
            complete = True
            if 100 <= status < 200 or status in (204, 304) or req.method == b"HEAD":
                body, pos = b"", end
            elif te and te[-1] == b"chunked":
                body, trailers, pos, complete = _chunked(data, end)
            elif te:
                body, pos, complete, persistent = data[end:], len(data), eof, False
            else:
                lengths = {v.strip() for n, value in fields if n == b"content-length" for v in value.split(b",")}
                if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
                    raise Unparseable("bad Content-Length in a response")
                if lengths:
                    n = int(lengths.pop())
                    body = data[end:end + n]
                    complete = len(body) == n
                    pos = end + len(body)
                else:  # delimited by the close
                    body, pos, complete, persistent = data[end:], len(data), eof, False
        except Unparseable as e:
            return ParsedReplies(replies, None, data[start:], str(e))
        reply = Reply(status, version, tuple(sorted(fields)), body, _multiset(trailers, frozenset()), complete,
                      origin, persistent, (start, pos))
        replies.append(reply)
        if not reply.interim:
            finals += 1
        if status == 101:
            return ParsedReplies(replies, data[pos:], b"")
        if not complete:
            break
    return ParsedReplies(replies, None, data[pos:])


# -- the two views ------------------------------------------------------------------------

@dataclass
class OriginConn:
    """One origin connection's view."""
    messages: list[Message]
    tunnel: bytes | None = None
    leftover: bytes = b""
    reason: str = ""
    #: what the origin answered, parsed
    replies: list[Reply] = field(default_factory=list)
    #: what a strict recipient refuses in those answers (see :func:`answer_problems`)
    problems: list[str] = field(default_factory=list)


@dataclass
class OriginView:
    connections: list[OriginConn]

    def messages(self) -> list[Message]:
        return [m for c in self.connections for m in c.messages]

    def tunnel(self) -> bytes:
        return b"".join(c.tunnel or b"" for c in self.connections)

    def leftover(self) -> list[bytes]:
        return [c.leftover for c in self.connections if c.leftover]

    def problems(self) -> list[str]:
        return [p for c in self.connections for p in c.problems]


def origin_conn_view(events: list[tuple[str, bytes]]) -> OriginConn:
    """One origin connection from its recorded events, in order: ``("in", bytes)``
    what the proxy sent, ``("out", bytes)`` what the origin answered."""
    received = bytearray()
    sent = bytearray()
    out_at: list[tuple[int, int]] = []  # (end of this out-chunk in sent, bytes received before it)
    for direction, chunk in events:
        if direction == "in":
            received += chunk
        elif direction == "out":
            sent += chunk
            out_at.append((len(sent), len(received)))
    received_b, sent_b = bytes(received), bytes(sent)
    first = parse_requests(received_b)
    infos = [ReqInfo(m.method, m.version) for m in first.messages]
    answers = parse_replies(sent_b, infos, eof=True)
    finals = [r for r in answers.replies if not r.interim]
    upgraded = next((i for i, r in enumerate(finals) if r.status == 101), None)
    parsed = first
    tunnel = None
    if upgraded is not None and upgraded < len(first.messages):
        parsed = parse_requests(received_b, stop_after=upgraded + 1)
        tunnel = parsed.leftover
        parsed = ParsedRequests(parsed.messages, parsed.spans, b"", "")
    # RFC 9112 §9.3: after an answer that ends the connection, what the proxy
    # still sends on it was written to a connection it should have given up.
    closed_at = None
    for i, r in enumerate(finals):
        if i < len(parsed.messages) and not r.persistent and r.status != 101:
            head_end = r.span[0] + 1
            closed_at = next((got for end, got in out_at if end >= head_end), None)
            break
    messages = []
    for m, (start, _end) in zip(parsed.messages, parsed.spans):
        if closed_at is not None and start >= closed_at:
            m = Message(**{**m.__dict__, "after_close": True})
        messages.append(m)
    problems = answer_problems(sent_b, answers.replies)
    if answers.reason:
        problems.append(f"unparseable answer: {answers.reason}")
    return OriginConn(messages, tunnel, parsed.leftover, parsed.reason, answers.replies, problems)


def origin_view(connections: list[list[tuple[str, bytes]]]) -> OriginView:
    return OriginView([origin_conn_view(events) for events in connections])


@dataclass
class ClientView:
    replies: list[Reply]
    tunnel: bytes | None
    leftover: bytes
    #: the proxy ended the connection (FIN or reset) before the case ended
    closed: bool
    reset: bool = False
    reason: str = ""

    def finals(self) -> list[Reply]:
        return [r for r in self.replies if not r.interim]


def requests_sent(data: bytes) -> list[ReqInfo]:
    """The method and version of each request a client wrote, for reading the
    answers: parsed leniently; where that stops, every further answer is
    read as an answer to a GET."""
    parsed = parse_requests(data)
    return [ReqInfo(m.method, m.version) for m in parsed.messages]


def client_view(received: bytes, sent: bytes, closed: bool, reset: bool = False) -> ClientView:
    parsed = parse_replies(received, requests_sent(sent), eof=closed)
    return ClientView(parsed.replies, parsed.tunnel, parsed.leftover, closed, reset, parsed.reason)


# -- strictness of the origin's answers ----------------------------------------------------

_STRICT_STATUS = re.compile(rb"HTTP/1\.[01] [1-5]\d\d(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
_STRICT_CHUNK = re.compile(rb"[0-9A-Fa-f]{1,16}(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")


def answer_problems(sent: bytes, replies: list[Reply]) -> list[str]:
    """What a strict RFC 9112 recipient refuses in the origin's answers
    (``sent``, parsed leniently into ``replies``): bare LF, obsolete folding,
    malformed status or field lines, ambiguous or unknown framing, malformed
    chunk lines. A proxy that answers 502 to these is stricter than an
    anchor that relays them, not wrong."""
    problems: list[str] = []
    for r in replies:
        start, end = r.span
        head_end = sent.find(b"\r\n\r\n", start)
        bare = _HEAD_END.search(sent, start)
        if head_end < 0 or (bare is not None and bare.start() < head_end):
            problems.append(f"{r.status}: head not ended by CRLF CRLF")
            continue
        raw = sent[start:head_end]
        lines = raw.split(b"\r\n")
        if b"\n" in raw.replace(b"\r\n", b"") or b"\r" in raw.replace(b"\r\n", b""):
            problems.append(f"{r.status}: bare CR or LF in the head")
        if not _STRICT_STATUS.match(lines[0]):
            problems.append(f"{r.status}: malformed status line")
        names = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.match(name) or _CTL.search(value.strip(b" \t")):
                problems.append(f"{r.status}: malformed field line {line[:40]!r}")
            names.append(name.lower())
        te = [t.strip().lower() for n, v in r.headers if n == b"transfer-encoding" for t in v.split(b",")]
        cls = {v.strip() for n, value in r.headers if n == b"content-length" for v in value.split(b",")}
        if te and cls:
            problems.append(f"{r.status}: both Content-Length and Transfer-Encoding")
        if te and te != [b"chunked"]:
            problems.append(f"{r.status}: transfer coding {b','.join(te)!r}")
        if len(cls) > 1 or any(not v.isdigit() for v in cls):
            problems.append(f"{r.status}: bad Content-Length {sorted(cls)!r}")
        if te == [b"chunked"] and not (100 <= r.status < 200 or r.status in (204, 304)):
            problems.extend(f"{r.status}: {p}" for p in _chunk_problems(sent[head_end + 4:end]))
    return problems


def _chunk_problems(body: bytes) -> list[str]:
    pos = 0
    while True:
        eol = body.find(b"\n", pos)
        if eol < 0:
            return []  # truncated: not a framing problem of its own
        if body[eol - 1:eol] != b"\r":
            return ["chunk line ended by a bare LF"]
        eol -= 1
        line = body[pos:eol]
        if b"\n" in line or b"\r" in line or not _STRICT_CHUNK.match(line):
            return [f"malformed chunk line {line[:40]!r}"]
        n = int(line.split(b";")[0].strip(b" \t"), 16)
        pos = eol + 2
        if n == 0:
            break
        pos += n
        if len(body) >= pos + 2 and body[pos:pos + 2] != b"\r\n":
            return ["chunk data longer than its size"]
        pos += 2
    while True:
        eol = body.find(b"\n", pos)
        if eol < 0:
            return []
        if body[eol - 1:eol] != b"\r":
            return ["trailer line ended by a bare LF"]
        eol -= 1
        line = body[pos:eol]
        if not line:
            return []
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name) or _CTL.search(value) or b"\n" in line:
            return [f"malformed trailer line {line[:40]!r}"]
        pos = eol + 2
