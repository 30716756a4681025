"""A second relay never joins an address another one serves (README: Lifecycle).

With SO_REUSEPORT on the listening socket, any process of the same user
could bind the same address and take a share of the connections: two relays
with different origins split 8 connections 6/2, silently. Now the second one
refuses to start with one line, as nginx and HAProxy do, and a reload that
moves RELAY_LISTEN onto such an address is refused while the relay keeps
serving.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect

from tests.support.relay import Relay, wait_for


def echo_many(port: int, n: int) -> list[str]:
    async def one(i: int) -> str:
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=10, close_timeout=2) as ws:
            await ws.send(f"message {i}")
            return await asyncio.wait_for(ws.recv(), 10)

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(n)))
    return asyncio.run(all_of_them())


def upgraded(r: Relay) -> int:
    return sum('"outcome":"upgraded"' in line for line in r.access)


def test_second_relay_on_a_served_address_refuses_to_start(ws_origin, aio_origin):
    with Relay(ws_origin.addr, workers=2) as first:
        second = Relay(aio_origin.addr, workers=2, env={"RELAY_LISTEN": f"127.0.0.1:{first.port}"})
        second.start(wait_ready=False)
        try:
            code = second.proc.wait(20)
        finally:
            second.stop()
        wait_for(lambda: second.log, 5, what="the second relay's stderr")
        assert code == 2, second.text()
        assert len(second.log) == 1, second.text()
        assert second.log[0].startswith(f"wsrelay: RELAY_LISTEN: 127.0.0.1:{first.port} is already in use by "
                                        f"pid {first.proc.pid} ")
        assert "Traceback" not in second.text()
        # Every connection goes to the first relay, and so to its origin.
        assert echo_many(first.port, 8) == [f"message {i}" for i in range(8)]
        wait_for(lambda: upgraded(first) == 8, 10, what="8 sessions in the first relay's access log")


def test_reload_onto_an_address_another_relay_serves_is_refused(ws_origin, tmp_path):
    with Relay(ws_origin.addr, workers=1) as other:
        env_file = tmp_path / "wsrelay.env"
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:0\n")
        with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
            env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:{other.port}\n")
            r.signal(__import__("signal").SIGHUP)
            r.wait_log("reload refused", timeout=10)
            assert f"RELAY_LISTEN: 127.0.0.1:{other.port} is already in use by pid {other.proc.pid}" in r.text()
            assert "starting worker generation 1" not in r.text()
            # Both keep serving their own clients.
            assert echo_many(r.port, 4) == [f"message {i}" for i in range(4)]
            assert echo_many(other.port, 4) == [f"message {i}" for i in range(4)]
            wait_for(lambda: upgraded(other) == 4 and upgraded(r) == 4, 10, what="4 sessions in each access log")


def test_reload_that_adds_an_address_keeps_the_one_it_serves(ws_origin, tmp_path):
    """The new generation inherits the socket of the address it still serves
    (no second bind, so no SO_REUSEPORT needed) and binds the new one."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        spare = probe.getsockname()[1]
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:0\n")
    with Relay(None, workers=1, args=("--env-file", str(env_file))) as r:
        first = r.port
        env_file.write_text(f"RELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:0,127.0.0.1:{spare}\n")
        r.signal(__import__("signal").SIGHUP)
        r.wait_log("reload: generation 1 accepting", timeout=20)
        r.wait_log(") finished (", timeout=20)  # the old generation is gone
        assert echo_many(spare, 2) == ["message 0", "message 1"]
        # The same address (even 127.0.0.1:0): the same socket, still on its port.
        assert echo_many(first, 2) == ["message 0", "message 1"]
