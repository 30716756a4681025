"""The echo origin: a picows WebSocket server that sends every data frame back.

    python -m bench.origin [--listen 127.0.0.1:0] [--procs 1]

Prints ``listening on HOST:PORT`` once the socket is bound, then ``ready``
once every process accepts. With ``--procs N`` the parent binds one socket
and forks N servers that share it (no event loop exists before the fork).
SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys



def _serve(sock: socket.socket, ready_w: int) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, ws_create_server

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

    async def main() -> None:
        await ws_create_server(lambda _req: Echo(), sock=sock, backlog=4096,
                               max_frame_size=64 << 20, websocket_handshake_timeout=30)
        os.write(ready_w, b"R")
        os.close(ready_w)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--procs", type=int, default=1, help="server processes sharing the socket")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    print(f"listening on {host}:{sock.getsockname()[1]}", flush=True)

    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                _serve(sock, ready_w)
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
