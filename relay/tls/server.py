"""A worker's TLS listener state: one ``ssl.SSLContext`` per certificate,
configured as Mozilla's "intermediate" profile (README, "TLS"), the SNI choice
between them, and the per-connection facts a handshake leaves (version,
resumption, client certificate subject).

Profile: TLS 1.2 and 1.3 (``RELAY_TLS_MIN_VERSION=1.3`` for 1.3 only); the
TLS 1.2 suites are ECDHE with AES-GCM or ChaCha20-Poly1305 (no DHE: it needs
2048-bit parameters Python 3.11 cannot generate, and no current browser needs
it); TLS 1.3's three suites; groups X25519, P-256, P-384; the client's
preference among those (``ssl_prefer_server_ciphers off``); no compression,
no renegotiation. ALPN offers ``http/1.1`` only: never ``h2`` until WebSockets
over HTTP/2 (RFC 8441) work end to end — advertising it broke Go's and
Traefik's users. A client that offers no ``http/1.1`` gets no ALPN answer and
goes on (as Python's ssl does; nginx sends an alert).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from relay.tls import openssl
from relay.tls.names import Chooser

#: Mozilla's "intermediate" TLS 1.2 suites (ECDHE only), in its order
CIPHERS_TLS12 = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
ALPN = ["http/1.1"]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _SSLObject(ssl.SSLObject):
    """ssl.SSLObject whose read, write and pending are _ssl's own methods:
    uvloop's TLS layer calls them several times per record, and the Python
    wrappers (one frame each) add nothing for a server with a buffer."""

    @classmethod
    def _create(cls, *args, **kwargs):
        obj = super()._create(*args, **kwargs)
        inner = obj._sslobj
        obj.read, obj.write, obj.pending = inner.read, inner.write, inner.pending
        return obj


def context(pem_path: str, min_version: str, client_ca: str = "", client_verify: str = "required",
            tickets: bool = True) -> ssl.SSLContext:
    """A server context for one certificate (``pem_path``: chain then key)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _SSLObject
    ctx.minimum_version = VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(ALPN)
    ctx.load_cert_chain(pem_path)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_verify == "required" else ssl.CERT_OPTIONAL
    # One ticket per full handshake, none more (OpenSSL sends two by default;
    # a browser uses one per connection it reopens, nginx and HAProxy send one).
    ctx.num_tickets = 1
    openssl.configure(ctx, tickets)
    return ctx


class TlsServer:
    """The contexts of one worker; ``default`` is the first certificate's.

    ``strict_sni``: a ClientHello naming no configured certificate (or no name)
    is refused (HAProxy's ``strict-sni``), counted ``failed_sni``; otherwise it
    gets the default certificate.
    """

    def __init__(self, contexts: Sequence[ssl.SSLContext], names: Sequence[Sequence[str]],
                 strict_sni: bool = False, client_header: bytes = b""):
        self.contexts = list(contexts)
        self.default = self.contexts[0]
        self.chooser = Chooser([list(n) for n in names])
        self.strict_sni = strict_sni
        #: the header the origin gets the verified client subject in (b"" without mTLS)
        self.client_header = client_header
        if len(self.contexts) > 1 or strict_sni:
            self.default.sni_callback = self._sni

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext):
        i = self.chooser.choose(server_name)
        if i is None:
            if self.strict_sni:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None
        if i:
            sslobj.context = self.contexts[i]
        return None


def subject(peercert: dict | None) -> str:
    """A verified client certificate's subject as RFC 4514 text (the order and
    escaping of nginx's ``$ssl_client_s_dn``); "" without one."""
    if not peercert:
        return ""
    rdns = peercert.get("subject") or ()
    short = {"commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
             "organizationName": "O", "organizationalUnitName": "OU", "domainComponent": "DC",
             "userId": "UID", "streetAddress": "STREET"}
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{short.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\%02X" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)
