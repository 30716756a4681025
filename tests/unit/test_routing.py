"""Routes and origin pools without processes (README, "Routes and origins"):
the settings (RELAY_ROUTES, RELAY_POOL_*), the router, the balancer and the
passive health rules, over a real origin table in memory."""

from __future__ import annotations

import asyncio
import collections
import logging

import pytest

from metrics import layout
from relay import pools
from relay.config import load
from relay.errors import ConfigError, HeadError
from relay.origins import outlier
from relay.origins.balance import AtLimit, OriginPool
from relay.origins.report import FailureLog
from relay.origins.table import OriginTable
from relay.routes import Router


def problems(env: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(env)
    return e.value.lines


# -- settings --------------------------------------------------------------------------

TABLE = """
  # the chat app: polling and WebSockets
  /chat              = chat
  /socket.io         = chat,  /api = api
  FEED.example.com./ = feed
  *.example.com/x/   = api
"""


def test_a_route_table_reads_as_written():
    s = load({"RELAY_ORIGIN": "10.0.0.5:9000", "RELAY_ROUTES": TABLE,
              "RELAY_POOL_CHAT": "10.0.1.1:9000, 10.0.1.2:9000", "RELAY_POOL_CHAT_BALANCE": "cookie:io",
              "RELAY_POOL_API": "10.0.3.1:8000", "RELAY_POOL_API_WEBSOCKET": "0",
              "RELAY_POOL_API_READ_TIMEOUT": "30", "RELAY_POOL_FEED": "10.0.2.1:9000",
              "RELAY_READ_TIMEOUT": "60", "RELAY_MAX_FAILS": "5"})
    assert [str(r) for r in s.routes] == ["/chat = chat", "/socket.io = chat", "/api = api",
                                          "feed.example.com/ = feed", "*.example.com/x = api"]
    by_name = {p.name: p for p in pools.effective(s)}
    assert list(by_name) == ["default", "api", "chat", "feed"]
    # a pool's own setting wins, the global one fills the rest
    assert by_name["api"].read_timeout == 30 and by_name["chat"].read_timeout == 60
    assert by_name["api"].websocket is False and by_name["chat"].websocket is True
    assert by_name["chat"].balance == "cookie:io" and by_name["api"].balance == "least_conn"
    assert all(p.max_fails == 5 for p in by_name.values())
    # the table a request tries, in order, as `wsrelay check` prints it
    rows = [(r.host, r.path, r.pool) for r in pools.table(s)]
    assert rows == [("feed.example.com", "/", "feed"), ("*.example.com", "/x", "api"),
                    ("", "/socket.io", "chat"), ("", "/chat", "chat"), ("", "/api", "api"),
                    ("", "(anything else)", "default")]
    d = s.to_dict()
    assert d["RELAY_POOL_API_READ_TIMEOUT"] == 30 and "RELAY_POOL_CHAT_READ_TIMEOUT" not in d
    assert d["effective_pools"]["chat"]["origins"] == ["10.0.1.1:9000", "10.0.1.2:9000"]
    assert "feed.example.com" in pools.render(pools.table(s))


def test_routes_without_a_default_pool_need_no_origin():
    s = load({"RELAY_ROUTES": "/chat = chat", "RELAY_POOL_CHAT": "10.0.1.1:9000"})
    assert s.origin == () and pools.table(s)[-1].pool == ""
    assert [p.name for p in pools.effective(s)] == ["chat"]


@pytest.mark.parametrize("env,expect", [
    ({"RELAY_ROUTES": "/chat = chat # the app"}, "an inline comment?"),
    ({"RELAY_ROUTES": "/chat chat"}, "expected [host]/path = pool"),
    ({"RELAY_ROUTES": "chat = chat"}, "a route's path starts with /"),
    ({"RELAY_ROUTES": "/a/../b = chat"}, "no . or .. segments"),
    ({"RELAY_ROUTES": "/a%2f = chat"}, "no %-escapes"),
    ({"RELAY_ROUTES": "example.com:8080/ = chat"}, "without a port"),
    ({"RELAY_ROUTES": "/chat = chat, /chat/ = chat"}, "/chat is routed twice"),
    ({"RELAY_ROUTES": "/chat = chta"}, "no pool named chta (did you mean chat?"),
    ({"RELAY_ROUTES": "/x = default"}, "the default pool is RELAY_ORIGIN, which is not set"),
    ({"RELAY_POOL_API": "10.0.3.1:8000"}, "RELAY_POOL_API: no route in RELAY_ROUTES sends requests to pool api"),
    ({"RELAY_POOL_API_READ_TIMEOUT": "30"}, "pool api has settings but no origins"),
    ({"RELAY_POOL_CHAT_BALANCE": "sticky"}, "expected least_conn, round_robin, cookie:NAME or header:NAME"),
    ({"RELAY_POOL_CHAT_MAX_FAILS": "many"}, "RELAY_POOL_CHAT_MAX_FAILS"),
    ({"RELAY_POOL_DEFAULT": "10.0.3.1:8000"}, "the default pool is RELAY_ORIGIN"),
    ({"RELAY_POOL_CHAT": "10.0.1.1:9000 # eu"}, "an inline comment?"),
    ({"RELAY_HEALTH_CHECK_PATH": "healthz"}, "starting with /"),
])
def test_a_bad_route_or_pool_is_one_line_naming_it(env, expect):
    base = {"RELAY_POOL_CHAT": "10.0.1.1:9000", "RELAY_ROUTES": "/chat = chat"}
    lines = problems({**base, **env})
    assert len(lines) == 1, lines
    assert expect in lines[0], lines


def test_every_bad_route_is_named_at_once():
    lines = problems({"RELAY_ORIGIN": "10.0.0.5:9000", "RELAY_ROUTES": "/a = b = c\n/b/./c = x\nx"})
    assert len(lines) == 3 and all(line.startswith("RELAY_ROUTES: ") for line in lines)


def test_a_bad_setting_whose_name_starts_like_origins_hides_nothing():
    """RELAY_ORIGIN_PROXY_PROTOCOL is not RELAY_ORIGIN: its bad value must not
    stop the route checks (a prefix match once did, and a second check named the rest)."""
    lines = problems({"RELAY_ORIGIN": "10.0.0.5:9000", "RELAY_ORIGIN_PROXY_PROTOCOL": "v3",
                      "RELAY_ROUTES": "/chat = chat"})
    assert len(lines) == 2 and lines[0].startswith("RELAY_ORIGIN_PROXY_PROTOCOL: "), lines
    assert "no pool named chat" in lines[1], lines
    # and without RELAY_ORIGIN, its absence is still named beside it
    lines = problems({"RELAY_ORIGIN_PROXY_PROTOCOL": "v3"})
    assert any(line.startswith("RELAY_ORIGIN is not set") for line in lines), lines


def test_no_origin_and_no_routes_is_still_an_error():
    assert problems({}) == ["RELAY_ORIGIN is not set: expected the origin server(s), e.g. 10.0.0.5:9000"]


# -- the router --------------------------------------------------------------------------

def router() -> Router[str]:
    routes = [("", "/chat", "chat"), ("", "/chat/admin", "admin"), ("", "/socket.io", "chat"),
              ("feed.example.com", "/", "feed"), ("feed.example.com", "/chat", "feed-chat"),
              ("*.example.com", "/", "wild"), ("*.eu.example.com", "/", "eu"), ("[::1]", "/", "v6")]
    return Router(routes, "default")


@pytest.mark.parametrize("path,host,pool", [
    (b"/chat", b"relay.test", "chat"),
    (b"/chat/", b"relay.test", "chat"),
    (b"/chat/room/1", b"relay.test", "chat"),
    (b"/chatx", b"relay.test", "default"),          # whole segments only
    (b"/chat/admin/x", b"relay.test", "admin"),     # the longest prefix wins
    (b"/chat/administrator", b"relay.test", "chat"),
    (b"/socket.io/", None, "chat"),                 # HTTP/1.0 without Host
    (b"/", b"relay.test", "default"),
    (b"*", b"relay.test", "default"),               # OPTIONS *
    (b"/x", b"feed.example.com", "feed"),
    (b"/x", b"FEED.Example.COM:8443", "feed"),      # any case, any port
    (b"/x", b"feed.example.com.", "feed"),          # a final dot
    (b"/chat/1", b"feed.example.com", "feed-chat"),  # its host's routes first
    (b"/x", b"a.example.com", "wild"),
    (b"/x", b"a.b.eu.example.com", "eu"),           # the longest wildcard suffix
    (b"/x", b"example.com", "default"),             # *.example.com is subdomains only
    (b"/chat", b"example.com", "chat"),
    (b"/x", b"[::1]:8080", "v6"),
])
def test_longest_prefix_on_whole_segments_host_first(path, host, pool):
    assert router().route(path, host) == pool


def test_no_route_and_no_default_is_none():
    assert Router([("", "/chat", "chat")], None).route(b"/x", b"h") is None


@pytest.mark.parametrize("path", [b"/chat/..%2fadmin", b"/chat/%2e%2e/admin", b"/chat/../admin", b"//chat"])
def test_a_path_that_routes_elsewhere_once_decoded_is_refused(path):
    with pytest.raises(HeadError) as e:
        Router([("", "/chat", "chat"), ("", "/admin", "admin")], None).route(path, b"h")
    assert e.value.status == 400


def test_a_decoded_path_that_routes_alike_passes():
    r = Router([("", "/chat", "chat")], "default")
    assert r.route(b"/chat/a%20b/./c", b"h") == "chat"
    assert r.route(b"/x/%2e%2e/y", b"h") == "default"


def test_fifty_routes_cost_a_lookup_not_a_scan():
    r = Router([("", f"/app{i}/ws", f"p{i}") for i in range(50)], "default")
    assert r.route(b"/app49/ws/x", b"h") == "p49"
    assert len(r.any.by_segment[b"app49"]) == 1  # one candidate for that first segment, not 50


# -- the balancer over a real origin table ---------------------------------------------------

@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def pool_of(loop, n=3, nslots=2, slot=0, table=None, **env) -> OriginPool:
    origins = ",".join(f"10.0.0.{i + 1}:9000" for i in range(n))
    s = load({"RELAY_ORIGIN": origins, **{f"RELAY_{k.upper()}": str(v) for k, v in env.items()}})
    table = table or OriginTable(nslots)
    entries = table.assign(pools.keys(s))
    table.slot_started(slot)
    return OriginPool(pools.effective(s)[0], table, entries, slot, loop, FailureLog())


def test_least_connections_across_workers(loop):
    table = OriginTable(2)
    mine = pool_of(loop, table=table, slot=0)
    sibling = pool_of(loop, table=table, slot=1)
    a, b, c = mine.members
    sibling.opened(sibling.members[0])
    sibling.opened(sibling.members[0])
    mine.opened(b)
    assert mine.open_connections(a) == 2  # the sibling's count is seen
    assert mine.choose(None) is c
    mine.opened(c)
    assert mine.choose(None) in (b, c)
    # ties are taken in turn, not always the first
    fresh = pool_of(loop)
    assert len({fresh.choose(None) for _ in range(6)}) == 3


def test_taken_out_gets_nothing_then_panic_uses_all(loop, caplog):
    p = pool_of(loop, max_fails=2, fail_timeout=30)
    a, b, c = p.members
    for m in (a, b):
        p.failed(m, "connect", "Connection refused")
        p.failed(m, "connect", "Connection refused")
    assert {p.choose(None) for _ in range(10)} == {c}
    with caplog.at_level(logging.WARNING, "wsrelay.origin"):
        p.failed(c, "status_5xx", "502 to GET")
        p.failed(c, "status_5xx", "502 to GET")
    assert "pool default: every origin is out: trying them all (panic mode)" in caplog.text
    assert {p.choose(None) for _ in range(12)} == {a, b, c}


def test_slow_start_ramps_the_share_of_a_recovered_origin(loop):
    p = pool_of(loop, n=2, slowstart=100)
    a, b = p.members
    now = 1000.0
    p.table.state[b.state + layout.O_CHECK_SINCE] = now - 5  # its health check passed 5 s ago
    assert p.weight(a, now) == 1.0
    assert p.weight(b, now) == pytest.approx(0.05)
    assert p.weight(b, now + 45) == pytest.approx(0.5)
    assert p.weight(b, now + 95) == 1.0


def test_consistent_hash_keeps_keys_and_moves_only_a_leaving_origins_keys(loop):
    class Req:
        def __init__(self, cookie: bytes):
            self.cookie = cookie

        def get(self, name: bytes):
            return self.cookie if name == b"cookie" else None

    three = pool_of(loop, balance="cookie:io")
    keys = [b"lang=en; io=" + str(i).encode() + b"; x=1" for i in range(600)]
    first = {k: three.choose(Req(k)).name for k in keys}
    assert first == {k: three.choose(Req(k)).name for k in keys}  # the same, every time
    assert max(collections.Counter(first.values()).values()) < 600 * 0.45  # spread over the three
    # a fresh pool (a reload, another worker) hashes alike
    assert first == {k: pool_of(loop, balance="cookie:io").choose(Req(k)).name for k in keys}
    # the third origin out: only its keys move
    gone = three.members[2]
    three.table.state[gone.state + layout.O_CHECK] = 0.0
    moved = [k for k in keys if three.choose(Req(k)).name != first[k]]
    assert moved and all(first[k] == gone.name for k in moved)
    # no cookie: least connections
    assert three.choose(Req(b"lang=en")) is not None


def test_round_robin_is_smooth(loop):
    p = pool_of(loop, balance="round_robin")
    seq = [p.choose(None).name for _ in range(9)]
    assert collections.Counter(seq) == {m.name: 3 for m in p.members}
    assert all(seq[i] != seq[i + 1] for i in range(8))


def test_every_origin_at_max_conns_is_at_limit(loop):
    p = pool_of(loop, n=2, max_conns=1)
    for m in p.members:
        p.opened(m)
    with pytest.raises(AtLimit):
        p.choose(None)


# -- passive health ---------------------------------------------------------------------------

def test_n_failures_in_the_window_take_it_out_once_then_it_comes_back(caplog):
    t = OriginTable(1)
    e = t.assign(["p/o:1"])["p/o:1"]
    who = "origin o:1 (pool p)"
    with caplog.at_level(logging.INFO, "wsrelay.origin"):
        assert outlier.failed(t, e, "connect", "Connection refused", 100.0, 3, 10.0, who) is None
        assert outlier.failed(t, e, "timeout", "", 101.0, 3, 10.0, who) is None
        # the window is 10 s: a failure after it starts a new count
        assert outlier.failed(t, e, "connect", "Connection refused", 115.0, 3, 10.0, who) is None
        assert outlier.failed(t, e, "connect", "Connection refused", 116.0, 3, 10.0, who) is None
        assert outlier.failed(t, e, "connect", "Connection refused", 117.0, 3, 10.0, who) == "down"
        assert not t.up(e)
        assert outlier.failed(t, e, "connect", "refused", 118.0, 3, 10.0, who) is None  # out already
        assert not outlier.trial(t, e, 126.0, 5.0)  # cooling down until 127
        # after the cool-down one request, across workers, tries it again
        assert outlier.trial(t, e, 128.0, 5.0) and not outlier.trial(t, e, 128.5, 5.0)
        # the trial fails: out again at once
        assert outlier.failed(t, e, "connect", "Connection refused", 129.0, 3, 10.0, who) == "down"
        assert outlier.failed(t, e, "connect", "Connection refused", 129.5, 3, 10.0, who) is None
        outlier.answered(t, e, 135.0, who)  # an answer that was in flight: not its trial
        assert not t.up(e)
        assert outlier.trial(t, e, 139.0, 5.0)
        outlier.answered(t, e, 139.5, who)  # the trial's answer
        outlier.answered(t, e, 140.0, who)  # once
        assert t.up(e)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["origin o:1 (pool p) down: 3 connect errors in 2.0 s (last: Connection refused); out for 10 s",
                     "origin o:1 (pool p) still down: connect error: Connection refused when tried again; "
                     "out for another 10 s",
                     "origin o:1 (pool p) up: answering again after 22 s out"]
    assert t.errors(e)[layout.ORIGIN_REASONS.index("connect")] == 7


def test_in_panic_mode_any_answer_brings_an_origin_back():
    t = OriginTable(1)
    e = t.assign(["p/o:1"])["p/o:1"]
    outlier.failed(t, e, "connect", "", 100.0, 1, 30.0, "o")
    outlier.answered(t, e, 101.0, "o")
    assert not t.up(e)
    outlier.answered(t, e, 101.0, "o", panic=True)
    assert t.up(e)


def test_a_cut_response_is_counted_but_takes_nothing_out():
    t = OriginTable(1)
    e = t.assign(["p/o:1"])["p/o:1"]
    for i in range(5):
        outlier.failed(t, e, "cut", "", 100.0 + i, 1, 10.0, "o")
    assert t.up(e) and t.errors(e)[layout.ORIGIN_REASONS.index("cut")] == 5


def test_the_table_keeps_entries_across_a_reload_and_frees_the_rest():
    t = OriginTable(4)
    first = t.assign(["a/x:1", "a/y:1"])
    t.state[first["a/x:1"] * layout.O_SIZE + layout.O_ERRORS] = 7
    second = t.assign(["a/x:1", "b/z:1"], keep={first["a/y:1"]})  # a/y:1's generation still drains
    assert second["a/x:1"] == first["a/x:1"] and t.errors(second["a/x:1"])[0] == 7
    assert second["b/z:1"] not in first.values()
    assert set(t.entries()) == {"a/x:1", "a/y:1", "b/z:1"}
    t.assign(["a/x:1", "b/z:1"])  # that generation is gone
    assert set(t.entries()) == {"a/x:1", "b/z:1"}
    with pytest.raises(ConfigError) as e:
        t.assign([f"p/h:{i}" for i in range(layout.ORIGIN_CAPACITY + 1)], dry_run=True)
    assert "entries of the origin table" in e.value.lines[0]
    assert set(t.entries()) == {"a/x:1", "b/z:1"}  # a dry run changes nothing
