"""relay/native/plane._tls_to_take: when the engine may take a TLS client,
and when the tunnel must stay on the Python plane because uvloop holds bytes
to send that the engine cannot take (records in the TCP transport's buffer,
plaintext in the SSL protocol's backlog)."""

from __future__ import annotations

import ssl

import pytest

from relay import native

pytestmark = pytest.mark.skipif(not native.TLS_AVAILABLE, reason="TLS in the native plane unavailable")


class _Buffered:
    def __init__(self, n: int):
        self.n = n

    def get_write_buffer_size(self) -> int:
        return self.n


class _Conn:
    def __init__(self, tcp):
        self.tcp_transport = tcp


class _TlsTransport(_Buffered):
    """What plane.py asks of uvloop's TLS transport: its write buffer (write BIO + backlog) and protocol."""

    def __init__(self, n: int, tcp):
        super().__init__(n)
        self.conn = _Conn(tcp)

    def get_protocol(self):
        return self.conn


def _sslobj():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)


def test_nothing_unsent_the_engine_takes_the_ssl_socket():
    from relay.native.plane import _tls_to_take

    obj = _sslobj()
    assert _tls_to_take(_TlsTransport(0, _Buffered(0)), obj) is obj._sslobj


@pytest.mark.parametrize("tls_buffered,tcp_buffered", [(0, 1), (7, 0)], ids=["tcp-transport", "plaintext-backlog"])
def test_bytes_uvloop_would_drop_keep_the_tunnel_in_python(tls_buffered, tcp_buffered):
    """The write BIO is empty here, so any size uvloop reports is its backlog."""
    from relay.native.plane import _tls_to_take

    assert _tls_to_take(_TlsTransport(tls_buffered, _Buffered(tcp_buffered)), _sslobj()) is None


def test_no_tcp_transport_known_keeps_the_tunnel_in_python():
    from relay.native.plane import _tls_to_take

    assert _tls_to_take(_TlsTransport(0, None), _sslobj()) is None
