"""The process model under real signals: the global limit, crashes, spread,
drain, reload and restart backoff (README: "Lifecycle")."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time

import pytest
from websockets.asyncio.client import connect

from tests.support.net import read_head, status_of, upgrade_request
from tests.support.probes import closed_by_peer, worker_fds
from tests.support.relay import Relay, run, wait_for
from tests.support.scrape import text as metrics_text


def gauge(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def _attempt(port: int) -> tuple[int, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/"))
    head = await reader.readuntil(b"\r\n\r\n")
    return status_of(head), writer


async def burst(port: int, n: int) -> tuple[list[asyncio.StreamWriter], dict[int, int]]:
    """n simultaneous upgrade attempts; returns the open tunnels and a count per status."""
    results = await asyncio.gather(*(_attempt(port) for _ in range(n)))
    counts: dict[int, int] = {}
    tunnels = []
    for status, writer in results:
        counts[status] = counts.get(status, 0) + 1
        if status == 101:
            tunnels.append(writer)
        else:
            writer.close()
    return tunnels, counts


def test_global_limit_is_strict_over_three_bursts(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MAX_CLIENTS": "20"}) as r:
        for _round in range(3):
            async def go():
                tunnels, counts = await burst(r.port, 60)
                assert counts == {101: 20, 503: 40}, counts
                assert gauge(metrics_text(r), "wsrelay_clients") == 20
                for w in tunnels:
                    w.close()
            run(go())
            wait_for(lambda: gauge(metrics_text(r), "wsrelay_clients") == 0, 10, what="clients back to 0")


def test_limit_503_retry_after_and_closing_admits_more(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MAX_CLIENTS": "20"}) as r:
        async def go():
            tunnels, counts = await burst(r.port, 20)
            assert counts == {101: 20}
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(upgrade_request("/"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert status_of(head) == 503 and b"Retry-After: 5" in head
            writer.close()
            for w in tunnels[:5]:
                w.close()
            deadline = time.monotonic() + 10
            while gauge(metrics_text(r), "wsrelay_clients") > 15 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            more, counts = await burst(r.port, 8)
            assert counts == {101: 5, 503: 3}, counts
            for w in tunnels[5:] + more:
                w.close()
        run(go())


def test_sigkill_of_a_worker_holding_clients_gives_its_share_back(ws_origin):
    with Relay(ws_origin.addr, workers=2, env={"RELAY_MAX_CLIENTS": "20"}) as r:
        async def go():
            tunnels, counts = await burst(r.port, 20)
            assert counts == {101: 20}
            text = metrics_text(r)
            per_worker = {w: gauge(text, "wsrelay_websocket_connections", f'{{worker="{w}"}}') for w in "01"}
            assert sum(per_worker.values()) == 20
            victim_index = max(per_worker, key=per_worker.get)
            victim = r.worker_pids()[int(victim_index)]
            held = int(per_worker[victim_index])
            import os
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            deadline = t0 + 10
            while time.monotonic() < deadline:
                pids = r.worker_pids()
                if pids.get(int(victim_index)) not in (None, victim) and \
                        gauge(metrics_text(r), "wsrelay_clients") == 20 - held:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("worker not replaced or its clients not given back within 10 s")
            more, counts = await burst(r.port, held + 3)
            assert counts == {101: held, 503: 3}, counts
            assert gauge(metrics_text(r), "wsrelay_worker_restarts_total") == 1
            for w in tunnels + more:
                w.close()
        run(go())
        assert "died (signal SIGKILL)" in r.text()


def test_spread_of_1000_connections_over_two_workers(ws_origin):
    with Relay(ws_origin.addr, workers=2) as r:
        socks = []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
                s.sendall(upgrade_request("/"))
                socks.append(s)
            for s in socks:
                assert status_of(read_head(s)[0]) == 101
            text = metrics_text(r)
            counts = [gauge(text, "wsrelay_websocket_connections", f'{{worker="{w}"}}') for w in "01"]
            assert sum(counts) == 1000
            print("spread", counts)
            assert all(400 <= c <= 600 for c in counts), counts
        finally:
            for s in socks:
                s.close()


def test_a_stalled_worker_costs_latency_not_service(ws_origin):
    """Balanced accepting defers to the least-loaded sibling; if that sibling
    is stopped (SIGSTOP), the other still takes every connection."""
    with Relay(ws_origin.addr, workers=2) as r:
        socks = []
        pids = r.worker_pids()
        stopped = pids[0]
        os.kill(stopped, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for _ in range(60):  # sequential: each would rather go to the stopped, emptier worker
                s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
                s.sendall(upgrade_request("/"))
                socks.append(s)
                assert status_of(read_head(s)[0]) == 101
            elapsed = time.monotonic() - t0
            print(f"60 handshakes with a stopped sibling in {elapsed:.2f}s")
            assert elapsed < 10
        finally:
            os.kill(stopped, signal.SIGCONT)
            for s in socks:
                s.close()


def test_an_unresponsive_worker_is_killed_and_replaced(ws_origin, data_plane):
    """A worker whose event loop stops turning (here: SIGSTOP, as a blocking
    call would) serves nobody: after HUNG_AFTER without a heartbeat the
    supervisor kills and replaces it, counts the restart, and the sibling
    serves throughout."""
    from workers.supervisor import HUNG_AFTER

    if data_plane != "native-fast":  # ~10 s each: the supervisor's watchdog is the same for every plane
        pytest.skip("the supervisor's heartbeat watchdog does not depend on the data plane: run on the default one")

    with Relay(ws_origin.addr, workers=2) as r:
        stuck = r.worker_pids()[0]
        os.kill(stuck, signal.SIGSTOP)
        t0 = time.monotonic()
        r.wait_log(f"(pid {stuck}) unresponsive for", timeout=HUNG_AFTER + 5)
        wait_for(lambda: r.worker_pids().get(0) not in (None, stuck), 10, what="a replacement worker 0")
        waited = time.monotonic() - t0
        print(f"stuck worker replaced after {waited:.1f}s")
        assert HUNG_AFTER - 1.5 <= waited <= HUNG_AFTER + 8
        r.wait_log(f"(pid {stuck}) died (signal SIGKILL)")  # the restart path: logged and counted
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
                s.sendall(upgrade_request("/"))
                assert status_of(read_head(s)[0]) == 101


def test_sigterm_drains_open_websocket_and_exits_0(ws_origin):
    r = Relay(ws_origin.addr, workers=2, env={"RELAY_DRAIN_TIMEOUT": "3"}).start()
    try:
        async def go():
            async with connect(r.url + "/") as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                t0 = time.monotonic()
                r.signal(signal.SIGTERM)
                # New connections are refused once every worker has closed its
                # listening socket; one a worker accepted just before its SIGTERM
                # is still answered (101), never left hanging.
                refused = False
                while not refused and time.monotonic() - t0 < 2:
                    try:
                        status, w = await asyncio.wait_for(_attempt(r.port), 2)
                        w.close()
                        assert status in (101, 503), status
                    except (ConnectionError, asyncio.IncompleteReadError):
                        refused = True
                assert refused, "connections still accepted 2 s into the drain"
                # ...while the open one keeps echoing until the drain timeout.
                while time.monotonic() - t0 < 2.5:
                    await ws.send("during")
                    assert await ws.recv() == "during"
                    await asyncio.sleep(0.2)
                with pytest.raises(Exception):
                    await asyncio.wait_for(ws.recv(), 6)
        run(go())
        code = r.proc.wait(8)
        assert code == 0
    finally:
        r.stop()


def test_connections_accepted_before_the_drain_are_served(ws_origin):
    """The race a reload would otherwise lose: a worker accepted a connection,
    then got SIGTERM before the request arrived. That first request is served
    (101, or the origin's answer for plain HTTP), while a kept-alive connection
    asking again gets 503 draining."""
    r = Relay(ws_origin.addr, workers=1, env={"RELAY_DRAIN_TIMEOUT": "5"}).start()
    try:
        before = worker_fds(r)
        fresh = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        fresh_http = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        kept = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        kept.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_head(kept)
        assert b"connection: close" not in head.lower()
        wait_for(lambda: worker_fds(r) >= before + 3, 5, what="the worker to accept the connections")
        r.signal(signal.SIGTERM)
        r.wait_log("draining")
        fresh.sendall(upgrade_request("/"))
        assert status_of(read_head(fresh)[0]) == 101
        fresh_http.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_head(fresh_http)[0]) != 503  # the origin's own answer
        fresh_http.close()
        assert closed_by_peer(kept, 5)  # an idle kept-alive connection is closed at once
        fresh.close()
        assert r.proc.wait(10) == 0
        assert '"outcome":"draining"' not in r.text()
    finally:
        r.stop()


def test_second_sigterm_stops_at_once(ws_origin):
    r = Relay(ws_origin.addr, workers=1, env={"RELAY_DRAIN_TIMEOUT": "30"}).start()
    try:
        s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        s.sendall(upgrade_request("/"))
        assert status_of(read_head(s)[0]) == 101
        r.signal(signal.SIGTERM)
        r.wait_log("draining")
        t0 = time.monotonic()
        r.signal(signal.SIGTERM)
        assert r.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        s.close()
    finally:
        r.stop()


def test_sighup_reload_drops_nothing_and_applies_the_new_env_file(ws_origin, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WS_PATHS=/\n")
    with Relay(None, workers=2, args=("--env-file", str(env_file))) as r:
        async def client_loop(stop_at: float, failures: list, done: list):
            while time.monotonic() < stop_at:
                try:
                    async with connect(r.url + "/live", open_timeout=5) as ws:
                        await ws.send("ping")
                        assert await ws.recv() == "ping"
                    done.append(1)
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(e))

        async def go():
            failures, done = [], []
            stop_at = time.monotonic() + 5
            loops = [asyncio.ensure_future(client_loop(stop_at, failures, done)) for _ in range(4)]
            async with connect(r.url + "/held") as held:
                await asyncio.sleep(1)
                env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WS_PATHS=/live\n")
                r.signal(signal.SIGHUP)
                await asyncio.gather(*loops)
                # the WebSocket opened before the reload still works
                await held.send("still here")
                assert await held.recv() == "still here"
            assert failures == [], failures[:5]
            assert len(done) > 20
        run(go())
        r.wait_log("reload: generation 1 accepting")
        # The new setting is in force: upgrades outside /live are refused now.
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(upgrade_request("/held"))
            assert status_of(read_head(s)[0]) == 403


def test_reload_applies_a_new_log_level_to_supervisor_and_workers(ws_origin, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LOG_LEVEL=info\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        assert " DEBUG " not in r.text()
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LOG_LEVEL=debug\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload: generation 1 accepting")
        new = r.worker_pids()[0]
        r.wait_log(f"(pid {new}) accepting")  # the new worker's debug line
        r.wait_log(f"(pid {new}) ready")  # the supervisor's own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_quick_reloads_moving_the_listener_leave_only_the_last_one_open(ws_origin, tmp_path):
    """A second SIGHUP before the first new generation is ready, each moving
    RELAY_LISTEN: the first address is closed once the old generation drains,
    the intermediate one at once, and only the last one serves."""
    first, second, third = _free_port(), _free_port(), _free_port()
    env_file = tmp_path / "wsrelay.env"

    def listen_on(port: int) -> None:
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:{port}\n"
                            "RELAY_DRAIN_TIMEOUT=1\n")

    def refused(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(upgrade_request("/"))
                return s.recv(1) == b""  # accepted by a closing queue: no answer
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        except TimeoutError:  # queued on a socket nobody accepts from: the leak
            return False

    listen_on(first)
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        listen_on(second)
        r.signal(signal.SIGHUP)
        r.wait_log("starting worker generation 1")
        listen_on(third)
        r.signal(signal.SIGHUP)
        r.wait_log("starting worker generation 2")
        r.wait_log("reload: generation 2 accepting")
        with socket.create_connection(("127.0.0.1", third), timeout=5) as s:
            s.sendall(upgrade_request("/"))
            assert status_of(read_head(s)[0]) == 101
        wait_for(lambda: refused(first) and refused(second), 10, what="the first two addresses closed")


def test_invalid_env_file_on_reload_keeps_serving(ws_origin, tmp_path):
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_WORKERS=lots\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload refused")
        assert "RELAY_WORKERS" in r.text()
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(upgrade_request("/"))
            assert status_of(read_head(s)[0]) == 101
        assert "generation 1" not in r.text()


def test_worker_crashing_on_start_is_restarted_with_growing_delays(ws_origin):
    r = Relay(ws_origin.addr, workers=1, env={"WSRELAY_FAULT": "crash-on-start"}, tracebacks=True).start(wait_ready=False)
    try:
        r.wait_log("restarting in", count=5, timeout=15)
        delays = [float(x) for x in re.findall(r"restarting in ([\d.]+)s", r.text())]
        assert delays[:5] == sorted(delays[:5]) and delays[4] >= 1.0, delays
        starts = r.text().count("worker 0 started")
        assert starts < 12, f"{starts} starts: restart loop too tight"
    finally:
        r.stop()


def test_a_worker_exiting_resets_no_queued_connection(ws_origin):
    """Why one shared listening socket: connections waiting in the backlog
    belong to no worker, so killing one while they wait resets none of them
    (with a socket per worker, those hashed to its queue would be reset)."""
    with Relay(ws_origin.addr, workers=2) as r:
        pids = r.worker_pids()
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)  # nobody accepts: every connection stays queued
        socks = []
        try:
            for _ in range(40):
                s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
                s.sendall(upgrade_request("/"))
                socks.append(s)
            os.kill(pids[0], signal.SIGKILL)
            os.kill(pids[1], signal.SIGCONT)
            statuses = [status_of(read_head(s)[0]) for s in socks]
            assert statuses == [101] * 40, statuses
            wait_for(lambda: r.worker_pids().get(0) not in (None, pids[0]), 10, what="worker 0 replaced")
        finally:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
            for s in socks:
                s.close()


def test_the_drain_line_counts_connections_waiting_for_their_origin(silent_origin):
    """"worker N draining: T tunnels, C connections" counts each connection
    still in its head phase (here: three upgrades waiting for a silent
    origin), whichever plane read their heads."""
    r = Relay(silent_origin.addr, workers=1, env={"RELAY_DRAIN_TIMEOUT": "1", "RELAY_CONNECT_TIMEOUT": "30"}).start()
    waiting = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            s.sendall(upgrade_request("/"))
            waiting.append(s)
        wait_for(lambda: gauge(metrics_text(r), "wsrelay_origin_connections",
                               f'{{origin="{silent_origin.addr}",pool="default"}}') == 3, 10,
                 what="three upgrades waiting for the origin")
        r.signal(signal.SIGTERM)
        r.wait_log("worker 0 draining: ")
        assert "worker 0 draining: 0 tunnels, 3 connections, up to 1s" in r.text(), r.text()
        assert r.proc.wait(10) == 0
    finally:
        for s in waiting:
            s.close()
        r.stop()
