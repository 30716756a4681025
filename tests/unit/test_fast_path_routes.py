"""The fast path's routing (relay/native/fast_path.py router, called from C)
against the gate's (relay/context.py builds the Router relay/gate.py asks):
for random paths and Host fields, the same pool, or -1 where the fast path
leaves the pool to Python; for a path that routes elsewhere once decoded
the same 400, or -1 (Python decides, and refuses it). Sans-I/O: no relay,
no sockets."""

from __future__ import annotations

import random

import pytest

from relay import config, pools
from relay.errors import HeadError
from relay.native import fast_path
from relay.routes import Router

ENV = {
    "RELAY_ORIGIN": "127.0.0.1:9000",
    "RELAY_POOL_CHAT": "127.0.0.1:9001,127.0.0.1:9002",
    "RELAY_POOL_FEED": "127.0.0.1:9003", "RELAY_POOL_FEED_MAX_CONNS": "10",
    "RELAY_POOL_API": "127.0.0.1:9004", "RELAY_POOL_API_WEBSOCKET": "0",
    "RELAY_ROUTES": "/chat = chat, /chat/admin = api, /feed = feed, /a/b/c = chat, / = chat,"
                    " chat.example.com/ = chat, chat.example.com/api = api, *.example.com/feed = feed,"
                    " *.x.example.com/ = api, [::1]/v6 = chat",
}
SEGMENTS = ["chat", "admin", "feed", "a", "b", "c", "api", "v6", "x", "%2e%2e", ".", "..", "", "chatx"]
HOSTS = [None, "relay.test", "chat.example.com", "CHAT.Example.COM:8443", "chat.example.com.", "v.example.com",
         "a.x.example.com", "x.example.com", "example.com", "[::1]:80", "[::1", "[::1]", ":80", ""]


@pytest.mark.parametrize("default", [True, False])
def test_the_fast_paths_router_routes_as_the_gates(default):
    env = dict(ENV) if default else {k: v for k, v in ENV.items() if k != "RELAY_ORIGIN"}
    settings = config.load(env)
    names = fast_path.decided_pools(settings)
    assert set(names) == ({"default", "chat"} if default else {"chat"})  # feed: MAX_CONNS; api: no WebSockets
    fast = fast_path.router(settings, names)
    # one object per pool, as relay/context.py's OriginPools (Router compares targets by identity)
    pool = {p.name: p.name for p in pools.effective(settings)}
    gate = Router(((r.host, r.path, pool[r.pool]) for r in settings.routes), pool.get(pools.DEFAULT))
    rng = random.Random(7)
    for _ in range(3000):
        path = "/" + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randrange(4)))
        host = rng.choice(HOSTS)
        args = (path.encode(), None if host is None else host.encode())
        try:
            want = gate.route(*args)
        except HeadError:
            # refused, or -1 where both routes lead to pools Python decides for: Python refuses it then
            try:
                assert fast(*args) == -1, (path, host)
            except HeadError:
                pass
            continue
        got = fast(*args)
        assert got == (None if want is None else names.index(want) if want in names else -1), (path, host)
