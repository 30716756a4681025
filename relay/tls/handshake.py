"""TLS on an accepted connection, from bytes already read (README, "TLS").

Why not ``loop.start_tls``: it cannot take bytes the connection already read,
and a TLS listener must read before it starts TLS. The first byte tells a
ClientHello (a TLS record, 0x16; 0x80 for an SSLv2-style hello) from a plain
HTTP request, which gets a short 400 instead (nginx's check), and a PROXY
protocol header (read first, on its own listener setting) may be followed in
the same read by the ClientHello. So :func:`start` does what ``start_tls``
does — the loop's own SSL protocol (uvloop's, in Cython) between the TCP
transport and ours — and then feeds it those bytes through its
``get_buffer``/``buffer_updated`` (the BufferedProtocol interface every
transport uses). Our protocol's ``connection_made`` gets the TLS transport when
the handshake succeeds; the returned future fails when it does not.

:func:`outcome` names a failed handshake for
``wsrelay_tls_handshakes_total{outcome}``, from OpenSSL's reason.
"""

from __future__ import annotations

import asyncio
import ssl

#: outcomes of a TLS handshake (metrics/layout.py keeps the same tuple)
FULL, RESUMED = "full", "resumed"


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop):
    try:
        import uvloop

        if isinstance(loop, uvloop.Loop):
            from uvloop.loop import SSLProtocol

            return SSLProtocol
    except ImportError:  # pragma: no cover - workers always run uvloop
        pass
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


def looks_like_tls(first: bytes) -> bool:
    """A TLS record (handshake, 0x16) or an SSLv2-framed hello (high bit set):
    anything else on a TLS port is taken for plain HTTP, as nginx does."""
    return bool(first) and (first[0] == 0x16 or first[0] & 0x80 != 0)


def start(transport: asyncio.Transport, protocol: asyncio.BaseProtocol, context: ssl.SSLContext,
          first: bytes, timeout: float, shutdown_timeout: float) -> asyncio.Future:
    """Put TLS (server side) between ``transport`` and ``protocol``, fed ``first``.

    ``protocol.connection_made`` gets the TLS transport once the handshake is
    done; the returned future then holds None, or the exception that ended the
    handshake (the transport is then closed, and ``protocol`` gets no
    ``connection_lost``). ``timeout`` bounds the handshake itself."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = _ssl_protocol_class(loop)(loop, protocol, context, waiter, server_side=True, server_hostname=None,
                                    call_connection_made=True, ssl_handshake_timeout=timeout,
                                    ssl_shutdown_timeout=shutdown_timeout)
    # Paused around the switch, as start_tls does: uvloop picks its read path
    # (plain or buffered) when reading starts, and until reading restarts it
    # would hand the next bytes to the previous protocol's data_received.
    transport.pause_reading()
    transport.set_protocol(tls)
    tls.connection_made(transport)
    buf = tls.get_buffer(len(first))
    buf[:len(first)] = first  # a first read is at most 256 KiB, the size of this buffer
    tls.buffer_updated(len(first))
    transport.resume_reading()
    return waiter


_PROTOCOL = ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW",
             "TLSV1_ALERT_PROTOCOL_VERSION", "UNKNOWN_PROTOCOL", "INAPPROPRIATE_FALLBACK")
_CIPHER = ("NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "NO_SHARED_GROUPS", "NO_SUITABLE_KEY_SHARE",
           "NO_SUITABLE_SIGNATURE_ALGORITHM", "NO_SHARED_SIGNATURE_ALGORITHMS")
_CLIENT_CERT = ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED", "NO_CERTIFICATE_RETURNED",
                "CERTIFICATE_REQUIRED", "TLSV13_ALERT_CERTIFICATE_REQUIRED")


def _by_reason(reason: str) -> str:
    """The outcome of a handshake OpenSSL failed with ``reason`` (its name, e.g. NO_SHARED_CIPHER)."""
    if reason in _PROTOCOL:
        return "failed_protocol"
    if reason in _CIPHER:
        return "failed_cipher"
    if reason in _CLIENT_CERT:
        return "failed_client_certificate"
    if reason == "CALLBACK_FAILED" or "SERVERNAME" in reason or "UNRECOGNIZED_NAME" in reason:
        # our one callback that can fail is the SNI choice (RELAY_TLS_STRICT_SNI)
        return "failed_sni"
    if reason == "UNEXPECTED_EOF_WHILE_READING":  # the client closed during the handshake
        return "client_abort"
    return "failed_other"


def outcome(exc: BaseException | None) -> str:
    """The outcome label of a handshake that ended with ``exc``."""
    if isinstance(exc, ssl.SSLError):
        if isinstance(exc, ssl.SSLCertVerificationError):
            return "failed_client_certificate"
        return _by_reason((exc.reason or "").upper())
    if isinstance(exc, ConnectionAbortedError):  # the SSL protocol's own timer
        return "timeout"
    return "client_abort"  # the client closed or reset during the handshake


def reason_table(outcomes: tuple[str, ...]) -> tuple[list[tuple[int, int, int]], int, int]:
    """:func:`outcome` as the C head phase applies it (relay/native/handshake.c
    "TLS"): ``([(lib, reason, index into outcomes), ...], lib shift, reason
    mask)`` for each OpenSSL error this Python's ssl module names whose outcome
    is not ``failed_other`` (the default), and how this OpenSSL packs an error
    code (ERR_GET_LIB/ERR_GET_REASON: from 3.0, 8 bits at 23 and 23 bits; 1.1.1,
    8 bits at 24 and 12 bits)."""
    import _ssl

    table = []
    for (lib, reason), name in _ssl.err_codes_to_names.items():
        label = _by_reason(name.upper())
        if label != "failed_other":
            table.append((lib, reason, outcomes.index(label)))
    v3 = ssl.OPENSSL_VERSION_INFO >= (3,)
    return table, (23 if v3 else 24), (0x7FFFFF if v3 else 0xFFF)
