"""Generated differential inputs (hypothesis strategies).

:func:`cases` builds a :class:`~tests.differential.case.Case` from one to
three requests and the origin's answers, each drawn from the seams where
proxies disagree: body framing (Content-Length and Transfer-Encoding in
their legal and ambiguous spellings, chunk-size tricks, trailers), header
folding and name/whitespace variants, Connection token lists naming
framing or end-to-end fields, ``Expect: 100-continue``, WebSocket upgrades
(accepted, refused, with bytes behind the head), 1xx before the final
answer, responses with HEAD/204/304 bodies, HTTP/1.0 on either side,
pipelining (one write, several, heads cut across writes) and early closes
by either side.

Each case carries ``features``: the named patterns it contains, which
:mod:`tests.differential.known` matches against the differences wsrelay is
known to still have.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential.case import Answer, Case, Step

HOST = b"Host: example.test\r\n"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: {accept}\r\nX-Origin: %s\r\n\r\n")

TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"Transfer-Encoding ",
            b"Transfer_Encoding", b" Transfer-Encoding"]
TE_VALUES = [b"chunked", b"chunked", b"Chunked", b" chunked", b"chunked ", b"\tchunked", b"chunked, identity",
             b"identity, chunked", b"gzip, chunked", b"xchunked", b"chunked;q=1", b"chunked, chunked", b'"chunked"']
CONNECTION_TOKENS = [b"close", b"keep-alive", b"content-length", b"transfer-encoding", b"host", b"x-a", b"upgrade",
                     b"te", b"expect", b"x-forwarded-for", b"trailer", b"keep-alive, x-a"]


def _chunks(draw, body: bytes, features: set[str]) -> bytes:
    """``body`` chunked, with the chunk-line spellings proxies read differently."""
    n = draw(st.integers(1, 3)) if body else 0
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), min_size=n - 1, max_size=n - 1))) if n > 1 else []
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])] if body else []
    eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n"]))
    if eol == b"\n":
        features.add("chunk-bare-lf")
    out = b""
    for piece in pieces:
        if not piece:
            continue
        size = draw(st.sampled_from([b"%x", b"%X", b"00%x", b"%x ", b"%x;ext=1", b'%x;q="a b"', b"1000000000000000%x"]))
        out += size % len(piece) + eol + piece + eol
    out += draw(st.sampled_from([b"0", b"000", b"0;last"])) + eol
    trailer = draw(st.sampled_from([b""] * 4 + [b"X-Checksum: abc", b"Host: evil.test", b"Content-Length: 0",
                                              b"Transfer-Encoding: chunked", b"X-A : 1"]))
    if trailer:
        out += trailer + eol
    return out + eol


@st.composite
def framing(draw, body: bytes) -> tuple[list[bytes], bytes, set[str]]:
    """(header lines, encoded body, features) for a request body."""
    features: set[str] = set()
    kind = draw(st.sampled_from(["cl", "cl", "chunked", "chunked", "cl+te", "te+cl", "te-twice", "cl-twice",
                                 "cl-differ", "cl-list", "te-fold"]))
    features.add(f"framing-{kind}")
    cl = draw(st.sampled_from([b"%d", b"%d", b"0%d", b"+%d", b"%d, %d", b" %d "]))
    cl_line = b"Content-Length: " + (cl % ((len(body),) * cl.count(b"%d")))
    te_line = draw(st.sampled_from(TE_NAMES)) + b": " + draw(st.sampled_from(TE_VALUES))
    chunked = _chunks(draw, body, features)
    if kind == "cl":
        return [cl_line], body, features
    if kind == "chunked":
        return [te_line], chunked, features
    if kind == "cl+te":
        return [cl_line, te_line], chunked, features
    if kind == "te+cl":
        return [te_line, b"Content-Length: %d" % draw(st.integers(0, max(0, len(chunked) - 1)))], chunked, features
    if kind == "te-twice":
        return [te_line, b"Transfer-Encoding: " + draw(st.sampled_from([b"x", b"identity", b"chunked"]))], \
            chunked, features
    if kind == "cl-twice":
        return [cl_line, cl_line], body, features
    if kind == "cl-differ":
        return [cl_line, b"Content-Length: %d" % (len(body) + draw(st.integers(1, 5)))], body, features
    if kind == "cl-list":
        return [b"Content-Length: %d, %d" % (len(body), len(body) + draw(st.integers(0, 1)))], body, features
    # te-fold: the coding on a folded line (obs-fold)
    return [b"Transfer-Encoding:\r\n chunked"], chunked, features


@st.composite
def request(draw, index: int) -> tuple[bytes, dict]:
    """One request: (bytes, meta) with meta's method, version, upgrade flag and features."""
    features: set[str] = set()
    upgrade = draw(st.integers(0, 4)) == 0
    if upgrade:
        features.add("upgrade")
        fields = [HOST, b"Upgrade: websocket\r\n", b"Connection: Upgrade\r\n",
                  b"Sec-WebSocket-Key: " + KEY + b"\r\n", b"Sec-WebSocket-Version: 13\r\n"]
        variant = draw(st.sampled_from(["valid"] * 5 + ["connection-list", "no-key", "version-8", "h2c",
                                                        "origin-other", "xff"]))
        valid = True
        if variant == "connection-list":
            fields[2] = b"Connection: keep-alive, Upgrade\r\n"
        elif variant == "no-key":
            fields.pop(3)
            valid = False
        elif variant == "version-8":
            fields[4] = b"Sec-WebSocket-Version: 8\r\n"
            valid = False
        elif variant == "h2c":
            fields[1:] = [b"Upgrade: h2c\r\n", b"Connection: Upgrade, HTTP2-Settings\r\n",
                          b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"]
            features.add("h2c")
            valid = False
        elif variant == "origin-other":
            fields.append(b"Origin: https://evil.test\r\n")
            valid = False
        elif variant == "xff":
            fields.append(b"X-Forwarded-For: 10.0.0.1\r\n")
        features.add(f"upgrade-{variant}")
        head = b"GET /ws HTTP/1.1\r\n" + b"".join(draw(st.permutations(fields)))
        return head + b"\r\n", {"method": b"GET", "version": b"1.1", "upgrade": valid, "body": False,
                                "asks_upgrade": True, "features": features}
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"OPTIONS"]))
    if method == b"HEAD":
        features.add("head-request")
    version = draw(st.sampled_from([b"1.1"] * 4 + [b"1.0"]))
    if version == b"1.0":
        features.add("http10-client")
    target = draw(st.sampled_from([b"/r%d" % index] * 3 + [b"/r%d?q=1" % index, b"http://example.test/r%d" % index,
                                                          b"http://other.test/r%d" % index, b"//r%d" % index,
                                                          b"/r%d/../x" % index, b"/r%d#frag" % index]))
    if b"#" in target:
        features.add("target-fragment")
    if b"other.test" in target:
        features.add("target-absolute-other")
    fields: list[bytes] = []
    if version == b"1.0" and not draw(st.booleans()):
        features.add("http10-no-host")
    else:
        host = draw(st.sampled_from([HOST.rstrip(b"\r\n")] * 6 + [
            b"Host: example.test:80", b"host: example.test", b"Host:", b"Host: example.test\r\nHost: other.test",
            b"Host: exa mple.test", b"Host: example.test:80:80"]))
        if host in (b"Host:", b"Host: exa mple.test"):
            features.add("host-invalid")
        fields.append(host)
    has_body = method in (b"POST", b"PUT") and draw(st.integers(0, 5)) > 0
    body_bytes = b""
    if has_body:
        body_bytes = draw(st.sampled_from([b"hello", b"a=1&b=2", SMUGGLED, b"0\r\n\r\n" + SMUGGLED, b""]))
        lines, body_bytes, f = draw(framing(body_bytes))
        fields.extend(lines)
        features |= f
    if draw(st.integers(0, 3)) == 0:
        tokens = draw(st.lists(st.sampled_from(CONNECTION_TOKENS), min_size=1, max_size=3, unique=True))
        fields.append(b"Connection: " + b", ".join(tokens))
        features.add("connection-list")
        if b"x-a" in b"".join(tokens):
            fields.append(b"X-A: named")
    elif version == b"1.0" and draw(st.booleans()):
        fields.append(b"Connection: keep-alive")
    if draw(st.integers(0, 4)) == 0:
        fields.append(b"Expect: 100-continue")
        features.add("expect")
    if draw(st.integers(0, 3)) == 0:
        fields.append(b"X-Forwarded-For: 10.0.0.1")
    if draw(st.integers(0, 6)) == 0:
        fields.append(draw(st.sampled_from([b"X-Fold: a\r\n b", b"X-Fold: a\r\n\tb", b"X_Forwarded_For: 10.0.0.2",
                                            b"x-lower: 1", b"X-Empty:", b"Keep-Alive: 300", b"TE: trailers"])))
        features.add("odd-field")
    order = draw(st.permutations(fields)) if draw(st.booleans()) else fields
    eol = b"\r\n"
    if draw(st.integers(0, 12)) == 0:
        eol = b"\n"
        features.add("bare-lf-head")
    line = b"%s %s HTTP/%s" % (method, target, version)
    if draw(st.integers(0, 8)) == 0:
        line = draw(st.sampled_from([line.lower(), line + b" ", line.replace(b" ", b"  ", 1),
                                     line.replace(b"HTTP/1.1", b"HTTP/1.2"), line.replace(b"HTTP/1.", b"HTTP/01."),
                                     line.replace(b" ", b"\t")]))
        features.add("odd-request-line")
    head = line + eol + b"".join(f + eol for f in order) + eol
    return head + body_bytes, {"method": method, "version": version, "upgrade": False, "body": has_body,
                               "asks_upgrade": False, "features": features}


@st.composite
def answer(draw, index: int, meta: dict) -> tuple[Answer, set[str]]:
    """The origin's answer to request ``index``."""
    features: set[str] = set()
    oid = b"%d" % (index + 1)
    interim = draw(st.sampled_from([b""] * 4 + [b"HTTP/1.1 100 Continue\r\n\r\n",
                                                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"]))
    if meta["upgrade"]:
        if draw(st.booleans()):
            if interim:
                features.add("interim-before-101")
            return Answer("request", interim + SWITCH % oid), features
        features.add("upgrade-refused")
        extra = draw(st.sampled_from([b"", b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
                                      b"Connection: close\r\n"]))
        return Answer("request", b"HTTP/1.1 403 Forbidden\r\nX-Origin: " + oid + b"\r\n" + extra
                      + b"Content-Length: 2\r\n\r\nno", "close" if b"close" in extra else "keep"), features
    if meta["asks_upgrade"] and draw(st.booleans()):
        # an origin that switches whatever the proxy thought of the request (h2c, a missing key)
        features.add("101-to-non-websocket")
        return Answer("request", SWITCH % oid), features
    status = draw(st.sampled_from([b"200 OK", b"200 OK", b"201 Created", b"204 No Content", b"304 Not Modified",
                                   b"404 Not Found", b"500 Internal Server Error"]))
    version = draw(st.sampled_from([b"1.1"] * 5 + [b"1.0"]))
    body = b"answer %s" % oid
    conn = draw(st.sampled_from([b""] * 4 + [b"Connection: close\r\n", b"Connection: keep-alive\r\n",
                                             b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
                                             b"Connection: content-length\r\n"]))
    kind = draw(st.sampled_from(["cl", "cl", "chunked", "close", "cl-extra"]))
    no_body = meta["method"] == b"HEAD" or status[:3] in (b"204", b"304")
    if version == b"1.0" and b"keep-alive" not in conn:
        features.add("http10-answer")
    then = "keep"
    if kind == "chunked":
        if version == b"1.0":
            kind = "cl"
        else:
            trailer = draw(st.booleans())
            framing = b"Transfer-Encoding: chunked\r\n" + (b"Trailer: X-Checksum\r\n" if trailer else b"")
            payload = b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, b"X-Checksum: abc\r\n" if trailer else b"")
            if trailer:
                features.add("trailer")
            if meta["version"] == b"1.0" and not no_body:
                features.add("http10-client-chunked")
    if kind in ("cl", "cl-extra"):
        framing = b"Content-Length: %d\r\n" % len(body)
        # cl-extra: a second response glued behind the first, which no request asked for
        forged = b"HTTP/1.1 200 OK\r\nX-Origin: forged\r\nContent-Length: 0\r\n\r\n"
        payload = body + (forged if kind == "cl-extra" else b"")
    elif kind == "close":
        framing, payload, then = b"", body, "close"
    if no_body and kind != "close" and draw(st.booleans()):
        payload = b""  # a well-behaved origin sends no body; sometimes it sends it anyway
    if b"close" in conn or (version == b"1.0" and b"keep-alive" not in conn):
        then = "close"
    data = interim + b"HTTP/%s %s\r\nX-Origin: %s\r\n%s%s\r\n%s" % (version, status, oid, conn, framing, payload)
    at = "request"
    if meta["body"] and draw(st.integers(0, 3)) == 0:
        at = "head"
        features.add("early-answer")
    return Answer(at, data, then), features


@st.composite
def cases(draw) -> Case:
    n = draw(st.integers(1, 3))
    reqs = [draw(request(i)) for i in range(n)]
    answers = []
    features: set[str] = set()
    for i, (_data, meta) in enumerate(reqs):
        features |= meta["features"]
        ans, f = draw(answer(i, meta))
        features |= f
        answers.append(ans)
    mode = draw(st.sampled_from(["pipelined", "sequential", "sequential", "split"]))
    steps: list[Step] = []
    if mode == "pipelined":
        steps.append(Step("send", b"".join(d for d, _ in reqs)))
        if any(m["upgrade"] for _d, m in reqs[:-1]):
            features.add("bytes-behind-upgrade")
    else:
        for i, (data, _meta) in enumerate(reqs):
            if mode == "split" and len(data) > 2:
                cut = draw(st.integers(1, len(data) - 1))
                steps += [Step("send", data[:cut]), Step("pause", seconds=0.02), Step("send", data[cut:])]
            else:
                steps.append(Step("send", data))
            if i < n - 1:
                steps.append(Step("wait-response", seconds=0.5, count=i + 1))
    if reqs[-1][1]["asks_upgrade"] and draw(st.booleans()):
        # tunnel bytes: right behind the head (before any answer) or after the answer
        if draw(st.booleans()):
            steps.append(Step("wait-response", seconds=0.5, count=n))
        else:
            features.add("bytes-behind-upgrade")
        steps.append(Step("send", b"tunnel bytes"))
    end = draw(st.sampled_from(["open"] * 6 + ["shutdown", "close", "truncate"]))
    if end == "truncate":
        last = steps[-1]
        if last.kind == "send" and len(last.data) > 1:
            steps[-1] = Step("send", last.data[:draw(st.integers(1, len(last.data) - 1))])
        steps += [Step("pause", seconds=0.05), Step("close")]
        features.add("client-closes-early")
    elif end != "open":
        steps.append(Step(end))
        features.add(f"client-{end}")
    title = f"generated: {n} request(s), {mode}, client {end}"
    return Case(name="generated", title=title, client=steps, origin=answers, features=frozenset(features))
