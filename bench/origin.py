"""The echo origin: a picows WebSocket server that sends every data frame back.

A client offering ``permessage-deflate`` gets it (``Sec-WebSocket-Extensions:
permessage-deflate`` in the 101: 15-bit windows, context takeover both ways)
and its compressed frames back as they came, RSV1 included: the client sends
each message once and in order, so both directions have the same window and
the same bytes are a valid compressed stream back (what a zlib echo server
with the same settings would send; bench/loadgen.py ``--deflate``).

    python -m bench.origin [--listen 127.0.0.1:0] [--procs 1] [--http 127.0.0.1:0]

Prints ``listening on HOST:PORT`` once the socket is bound, then ``ready``
once every process accepts. With ``--procs N`` the parent binds one socket
and forks N servers that share it (no event loop exists before the fork).
SIGTERM or SIGINT stops them all.

``--http HOST:PORT`` also serves plain HTTP/1.1 on a second socket (printed as
``http on HOST:PORT`` before ``ready``), from the same processes: every request
head gets the same 200 answer with a ``HTTP_BODY``-byte body and a
Content-Length, on a kept-alive connection (:class:`HttpResponder`; requests
with a body are not supported). picows cannot do this on the WebSocket port:
it closes the connection after any non-101 answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

#: the body every plain HTTP request gets (the ``http-rate`` workload's response)
HTTP_BODY = 128
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % HTTP_BODY
                 + b"x" * (HTTP_BODY - 1) + b"\n")
HEAD_END = b"\r\n\r\n"


class HttpResponder(asyncio.Protocol):
    """One fixed 200 per request head seen; the connection stays open.

    Counts head ends in what arrived (a head split over reads is handled by
    keeping the unfinished tail), so pipelined requests get one answer each."""

    __slots__ = ("transport", "tail")

    def __init__(self) -> None:
        self.transport = None
        self.tail = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        n = data.count(HEAD_END)
        if n:
            self.transport.write(HTTP_RESPONSE * n if n > 1 else HTTP_RESPONSE)
            end = data.rfind(HEAD_END) + 4
            self.tail = data[end:] if end < len(data) else b""
        else:
            self.tail = data[-65536:]  # a head never grows without bound here

    def eof_received(self) -> bool:
        return False  # close


def _serve(sock: socket.socket, ready_w: int, http_sock: socket.socket | None = None) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

    BINARY, TEXT, CONT, CLOSE = WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.CLOSE

    class Echo(WSListener):
        def on_ws_frame(self, transport, frame):
            t = frame.msg_type
            if t is BINARY or t is TEXT or t is CONT:
                # send() copies the payload into the write buffer, so the view
                # may be handed over while the frame is still ours
                transport.send(t, frame.get_payload_as_memoryview(), frame.fin)
            elif t is CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    class DeflateEcho(WSListener):
        """Echo keeping RSV1 (permessage-deflate agreed)."""

        def on_ws_frame(self, transport, frame):
            t = frame.msg_type
            if t is BINARY or t is TEXT or t is CONT:
                transport.send(t, frame.get_payload_as_memoryview(), frame.fin, frame.rsv1)
            elif t is CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    agreed = {"Sec-WebSocket-Extensions": "permessage-deflate"}

    def listener(req):
        if "permessage-deflate" in req.headers.get("Sec-WebSocket-Extensions", ""):
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(extra_headers=agreed),
                                                 DeflateEcho())
        return Echo()

    async def main() -> None:
        await ws_create_server(listener, sock=sock, backlog=4096,
                               max_frame_size=64 << 20, websocket_handshake_timeout=30)
        if http_sock is not None:
            await asyncio.get_running_loop().create_server(HttpResponder, sock=http_sock, backlog=4096)
        os.write(ready_w, b"R")
        os.close(ready_w)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    uvloop.run(main())


def _bind(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--procs", type=int, default=1, help="server processes sharing the socket")
    ap.add_argument("--http", metavar="HOST:PORT", help="also answer plain HTTP/1.1 here (fixed 200, keep-alive)")
    args = ap.parse_args(argv)
    sock = _bind(args.listen)
    print(f"listening on {args.listen.rpartition(':')[0]}:{sock.getsockname()[1]}", flush=True)
    http_sock = None
    if args.http:
        http_sock = _bind(args.http)
        print(f"http on {args.http.rpartition(':')[0]}:{http_sock.getsockname()[1]}", flush=True)

    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                _serve(sock, ready_w, http_sock)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(ready_w)
    got = 0
    while got < args.procs:
        b = os.read(ready_r, 16)
        if not b:
            print("an origin process died before accepting", file=sys.stderr)
            break
        got += len(b)
    print("ready", flush=True)

    def stop(signum, _frame):
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = 0
    for p in pids:
        while True:
            try:
                _, status = os.waitpid(p, 0)
                break
            except InterruptedError:
                continue
        if os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
