"""``wsrelay demo``: the embedded default, with no configuration.

Starts the demo origin (:mod:`relay.demo_origin`: WebSocket echo, a page
with a long-polling fallback) on loopback in its own process, runs the real
supervisor with two workers in front of it, prints the URLs, proves one round
trip through the relay with a plain blocking client, and serves until Ctrl-C.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import sys

from relay.config import Address, Settings
from relay.handshake import accept_key


def _bind_loopback(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s


def _free_port(preferred: int) -> int:
    s = _bind_loopback(preferred)
    port = s.getsockname()[1]
    s.close()
    return port


def serve_origin(sock: socket.socket) -> None:
    """The demo origin (echo, page, long polling) in this process, on uvloop."""
    import uvloop

    from relay.demo_origin import serve_demo

    uvloop.run(serve_demo(sock))


def round_trip(port: int, text: str, timeout: float = 5.0) -> str:
    """One text message through ws://127.0.0.1:port/ with a minimal blocking client."""
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("relay closed during the handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or accept_key(key) not in head:
            raise ConnectionError("no valid 101: " + head.split(b"\r\n")[0].decode(errors="replace"))
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("relay closed before the echo")
            rest += chunk
        return rest[2: 2 + (rest[1] & 0x7F)].decode()


def main(port: int = 8080) -> int:
    from relay.cli import run

    origin_sock = _bind_loopback(0)
    origin_port = origin_sock.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve_origin(origin_sock)
        finally:
            os._exit(0)
    origin_sock.close()
    relay_port = _free_port(port)
    metrics_port = _free_port(9108)
    settings = Settings(listen=(Address("127.0.0.1", relay_port),),
                        origin=(Address("127.0.0.1", origin_port),),
                        workers=2, metrics_listen=Address("127.0.0.1", metrics_port), access_log=False)

    def ready(_sup) -> None:
        url = f"ws://127.0.0.1:{relay_port}/"
        try:
            answer = round_trip(relay_port, "hello through wsrelay")
        except OSError as e:
            print(f"wsrelay demo: round trip FAILED: {e}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(f"wsrelay demo: relay on {url} -> echo origin on ws://127.0.0.1:{origin_port}/\n"
              f"wsrelay demo: open http://127.0.0.1:{relay_port}/ in a browser for the demo page\n"
              f"wsrelay demo: round trip OK: sent 'hello through wsrelay', got {answer!r}\n"
              f"wsrelay demo: metrics on http://127.0.0.1:{metrics_port}/metrics\n"
              f"wsrelay demo: try it:  python -m websockets {url}   (Ctrl-C to stop)", flush=True)

    try:
        return run(settings, None, on_ready=ready)
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
