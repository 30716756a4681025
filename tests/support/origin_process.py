"""A real origin in a process of its own (aiohttp), so that "killed" means a
real SIGKILL, and "restarted" a new process on the same port.

``python -m tests.support.origin_process --name a [--port P] [--close-after S]``
prints ``READY <port>`` once it listens, then serves:

- a WebSocket on any path: first a text message ``{"origin", "path",
  "host"}`` naming itself, then an echo; ``--close-after S`` closes each
  WebSocket after 0.5 S to 1.5 S seconds (an origin whose sessions are short);
- ``GET /healthz``: 200, or 503 after ``POST /_origin/health?ok=0``; every
  one is counted as a probe;
- ``GET /_origin/stats``: its counters as JSON (probes, requests, WebSockets
  opened and open now);
- any other request: 200 with ``{"origin", "path", "host"}``.

:class:`OriginProcess` runs one from a test; :func:`hello_over_ws`,
:func:`hello_over_http` and :func:`held_hello` ask through a relay and say
which origin answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

from tests.support.net import raw_exchange, read_head, status_of, upgrade_request
from tests.support.raw_origins import read_frame
from tests.support.relay import ROOT, wait_for


def _app(name: str, close_after: float | None):
    from aiohttp import WSMsgType, web

    stats = {"probes": 0, "requests": 0, "ws_opened": 0, "ws_open": 0}
    healthy = [True]

    def who(request) -> dict:
        return {"origin": name, "path": request.path, "host": request.headers.get("Host", "")}

    async def any_request(request):
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await websocket(request)
        if request.path == "/healthz":
            stats["probes"] += 1
            return web.Response(status=200 if healthy[0] else 503, text="ok" if healthy[0] else "sick")
        if request.path == "/_origin/stats":
            return web.json_response(stats)
        if request.path == "/_origin/health":
            healthy[0] = request.query.get("ok") == "1"
            return web.Response(text="set")
        stats["requests"] += 1
        await request.read()
        return web.json_response(who(request))

    async def websocket(request):
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        stats["ws_opened"] += 1
        stats["ws_open"] += 1
        closer = None
        if close_after is not None:
            closer = asyncio.get_running_loop().call_later(random.uniform(0.5, 1.5) * close_after,
                                                           lambda: asyncio.ensure_future(ws.close()))
        try:
            await ws.send_str(json.dumps(who(request)))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            stats["ws_open"] -= 1
            if closer is not None:
                closer.cancel()
        return ws

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    return app


async def _serve(name: str, port: int, close_after: float | None) -> None:
    from aiohttp import web

    runner = web.AppRunner(_app(name, close_after), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=1024)
    await site.start()
    sock = site._server.sockets[0]
    print(f"READY {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


class OriginProcess:
    """One origin process; :meth:`kill` is a SIGKILL, :meth:`start` again
    binds the same port."""

    def __init__(self, name: str, close_after: float | None = None) -> None:
        self.name = name
        self.close_after = close_after
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "OriginProcess":
        args = [sys.executable, "-m", "tests.support.origin_process", "--name", self.name, "--port", str(self.port)]
        if self.close_after is not None:
            args += ["--close-after", str(self.close_after)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready: list[str] = []

        def read() -> None:
            ready.append(self.proc.stdout.readline().decode())

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(20)
        if not ready or not ready[0].startswith("READY "):
            self.kill()
            raise AssertionError(f"origin {self.name} did not start: {ready!r}")
        self.port = int(ready[0].split()[1])
        return self

    def kill(self) -> None:
        """SIGKILL: its sockets are reset by the kernel, nothing is said."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def _get(self, path: str, method: str = "GET") -> bytes:
        req = urllib.request.Request(f"http://{self.addr}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def stats(self) -> dict:
        return json.loads(self._get("/_origin/stats"))

    def healthy(self, ok: bool) -> None:
        """Make its /healthz answer 200 (``ok``) or 503; it keeps serving everything else."""
        self._get(f"/_origin/health?ok={int(ok)}", "POST")

    def wait_ws_open(self, n: int, timeout: float = 20) -> None:
        wait_for(lambda: self.stats()["ws_open"] == n, timeout, what=f"{n} WebSockets open at {self.name}")


# -- clients that learn which origin served them ----------------------------------------

def hello_over_ws(port: int, path: str = "/", host: str = "relay.test", extra: str = "") -> tuple[int, dict | None]:
    """Open a WebSocket by hand: (status, the origin's first message naming itself)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request(path, host, extra=extra))
        head, rest = read_head(s)
        status = status_of(head)
        if status != 101:
            return status, None
        _op, payload, _rest = read_frame(s, rest)
        return 101, json.loads(payload)


def hello_over_http(port: int, path: str = "/", host: str = "relay.test", extra: str = "") -> tuple[int, dict | None]:
    out = raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
    status = status_of(out)
    return status, json.loads(out.partition(b"\r\n\r\n")[2]) if status == 200 else None


def held_hello(port: int, path: str) -> tuple[socket.socket, str]:
    """A WebSocket left open, and the name of its origin."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(upgrade_request(path))
    head, rest = read_head(s)
    assert status_of(head) == 101
    return s, json.loads(read_frame(s, rest)[1])["origin"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--close-after", type=float, default=None)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(a.name, a.port, a.close_after))


if __name__ == "__main__":
    main()
