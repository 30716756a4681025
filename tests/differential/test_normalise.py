"""The differential harness's own parsers and judge, sans-I/O: bytes in,
views and differences out (no proxy, no socket)."""

from __future__ import annotations

from tests.differential.compare import Observed, client_differences, compare, origin_differences, shape
from tests.differential.normalise import (ClientView, Message, ReqInfo, answer_problems, client_view,
                                          origin_conn_view, origin_form, origin_view, parse_replies, parse_requests)

XFF = b"X-Forwarded-For: 127.0.0.1\r\n"


def test_requests_are_split_by_their_own_framing():
    data = (b"\r\nPOST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n" + XFF + b"\r\nhello"
            b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n" + XFF +
            b"\r\n3;ext=1\r\nabc\r\n002\r\nde\r\n0\r\nX-Sum: 1\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    parsed = parse_requests(data)
    a, b, c = parsed.messages
    assert (a.method, a.target, a.body, a.proxied) == (b"POST", b"/a", b"hello", True)
    assert (b.body, b.trailers, b.complete) == (b"abcde", ((b"x-sum", b"1"),), True)
    assert (c.target, c.proxied, c.xff) == (b"/c", False, ())
    assert parsed.leftover == b"" and parsed.spans[0][0] == 2


def test_header_multiset_drops_what_proxies_own_and_keeps_the_rest():
    m = parse_requests(b"GET http://other/x?y HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-A: 1\r\nx-a: 1\r\n"
                       b"Keep-Alive: 5\r\nX-Forwarded-For: 6.6.6.6, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
                       ).messages[0]
    assert m.target == b"/x?y"
    assert m.headers == ((b"x-a", b"1"), (b"x-a", b"1"))
    assert (m.xff, m.proxied) == ((b"6.6.6.6",), True)


def test_haproxy_style_second_forwarded_for_line_counts_as_appended():
    m = parse_requests(b"GET / HTTP/1.1\r\nx-forwarded-for: 6.6.6.6\r\nx-forwarded-for: 127.0.0.1\r\n\r\n").messages[0]
    assert (m.xff, m.proxied) == ((b"6.6.6.6",), True)


def test_lenient_origin_reading_reveals_what_raw_bytes_become():
    # bare LF lines and obs-fold are read (as a lenient origin would), so bytes
    # a proxy let through show up as what they mean
    m = parse_requests(b"GET / HTTP/1.1\nHost: h\nX-A: a\n b\n\n").messages[0]
    assert m.headers == ((b"x-a", b"a b"),)
    parsed = parse_requests(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n")
    assert parsed.messages == [] and "bad field line" in parsed.reason
    parsed = parse_requests(b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n")
    assert parsed.messages == [] and parsed.leftover.startswith(b"GET")


def test_transfer_encoding_wins_over_content_length():
    m = parse_requests(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n").messages[0]
    assert m.body == b"hello"


def test_incomplete_input():
    parsed = parse_requests(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert parsed.messages[0].complete is False and parsed.messages[0].body == b"abc"
    parsed = parse_requests(b"GET / HTTP/1.1\r\nHo")
    assert parsed.messages == [] and parsed.leftover == b"GET / HTTP/1.1\r\nHo" and parsed.reason == ""
    parsed = parse_requests(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello")
    assert parsed.messages[0].complete is False


def test_stop_after_leaves_the_rest():
    parsed = parse_requests(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", stop_after=1)
    assert len(parsed.messages) == 1 and parsed.leftover == b"GET /2 HTTP/1.1\r\n\r\n"


def test_the_host_named_ignores_case_and_port():
    names = [parse_requests(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % h).messages[0].authority
             for h in (b"Example.TEST:8080", b"example.test", b"[::1]:80", b"")]
    assert names == [b"example.test", b"example.test", b"[::1]", b""]


def test_another_host_named_is_a_finding():
    mine = _origin(_msg(b"/x", authority=b"example.test"))
    kinds = [d.kind for d in origin_differences(mine, {"nginx": _origin(_msg(b"/x", authority=b"other.test"))})]
    assert kinds == ["origin-authority"]


def test_origin_form():
    assert origin_form(b"http://a:1") == b"/"
    assert origin_form(b"HTTPS://a?x") == b"/?x"
    assert origin_form(b"ws://a/b/c?d") == b"/b/c?d"
    assert origin_form(b"/p") == b"/p" and origin_form(b"*") == b"*"


def test_replies_framing_follows_the_request():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Origin: 1\r\n\r\n"          # HEAD: no body
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    parsed = parse_replies(data, [ReqInfo(b"HEAD"), ReqInfo(), ReqInfo()], eof=True)
    statuses = [(r.status, r.body, r.interim) for r in parsed.replies]
    assert statuses == [(100, b"", True), (200, b"", False), (204, b"", False), (200, b"ok", False)]
    assert parsed.replies[1].origin == b"1" and parsed.replies[3].persistent is False


def test_an_http10_client_knows_no_chunked():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    r = parse_replies(data, [ReqInfo(b"GET", b"1.0")], eof=True).replies[0]
    assert r.body == b"2\r\nok\r\n0\r\n\r\n" and r.complete
    r = parse_replies(data, [ReqInfo()], eof=True).replies[0]
    assert r.body == b"ok"


def test_close_delimited_body_is_complete_only_at_the_close():
    data = b"HTTP/1.1 200 OK\r\n\r\npart"
    assert parse_replies(data, [ReqInfo()], eof=False).replies[0].complete is False
    assert parse_replies(data, [ReqInfo()], eof=True).replies[0].complete is True


def test_101_starts_the_tunnel():
    parsed = parse_replies(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nframes", [ReqInfo()],
                           eof=False)
    assert parsed.replies[0].status == 101 and parsed.tunnel == b"frames"


def test_origin_connection_view_tunnel_and_after_close():
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n" + XFF + b"\r\n"
    view = origin_conn_view([("in", upgrade + b"early"), ("out", b"HTTP/1.1 101 S\r\n\r\n"), ("in", b" later")])
    assert len(view.messages) == 1 and view.tunnel == b"early later"

    events = [("in", b"GET /1 HTTP/1.1\r\n" + XFF + b"\r\n"),
              ("out", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na"),
              ("in", b"GET /2 HTTP/1.1\r\n" + XFF + b"\r\n")]
    first, second = origin_conn_view(events).messages
    assert (first.after_close, second.after_close) == (False, True)
    # a 1.0 answer that keeps alive does not end the connection
    events[1] = ("out", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na")
    assert not any(m.after_close for m in origin_conn_view(events).messages)


def test_proxy_answers_are_told_from_the_origins():
    view = client_view(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
                       b"HTTP/1.1 403 Forbidden\r\nX-Origin: 9\r\nContent-Length: 0\r\n\r\n",
                       b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", closed=True)
    assert [(r.status, r.from_origin) for r in view.finals()] == [(400, False), (403, True)]


def test_answer_problems_of_a_strict_reading():
    ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert answer_problems(ok, parse_replies(ok, [ReqInfo()], True).replies) == []
    for bad, why in [(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\n0\n\n", "bare LF"),
                     (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "both"),
                     (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", "malformed field"),
                     (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "CRLF")]:
        problems = answer_problems(bad, parse_replies(bad, [ReqInfo()], True).replies)
        assert any(why in p for p in problems), (bad, problems)


# -- the judge --------------------------------------------------------------------------------------

def _msg(target=b"/", headers=(), body=b"", **kw) -> Message:
    return Message(b"GET", target, tuple(sorted(headers)), body, **kw)


def _origin(*messages):
    view = origin_view([])
    view.connections.append(origin_conn_view([]))
    view.connections[0].messages.extend(messages)
    return view


def test_same_requests_no_difference():
    same = _origin(_msg(b"/a"), _msg(b"/b"))
    assert origin_differences(same, {"nginx": _origin(_msg(b"/a"), _msg(b"/b")), "haproxy": _origin()}) == []


def test_raw_bytes_that_became_a_request_are_smuggling():
    mine = _origin(_msg(b"/a"), _msg(b"/internal", proxied=False, xff=(b"10.0.0.1",)))
    anchors = {"nginx": _origin(_msg(b"/a"), _msg(b"/internal", xff=(b"10.0.0.1",))), "haproxy": _origin(_msg(b"/a"))}
    assert [d.kind for d in origin_differences(mine, anchors)] == ["origin-unproxied"]
    assert [d.kind for d in origin_differences(_origin(_msg(b"/smuggled")), {"nginx": _origin()})] == \
        ["origin-extra-message"]


def test_a_message_counts_once():
    mine = _origin(_msg(b"/a"), _msg(b"/a"))
    kinds = [d.kind for d in origin_differences(mine, {"nginx": _origin(_msg(b"/a")), "haproxy": _origin(_msg(b"/a"))})]
    assert kinds == ["origin-extra-message"]


def test_headers_extra_is_a_finding_fewer_is_not():
    anchor = _origin(_msg(headers=[(b"x-a", b"1"), (b"x-b", b"2")]))
    fewer = origin_differences(_origin(_msg(headers=[(b"x-a", b"1")])), {"nginx": anchor})
    assert [d.kind for d in fewer] == ["fewer-headers"] and not fewer[0].finding
    extra = origin_differences(_origin(_msg(headers=[(b"x-a", b"1"), (b"x-injected", b"1")])), {"nginx": anchor})
    assert [d.kind for d in extra] == ["origin-extra-header"] and extra[0].finding


def test_truncated_message_is_covered_by_a_longer_one():
    mine = _origin(_msg(body=b"0123", complete=False))
    assert origin_differences(mine, {"haproxy": _origin(_msg(body=b"0123456789"))}) == []
    assert origin_differences(_origin(_msg(body=b"0123")), {"haproxy": _origin(_msg(body=b"0123456789"))})


def _client(data: bytes, sent: bytes = b"GET / HTTP/1.1\r\n\r\n" * 3, closed=False) -> Observed:
    return Observed(_origin(), client_view(data, sent, closed))


R1 = b"HTTP/1.1 200 OK\r\nX-Origin: 1\r\nContent-Length: 1\r\n\r\na"
R2 = b"HTTP/1.1 200 OK\r\nX-Origin: 2\r\nContent-Length: 1\r\n\r\nb"
E400 = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbad"
E431 = b"HTTP/1.1 431 Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
E502 = b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def test_client_boundaries():
    anchors = {"nginx": _client(R1 + R2), "haproxy": _client(R1 + R2)}
    assert client_differences(_client(R1 + R2), anchors) == []
    assert shape(_client(R1 + R2).client) != shape(_client(R1).client)
    kinds = [d.kind for d in client_differences(_client(R1 + R2 + R2), anchors)]
    assert kinds == ["client-boundary"]


def test_refusals_status_codes_and_strictness_are_differences_not_findings():
    anchors = {"nginx": _client(E400, closed=True), "haproxy": _client(R1)}
    diffs = client_differences(_client(E431, closed=True), anchors)
    assert [d.kind for d in diffs] == ["refusal-status"] and not diffs[0].finding
    stricter = client_differences(_client(E400, closed=True), {"nginx": _client(R1), "haproxy": _client(R1)})
    assert [d.kind for d in stricter] == ["stricter-refusal"] and not stricter[0].finding
    both = {"nginx": _client(R1 + R2), "haproxy": _client(R1 + R2)}
    failed = client_differences(_client(R1 + E502, closed=True), both)
    assert [d.kind for d in failed] == ["client-proxy-error"]


def test_a_partial_head_an_anchor_refused_at_once():
    sent = b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX"
    left = Observed(_origin(), client_view(R1, sent, True), client_end="close")
    diffs = client_differences(left, {"nginx": _client(R1 + E400, closed=True), "haproxy": _client(E400, closed=True)})
    assert [d.kind for d in diffs] == ["unanswered-refusal"] and not diffs[0].finding
    left.client_end = "open"  # the client still waits: no answer is a hang
    assert "client-boundary" in [d.kind for d in client_differences(left, {"nginx": _client(R1 + E400, closed=True)})]


def test_hop_by_hop_and_end_to_end_headers_of_responses():
    with_ka = b"HTTP/1.1 200 OK\r\nX-Origin: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 1\r\n\r\na"
    with_trailer = b"HTTP/1.1 200 OK\r\nX-Origin: 1\r\nTrailer: X-Sum\r\nContent-Length: 1\r\n\r\na"
    assert [d.kind for d in client_differences(_client(with_ka), {"nginx": _client(R1), "haproxy": _client(R1)})] \
        == ["client-extra-header"]
    # an anchor passing Keep-Alive does not make its absence a finding; a dropped Trailer is one
    assert client_differences(_client(R1), {"nginx": _client(with_ka), "haproxy": _client(with_ka)}) == []
    assert [d.kind for d in client_differences(_client(R1), {"nginx": _client(with_trailer)})] == \
        ["client-missing-header"]


def test_closing_after_a_response_that_promised_keep_alive():
    anchors = {"nginx": _client(R1), "haproxy": _client(R1)}
    assert [d.kind for d in client_differences(_client(R1, closed=True), anchors)] == ["client-unannounced-close"]
    announced = b"HTTP/1.1 200 OK\r\nX-Origin: 1\r\nConnection: close\r\nContent-Length: 1\r\n\r\na"
    assert client_differences(_client(announced, closed=True), {"nginx": _client(announced)}) == []


def test_compare_joins_both_sides():
    mine = Observed(_origin(_msg(b"/x", proxied=False)), ClientView([], None, b"", False))
    assert [d.kind for d in compare(mine, {"nginx": Observed(_origin(), ClientView([], None, b"", False))})] == \
        ["origin-extra-message"]
