"""Routes and origins with real origin processes (README, "Routes and
origins"): each origin is an aiohttp server in a process of its own
(tests/support/origin_process.py), so "killed" is a SIGKILL and "restarted" a new
process on the same port. Every 502 a client gets is counted."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from websockets.asyncio.client import connect

from tests.support.origin_process import OriginProcess, held_hello, hello_over_http, hello_over_ws
from tests.support.relay import ROOT, LoopThread, Relay, wait_for
from tests.support.scrape import metric, samples


def access(relay: Relay) -> list[dict]:
    return [json.loads(line) for line in list(relay.access) if line.startswith("{")]


# -- routes --------------------------------------------------------------------------------

def test_routes_by_path_and_host_reach_their_pool(origins):
    a, b, c = origins
    env = {"RELAY_POOL_CHAT": f"{b.addr},{c.addr}", "RELAY_POOL_API": c.addr, "RELAY_POOL_API_WEBSOCKET": "0",
           "RELAY_ROUTES": "\n  /chat = chat\n  /api = api\n  chat.example.com/ = chat\n  *.api.example.com/ = api\n"}
    chat = {"b", "c"}
    with Relay(a.addr, env=env) as r:
        for path, host, pool in [("/", "relay.test", {"a"}), ("/chatx", "relay.test", {"a"}),
                                 ("/chat", "relay.test", chat), ("/chat/room/1", "relay.test", chat),
                                 ("/x", "chat.example.com", chat), ("/x", "CHAT.Example.com:8080", chat),
                                 ("/x", "v2.api.example.com", {"c"}), ("/api/v1", "relay.test", {"c"})]:
            status, hello = hello_over_http(r.port, path, host)
            assert status == 200 and hello["origin"] in pool, (path, host, hello)
            assert hello["path"] == path and hello["host"] == host  # passed on as received
            if pool != {"c"}:
                status, hello = hello_over_ws(r.port, path, host)
                assert status == 101 and hello["origin"] in pool, (path, host, hello)
        # pool api takes no WebSockets: 403, and its origin never sees the upgrade
        before = c.stats()["ws_opened"]
        assert hello_over_ws(r.port, "/api/ws")[0] == 403
        assert c.stats()["ws_opened"] == before
        # a path that would route elsewhere once decoded is refused
        assert hello_over_http(r.port, "/chat/%2e%2e/api")[0] == 400
        wait_for(lambda: {("/chat/room/1", "chat"), ("/api/v1", "api"), ("/", "default")}
                 <= {(x["path"], x["pool"]) for x in access(r)}, 5, what="the pools in the access log")


def test_no_route_and_no_default_pool_is_404(origins):
    _a, b, _c = origins
    with Relay(None, env={"RELAY_POOL_CHAT": b.addr, "RELAY_ROUTES": "/chat = chat"}) as r:
        assert hello_over_http(r.port, "/chat")[1]["origin"] == "b"
        assert hello_over_http(r.port, "/other")[0] == 404
        assert hello_over_ws(r.port, "/other")[0] == 404
        assert metric(r, "wsrelay_websocket_upgrades_total", outcome="no_route") == 1
        wait_for(lambda: [x["outcome"] for x in access(r) if x["status"] == 404] == ["no_route"] * 2, 5,
                 what="two 404s logged")


# -- passive health: an origin killed, restarted ------------------------------------------------

class Traffic:
    """Plain HTTP requests and WebSocket opens, one after another on a thread,
    every status counted."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.statuses: list[tuple[float, int, str]] = []  # (time started, status, origin); 0: lost
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            started = time.monotonic()
            try:
                status, hello = (hello_over_ws if i % 2 else hello_over_http)(self.port, self.path)
            except OSError:
                # upgraded to an origin killed before its first message: the tunnel is
                # cut, as it must be; the thread goes on (it used to die here, and with
                # it the traffic that takes the origin out)
                status, hello = 0, None
            self.statuses.append((started, status, hello["origin"] if hello else ""))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def hold(port: int, path: str, n: int) -> list[socket.socket]:
    """``n`` WebSockets opened and left open."""
    return [held_hello(port, path)[0] for _ in range(n)]


@pytest.mark.slow  # ~20 s: two cool-downs and a slow start
def test_killed_origin_leaves_the_pool_and_comes_back_gradually(origins):
    a, b, c = origins
    window = 2.0
    env = {"RELAY_POOL_CHAT": f"{b.addr},{c.addr}", "RELAY_ROUTES": "/chat = chat",
           "RELAY_MAX_FAILS": "2", "RELAY_FAIL_TIMEOUT": str(window), "RELAY_SLOWSTART": "8"}
    with Relay(a.addr, env=env) as r:
        held = hold(r.port, "/chat", 40)
        b.wait_ws_open(20)  # least connections: 20 each
        c.wait_ws_open(20)
        traffic = Traffic(r.port, "/chat")
        try:
            wait_for(lambda: len(traffic.statuses) > 10, 10, what="traffic")
            c.kill()
            killed = time.monotonic()
            # out within the configured window
            # (a request in flight at the kill may count as "closed before answering")
            r.wait_log(f"origin {c.addr} (pool chat) down: ", timeout=window)
            wait_for(lambda: traffic.statuses[-1][0] > killed + 2 * window, 20, what="traffic after the kill")
        finally:
            traffic.stop()
        after = [x for x in traffic.statuses if x[0] > killed]
        # not one 502 nor one lost among those begun after the kill: the first connect
        # errors fail over to b, then c is out
        assert [x for x in after if x[1] not in (101, 200)] == []
        assert {origin for _t, _s, origin in after} == {"b"}
        # once out, c is tried again only once per cool-down (each time failing over to b):
        # 2 failures took it out, then at most one try per window
        wait_for(lambda: len(access(r)) >= len(traffic.statuses), 5, what="the access log")
        tried_twice = [x for x in access(r) if x["pool"] == "chat" and x["tries"] == 2]
        assert 2 <= len(tried_twice) <= 2 + (time.monotonic() - killed) / window + 1, tried_twice
        assert metric(r, "wsrelay_origin_up", origin=c.addr) == 0
        assert metric(r, "wsrelay_origin_up", origin=b.addr) == 1
        assert metric(r, "wsrelay_origin_errors_total", origin=c.addr, pool="chat", reason="connect") >= 2
        for s in held:
            s.close()
        b.wait_ws_open(0)
        wait_for(lambda: metric(r, "wsrelay_origin_connections", pool="chat") == 0, 10, what="tunnels closed")

        # 40 long-lived WebSockets on b; c comes back on its port
        held = hold(r.port, "/chat", 40)
        b.wait_ws_open(40)
        c.start()
        up = f"origin {c.addr} (pool chat) up: answering again after "
        wait_for(lambda: hello_over_http(r.port, "/chat") and up in r.text(), 10, what="c up")
        back = time.monotonic()
        # least connections alone would send c every one of the next 20 long-lived
        # WebSockets (0 against b's 40); ramping up from 5% of its share, it gets a few
        first = [held_hello(r.port, "/chat") for _ in range(20)]
        held += [s for s, _ in first]
        assert 1 <= sum(origin == "c" for _, origin in first) <= 10, first
        # its slow start over, it catches up
        time.sleep(max(0.0, 8 - (time.monotonic() - back)))
        later = [held_hello(r.port, "/chat") for _ in range(20)]
        held += [s for s, _ in later]
        assert sum(origin == "c" for _, origin in later) >= 15, later
        for s in held:
            s.close()


def test_all_origins_of_a_pool_down_is_a_clear_502_then_recovery(origins):
    a, b, c = origins
    env = {"RELAY_POOL_CHAT": f"{b.addr},{c.addr}", "RELAY_ROUTES": "/chat = chat",
           "RELAY_MAX_FAILS": "1", "RELAY_FAIL_TIMEOUT": "30"}
    with Relay(a.addr, env=env) as r:
        b.kill()
        c.kill()
        for probe in (hello_over_http, hello_over_ws) * 3:
            assert probe(r.port, "/chat")[0] == 502
        r.wait_log("pool chat: every origin is out: trying them all (panic mode)")
        wait_for(lambda: len([x for x in access(r) if x["status"] == 502]) == 6, 5, what="six 502s logged")
        failed = [x for x in access(r) if x["status"] == 502]
        assert all(x["pool"] == "chat" and x["tries"] == 2 and x["origin"] in (b.addr, c.addr) for x in failed)
        assert all(x["outcome"] == "origin_error" for x in failed)
        # the default pool is not disturbed
        assert hello_over_ws(r.port, "/")[1]["origin"] == "a"
        # every origin out: all are still tried (panic mode), so the first one back serves at once,
        # without waiting for RELAY_FAIL_TIMEOUT (30 s)
        b.start()
        assert hello_over_http(r.port, "/chat")[1]["origin"] == "b"
        assert hello_over_ws(r.port, "/chat")[1]["origin"] == "b"
        r.wait_log(f"origin {b.addr} (pool chat) up: ")


# -- balancing ----------------------------------------------------------------------------------

async def _hold(url: str, n: int, stop: asyncio.Event, where: dict[int, str], opened: collections.Counter,
                errors: list) -> None:
    """``n`` WebSockets kept open: one whose origin closes it is opened again."""
    sem = asyncio.Semaphore(20)

    async def slot(i: int) -> None:
        while not stop.is_set():
            try:
                async with sem:
                    ws = await connect(url, open_timeout=20, ping_interval=None)
                hello = json.loads(await ws.recv())
                where[i] = hello["origin"]
                opened[hello["origin"]] += 1
                await ws.wait_closed()
            except Exception as e:  # noqa: BLE001 - counted, the test asserts none
                errors.append(repr(e))
                await asyncio.sleep(0.1)
            finally:
                where.pop(i, None)

    tasks = [asyncio.ensure_future(slot(i)) for i in range(n)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow  # ~20 s: 300 WebSockets, several generations of the fast origin's sessions
def test_least_connections_spreads_long_lived_websockets_evenly():
    """300 WebSockets over 3 origins, one of which closes each of its sessions
    after about a second: least connections keeps every origin within ±10% of
    the mean (round-robin would pile them on the other two)."""
    fast = OriginProcess("fast", close_after=1.0).start()
    slow = [OriginProcess(name).start() for name in ("s1", "s2")]
    lt = LoopThread()
    stop = asyncio.Event()
    where: dict[int, str] = {}
    opened: collections.Counter = collections.Counter()
    errors: list = []
    try:
        with Relay(",".join(o.addr for o in (fast, *slow)), env={"RELAY_ACCESS_LOG": "0"}) as r:
            future = asyncio.run_coroutine_threadsafe(_hold(r.url + "/", 300, stop, where, opened, errors), lt.loop)
            wait_for(lambda: len(where) == 300, 60, what="300 WebSockets open")
            # a few generations of the fast origin's sessions (least connections sends it
            # about 100 a second; round-robin a third of those that close, fewer and fewer)
            base, t0 = opened["fast"], time.monotonic()
            wait_for(lambda: opened["fast"] - base >= 250 or time.monotonic() - t0 > 8, 10, what="renewals")
            snapshots = []
            for _ in range(5):
                counts = collections.Counter(dict(where).values())
                snapshots.append(counts)
                mean = sum(counts.values()) / 3
                assert all(abs(counts[o] - mean) <= 0.1 * mean for o in ("fast", "s1", "s2")), snapshots
                time.sleep(0.5)
            assert not errors, errors[:5]
            lt.loop.call_soon_threadsafe(stop.set)
            future.result(30)
    finally:
        lt.loop.call_soon_threadsafe(stop.set)
        lt.stop()
        for o in (fast, *slow):
            o.stop()


def test_sticky_hashing_keeps_a_cookie_on_its_origin_across_a_reload(origins, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    addrs = ",".join(o.addr for o in origins)
    env_file.write_text(f"RELAY_ORIGIN={addrs}\nRELAY_BALANCE=cookie:io\n")
    with Relay(None, args=("--env-file", str(env_file))) as r:
        def origins_of(cookie: str, n: int) -> collections.Counter:
            extra = f"Cookie: lang=en; io={cookie}\r\n"
            return collections.Counter((hello_over_ws if i % 2 else hello_over_http)(r.port, "/", extra=extra)[1]
                                       ["origin"] for i in range(n))

        seen = origins_of("session-1", 100)
        assert len(seen) == 1, seen  # polling and upgrades alike, through both workers
        first = next(iter(seen))
        # other sessions go elsewhere too: the ring follows the origins' random
        # ports, and 28 sessions missed one origin for 1.9% of port triples
        # (simulated: 3,000 triples); 98 missed none of 20,000
        spread = {next(iter(origins_of(f"session-{i}", 2))) for i in range(2, 100)}
        assert len(spread) == 3
        env_file.write_text(f"RELAY_ORIGIN={addrs}\nRELAY_BALANCE=cookie:io\nRELAY_READ_TIMEOUT=60\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting")
        assert origins_of("session-1", 100) == {first: 100}


# -- active health checks ----------------------------------------------------------------------

def test_one_health_checker_per_host_and_what_it_says_reaches_every_worker(origins):
    a, b, c = origins
    env = {"RELAY_HEALTH_CHECK_PATH": "/healthz", "RELAY_HEALTH_CHECK_INTERVAL": "0.2",
           "RELAY_HEALTH_CHECK_FALL": "2", "RELAY_HEALTH_CHECK_RISE": "2", "RELAY_SLOWSTART": "0"}
    with Relay(f"{a.addr},{b.addr},{c.addr}", workers=3, env=env) as r:
        wait_for(lambda: a.stats()["probes"] >= 2, 10, what="probes")
        before, t0 = a.stats()["probes"], time.monotonic()
        time.sleep(3)
        rate = (a.stats()["probes"] - before) / (time.monotonic() - t0)
        # one checker: 5 probes a second; one per worker would be 15
        assert 2.5 < rate < 7.5, rate
        # b fails its checks (it still accepts connections): out for every worker
        b.healthy(False)
        r.wait_log(f"origin {b.addr} (pool default) down: health check GET /healthz failed 2 times in a row "
                   f"(last: answered 503)")
        served = collections.Counter((hello_over_ws if i % 2 else hello_over_http)(r.port)[1]["origin"]
                                     for i in range(30))
        assert served["b"] == 0 and served["a"] and served["c"], served
        assert metric(r, "wsrelay_origin_up", origin=b.addr) == 0
        b.healthy(True)
        r.wait_log(f"origin {b.addr} (pool default) up: health check GET /healthz passed 2 times in a row")
        wait_for(lambda: metric(r, "wsrelay_origin_up", origin=b.addr) == 1, 5, what="b up")
        served = collections.Counter(hello_over_http(r.port)[1]["origin"] for _ in range(30))
        assert served["b"], served
        # each change was one line, however many workers there are
        assert r.text().count(f"origin {b.addr} (pool default) down") == 1
        assert r.text().count(f"origin {b.addr} (pool default) up") == 1
        # and the checker is the supervisor's: its log lines carry the supervisor's pid
        m = re.search(rf"wsrelay\[(\d+)\] \w+ origin {re.escape(b.addr)} \(pool default\) down", r.text())
        assert int(m.group(1)) == r.proc.pid


# -- the README's example ------------------------------------------------------------------------

def readme_routes_example() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("<!-- routes-example -->")[1].split("<!-- /routes-example -->")[0]
    return block.split("```sh\n")[1].split("```")[0]


def test_the_readme_routes_example(origins, tmp_path):
    """The multi-route example of README "Routes and origins", as written, with
    its addresses replaced by three real origins."""
    example = readme_routes_example()
    addrs = list(dict.fromkeys(re.findall(r"10\.0\.\d+\.\d+:\d+", example)))
    assert len(addrs) == 7
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(re.sub(r"10\.0\.\d+\.\d+:\d+", lambda m: origins[addrs.index(m.group()) % 3].addr, example))
    out = subprocess.run([sys.executable, "-m", "relay", "check", "--env-file", str(env_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")})
    assert out.returncode == 0, out.stderr
    table = [(r["host"], r["path"], r["pool"]) for r in json.loads(out.stdout)["effective_routes"]]
    assert table == [("admin.example.com", "/", "api"), ("feed.example.com", "/", "feed"),
                     ("*", "/socket.io", "chat"), ("*", "/chat", "chat"), ("*", "/feed", "feed"),
                     ("*", "/api", "api"), ("*", "(anything else)", "default")]
    with Relay(None, args=("--env-file", str(env_file))) as r:
        # socket.io: polling, then the upgrade, on one origin by the io cookie
        cookie = "Cookie: io=Zx81pQ\r\n"
        polled = {hello_over_http(r.port, f"/socket.io/?EIO=4&transport=polling&t={i}", extra=cookie)[1]["origin"]
                  for i in range(6)}
        status, hello = hello_over_ws(r.port, "/socket.io/?EIO=4&transport=websocket", extra=cookie)
        assert status == 101 and polled == {hello["origin"]}
        assert hello_over_ws(r.port, "/chat/room/7")[0] == 101
        # feed: its own allowed Origins
        assert hello_over_ws(r.port, "/feed", extra="Origin: https://app.example.com\r\n")[0] == 101
        assert hello_over_ws(r.port, "/feed", extra="Origin: https://evil.example\r\n")[0] == 403
        assert hello_over_ws(r.port, "/live", host="Feed.Example.com:443")[0] == 101
        # api: plain HTTP only
        assert hello_over_http(r.port, "/api/v1/users")[0] == 200
        assert hello_over_ws(r.port, "/api/v1/stream")[0] == 403
        assert hello_over_http(r.port, "/users", host="ADMIN.example.com")[0] == 200
        assert hello_over_ws(r.port, "/elsewhere")[0] == 101
        expected = {"/socket.io/": "chat", "/chat/room/7": "chat", "/live": "feed", "/api/v1/users": "api",
                    "/users": "api", "/elsewhere": "default"}

        def pools_logged() -> dict:
            return {x["path"]: x["pool"] for x in access(r) if x["status"] in (101, 200)}
        wait_for(lambda: expected.items() <= pools_logged().items(), 5, what="each request's pool logged")
        # the chat pool's health checks reach its origins (and only its: the others have none)
        wait_for(lambda: sum(o.stats()["probes"] for o in origins) >= 3, 20, what="health checks of pool chat")


def test_a_reload_applies_a_new_route_table_and_refuses_a_bad_one(origins, tmp_path):
    a, b, c = origins
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={a.addr}\nRELAY_POOL_X={b.addr}\nRELAY_ROUTES=/x = x\n")
    with Relay(None, args=("--env-file", str(env_file))) as r:
        assert hello_over_ws(r.port, "/x/1")[1]["origin"] == "b"
        assert hello_over_ws(r.port, "/y")[1]["origin"] == "a"
        # /y gets a pool of its own, /x moves to c
        env_file.write_text(f"RELAY_ORIGIN={a.addr}\nRELAY_POOL_X={c.addr}\nRELAY_POOL_Y={b.addr}\n"
                            f"RELAY_ROUTES=/x = x, /y = y\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting")
        assert hello_over_ws(r.port, "/x/1")[1]["origin"] == "c"
        assert hello_over_ws(r.port, "/y")[1]["origin"] == "b"
        assert ("wsrelay_origin_up", (("origin", b.addr), ("pool", "x"))) not in samples(r)  # gone with b
        assert metric(r, "wsrelay_origin_up", origin=b.addr, pool="y") == 1
        # a misspelt pool: refused, the running table stays
        env_file.write_text(f"RELAY_ORIGIN={a.addr}\nRELAY_POOL_X={c.addr}\nRELAY_ROUTES=/x = z\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload refused, still serving the running configuration: RELAY_ROUTES: '/x = z': "
                   "no pool named z")
        assert hello_over_ws(r.port, "/x/1")[1]["origin"] == "c"


# -- failover: the balancer's rules hold for the next origin too, on both head phases ---------------

HEAD_PHASES = pytest.mark.parametrize("head_phase", ["1", "0"], ids=["head-in-c", "head-in-python"])


def _ws_or_health(closes_upgrades: bool, healthy: bool):
    """A raw origin: GET /healthz answers 200 or 503; an upgrade gets its 101
    and an echo, or a close without a byte (a failover, README "Passive health")."""
    from tests.support.raw_origins import answer, echo_after_101

    async def behave(origin, c):
        if b"upgrade: websocket" not in c.head.lower():
            code = b"200 OK" if healthy else b"503 Service Unavailable"
            return await answer(b"HTTP/1.1 " + code + b"\r\nContent-Length: 0\r\n\r\n")(origin, c)
        if not closes_upgrades:
            await echo_after_101(origin, c)
    return behave


def _upgrades(origin) -> int:
    return sum(1 for h in origin.heads if b"upgrade: websocket" in h.lower())


@HEAD_PHASES
def test_failover_skips_an_origin_its_health_check_took_out(loop_thread, head_phase):
    """Of a pool's three origins, one closes every upgrade without answering
    (its health check passes), one fails its health check but would still
    answer: every upgrade that meets the first moves on to the third. An
    origin checked out but still accepting connections gets none (README
    "Routes and origins"), whichever plane read the head."""
    from tests.support.raw_origins import RawOrigin
    from tests.support.net import upgrade_request

    quitter = RawOrigin(loop_thread, _ws_or_health(closes_upgrades=True, healthy=True)).start()
    sick = RawOrigin(loop_thread, _ws_or_health(closes_upgrades=False, healthy=False)).start()
    good = RawOrigin(loop_thread, _ws_or_health(closes_upgrades=False, healthy=True)).start()
    env = {"RELAY_POOL_P": f"{quitter.addr},{sick.addr},{good.addr}", "RELAY_ROUTES": "/p = p",
           "RELAY_MAX_FAILS": "0", "RELAY_HEALTH_CHECK_PATH": "/healthz", "RELAY_HEALTH_CHECK_INTERVAL": "0.5",
           "RELAY_HEALTH_CHECK_FALL": "1", "WSRELAY_NATIVE_HANDSHAKE": head_phase}
    try:
        with Relay(good.addr, workers=1, env=env) as r:
            wait_for(lambda: metric(r, "wsrelay_origin_up", pool="p", origin=sick.addr) == 0, 10,
                     what="the sick origin checked out")
            for _ in range(8):
                with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
                    s.sendall(upgrade_request("/p"))
                    assert s.recv(4096).startswith(b"HTTP/1.1 101 ")
            assert _upgrades(quitter) >= 2  # ties are taken in turn: it was asked first now and then
            assert _upgrades(sick) == 0
            assert _upgrades(good) == 8
    finally:
        for o in (quitter, sick, good):
            o.stop()


@HEAD_PHASES
def test_failover_never_takes_an_origin_past_max_conns(loop_thread, head_phase):
    """RELAY_MAX_CONNS=1: with one origin holding its WebSocket and another
    closing upgrades without an answer, an upgrade that meets the second goes
    to the third; with the third held too, the client gets 503 (limit_origin),
    never a second connection to a full origin."""
    from tests.support.raw_origins import RawOrigin
    from tests.support.net import read_head, status_of, upgrade_request

    quitter = RawOrigin(loop_thread, _ws_or_health(closes_upgrades=True, healthy=True)).start()
    held, spare = (RawOrigin(loop_thread, _ws_or_health(closes_upgrades=False, healthy=True)).start()
                   for _ in range(2))
    env = {"RELAY_POOL_P": f"{quitter.addr},{held.addr},{spare.addr}", "RELAY_ROUTES": "/p = p",
           "RELAY_MAX_CONNS": "1", "RELAY_MAX_FAILS": "0", "WSRELAY_NATIVE_HANDSHAKE": head_phase}
    kept = []
    try:
        with Relay(held.addr, workers=1, env=env) as r:
            def upgrade() -> int:
                s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
                s.sendall(upgrade_request("/p"))
                status = status_of(read_head(s)[0])
                kept.append(s)
                return status

            while _upgrades(held) == 0:  # one WebSocket on `held`, kept open
                assert upgrade() == 101 and len(kept) < 10
                if _upgrades(spare):
                    kept.pop().close()
                    wait_for(lambda: metric(r, "wsrelay_origin_connections", pool="p", origin=spare.addr) == 0,
                             10, what="the spare origin's count back to 0")
            for _ in range(4):
                assert upgrade() == 101
                assert _upgrades(held) == 1
                kept.pop().close()
                wait_for(lambda: metric(r, "wsrelay_origin_connections", pool="p", origin=spare.addr) == 0,
                         10, what="the spare origin's count back to 0")
            # `spare` held as well: the rest are full, and only the quitter is left
            assert upgrade() == 101 and _upgrades(held) == 1
            statuses = [upgrade() for _ in range(4)]
            assert statuses == [503] * 4 and _upgrades(held) == 1
            wait_for(lambda: metric(r, "wsrelay_websocket_upgrades_total", outcome="limit_origin") == 4, 10,
                     what="four limit_origin refusals counted")
    finally:
        for s in kept:
            s.close()
        for o in (quitter, held, spare):
            o.stop()


def test_a_cookie_whose_origin_is_down_keeps_its_polls_and_its_upgrade_together(origins):
    """socket.io polls (plain HTTP, the Python plane), then upgrades (the head
    phase in C): while a hashed cookie's origin refuses connections but is not
    yet taken out, both fail over along the ring to the same next origin
    (README "Routes and origins": "both must reach the same origin")."""
    env = {"RELAY_POOL_CHAT": ",".join(o.addr for o in origins), "RELAY_POOL_CHAT_BALANCE": "cookie:io",
           "RELAY_ROUTES": "/socket.io = chat", "RELAY_MAX_FAILS": "0"}
    with Relay(None, workers=1, env=env) as r:
        home = {i: hello_over_http(r.port, "/socket.io/", extra=f"Cookie: io=s{i}\r\n")[1]["origin"]
                for i in range(40)}
        counts = collections.Counter(home.values())
        victim = max(origins, key=lambda o: counts[o.name])  # 14 cookies or more
        victim.kill()
        moved = [i for i, o in home.items() if o == victim.name]
        for i in moved:
            cookie = f"Cookie: io=s{i}\r\n"
            status, poll = hello_over_http(r.port, "/socket.io/", extra=cookie)
            status_ws, upgrade = hello_over_ws(r.port, "/socket.io/", extra=cookie)
            assert (status, status_ws) == (200, 101)
            assert upgrade["origin"] == poll["origin"] != victim.name, (i, poll, upgrade)
        # the others stay where they were
        for i in (i for i, o in home.items() if o != victim.name):
            assert hello_over_ws(r.port, "/socket.io/", extra=f"Cookie: io=s{i}\r\n")[1]["origin"] == home[i]


@HEAD_PHASES
def test_upgrades_time_their_origin_connects(loop_thread, head_phase):
    """wsrelay_origin_connect_seconds (README "Observability"): each upgrade's
    TCP connect to the origin that answered is in its origin's histogram, on
    both head phases; an interim answer before the 101 does not count it twice."""
    from tests.support.net import read_head, status_of, upgrade_request
    from tests.support.raw_origins import RawOrigin, switching

    async def early_hints_then_101(origin, c):
        c.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + switching(c.head))
        while await c.reader.read(65536):
            pass

    o = RawOrigin(loop_thread, early_hints_then_101).start()
    try:
        with Relay(o.addr, workers=1, env={"WSRELAY_NATIVE_HANDSHAKE": head_phase}) as r:
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
                    s.sendall(upgrade_request("/"))
                    assert status_of(read_head(s)[0]) == 101
            wait_for(lambda: metric(r, "wsrelay_origin_connections", origin=o.addr) == 0, 10,
                     what="the tunnels' counts given back")
            assert metric(r, "wsrelay_origin_connect_seconds_count", origin=o.addr) == 5
            assert 0 < metric(r, "wsrelay_origin_connect_seconds_sum", origin=o.addr) < 5
            assert metric(r, "wsrelay_origin_connect_seconds_bucket", origin=o.addr, le="+Inf") == 5
    finally:
        o.stop()


@HEAD_PHASES
def test_a_pools_connect_timeout_bounds_its_upgrades(silent_origin, head_phase):
    """RELAY_POOL_<NAME>_CONNECT_TIMEOUT is the pool's own (README "Settings",
    *pool*): a silent origin's upgrade gets its 504 after the pool's timeout,
    shorter or longer than the global RELAY_CONNECT_TIMEOUT, on both head phases."""
    from tests.support.net import read_head, status_of, upgrade_request

    env = {"RELAY_POOL_FAST": silent_origin.addr, "RELAY_POOL_FAST_CONNECT_TIMEOUT": "0.3",
           "RELAY_POOL_SLOW": silent_origin.addr, "RELAY_POOL_SLOW_CONNECT_TIMEOUT": "2",
           "RELAY_ROUTES": "/fast = fast, /slow = slow", "RELAY_CONNECT_TIMEOUT": "8",
           "WSRELAY_NATIVE_HANDSHAKE": head_phase}

    def waited(relay, path: str) -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as s:
            s.sendall(upgrade_request(path))
            assert status_of(read_head(s)[0]) == 504
        return time.monotonic() - started

    with Relay(None, workers=1, env=env) as r:
        assert waited(r, "/fast") < 4  # the pool's 0.3 s, not the global 8 s
        assert 1.9 <= waited(r, "/slow") < 6
        # a short timeout is not held up behind a longer one pending
        with socket.create_connection(("127.0.0.1", r.port), timeout=20) as pending:
            pending.sendall(upgrade_request("/slow"))
            started = time.monotonic()
            assert waited(r, "/fast") < 1.5
            assert status_of(read_head(pending)[0]) == 504 and time.monotonic() - started < 6
        r.wait_log(f"origin {silent_origin.addr} timeout: no answer to an upgrade within RELAY_CONNECT_TIMEOUT=0.3s")
    env.update(RELAY_CONNECT_TIMEOUT="0.3", RELAY_POOL_FAST_CONNECT_TIMEOUT="0.3")
    with Relay(None, workers=1, env=env) as r:
        assert 1.9 <= waited(r, "/slow") < 6  # the pool's 2 s, not the global 0.3 s
