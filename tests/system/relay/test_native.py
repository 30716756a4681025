"""The native pump (relay/native/engine.c) on its own, against real loopback
TCP connections: a client pair and an origin pair, the engine owning the
relay's end of each, polled here by hand (the worker polls it from uvloop).

What relay/tunnel.py promises, checked one by one: bytes both ways in
order, what arrived behind the heads first, backpressure (a peer that reads
nothing stops the other side being read, holding at most one read buffer),
a FIN passed on as a FIN with the other direction going on, a reset passed
on as a reset, close() flushing first, abort(), idle times, byte counts, and
on_end exactly once. The whole-relay behaviour on both data planes is in
test_tunnel*.py, test_faults.py, ... (tests/conftest.py BOTH_PLANES) and
test_data_plane_fuzz.py.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
import subprocess
import sys
import time

import pytest

from relay import native
from relay.config import ConfigError, load
from tests.support.relay import ROOT

pytestmark = pytest.mark.skipif(not native.AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="native data plane unavailable")


BACKEND = "io_uring"


@pytest.fixture(params=["io_uring", "epoll"], autouse=True)
def backend(request):
    """Every engine test runs on both of the engine's backends."""
    global BACKEND
    BACKEND = request.param
    if request.param == "io_uring" and native.Engine(backend="io_uring").backend != "io_uring":
        pytest.skip("io_uring unavailable here: " + str(native.Engine(backend="io_uring").fallback_reason))
    yield request.param


def test_the_extension_is_built_when_required():
    """CI sets WSRELAY_REQUIRE_NATIVE=1: a build that fell back silently fails here."""
    if os.environ.get("WSRELAY_REQUIRE_NATIVE", "") not in ("", "0"):
        assert native.AVAILABLE, native.WHY_NOT


SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ


def queued(fd: int, which: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, which, buf)
    return buf[0]


def pair() -> tuple[socket.socket, socket.socket]:
    """(outside end, relay end) of a loopback TCP connection."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        out = socket.create_connection(lst.getsockname())
        inside, _ = lst.accept()
    inside.setblocking(False)
    out.settimeout(5)
    return out, inside


class Pumped:
    """Waits that poll ``self.engine`` by hand until a condition holds; for
    this module's Rig and test_native_tls.py's."""

    #: seconds a wait may take before the test fails
    TIMEOUT = 5.0

    def pump(self, until, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.TIMEOUT)
        while not until():
            assert time.monotonic() < deadline, "timed out"
            self.engine.poll()
            time.sleep(0.001)

    def recv_exactly(self, s: socket.socket, n: int) -> bytes:
        got = bytearray()
        s.setblocking(False)
        try:
            def done():
                try:
                    chunk = s.recv(1 << 20)
                except BlockingIOError:
                    return False
                assert chunk, f"EOF after {len(got)} of {n} bytes"
                got.extend(chunk)
                return len(got) >= n
            self.pump(done)
        finally:
            s.settimeout(5)
        return bytes(got)

    def ending(self, s: socket.socket) -> str:
        """'eof' or 'reset', pumping until one arrives (bytes before it are dropped)."""
        s.setblocking(False)
        seen = []

        def done():
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                seen.append("reset")
                return True
            if chunk:
                return False
            seen.append("eof")
            return True
        self.pump(done)
        s.settimeout(5)
        return seen[0]


class Rig(Pumped):
    """A client and an origin joined by an engine."""

    def __init__(self, read_size: int = 256 * 1024, to_client: bytes = b"", to_origin: bytes = b""):
        self.ended: list[tuple[object, int, int]] = []
        self.engine = native.Engine(read_size, lambda token, up, down: self.ended.append((token, up, down)),
                                    backend=BACKEND)
        assert self.engine.backend == BACKEND
        self.client, c_in = pair()
        self.origin, o_in = pair()
        #: the relay's ends, now the engine's (read here only through ioctls)
        self.c_fd, self.o_fd = c_in.detach(), o_in.detach()
        self.id = self.engine.tunnel(self.c_fd, self.o_fd, to_client, to_origin, "tok")


def push_until_stalled(r: Rig, size: int) -> int:
    """Send ``size``-byte chunks from the client, pumping the engine, until 50
    tries in a row found its socket full (~50 ms of no progress), or 128 MiB
    went through (a client never stopped: the caller's bound fails); returns
    the bytes sent."""
    r.client.setblocking(False)
    chunk = os.urandom(size)
    pushed = stalled = 0
    while stalled < 50 and pushed < 128 << 20:
        try:
            pushed += r.client.send(chunk)
            stalled = 0
        except BlockingIOError:
            stalled += 1
        r.engine.poll()
        time.sleep(0.001)
    return pushed


def test_bytes_both_ways_in_order_with_the_early_bytes_first():
    r = Rig(to_client=b"behind the 101|", to_origin=b"behind the head|")
    r.client.sendall(b"up")
    assert r.recv_exactly(r.origin, 18) == b"behind the head|up"
    r.origin.sendall(b"down")
    assert r.recv_exactly(r.client, 19) == b"behind the 101|down"
    blob = os.urandom(3 << 20)
    r.client.sendall(blob[:1 << 20])  # fits the kernel buffers on the way
    assert r.recv_exactly(r.origin, 1 << 20) == blob[:1 << 20]
    assert r.engine.bytes(r.id) == (2 + (1 << 20), 4)
    assert r.engine.open_bytes == (2 + (1 << 20), 4) == r.engine.totals
    assert r.engine.open == 1 and r.ended == []


def test_a_fin_is_passed_on_and_the_other_direction_goes_on():
    r = Rig()
    r.client.sendall(b"last words")
    r.client.shutdown(socket.SHUT_WR)
    assert r.recv_exactly(r.origin, 10) == b"last words"
    assert r.ending(r.origin) == "eof"
    r.origin.sendall(b"answer after your FIN")
    assert r.recv_exactly(r.client, 21) == b"answer after your FIN"
    assert r.ended == []
    r.origin.shutdown(socket.SHUT_WR)
    assert r.ending(r.client) == "eof"
    r.pump(lambda: r.ended)
    assert r.ended == [("tok", 10, 21)]
    assert r.engine.open == 0 and r.engine.open_bytes == (0, 0) and r.engine.totals == (10, 21)
    assert r.engine.bytes(r.id) is None and not r.engine.close(r.id)


@pytest.mark.parametrize("who", ["client", "origin"])
def test_a_reset_is_passed_on_as_a_reset(who):
    r = Rig()
    a, b = (r.client, r.origin) if who == "client" else (r.origin, r.client)
    a.sendall(b"ping")
    assert r.recv_exactly(b, 4) == b"ping"
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    assert r.ending(b) == "reset"
    r.pump(lambda: r.ended)
    assert len(r.ended) == 1


def test_backpressure_stops_reading_the_source_and_holds_one_buffer_at_most():
    """An origin that reads nothing: the client can push only what the kernel
    buffers and one engine read buffer hold, then its sends block; once the
    origin reads, every byte arrives."""
    read_size = 64 * 1024
    r = Rig(read_size=read_size)
    r.origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    pushed = push_until_stalled(r, 64 * 1024)
    up, _ = r.engine.bytes(r.id)
    assert pushed < 64 << 20, "the client was never stopped"
    # What the engine read from the client and holds: neither in the origin's
    # receive queue nor in the send queue of the relay's socket towards it.
    held = up - queued(r.origin.fileno(), SIOCINQ) - queued(r.o_fd, SIOCOUTQ)
    assert 0 < held <= read_size, (up, held)
    assert queued(r.c_fd, SIOCINQ) > 0  # the rest waits in the kernel, unread
    # reading resumes once the origin reads: everything arrives
    r.client.settimeout(5)
    total = pushed
    got = r.recv_exactly(r.origin, total)
    assert len(got) == total


def test_close_flushes_what_is_pending_then_closes_both():
    r = Rig(read_size=64 * 1024)
    r.origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    blob = os.urandom(2 << 20)
    r.client.setblocking(False)
    sent = 0
    for _ in range(200):
        try:
            sent += r.client.send(blob[sent:sent + 65536])
        except BlockingIOError:
            pass
        r.engine.poll()
        if sent >= len(blob):
            break
    up, _ = r.engine.bytes(r.id)
    assert r.engine.close(r.id)
    # what the engine had read is delivered before the close
    got = r.recv_exactly(r.origin, up)
    assert got == blob[:up]
    assert r.ending(r.origin) == "eof"
    r.pump(lambda: r.ended)
    assert r.ended == [("tok", up, 0)]


def test_abort_closes_at_once_and_on_end_comes_once():
    r = Rig()
    assert r.engine.abort(r.id)
    assert r.ended == [("tok", 0, 0)]  # reported from abort() itself
    assert r.ending(r.client) in ("eof", "reset") and r.ending(r.origin) in ("eof", "reset")
    assert not r.engine.abort(r.id) and not r.engine.close(r.id)
    for _ in range(3):
        r.engine.poll()
    assert len(r.ended) == 1


def test_idle_time_and_close_idle():
    r = Rig()
    r.client.sendall(b"x")
    r.recv_exactly(r.origin, 1)
    time.sleep(0.3)
    assert 0.2 <= r.engine.idle(r.id) < 5
    assert r.engine.close_idle(60) == 0
    assert r.engine.close_idle(0.2) == 1
    assert r.ending(r.client) == "eof" and r.ending(r.origin) == "eof"
    assert len(r.ended) == 1


def test_ids_of_ended_tunnels_are_never_reused():
    r = Rig()
    first = r.id
    r.engine.abort(first)
    c, c_in = pair()
    o, o_in = pair()
    second = r.engine.tunnel(c_in.detach(), o_in.detach(), b"", b"", "two")
    assert second != first and r.engine.bytes(second) == (0, 0) and r.engine.bytes(first) is None
    assert not r.engine.close(first) and r.engine.open == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the second one
def test_an_exception_in_on_end_reaches_the_caller_after_every_ending_is_reported():
    calls = []

    def on_end(token, up, down):
        calls.append(token)
        raise RuntimeError(f"boom {token}")

    e = native.Engine(on_end=on_end, backend=BACKEND)
    for token in ("a", "b"):
        c, c_in = pair()
        o, o_in = pair()
        e.tunnel(c_in.detach(), o_in.detach(), b"", b"", token)
    with pytest.raises(RuntimeError, match="boom"):
        e.abort_all()
    assert sorted(calls) == ["a", "b"]


def test_a_tunnel_the_engine_cannot_take_leaves_the_descriptors_to_the_caller():
    e = native.Engine(backend=BACKEND)
    a, b = os.open(os.devnull, os.O_RDWR), os.open(os.devnull, os.O_RDWR)  # epoll refuses files
    try:
        with pytest.raises(OSError):
            e.tunnel(a, b, b"", b"", None)
        assert e.open == 0
        os.fstat(a), os.fstat(b)  # still open, still the caller's
    finally:
        os.close(a)
        os.close(b)


def test_data_plane_setting():
    base = {"RELAY_ORIGIN": "127.0.0.1:9"}
    assert load(base).effective_data_plane() == "native"
    assert load({**base, "RELAY_DATA_PLANE": "python"}).effective_data_plane() == "python"
    assert load({**base, "RELAY_MODE": "frames"}).effective_data_plane() == "python"
    with pytest.raises(ConfigError) as e:
        load({**base, "RELAY_MODE": "frames", "RELAY_DATA_PLANE": "native"})
    assert e.value.lines == ["RELAY_DATA_PLANE=native: applies to RELAY_MODE=tunnel only "
                             "(frames mode runs on the Python data plane); use auto"]
    with pytest.raises(ConfigError) as e:
        load({**base, "RELAY_DATA_PLANE": "fast"})
    assert e.value.lines == ['RELAY_DATA_PLANE: "fast": expected one of auto, native, python']


def test_wsrelay_check_says_which_data_plane_serves_tunnels():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_ORIGIN"] = "127.0.0.1:9"
    out = subprocess.run([sys.executable, "-m", "relay", "check"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"RELAY_DATA_PLANE":"auto"' in out.stdout and '"effective_data_plane":"native"' in out.stdout


# -- bulk by splice (io_uring backend; engine.c "Bulk by splice") ---------------------
def _push(r: Rig, src: socket.socket, dst: socket.socket, blob: bytes) -> bytes:
    """Send blob from src while reading dst, pumping the engine: what dst got."""
    src.setblocking(False)
    got = bytearray()
    sent = 0
    deadline = time.monotonic() + 20
    while len(got) < len(blob):
        assert time.monotonic() < deadline, f"{len(got)} of {len(blob)}"
        if sent < len(blob):
            try:
                sent += src.send(blob[sent:sent + (1 << 20)])
            except BlockingIOError:
                pass
        r.engine.poll()
        dst.setblocking(False)
        try:
            chunk = dst.recv(1 << 20)
            assert chunk, "EOF"
            got.extend(chunk)
        except BlockingIOError:
            time.sleep(0.0005)
    src.settimeout(5)
    dst.settimeout(5)
    return bytes(got)


def test_bulk_goes_by_splice_both_ways_and_small_messages_go_back_to_recv(backend):
    """Megabytes each way arrive whole and in order; on io_uring they were
    spliced (never copied through the engine), on epoll copied; a small
    message after the burst takes recv again; counts and the FIN as ever."""
    r = Rig()
    up, down = os.urandom(6 << 20), os.urandom(5 << 20)
    assert _push(r, r.client, r.origin, up) == up
    assert _push(r, r.origin, r.client, down) == down
    spliced = r.engine.spliced
    if backend == "io_uring":
        assert spliced > (8 << 20), spliced  # most of the 11 MiB
    else:
        assert spliced == 0
    r.client.sendall(b"small")
    assert r.recv_exactly(r.origin, 5) == b"small"
    r.origin.sendall(b"reply")
    assert r.recv_exactly(r.client, 5) == b"reply"
    r.client.sendall(b"again")
    assert r.recv_exactly(r.origin, 5) == b"again"
    assert r.engine.spliced - spliced <= 10  # the small ones went by recv (one may be read while bulk)
    assert r.engine.bytes(r.id) == (len(up) + 10, len(down) + 5) == r.engine.totals
    r.client.shutdown(socket.SHUT_WR)
    assert r.ending(r.origin) == "eof"
    r.origin.shutdown(socket.SHUT_WR)
    assert r.ending(r.client) == "eof"
    r.pump(lambda: r.ended)
    assert r.ended == [("tok", len(up) + 10, len(down) + 5)]


def test_a_stalled_bulk_direction_holds_one_read_at_most(backend):
    """Backpressure in bulk mode: an origin that stops reading after a burst
    stops the client being read; what the engine holds (its pipe) is at most
    one read; once the origin reads, every byte arrives."""
    read_size = 256 * 1024
    r = Rig(read_size=read_size)
    r.origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    burst = os.urandom(2 << 20)
    assert _push(r, r.client, r.origin, burst) == burst  # bulk mode on
    pushed = push_until_stalled(r, 256 * 1024)
    up, _ = r.engine.bytes(r.id)
    held = up - len(burst) - queued(r.origin.fileno(), SIOCINQ) - queued(r.o_fd, SIOCOUTQ)
    assert 0 <= held <= read_size, (up, held)
    assert queued(r.c_fd, SIOCINQ) > 0
    assert len(r.recv_exactly(r.origin, pushed)) == pushed


@pytest.mark.parametrize("who", ["client", "origin"])
def test_a_reset_in_the_middle_of_a_bulk_transfer_is_passed_on(backend, who):
    r = Rig()
    a, b = (r.client, r.origin) if who == "client" else (r.origin, r.client)
    blob = os.urandom(3 << 20)
    assert _push(r, a, b, blob) == blob
    a.setblocking(False)
    try:
        a.send(os.urandom(1 << 20))
    except BlockingIOError:
        pass
    r.engine.poll()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    assert r.ending(b) == "reset"
    r.pump(lambda: r.ended)
    assert len(r.ended) == 1
