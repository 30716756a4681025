"""The PROXY protocol, versions 1 and 2 (HAProxy's doc/proxy-protocol.txt),
sans-I/O: bytes in, a :class:`ProxyHeader`, ``None`` (need more bytes) or
:class:`~relay.errors.ProxyProtocolError` out (README, "Behind a load
balancer").

:func:`parse_proxy_header` reads the header a load balancer puts first on a
connection; what follows it in the buffer is the client's own stream (the
request head, or a TLS ClientHello). :func:`v2_header` builds the header
wsrelay sends first to an origin (``RELAY_ORIGIN_PROXY_PROTOCOL=v2``).

Strict where the spec is: v1 lines exactly as §2.1 draws them (one space
between fields, no leading zeroes in ports, addresses in their family's
canonical form, CRLF within 107 bytes); v2 with version 2, command LOCAL or
PROXY, a known family and protocol, an address block as long as its family
needs, TLVs that end where the header does, and a CRC32C TLV that matches
(§2.2.3). Unknown TLVs are skipped (AWS's network load balancer sends 0xEA,
GCP 0xE0, Azure 0xEE). A header is judged the same fed whole or a byte at a
time: every check reads only bytes already there, in the order they come.
"""

from __future__ import annotations

import re
import socket
import struct

from relay.errors import ProxyProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: §2.1: the longest v1 line, CRLF included
V1_MAX = 107

# v2 commands, families, protocols (§2.2)
LOCAL, PROXY = 0, 1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0, 1, 2, 3
STREAM = 1
#: address block length by family
_ADDR_LEN = (0, 12, 36, 216)
# TLV types with a meaning here (§2.2.1-2.2.8); any other is skipped.
PP2_TYPE_CRC32C = 0x03

_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")


class ProxyHeader:
    """A parsed PROXY protocol header.

    ``length``: bytes of the buffer it took. ``source``/``destination``:
    ``(address, port)`` of the client's original connection, or ``None`` when
    the header carries none that applies (v2 LOCAL, a health check; v1
    ``UNKNOWN``; v2 AF_UNSPEC, AF_UNIX or a datagram protocol): the receiver
    then uses the connection's own addresses (§2.1, §2.2). ``tlvs``: the v2
    TLVs as ``(type, value)``, in order.
    """

    __slots__ = ("version", "length", "local", "source", "destination", "tlvs")

    def __init__(self, version: int, length: int, local: bool = False,
                 source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None,
                 tlvs: tuple[tuple[int, bytes], ...] = ()) -> None:
        self.version = version
        self.length = length
        self.local = local
        self.source = source
        self.destination = destination
        self.tlvs = tlvs

    def __repr__(self) -> str:
        return (f"ProxyHeader(v{self.version}, length={self.length}, local={self.local}, "
                f"source={self.source}, destination={self.destination}, tlvs={self.tlvs})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyHeader) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


def parse_proxy_header(buf: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The PROXY header at the start of ``buf``; ``None`` until it is complete.

    Raises :class:`~relay.errors.ProxyProtocolError` with ``reason``
    ``"missing"`` when ``buf`` does not start like either version (a client
    speaking HTTP straight to a listener that requires the header), or
    ``"invalid"`` for a header that breaks the spec.
    """
    n = len(buf)
    if not n:
        return None
    first = buf[0]
    if first == 0x0D:
        if n < 12:
            if bytes(buf[:n]) != V2_SIGNATURE[:n]:
                raise ProxyProtocolError("missing", "not a PROXY protocol header")
            return None
        if bytes(buf[:12]) != V2_SIGNATURE:
            raise ProxyProtocolError("missing", "not a PROXY protocol header")
        return _v2(buf, n)
    if first == 0x50:  # "P"
        k = min(n, 6)
        if bytes(buf[:k]) != V1_PREFIX[:k]:
            raise ProxyProtocolError("missing", "not a PROXY protocol header")
        return _v1(buf, n)
    raise ProxyProtocolError("missing", "not a PROXY protocol header")


def _v1(buf, n: int) -> ProxyHeader | None:
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if n >= V1_MAX:
            raise ProxyProtocolError("invalid", "v1: no CRLF within 107 bytes")
        return None
    line = bytes(buf[6:end])
    parts = line.split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":  # §2.1: anything up to the CRLF is ignored
        return ProxyHeader(1, end + 2)
    if proto == b"TCP4":
        family = socket.AF_INET
    elif proto == b"TCP6":
        family = socket.AF_INET6
    else:
        raise ProxyProtocolError("invalid", "v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if len(parts) != 5:
        raise ProxyProtocolError("invalid", "v1: expected 4 fields after the protocol, one space apart")
    src = _v1_address(family, parts[1])
    dst = _v1_address(family, parts[2])
    return ProxyHeader(1, end + 2, source=(src, _v1_port(parts[3])), destination=(dst, _v1_port(parts[4])))


def _v1_address(family: int, text: bytes) -> str:
    # inet_pton is as strict as §2.1: no leading zeroes in IPv4, no zone in IPv6.
    try:
        packed = socket.inet_pton(family, text.decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):  # ValueError: an embedded NUL
        raise ProxyProtocolError("invalid", "v1: bad address") from None
    return socket.inet_ntop(family, packed)  # canonical: one spelling per address


def _v1_port(text: bytes) -> int:
    if not _PORT.match(text) or int(text) > 65535:
        raise ProxyProtocolError("invalid", "v1: bad port")
    return int(text)


def _v2(buf, n: int) -> ProxyHeader | None:
    if n < 16:
        return None
    ver_cmd, fam, length = buf[12], buf[13], (buf[14] << 8) | buf[15]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("invalid", "v2: version must be 2")
    command = ver_cmd & 0x0F
    if command > PROXY:
        raise ProxyProtocolError("invalid", "v2: command must be LOCAL or PROXY")
    af, proto = fam >> 4, fam & 0x0F
    if af > AF_UNIX or proto > 2:
        raise ProxyProtocolError("invalid", "v2: unknown address family or protocol")
    total = 16 + length
    if n < total:
        return None
    if command == LOCAL:
        # §2.2: the receiver uses the real endpoints and discards the block.
        return ProxyHeader(2, total, local=True)
    block = bytes(buf[:total])
    addr_len = _ADDR_LEN[af]
    if length < addr_len:
        raise ProxyProtocolError("invalid", "v2: address block shorter than its family needs")
    tlvs = _tlvs(block, 16 + addr_len) if length > addr_len else ()
    source = destination = None
    if proto == STREAM and af == AF_INET:
        s, d, sp, dp = struct.unpack_from("!4s4sHH", block, 16)
        source, destination = (socket.inet_ntop(socket.AF_INET, s), sp), (socket.inet_ntop(socket.AF_INET, d), dp)
    elif proto == STREAM and af == AF_INET6:
        s, d, sp, dp = struct.unpack_from("!16s16sHH", block, 16)
        source, destination = (socket.inet_ntop(socket.AF_INET6, s), sp), (socket.inet_ntop(socket.AF_INET6, d), dp)
    return ProxyHeader(2, total, source=source, destination=destination, tlvs=tlvs)


def _tlvs(block: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from ``pos`` to the end of ``block``; each must fit (§2.2)."""
    out = []
    end = len(block)
    while pos < end:
        if pos + 3 > end:
            raise ProxyProtocolError("invalid", "v2: truncated TLV")
        kind, size = block[pos], (block[pos + 1] << 8) | block[pos + 2]
        value_at = pos + 3
        pos = value_at + size
        if pos > end:
            raise ProxyProtocolError("invalid", "v2: TLV longer than the header")
        value = block[value_at:pos]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyProtocolError("invalid", "v2: CRC32C TLV must be 4 bytes")
            # §2.2.3: the checksum of the whole header with this field zeroed
            zeroed = block[:value_at] + b"\0\0\0\0" + block[pos:]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyProtocolError("invalid", "v2: CRC32C mismatch")
        out.append((kind, value))
    return tuple(out)


# -- CRC32C (Castagnoli, RFC 4960 appendix B), only for headers that carry one ------

def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- the sending side ----------------------------------------------------------------

_V2_PROXY = 0x21  # version 2, PROXY command
#: a v2 header saying "use the connection's own addresses" (LOCAL, AF_UNSPEC)
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


def _packed(address: str) -> tuple[int, bytes]:
    try:
        return socket.AF_INET, socket.inet_pton(socket.AF_INET, address)
    except OSError:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address)


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v2 PROXY header (command PROXY, TCP) for a connection from ``source``
    to ``destination``, each ``(IP address, port)``: what HAProxy's
    ``send-proxy-v2`` writes first on a server connection. Addresses of
    different families are both sent as IPv6, the IPv4 one mapped
    (``::ffff:a.b.c.d``), as HAProxy does. Raises ``OSError`` for a string
    that is not an IP address."""
    sf, s = _packed(source[0])
    df, d = _packed(destination[0])
    if sf == df == socket.AF_INET:
        return V2_SIGNATURE + struct.pack("!BBH4s4sHH", _V2_PROXY, 0x11, 12, s, d, source[1], destination[1])
    if sf == socket.AF_INET:
        s = b"\0" * 10 + b"\xff\xff" + s
    if df == socket.AF_INET:
        d = b"\0" * 10 + b"\xff\xff" + d
    return V2_SIGNATURE + struct.pack("!BBH16s16sHH", _V2_PROXY, 0x21, 36, s, d, source[1], destination[1])
