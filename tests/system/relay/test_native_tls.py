"""TLS tunnels in the native pump (relay/native/engine.c "TLS tunnels") on
their own: a server ssl.SSLObject whose handshake ran over memory BIOs, as
uvloop's SSL protocol runs it, handed to an engine with real loopback TCP
connections to a client and an origin, the engine polled here by hand.

The hand-over cases, each placed on purpose before the engine takes the SSL:
ciphertext in the read BIO that SSL has not read, plaintext SSL decrypted
and nobody read (the rest of a record), records in the write BIO not yet
sent. All must reach their side in order, before the 101 and what follows.
Then what the system tests (test_tls_tunnel.py) cannot place: a forged
record, byte counts to the byte, io_uring engines refusing TLS.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time

import pytest

from relay import native
from tests.system.relay.test_native import Pumped, pair
from tests.support.tls import client_context, issue, make_ca

pytestmark = pytest.mark.skipif(not native.TLS_AVAILABLE and not os.environ.get("WSRELAY_REQUIRE_NATIVE"),
                                reason="TLS in the native data plane unavailable: " + native.TLS_WHY_NOT)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pair_ = issue(make_ca(d), d, "localhost")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pair_.cert), str(pair_.key))
    return server, client_context(d)


class Client:
    """The far end of the client's TCP connection, with the client's SSLObject."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sock, self.obj, self.incoming, self.outgoing = sock, obj, incoming, outgoing
        self.sock.setblocking(False)
        self.plain = bytearray()
        self.close_notify = False
        self.eof = False
        self.reset = False

    def seal(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(self.seal(data))
        self.sock.setblocking(False)

    def take(self) -> None:
        """Read and decrypt whatever has arrived."""
        while not self.eof:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.reset = self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.incoming.write(chunk)
        while not self.close_notify:
            try:
                data = self.obj.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError) as e:
                self.close_notify = isinstance(e, ssl.SSLZeroReturnError)
                break
            if not data:
                self.close_notify = True
                break
            self.plain += data


class Rig(Pumped):
    """An SSL whose handshake is done, placed in-flight bytes, then a TLS tunnel."""

    TIMEOUT = 10.0

    def __init__(self, contexts, read_size: int = 256 * 1024):
        server_ctx, client_ctx = contexts
        self.si, self.so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        self.server = server_ctx.wrap_bio(self.si, self.so, server_side=True)
        cobj = client_ctx.wrap_bio(ci, co, server_hostname="localhost")
        for _ in range(10):
            for o in (cobj, self.server):
                try:
                    o.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            ci.write(self.so.read())
            self.si.write(co.read())
        assert self.server.version() and cobj.version()
        self.ended: list[tuple[object, int, int]] = []
        self.engine = native.Engine(read_size, lambda tok, up, down: self.ended.append((tok, up, down)),
                                    backend="epoll")
        c_out, c_in = pair()
        self.origin, o_in = pair()
        self.client = Client(c_out, cobj, ci, co)
        self.c_fd, self.o_fd = c_in.detach(), o_in.detach()
        self.id = None

    def open(self, to_client: bytes = b"", to_origin: bytes = b"") -> None:
        self.id = self.engine.tls_tunnel(self.c_fd, self.o_fd, to_client, to_origin, "tok", self.server._sslobj)

    def client_gets(self, n: int) -> bytes:
        def enough():
            self.client.take()
            return len(self.client.plain) >= n or self.client.eof
        self.pump(enough)
        out = bytes(self.client.plain[:n])
        del self.client.plain[:n]
        return out


def test_what_uvloop_held_at_the_101_arrives_first_and_in_order(contexts):
    r = Rig(contexts)
    # records SSL wrote that nobody sent yet (uvloop's write BIO while its TCP transport was paused)
    r.server.write(b"written-before-the-handover|")
    # two records from the client: SSL decrypts the first, of which 5 bytes are read (the rest
    # is plaintext inside the SSL); the second stays ciphertext in the read BIO
    r.si.write(r.client.seal(b"first-record-rest|") + r.client.seal(b"second-record|"))
    assert r.server.read(5) == b"first"
    held_in, held_out = native._engine.tls_held(r.server._sslobj)
    assert held_in > 0 and held_out > 0
    r.open(to_client=b"HTTP/1.1 101 head|after-101|", to_origin=b"behind-the-request|")
    expected_down = b"written-before-the-handover|HTTP/1.1 101 head|after-101|"
    assert r.client_gets(len(expected_down)) == expected_down
    expected_up = b"behind-the-request|" + b"-record-rest|" + b"second-record|"
    assert r.recv_exactly(r.origin, len(expected_up)) == expected_up
    # the SSL is the engine's now: its old BIOs are left empty
    assert native._engine.tls_held(r.server._sslobj) == (0, 0)
    r.client.send(b"up again")
    assert r.recv_exactly(r.origin, 8) == b"up again"
    r.origin.sendall(b"down again")
    assert r.client_gets(10) == b"down again"
    # byte counts are plaintext read by the engine (what the 101 carried is not counted, as in Python)
    assert r.engine.bytes(r.id) == (len(b"-record-rest|second-record|up again"), len(b"down again"))


def test_half_close_both_ways_then_on_end_once_with_plaintext_counts(contexts):
    r = Rig(contexts)
    r.open()
    r.origin.sendall(b"bye")
    r.origin.shutdown(socket.SHUT_WR)
    assert r.client_gets(3) == b"bye"
    r.pump(lambda: (r.client.take(), r.client.close_notify and r.client.eof)[1])  # close_notify, then the FIN
    r.client.send(b"after your close_notify")  # TLS half-close: the client's way is still open
    assert r.recv_exactly(r.origin, 23) == b"after your close_notify"
    assert not r.ended
    try:
        r.client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    r.client.sock.sendall(r.client.outgoing.read())
    assert r.ending(r.origin) == "eof"
    r.pump(lambda: r.ended)
    assert r.ended == [("tok", 23, 3)]


def test_a_forged_record_closes_the_client_and_resets_the_origin(contexts):
    r = Rig(contexts)
    r.open()
    record = bytearray(r.client.seal(b"x" * 100))
    record[-1] ^= 1  # the tag no longer matches: bad record MAC
    r.client.sock.sendall(bytes(record))
    assert r.ending(r.origin) == "reset"
    r.pump(lambda: r.ended)
    assert r.ended == [("tok", 0, 0)]


def test_close_sends_close_notify_after_what_is_pending(contexts):
    r = Rig(contexts)
    r.open(to_client=b"pending then close")
    r.engine.close(r.id)
    r.pump(lambda: r.ended)
    r.pump(lambda: (r.client.take(), r.client.eof)[1])
    assert bytes(r.client.plain) == b"pending then close" and r.client.close_notify
    assert r.ending(r.origin) == "eof"


def test_a_stalled_client_holds_at_most_a_read_then_everything_arrives(contexts):
    """The origin sends 16 MiB at a client that reads nothing: the origin's
    socket stops being read (its send fills up), then all arrives, in order."""
    r = Rig(contexts, read_size=64 * 1024)
    r.open()
    r.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    blob = os.urandom(16 << 20)
    r.origin.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += r.origin.send(blob[sent:sent + (1 << 20)])
        except BlockingIOError:
            r.engine.poll()
            time.sleep(0.01)
            try:
                sent += r.origin.send(blob[sent:sent + (1 << 20)])
            except BlockingIOError:
                break
        if sent == len(blob):
            break
    assert sent < len(blob), "the origin could send 16 MiB to a client reading nothing"
    got = bytearray()

    def drained():
        nonlocal sent
        if sent < len(blob):
            try:
                sent += r.origin.send(blob[sent:sent + (1 << 20)])
            except BlockingIOError:
                pass
        r.client.take()
        got.extend(r.client.plain)
        r.client.plain.clear()
        return len(got) >= len(blob)
    r.pump(drained, timeout=60)
    assert bytes(got) == blob


def test_io_uring_engines_refuse_tls_tunnels_and_leave_the_descriptors(contexts):
    e = native.Engine(backend="io_uring")
    if e.backend != "io_uring":
        pytest.skip("io_uring unavailable here")
    r = Rig(contexts)
    with pytest.raises(OSError) as info:
        e.tls_tunnel(r.c_fd, r.o_fd, b"", b"", "tok", r.server._sslobj)
    assert info.value.errno == errno.EOPNOTSUPP
    os.fstat(r.c_fd), os.fstat(r.o_fd)  # still open: the caller's
    os.close(r.c_fd), os.close(r.o_fd)


def test_only_an_ssl_socket_is_taken(contexts):
    r = Rig(contexts)
    with pytest.raises(TypeError):
        r.engine.tls_tunnel(r.c_fd, r.o_fd, b"", b"", "tok", r.server)  # the ssl.SSLObject wrapper, not _ssl's
    with pytest.raises(TypeError):
        native._engine.tls_held(object())
    os.close(r.c_fd), os.close(r.o_fd)
