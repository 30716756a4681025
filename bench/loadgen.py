"""One load-generator process (picows client, uvloop). The runner starts
several and steers them over stdin/stdout; it can also run by hand.

    python -m bench.loadgen --mode echo --url ws://127.0.0.1:8080/ --conns 25 --size 64 --duration 5

Modes:

- ``echo``: closed loop. Every connection sends one binary message of
  ``--size`` bytes, waits for the echo, sends the next. Counts round trips
  and their latency inside the measuring window (after ``--warmup``).
- ``handshake``: ``--conns`` concurrent loops of connect + upgrade + one
  64-byte echo + close; counts complete cycles and their latency.
- ``idle``: opens ``--conns`` connections (``--connect-concurrency`` at a
  time), does one echo on each, then holds them until told to stop.
- ``echo --deflate``: the echo loop with permessage-deflate (RFC 7692). Each
  connection offers ``permessage-deflate`` (no window parameter, so the
  origin cannot shrink ours) and refuses a 101 without it; it sends text-like
  JSON records of ``--size`` bytes, each compressed with context takeover as
  a browser's zlib would (compress + ``Z_SYNC_FLUSH``, the final ``00 00 ff
  ff`` stripped, RSV1 set). The records are distinct (a pool of at least 4
  windows' worth), so no message is a copy of one still in the window. They
  are compressed once per process, not per send (:func:`deflate_sequence`):
  the first pass from an empty window, the second with the pool before it in
  the window, which is the window of every later pass too, so the bytes sent
  are exactly what a compressor would send and the load generator costs what
  it costs uncompressed. The origin echoes them as they are (same messages in
  the same order: the same window both ways, so the same bytes are a valid
  stream towards the client).
- ``storm``: a reconnect storm. At START every one of ``--conns``
  connections connects and sends its upgrade request at once (raw uvloop
  protocol clients with a prepared request, so the load generator's own
  cost per handshake stays small); each one's handshake latency is from its
  connect call to the complete ``101`` head. Reports when the last one was
  upgraded (``last_ns``), then holds them all until told to stop.
- ``http``: closed loop of plain HTTP/1.1 on kept-alive connections (raw
  uvloop protocol clients, no picows): every connection sends ``GET / HTTP/1.1``
  with a ``Host``, reads until the response is complete by its Content-Length
  (a 200 is expected), sends the next. Counts responses and their latency
  inside the window. ``--url`` may be ``http://`` or ``ws://`` (only the host
  and port are used).

Protocol with the runner (one line each way, so several processes start
together): the process prints ``READY {json}`` once connected, waits for
``START <monotonic_ns>`` (``echo``/``handshake``) or any line (``idle``) on
stdin, and ends with ``RESULT {json}``. Without ``--steered`` it starts by
itself. Latencies (ns, int64) go to ``--lat-file`` if given.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import random
import ssl
import sys
import time
import zlib

import uvloop
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

BINARY, CLOSE = WSMsgType.BINARY, WSMsgType.CLOSE
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process


class Run:
    """Shared state of one process's connections."""

    def __init__(self, size: int):
        self.payload = os.urandom(size)
        self.size = size
        self.lat = array.array("q")
        self.msgs = 0
        self.errors = 0
        self.measure_from = 1 << 62
        self.measure_to = 1 << 62
        self.stop_at = 1 << 62
        self.active = 0
        self.all_done: asyncio.Future | None = None
        self.error_kinds: dict[str, int] = {}
        self.first: list[bytes] = []   # --deflate: the compressed sequence (deflate_sequence)
        self.steady: list[bytes] = []

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class EchoClient(WSListener):
    """Closed loop on one connection; the clock starts with :meth:`go`."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = run
        self.transport = None
        self.sent_at = 0
        self.waiting = False
        self.closing = False
        self.reply: asyncio.Future | None = None

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def go(self) -> None:
        self.sent_at = now_ns()
        self.waiting = True
        self.transport.send(BINARY, self.run.payload)

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is BINARY:
            now = now_ns()
            if self.reply is not None:  # idle mode: the single echo
                if not self.reply.done():
                    self.reply.set_result(None)
                return
            r = self.run
            if r.measure_from <= now < r.measure_to:
                r.lat.append(now - self.sent_at)
                r.msgs += 1
            if now < r.stop_at:
                self.sent_at = now
                transport.send(BINARY, r.payload)
            else:
                self.finish()
        elif frame.msg_type is CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def finish(self) -> None:
        if self.waiting:
            self.waiting = False
            r = self.run
            r.active -= 1
            if r.active == 0 and r.all_done is not None and not r.all_done.done():
                r.all_done.set_result(None)

    def on_ws_disconnected(self, transport) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError("disconnected before the echo"))
        if not self.closing:
            self.run.error("disconnected")
            self.finish()



# -- permessage-deflate ----------------------------------------------------------------

DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate"}


def records(rnd: random.Random, size: int) -> bytes:
    """``size`` bytes of a JSON array of order records (what a trading or
    chat feed sends): repeated keys, random values."""
    syms = ("BTC-USD", "ETH-USD", "EUR-USD", "AAPL", "MSFT", "TSLA", "NVDA", "AMZN")
    parts, n = [], 1
    while n < size:
        rec = ('{"seq":%d,"sym":"%s","side":"%s","px":%d.%02d,"qty":%d,"user":"u%05d"}'
               % (rnd.randrange(10 ** 7), rnd.choice(syms), rnd.choice(("buy", "sell")), rnd.randrange(1, 5000),
                  rnd.randrange(100), rnd.randrange(1, 1000), rnd.randrange(10 ** 5)))
        parts.append(rec)
        n += len(rec) + 1
    return (b"[" + ",".join(parts).encode())[:size - 1] + b"]"


def deflate_sequence(size: int, seed: int = 7) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(plain, first, steady): distinct records, then each compressed with
    context takeover from an empty window (the first pass), then again with
    the whole pool before it (every later pass sees that same window)."""
    rnd = random.Random(seed)
    plain = [records(rnd, size) for _ in range(max(8, -(-4 * 32768 // size)))]
    c = zlib.compressobj(wbits=-15)  # zlib's defaults, a 32 KiB window: a browser's
    passes = []
    for _ in range(2):
        out = []
        for m in plain:
            data = c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH)
            out.append(data[:-4])
        passes.append(out)
    return plain, passes[0], passes[1]


class DeflateEchoClient(EchoClient):
    """EchoClient sending the compressed sequence (RSV1 set); the echo is counted as is."""

    def __init__(self, run: Run):
        super().__init__(run)
        self.i = 0

    def on_ws_connected(self, transport) -> None:
        self.transport = transport
        agreed = transport.response.headers.get("Sec-WebSocket-Extensions", "") if transport.response else ""
        if "permessage-deflate" not in agreed or "client_" in agreed:
            # not agreed, or agreed with a window or no-takeover rule our stream does not keep
            self.run.error("deflate_not_agreed")
            self.closing = True
            transport.disconnect(graceful=False)

    def _next(self) -> bytes:
        r = self.run
        i = self.i
        self.i = i + 1
        n = len(r.steady)
        return r.first[i] if i < n else r.steady[i % n]

    def go(self) -> None:
        self.sent_at = now_ns()
        self.waiting = True
        self.transport.send(BINARY, self._next(), True, True)

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is BINARY:
            now = now_ns()
            if self.reply is not None:
                if not self.reply.done():
                    self.reply.set_result(None)
                return
            r = self.run
            if r.measure_from <= now < r.measure_to:
                r.lat.append(now - self.sent_at)
                r.msgs += 1
            if now < r.stop_at:
                self.sent_at = now
                transport.send(BINARY, self._next(), True, True)
            else:
                self.finish()
        elif frame.msg_type is CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def _connect(url: str, run: Run, sem: asyncio.Semaphore | None = None) -> EchoClient | None:
    async def once():
        try:
            if run.first:
                transport, client = await ws_connect(lambda: DeflateEchoClient(run), url,
                                                     websocket_handshake_timeout=30, max_frame_size=64 << 20,
                                                     extra_headers=DEFLATE_OFFER, ssl_context=TLS)
                if client is not None and client.closing:
                    return None
            else:
                transport, client = await ws_connect(lambda: EchoClient(run), url, websocket_handshake_timeout=30,
                                                     max_frame_size=64 << 20, ssl_context=TLS)
        except Exception as e:  # a refused or failed handshake is a result, not a crash
            run.error(type(e).__name__)
            return None
        if client is None:  # picows returns no listener when the peer hung up during the upgrade
            run.error("closed_during_upgrade")
            transport.disconnect(graceful=False)
        return client
    if sem is None:
        return await once()
    async with sem:
        return await once()


async def _read_line() -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, sys.stdin.readline)


def _emit(tag: str, obj: dict) -> None:
    sys.stdout.write(f"{tag} {json.dumps(obj)}\n")
    sys.stdout.flush()


async def _wait_start(steered: bool, warmup: float) -> int:
    """Returns the start time (monotonic ns) agreed with the runner."""
    if steered:
        line = (await _read_line()).split()
        if not line or line[0] != "START":
            raise SystemExit("loadgen: expected START")
        t0 = int(line[1])
    else:
        t0 = now_ns() + 50_000_000
    delay = (t0 - now_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    return t0


async def _close_all(clients: list[EchoClient], timeout: float = 5.0) -> None:
    for c in clients:
        c.closing = True
        t = c.transport
        if t is not None and not t.is_disconnected:
            t.send_close(WSCloseCode.OK)
            t.disconnect()
    waits = [c.transport.wait_disconnected() for c in clients if c.transport is not None]
    if waits:
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)
        except TimeoutError:
            pass


async def echo_mode(a: argparse.Namespace) -> dict:
    run = Run(a.size)
    ratio = None
    if a.deflate:
        plain, run.first, run.steady = deflate_sequence(a.size)
        ratio = round(sum(map(len, run.steady)) / sum(map(len, plain)), 3)
    sem = asyncio.Semaphore(a.connect_concurrency)
    clients = [c for c in await asyncio.gather(*(_connect(a.url, run, sem) for _ in range(a.conns))) if c]
    _emit("READY", {"connected": len(clients), "errors": run.errors})
    t0 = await _wait_start(a.steered, a.warmup)
    run.measure_from = t0 + int(a.warmup * 1e9)
    run.measure_to = run.stop_at = run.measure_from + int(a.duration * 1e9)
    run.all_done = asyncio.get_running_loop().create_future()
    run.active = len(clients)
    for c in clients:
        c.go()
    await asyncio.sleep(max(0.0, (run.stop_at - now_ns()) / 1e9))
    if run.active:
        try:  # in-flight messages come back after stop_at; 1 MiB ones may take a while
            await asyncio.wait_for(asyncio.shield(run.all_done), 10)
        except TimeoutError:
            run.error("no_echo_after_stop")
    await _close_all(clients)
    out = {"mode": "echo", "connected": len(clients), "msgs": run.msgs, "bytes": run.msgs * a.size,
           "window_s": a.duration, "errors": run.errors, "error_kinds": run.error_kinds, "lat": run.lat}
    if ratio is not None:
        out["deflate_ratio"] = ratio  # compressed / plain bytes, steady state
    return out


class HandshakeClient(WSListener):
    def __init__(self):
        super().__init__()
        self.reply: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is BINARY and not self.reply.done():
            self.reply.set_result(None)
        elif frame.msg_type is CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectionError("disconnected before the echo"))


async def handshake_mode(a: argparse.Namespace) -> dict:
    run = Run(64)
    _emit("READY", {"connected": 0, "errors": 0})
    t0 = await _wait_start(a.steered, a.warmup)
    run.measure_from = t0 + int(a.warmup * 1e9)
    run.measure_to = run.stop_at = run.measure_from + int(a.duration * 1e9)

    async def loop_once() -> None:
        while now_ns() < run.stop_at:
            start = now_ns()
            try:
                transport, client = await ws_connect(HandshakeClient, a.url, websocket_handshake_timeout=10,
                                                     ssl_context=TLS)
            except Exception as e:
                run.error(type(e).__name__)
                await asyncio.sleep(0.01)  # a refusing proxy must not turn this into a busy loop
                continue
            if client is None:  # the peer hung up during the upgrade
                run.error("closed_during_upgrade")
                transport.disconnect(graceful=False)
                continue
            try:
                transport.send(BINARY, run.payload)
                await asyncio.wait_for(client.reply, 10)
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()
                await transport.wait_disconnected()
            except Exception as e:
                run.error(type(e).__name__)
                transport.disconnect(graceful=False)
                continue
            end = now_ns()
            if run.measure_from <= end < run.measure_to:
                run.lat.append(end - start)
                run.msgs += 1

    await asyncio.gather(*(loop_once() for _ in range(a.conns)))
    return {"mode": "handshake", "msgs": run.msgs, "window_s": a.duration, "errors": run.errors,
            "error_kinds": run.error_kinds, "lat": run.lat}


async def idle_mode(a: argparse.Namespace) -> dict:
    run = Run(64)
    sem = asyncio.Semaphore(a.connect_concurrency)

    async def open_one() -> EchoClient | None:
        async with sem:
            c = await _connect(a.url, run)
            if c is None:
                return None
            c.reply = asyncio.get_running_loop().create_future()
            c.transport.send(BINARY, run.payload)
            try:
                await asyncio.wait_for(c.reply, 30)
            except Exception as e:
                run.error(type(e).__name__)
                c.closing = True
                c.transport.disconnect(graceful=False)
                return None
            return c

    clients = [c for c in await asyncio.gather(*(open_one() for _ in range(a.conns))) if c]
    _emit("READY", {"connected": len(clients), "errors": run.errors})
    if a.steered:
        await _read_line()
    else:
        await asyncio.sleep(a.duration)
    alive = sum(1 for c in clients if not c.transport.is_disconnected)
    lost = len(clients) - alive
    await _close_all(clients, timeout=30)
    return {"mode": "idle", "connected": len(clients), "alive_at_stop": alive, "lost": lost,
            "errors": run.errors, "error_kinds": run.error_kinds, "lat": array.array("q")}


class StormClient(asyncio.Protocol):
    """One connection of a reconnect storm: send the upgrade, wait for the 101."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request = request
        self.done = done
        self.buf = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            if self.buf.startswith(b"HTTP/1.1 101"):
                self.done.set_result(now_ns())
            else:
                self.done.set_exception(ConnectionError(self.buf.split(b"\r\n", 1)[0].decode(errors="replace")))

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before the 101"))


async def storm_mode(a: argparse.Namespace) -> dict:
    from urllib.parse import urlsplit

    u = urlsplit(a.url)
    request = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    run = Run(64)
    _emit("READY", {"connected": 0, "errors": 0})
    await _wait_start(a.steered, 0.0)
    transports = []

    async def one() -> None:
        start = now_ns()
        done = loop.create_future()
        try:
            transport, _ = await loop.create_connection(lambda: StormClient(request, done), u.hostname, u.port)
            transports.append(transport)
            end = await asyncio.wait_for(done, 60)
        except Exception as e:  # noqa: BLE001 - a failed upgrade is a result
            run.error(type(e).__name__)
            return
        run.lat.append(end - start)
        run.msgs += 1

    await asyncio.gather(*(one() for _ in range(a.conns)))
    last = now_ns()
    _emit("UPGRADED", {"upgraded": run.msgs, "last_ns": last, "errors": run.errors})
    if a.steered:
        await _read_line()
    for t in transports:
        t.abort()
    return {"mode": "storm", "msgs": run.msgs, "connected": run.msgs, "last_ns": last, "errors": run.errors,
            "error_kinds": run.error_kinds, "lat": run.lat}


class HttpClient(asyncio.Protocol):
    """Closed loop of GETs on one kept-alive connection; the clock starts with :meth:`go`."""

    def __init__(self, run: Run, request: bytes):
        self.run = run
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1       # bytes of the response in flight (head + body), once its head is in
        self.sent_at = 0
        self.waiting = False
        self.closing = False
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def go(self) -> None:
        self.waiting = True
        self.sent_at = now_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head = buf[:end + 2].lower()
                i = head.find(b"\r\ncontent-length:")
                if not head.startswith(b"http/1.1 200 ") or i < 0:
                    self.run.error("no_content_length" if i < 0 else "status_" + head[9:12].decode(errors="replace"))
                    self.closing = True
                    self.transport.abort()
                    self.finish()
                    return
                self.need = end + 4 + int(head[i + 17:head.index(b"\r\n", i + 17)])
            if len(buf) < self.need:
                self.buf = buf
                return
            buf = buf[self.need:]
            self.need = -1
            self.done_one()
            if not buf:
                self.buf = b""
                return

    def done_one(self) -> None:
        now = now_ns()
        r = self.run
        if r.measure_from <= now < r.measure_to:
            r.lat.append(now - self.sent_at)
            r.msgs += 1
        if now < r.stop_at:
            self.sent_at = now
            self.transport.write(self.request)
        else:
            self.finish()

    def finish(self) -> None:
        if self.waiting:
            self.waiting = False
            r = self.run
            r.active -= 1
            if r.active == 0 and r.all_done is not None and not r.all_done.done():
                r.all_done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.closing:
            self.run.error("disconnected")
            self.finish()


async def http_mode(a: argparse.Namespace) -> dict:
    from urllib.parse import urlsplit
    u = urlsplit(a.url)
    host, port = u.hostname, u.port or 80
    request = f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()
    run = Run(0)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(a.connect_concurrency)

    async def connect() -> HttpClient | None:
        async with sem:
            try:
                _t, c = await loop.create_connection(lambda: HttpClient(run, request), host, port)
            except OSError as e:
                run.error(type(e).__name__)
                return None
            return c
    clients = [c for c in await asyncio.gather(*(connect() for _ in range(a.conns))) if c]
    _emit("READY", {"connected": len(clients), "errors": run.errors})
    t0 = await _wait_start(a.steered, a.warmup)
    run.measure_from = t0 + int(a.warmup * 1e9)
    run.measure_to = run.stop_at = run.measure_from + int(a.duration * 1e9)
    run.all_done = loop.create_future()
    run.active = len(clients)
    for c in clients:
        c.go()
    await asyncio.sleep(max(0.0, (run.stop_at - now_ns()) / 1e9))
    if run.active:
        try:
            await asyncio.wait_for(asyncio.shield(run.all_done), 10)
        except TimeoutError:
            run.error("no_response_after_stop")
    for c in clients:
        c.closing = True
        c.transport.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.lost for c in clients)), 5)
    except TimeoutError:
        pass
    return {"mode": "http", "connected": len(clients), "msgs": run.msgs, "window_s": a.duration,
            "errors": run.errors, "error_kinds": run.error_kinds, "lat": run.lat}


#: the client TLS context for wss:// URLs (--ca), TLS 1.3 only
TLS = None


class TlsCycle(asyncio.Protocol):
    """One TLS cycle on a raw connection: TLS handshake (resuming ``session``
    when given), upgrade, one 64 B echo, close. Not picows: asyncio's
    create_connection cannot offer a session to resume, so the TLS layer is
    an ssl.SSLObject over memory BIOs (the same client for every proxy)."""

    UPGRADE = (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    FRAME = bytes([0x82, 0x80 | 64]) + b"\0\0\0\0" + b"x" * 64   # masked with a zero key: the payload as is
    CLOSE = bytes([0x88, 0x82]) + b"\0\0\0\0" + b"\x03\xe8"

    def __init__(self, session, done: asyncio.Future):
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = TLS.wrap_bio(self.inc, self.out, server_hostname="localhost", session=session)
        self.done = done
        self.stage = "tls"
        self.buf = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._step()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.transport.write(data)

    def _step(self) -> None:
        if self.stage == "tls":
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            self.stage = "upgrade"
            self.obj.write(self.UPGRADE)
            self._flush()
        try:
            while True:
                self.buf += self.obj.read(65536)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, ssl.SSLZeroReturnError) as e:
            return self._fail(e)
        if self.stage == "upgrade" and b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                return self._fail(ConnectionError(head[:40]))
            self.stage = "echo"
            self.obj.write(self.FRAME)
        if self.stage == "echo" and len(self.buf) >= 66:
            self.stage = "closing"
            self.obj.write(self.CLOSE)
            self._flush()
            if not self.done.done():
                self.done.set_result((self.obj.session, self.obj.session_reused))
            self.transport.close()
            return
        self._flush()

    def _fail(self, e: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(e)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.inc.write(data)
        self._step()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the echo"))


async def tls_cycle_mode(a: argparse.Namespace) -> dict:
    """``--mode tls-handshake``: cycles of TLS + upgrade + echo + close; with
    ``--resume`` every cycle resumes the previous cycle's session (its ticket)
    and one that does not is an error."""
    from urllib.parse import urlsplit

    run = Run(64)
    u = urlsplit(a.url)
    loop = asyncio.get_running_loop()
    _emit("READY", {"connected": 0, "errors": 0})
    t0 = await _wait_start(a.steered, a.warmup)
    run.measure_from = t0 + int(a.warmup * 1e9)
    run.measure_to = run.stop_at = run.measure_from + int(a.duration * 1e9)

    async def loop_once() -> None:
        session = None
        while now_ns() < run.stop_at:
            start = now_ns()
            done = loop.create_future()
            try:
                await loop.create_connection(lambda: TlsCycle(session if a.resume else None, done),
                                             u.hostname, u.port)
                new, reused = await asyncio.wait_for(done, 10)
            except Exception as e:
                run.error(type(e).__name__)
                await asyncio.sleep(0.01)
                continue
            if a.resume and session is not None and not reused:
                run.error("not_resumed")
            session = new
            end = now_ns()
            if run.measure_from <= end < run.measure_to:
                run.lat.append(end - start)
                run.msgs += 1

    await asyncio.gather(*(loop_once() for _ in range(a.conns)))
    return {"mode": "tls-handshake", "msgs": run.msgs, "window_s": a.duration, "errors": run.errors,
            "error_kinds": run.error_kinds, "lat": run.lat}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen",
                                 description="One picows load-generator process (see the module docstring).")
    ap.add_argument("--mode", choices=("echo", "handshake", "idle", "http", "storm", "tls-handshake"), default="echo")
    ap.add_argument("--ca", help="wss://: trust this CA (PEM); TLS 1.3 only")
    ap.add_argument("--resume", action="store_true", help="tls-handshake: resume the previous session each cycle")
    ap.add_argument("--url", required=True)
    ap.add_argument("--conns", type=int, default=10, help="connections (echo, idle, http) or loops (handshake)")
    ap.add_argument("--size", type=int, default=64, help="message size in bytes (echo)")
    ap.add_argument("--deflate", action="store_true",
                    help="echo: offer permessage-deflate and send compressed records (see the module docstring)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before the measuring window")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured (idle: seconds held, unsteered)")
    ap.add_argument("--connect-concurrency", type=int, default=64)
    ap.add_argument("--lat-file", help="write latencies (int64 ns) here")
    ap.add_argument("--steered", action="store_true", help="wait for START/stop lines on stdin")
    a = ap.parse_args(argv)
    global TLS
    if a.ca:
        TLS = ssl.create_default_context(cafile=a.ca)
        TLS.minimum_version = ssl.TLSVersion.TLSv1_3
    mode = {"echo": echo_mode, "handshake": handshake_mode, "idle": idle_mode, "http": http_mode,
            "storm": storm_mode, "tls-handshake": tls_cycle_mode}[a.mode]
    cpu0 = os.times()
    result = uvloop.run(mode(a))
    cpu1 = os.times()
    lat = result.pop("lat")
    if a.lat_file:
        with open(a.lat_file, "wb") as f:
            lat.tofile(f)
    elif len(lat):
        s = sorted(lat)
        result["p50_us"] = s[len(s) // 2] / 1e3
        result["p99_us"] = s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3
    result["cpu_s"] = round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3)
    _emit("RESULT", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
