"""The invariants every sans-I/O parser of wsrelay keeps, whatever the input.

Shared by the hypothesis properties (tests/unit/test_fuzz.py) and the atheris
target (tests/fuzz/fuzz_heads.py), so both check exactly the same things:

- any input either parses or raises the parser's own error (HeadError,
  FramingError, ConfigError, ExtensionError, the frame tracker's
  ProtocolError) — never anything else (h11's fuzz invariant);
- fed whole or in pieces (one byte at a time, or cut anywhere), the result is
  the same: the relay re-parses a growing buffer, so a head must not mean
  one thing in one read and another in two;
- a parsed request, forwarded with ``forward_head``, parses again into the
  same method, target, end-to-end header lines and body framing, and the
  forwarded bytes hold no line the client did not send besides our own
  ``X-Forwarded-*`` and ``Connection`` (no header injection, no smuggling);
- a PROXY protocol header (relay.proxy_protocol) is judged the same fed whole
  or one byte at a time, takes no byte past itself, and means the same
  without what follows it;
- a frame stream (relay.frames.FrameTracker, with or without permessage-
  deflate measured) gives the same verdict however it is cut: same error
  code or none, same control frames and message count, the same bytes
  released — except that a compressed message found too big (or invalid)
  only after part of a frame was released in an earlier piece releases that
  part (``ProtocolError.cut``), and never more of the frame than that.

- the compiled parsers and forward_head (relay/native/http_head.c, through
  relay.native._engine) give the reference's result for every input: the
  same head (fields, target, path, authority, length) or the same error
  status and outcome, whole and in pieces, and the same answers to
  get/get_all/tokens; the same forwarded bytes.

Each check raises AssertionError with the offending input on a violation.
"""

from __future__ import annotations

from relay.deflate import ExtensionError, PerMessageDeflate, parse_extensions
from relay.errors import FramingError, HeadError, ProxyProtocolError
from relay.frames import Control, FrameTracker, ProtocolError
from relay.http_body import BodyScanner
from relay.handshake import check_upgrade_response, is_upgrade, origin_allowed, path_allowed, validate_upgrade
from relay.headers import FORWARDED, HOP_BY_HOP, NEVER_NAMED, NO_UNDERSCORE, forward_head
from relay.http_head import CRLF, Request, Response, body_framing, parse_request_head, \
    parse_response_head
from relay.proxy_protocol import parse_proxy_header

#: a small cap so size errors are reachable by a fuzzer
MAX_HEAD = 1024


def _summary(head) -> tuple:
    if hasattr(head, "method"):  # a Request, or the compiled parser's view of one
        return ("request", head.method, head.target, head.path, head.version, tuple(head.fields), head.head_len)
    return ("response", head.status, tuple(head.fields), head.head_len)


def outcome(parse, buf: bytes, max_bytes: int = MAX_HEAD) -> tuple:
    """A comparable result of one parse: ('none',), ('error', status, outcome) or a summary."""
    try:
        head = parse(buf, max_bytes)
    except HeadError as e:
        assert 400 <= e.status <= 599, (buf, e.status)
        return ("error", e.status, e.outcome)
    # anything else propagates: that is the bug a fuzzer is looking for
    if head is None:
        return ("none",)
    assert 0 < head.head_len <= len(buf), (buf, head.head_len)
    return _summary(head)


def incremental(parse, buf: bytes, cuts, max_bytes: int = MAX_HEAD) -> tuple:
    """Parse a growing buffer as the relay does: after each cut, stop at the first answer."""
    for end in cuts:
        r = outcome(parse, buf[:end], max_bytes)
        if r[0] != "none":
            return r
    return outcome(parse, buf, max_bytes)


def check_head_parser(parse, buf: bytes, cuts=None, max_bytes: int = MAX_HEAD):
    """Whole vs incremental (every byte by default); returns the whole result."""
    whole = outcome(parse, buf, max_bytes)
    pieces = incremental(parse, buf, range(1, len(buf) + 1) if cuts is None else sorted(cuts), max_bytes)
    assert pieces == whole, f"incremental {pieces!r} != whole {whole!r} for {buf!r}"
    return whole


def check_request_semantics(buf: bytes, max_bytes: int = MAX_HEAD) -> None:
    """Everything the relay does with a parsed request raises only HeadError."""
    try:
        req = parse_request_head(buf, max_bytes)
    except HeadError:
        return
    if req is None:
        return
    try:
        body_framing(req, is_request=True)
    except HeadError as e:
        assert e.status == 400
    upgrade = is_upgrade(req)
    if upgrade:
        try:
            key = validate_upgrade(req)
        except HeadError as e:
            assert e.status in (400, 426)
            upgrade = False  # refused by the relay; still check the plain-HTTP forwarding below
        else:
            assert len(key) == 24
    path_allowed(req.path, (b"/", b"/ws"))
    origin_allowed(req.get(b"origin"), ("https://app.example.com", "*.example.org", "example.net"))
    check_forward_roundtrip(req, upgrade)
    check_forward_roundtrip(req, upgrade, trusted=True)


def check_forward_roundtrip(req: Request, upgrade: bool, client_ip: str = "203.0.113.7",
                            trusted: bool = False) -> bytes:
    """forward_head keeps the request's meaning and injects nothing; the
    client's X-Forwarded-For survives only from a ``trusted`` proxy."""
    out = forward_head(req, client_ip, b"http", upgrade, b"0123456789abcdef0123456789abcdef", trusted=trusted)
    again = parse_request_head(out, len(out))
    assert again is not None and again.head_len == len(out), (req.fields, out)
    assert (again.method, again.target, again.path) == (req.method, req.target, req.path), out
    named = req.tokens(b"connection")
    kept = [line for name, line, _v in req.fields
            if name not in HOP_BY_HOP and name not in FORWARDED and (name not in named or name in NEVER_NAMED)
            and not (b"_" in name and name.replace(b"_", b"-") in NO_UNDERSCORE)]
    ours = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id", b"connection"}
    if upgrade:
        ours.add(b"upgrade")
    if not upgrade:
        ours.add(b"transfer-encoding")
    if not req.get_all(b"host"):
        ours.add(b"host")
    sent = [line for name, line, _v in again.fields if name not in ours]
    assert sent == kept, f"end-to-end lines changed: {kept!r} -> {sent!r}"
    # every line that reached the origin is one the client sent, or one of ours
    client_lines = {line for _n, line, _v in req.fields}
    for name, line, _v in again.fields:
        assert line in client_lines or name in (ours - {b"upgrade", b"transfer-encoding"}), line
    # the same framing on both sides of the relay: no request smuggling
    try:
        before = body_framing(req, is_request=True)
    except HeadError:
        return out
    assert body_framing(again, is_request=True) == before, out
    # an HTTP/1.0 request may lack Host; HTTP/1.1 to the origin gets an empty one (RFC 9112 §3.2)
    assert again.get_all(b"host") == ([req.authority] if req.authority is not None
                                      else req.get_all(b"host") or [b"localhost"]), out
    xff = again.get_all(b"x-forwarded-for")
    assert len(xff) == 1 and xff[0].endswith(client_ip.encode()), xff
    if not trusted:
        assert xff == [client_ip.encode()], xff  # whatever the client claimed is gone
    assert again.get_all(b"x-request-id") == [b"0123456789abcdef0123456789abcdef"], out
    return out


def check_response_semantics(buf: bytes, key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
                             max_bytes: int = MAX_HEAD) -> None:
    try:
        resp = parse_response_head(buf, max_bytes)
    except HeadError:
        return
    if resp is None:
        return
    assert 100 <= resp.status <= 599
    try:
        body_framing(resp, is_request=False)
    except HeadError as e:
        assert e.status == 502
    try:
        check_upgrade_response(resp, key)
    except HeadError as e:
        assert e.status == 502


def scan(length, data: bytes, cuts) -> tuple:
    """Feed a body in pieces; returns (bytes taken, done) or ('error',)."""
    body = BodyScanner(length)
    taken, prev = 0, 0
    try:
        for end in [*cuts, len(data)]:
            if end <= prev:
                continue
            piece = data[prev:end]
            n = body.feed(memoryview(piece) if end % 2 else piece)
            assert 0 <= n <= len(piece), (n, len(piece))
            taken += n
            prev = end
            if body.done:
                break
    except FramingError:
        return ("error",)
    return (taken, body.done)


def dechunk(data: bytes, cuts) -> bytes | None:
    """The chunk data of a chunked body fed in pieces (``dechunk=True``); None on error."""
    body = BodyScanner(-1, dechunk=True)
    out, prev = b"", 0
    try:
        for end in [*cuts, len(data)]:
            if end <= prev:
                continue
            piece = data[prev:end]
            n = body.feed(piece)
            out += body.payload(piece)
            prev = end
            if body.done:
                break
    except FramingError:
        return None
    assert body.spans == []
    return out


def check_body_scanner(length, data: bytes, cuts=None) -> tuple:
    whole = scan(length, data, [])
    pieces = scan(length, data, range(1, len(data)) if cuts is None else sorted(cuts))
    assert pieces == whole, f"pieces {pieces!r} != whole {whole!r} for length={length!r} data={data!r}"
    if whole != ("error",) and whole[1] and length == -1:
        # what a chunked body took ends with the last-chunk and the trailer section
        assert data[: whole[0]].endswith(CRLF), data[: whole[0]]
    if length == -1:
        # de-chunking (for HTTP/1.0 clients) gives the same payload however the body is cut
        payload = dechunk(data, [])
        assert dechunk(data, range(1, len(data)) if cuts is None else sorted(cuts)) == payload
        assert (payload is None) == (whole == ("error",))
    return whole


def response_for(resp_bytes: bytes) -> Response | None:
    try:
        return parse_response_head(resp_bytes, MAX_HEAD)
    except HeadError:
        return None


def check_extensions(values: list[bytes]) -> PerMessageDeflate | None | str:
    """parse_extensions raises only ExtensionError, and a list of header
    lines means what the same lines joined into one do (RFC 9110 §5.3).
    Returns the value, or "error"."""
    def once(vals):
        try:
            return parse_extensions(vals)
        except ExtensionError as e:
            assert str(e), vals
            return "error"
    whole = once(values)
    if values:
        assert once([b", ".join(values)]) == whole, values
    if isinstance(whole, PerMessageDeflate):
        assert 8 <= whole.server_max_window_bits <= 15 and 8 <= whole.client_max_window_bits <= 15
    return whole


def track(data: bytes, client_to_server: bool, limit: int, deflate, cuts) -> tuple:
    """Feed ``data`` to a fresh tracker cut at ``cuts``; a comparable outcome:
    ("ok", released, held, controls, messages, at_boundary) or
    ("error", code, released, cut, controls, messages)."""
    t = FrameTracker(client_to_server=client_to_server, max_message_bytes=limit, deflate=deflate)
    out = bytearray()
    controls: list = []

    def release(plan, start, end):
        if plan is None:
            out.extend(data[start:end])
            return
        for item in plan:
            if isinstance(item, Control):
                controls.append((item.opcode, item.payload))
                out.extend(item.raw)
            else:
                out.extend(item)

    prev = 0
    try:
        for c in [*sorted(set(cuts)), len(data)]:
            if not prev <= c <= len(data):
                continue
            release(t.feed(memoryview(data), prev, c), prev, c)
            assert len(out) + t.held == c, (data, cuts)  # nothing lost or invented
            prev = c
    except ProtocolError as e:
        assert e.code in (1002, 1009), e
        release(e.plan, 0, 0)
        assert not e.cut or not t.at_boundary
        return ("error", e.code, bytes(out), e.cut, controls, t.messages)
    return ("ok", bytes(out), t.held, controls, t.messages, t.at_boundary)


def check_frame_tracker(data: bytes, client_to_server: bool, limit: int = 0, deflate=None, cuts=()) -> tuple:
    """Whole vs cut at ``cuts`` (every byte by default); returns the whole outcome."""
    whole = track(data, client_to_server, limit, deflate, [])
    pieces = track(data, client_to_server, limit, deflate, range(1, len(data)) if cuts is None else cuts)
    if whole[0] == "ok":
        assert pieces == whole, f"pieces {pieces!r} != whole {whole!r} for {data!r}"
        assert data.startswith(whole[1]) and len(whole[1]) + whole[2] == len(data)
        return whole
    assert pieces[0] == "error" and pieces[1] == whole[1], (pieces, whole, data)
    assert not whole[3], "one piece cannot be cut inside a frame"
    assert (pieces[4], pieces[5]) == (whole[4], whole[5]), (pieces, whole, data)
    released, more = whole[2], pieces[2]
    assert data.startswith(released) and data.startswith(more), (pieces, whole, data)
    if pieces[3]:
        # part of the bad frame went out, and nothing after it
        assert len(released) < len(more) < len(released) + _frame_len(data, len(released), client_to_server)
    else:
        assert more == released, (pieces, whole, data)
    return whole


def _frame_len(data: bytes, pos: int, masked: bool) -> int:
    """Length of the frame starting at ``pos`` (header included), RFC 6455 §5.2."""
    n = data[pos + 1] & 0x7F
    h = 2
    if n == 126:
        n, h = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
    elif n == 127:
        n, h = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
    return h + (4 if masked else 0) + n


# -- the compiled twin (relay/native/http_head.c) against the reference -------------------

#: names looked up on both parses (present or not)
LOOKUPS = (b"host", b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version", b"origin",
           b"content-length", b"transfer-encoding", b"x-forwarded-for", b"user-agent", b"sec-websocket-accept",
           b"absent")


def check_same_as_reference(native_parse, reference_parse, buf: bytes, cuts=None, max_bytes: int = MAX_HEAD):
    """``native_parse`` answers as ``reference_parse`` for ``buf``, whole and
    cut at ``cuts`` (every byte by default); both keep the whole/pieces
    invariant. Returns the reference's (whole) result."""
    ref = check_head_parser(reference_parse, buf, cuts, max_bytes)
    got = check_head_parser(native_parse, buf, cuts, max_bytes)
    assert got == ref, f"native {got!r} != reference {ref!r} for {buf!r}"
    if ref[0] in ("request", "response"):
        a, b = native_parse(buf, max_bytes), reference_parse(buf, max_bytes)
        names = {name for name, _l, _v in b.fields} | set(LOOKUPS)
        for name in names:
            assert a.get(name) == b.get(name), (name, buf)
            assert a.get_all(name) == b.get_all(name), (name, buf)
            assert a.tokens(name) == b.tokens(name), (name, buf)
        assert a.version == b.version, buf
        if ref[0] == "request":
            assert a.authority == b.authority, buf
    return ref


def check_same_forward(native_parse, native_forward, buf: bytes, client_ip: str = "203.0.113.7",
                       max_bytes: int = MAX_HEAD) -> None:
    """The compiled forward_head sends what the reference sends, upgrade or not."""
    try:
        ref = parse_request_head(buf, max_bytes)
    except HeadError:
        return
    if ref is None:
        return
    req = native_parse(buf, max_bytes)
    for upgrade in (True, False):
        for rid in (b"", b"0123456789abcdef0123456789abcdef"):
            for trusted in (False, True):  # a trusted proxy's X-Forwarded-For is kept (RELAY_TRUSTED_PROXIES)
                want = forward_head(ref, client_ip, b"https", upgrade, rid, b"10.0.0.5:9000", trusted)
                got = native_forward(req, client_ip, b"https", upgrade, rid, b"10.0.0.5:9000", trusted=trusted)
                assert got == want, f"native {got!r} != reference {want!r} for {buf!r} (trusted={trusted})"
def proxy_outcome(buf: bytes) -> tuple:
    """A comparable result of one PROXY header parse: ('none',), ('error', reason) or the header."""
    try:
        header = parse_proxy_header(buf)
    except ProxyProtocolError as e:
        assert e.reason in ("missing", "invalid"), (buf, e.reason)
        return ("error", e.reason)
    if header is None:
        return ("none",)
    assert 0 < header.length <= len(buf), (buf, header)
    assert header.version in (1, 2) and (header.source is None) == (header.destination is None), header
    if header.local:
        assert header.source is None, header
    return ("header", header)


def check_proxy_header(buf: bytes, cuts=None) -> tuple:
    """Whole vs incremental (every byte by default); returns the whole result."""
    whole = proxy_outcome(buf)
    pieces = ("none",)
    for end in (range(1, len(buf) + 1) if cuts is None else [*sorted(cuts), len(buf)]):
        pieces = proxy_outcome(buf[:end])
        if pieces[0] != "none":
            break
    assert pieces == whole, f"incremental {pieces!r} != whole {whole!r} for {buf!r}"
    if whole[0] == "header":
        # the header alone means the same: nothing after it was read
        assert proxy_outcome(buf[: whole[1].length]) == whole, buf
    return whole
