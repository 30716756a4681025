"""The PROXY protocol parser and builder (relay/proxy_protocol.py), sans-I/O:
the spec's examples (HAProxy's doc/proxy-protocol.txt), what it says a
receiver must refuse, the TLVs cloud load balancers send, and the fuzz
invariants of tests/fuzz/invariants.py (any input parses or gives the
parser's own error, the same whole or one byte at a time)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.errors import ProxyProtocolError
from relay.proxy_protocol import V2_SIGNATURE, ProxyHeader, crc32c, parse_proxy_header, v2_header
from tests.fuzz.invariants import check_proxy_header

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def v2(cmd: int = 1, fam: int = 0x11, block: bytes = b"", length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(block) if length is None else length) \
        + block


def inet(src=(192, 168, 0, 1), dst=(192, 168, 0, 11), sport=56324, dport=443) -> bytes:
    return bytes(src) + bytes(dst) + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def error(buf: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as e:
        parse_proxy_header(buf)
    return e.value.reason


# -- version 1 ------------------------------------------------------------------------

def test_v1_the_specs_example_and_what_follows_is_the_request():
    buf = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    h = parse_proxy_header(buf)
    assert h == ProxyHeader(1, 47, source=("192.168.0.1", 56324), destination=("192.168.0.11", 443))
    assert buf[h.length:].startswith(b"GET / HTTP/1.1\r\n")


def test_v1_ipv6_is_canonicalised_and_the_longest_lines_fit():
    h = parse_proxy_header(b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n")
    assert h.source == ("2001:db8::1", 65535) and h.destination == ("::1", 0)
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 107 and parse_proxy_header(line) == ProxyHeader(1, 107)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104 and parse_proxy_header(line).source == (full, 65535)


def test_v1_unknown_ignores_the_rest_of_its_line():
    assert parse_proxy_header(b"PROXY UNKNOWN\r\nGET") == ProxyHeader(1, 15)
    assert parse_proxy_header(b"PROXY UNKNOWN whatever \x01 here\r\n").source is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",   # leading zero (octal confusion, §2.1)
    b"PROXY TCP4 192.168.0.1 192.168.0.11 +80 443\r\n",
    b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
    b"PROXY TCP4 192.168.0.01 192.168.0.11 1 443\r\n",       # leading zero in an address
    b"PROXY TCP4 ::1 ::1 1 443\r\n",                          # another family's address
    b"PROXY TCP6 1.2.3.4 1.2.3.4 1 443\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 443\r\n",                 # a zone is no address
    b"PROXY TCP4  192.168.0.1 192.168.0.11 1 443\r\n",       # two spaces
    b"PROXY TCP4 192.168.0.1 192.168.0.11 1\r\n",
    b"PROXY TCP4 192.168.0.1 192.168.0.11 1 443 \r\n",
    b"PROXY TCP5 192.168.0.1 192.168.0.11 1 443\r\n",
    b"PROXY tcp4 192.168.0.1 192.168.0.11 1 443\r\n",
    b"PROXY TCP4 192.168.0.1 192.168.0.11 1 443\n\r\n",      # a lone LF does not end the line
    b"PROXY TCP4 1.2.3.\xff 192.168.0.11 1 443\r\n",
    b"PROXY TCP4 1.2.3.4\x00 192.168.0.11 1 443\r\n",
])
def test_v1_lines_the_spec_refuses(line):
    assert error(line) == "invalid"
    assert check_proxy_header(line) == ("error", "invalid")


def test_v1_without_crlf_in_107_bytes_is_refused_whole_and_trickled():
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"  # CRLF ends at byte 108
    assert len(line) == 108
    assert check_proxy_header(line) == ("error", "invalid")
    assert parse_proxy_header(line[:106]) is None


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXX", b"proxy TCP4", b"\x16\x03\x01", b"\r\n\r\n\x01",
                                  b"PROXY\t", b"\x00"])
def test_anything_else_is_missing_at_its_first_wrong_byte(data):
    assert error(data) == "missing"
    assert check_proxy_header(data) == ("error", "missing")


def test_incomplete_headers_wait():
    for buf in (b"P", b"PROXY", b"PROXY TCP4 1.2.3.4", V2_SIGNATURE[:5], V2_SIGNATURE + b"\x21\x11\x00",
                v2(block=inet())[:-1]):
        assert parse_proxy_header(buf) is None, buf


# -- version 2 ------------------------------------------------------------------------

def test_v2_tcp4_and_tcp6():
    h = parse_proxy_header(v2(block=inet()) + b"GET")
    assert h == ProxyHeader(2, 28, source=("192.168.0.1", 56324), destination=("192.168.0.11", 443))
    block = bytes(15) + b"\x01" + bytes.fromhex("20010db8000000000000000000000002") + struct.pack("!HH", 1, 2)
    h = parse_proxy_header(v2(fam=0x21, block=block))
    assert h.source == ("::1", 1) and h.destination == ("2001:db8::2", 2) and h.length == 52


def test_v2_local_health_check_uses_the_real_endpoints_and_skips_its_block():
    assert parse_proxy_header(v2(cmd=0, fam=0)) == ProxyHeader(2, 16, local=True)
    # "must not assume zero is presented for LOCAL connections" (§2.2)
    h = parse_proxy_header(v2(cmd=0, fam=0x11, block=inet() + tlv(0x04, b"pad")) + b"GET")
    assert h == ProxyHeader(2, 16 + 12 + 6, local=True)


def test_v2_families_without_an_ip_address_keep_the_connection_address():
    unix = b"/run/lb.sock".ljust(108, b"\0") + b"/run/wsrelay.sock".ljust(108, b"\0")
    for fam, block in ((0x31, unix), (0x32, unix), (0x00, b""), (0x12, inet()), (0x22, bytes(36)), (0x10, inet())):
        h = parse_proxy_header(v2(fam=fam, block=block))
        assert h.source is None and h.destination is None and not h.local and h.length == 16 + len(block), fam


@pytest.mark.parametrize("buf", [
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + inet(),           # version 1 in a v2 header
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + inet(),           # version 3
    v2(cmd=2, block=inet()),                                # command 2
    v2(fam=0x41, block=inet()),                             # family 4
    v2(fam=0x13, block=inet()),                             # protocol 3
    v2(fam=0x11, block=inet()[:8]),                         # address block too short
    v2(fam=0x21, block=inet()),
    v2(fam=0x31, block=bytes(100)),
    v2(block=inet() + b"\x04\x00"),                         # truncated TLV header
    v2(block=inet() + b"\x04\x00\x09abc"),                  # TLV past the header's end
    v2(block=inet() + tlv(0x03, b"\0\0\0")),                # CRC32C of the wrong size
])
def test_v2_headers_the_spec_refuses(buf):
    assert error(buf) == "invalid"
    assert check_proxy_header(buf) == ("error", "invalid")


def test_v2_tlvs_are_skipped_like_the_cloud_balancers_send_them():
    # AWS NLB: PP2_TYPE_AWS (0xEA), subtype 0x01 + the VPC endpoint id; GCP's PSC
    # connection id (0xE0, 8 bytes); Azure's link id (0xEE); a zero-length NOOP.
    tlvs = tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9") + tlv(0xE0, bytes(8)) + tlv(0xEE, b"\x01\0\0\0\x2a") \
        + tlv(0x04, b"")
    h = parse_proxy_header(v2(block=inet() + tlvs) + b"GET / HTTP/1.1\r\n")
    assert h.source == ("192.168.0.1", 56324)
    assert [t for t, _ in h.tlvs] == [0xEA, 0xE0, 0xEE, 0x04]
    assert h.tlvs[0][1] == b"\x01vpce-08d2bf15fac5001c9"
    assert check_proxy_header(v2(block=inet() + tlvs) + b"GET")[0] == "header"


def test_v2_crc32c_is_checked_when_present():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4's check value
    head = v2(block=inet() + tlv(0x03, b"\0\0\0\0") + tlv(0x05, b"unique-id"))
    value = crc32c(head).to_bytes(4, "big")
    good = head.replace(tlv(0x03, b"\0\0\0\0"), tlv(0x03, value))
    assert parse_proxy_header(good).tlvs[0] == (0x03, value)
    bad = good[:-1] + b"X"  # a flipped byte anywhere in the header
    assert error(bad) == "invalid"
    assert check_proxy_header(good)[0] == "header"


# -- the sending side -------------------------------------------------------------------

@pytest.mark.parametrize("src, dst, fam", [
    (("203.0.113.7", 51000), ("10.0.0.1", 8080), 0x11),
    (("2001:db8::7", 1), ("::1", 65535), 0x21),
    (("203.0.113.7", 2), ("::1", 3), 0x21),              # mixed: both sent as IPv6
    (("::1", 4), ("10.0.0.1", 5), 0x21),
])
def test_v2_header_round_trips(src, dst, fam):
    out = v2_header(src, dst)
    assert out[:12] == V2_SIGNATURE and out[12] == 0x21 and out[13] == fam
    h = parse_proxy_header(out)
    assert h.length == len(out)
    mapped = lambda a: a if fam == 0x11 or ":" in a[0] else ("::ffff:" + a[0], a[1])  # noqa: E731
    assert h.source == mapped(src) and h.destination == mapped(dst)


def test_v2_header_refuses_what_is_not_an_address():
    with pytest.raises(OSError):
        v2_header(("-", 0), ("127.0.0.1", 1))


# -- fuzzing ----------------------------------------------------------------------------

ADDRESSES = [b"192.168.0.1", b"0.0.0.0", b"255.255.255.255", b"::1", b"2001:db8::1", b"::ffff:1.2.3.4",
             b"01.2.3.4", b"1.2.3", b"", b"fe80::1%lo", b"1:2:3:4:5:6:7:8:9"]
PORTS = [b"0", b"443", b"65535", b"65536", b"080", b"-1", b"", b"1 "]


@st.composite
def v1_lines(draw) -> bytes:
    proto = draw(st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"UDP4", b""]))
    fields = [draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from(ADDRESSES)),
              draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))]
    fields = fields[: draw(st.integers(0, 5))]
    sep = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t"])
    line = b"PROXY" + draw(sep) + proto + b"".join(draw(sep) + f for f in fields)
    end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
    return line + end + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n\r\n", b"\r\n"]))


@st.composite
def v2_headers(draw) -> bytes:
    cmd = draw(st.sampled_from([0x21, 0x21, 0x20, 0x22, 0x11]))
    fam = draw(st.sampled_from([0x11, 0x21, 0x31, 0x00, 0x12, 0x22, 0x41, 0x14]))
    addr = {0x1: 12, 0x2: 36, 0x3: 216}.get(fam >> 4, 0)
    block = draw(st.binary(min_size=addr, max_size=addr))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0xEA, 0xE0]))
        value = draw(st.binary(max_size=8))
        size = draw(st.sampled_from([len(value), len(value), len(value) + 1, 0xFFFF]))
        block += bytes([kind]) + struct.pack("!H", size) + value
    if draw(st.booleans()):  # a correct CRC32C, over the header as it stands
        length = len(block) + 7
        head = V2_SIGNATURE + bytes([cmd, fam]) + struct.pack("!H", length) + block + tlv(0x03, b"\0\0\0\0")
        block += tlv(0x03, crc32c(head).to_bytes(4, "big"))
    length = draw(st.sampled_from([len(block), len(block), len(block) - 1, len(block) + 1, 0]))
    out = V2_SIGNATURE + bytes([cmd, fam]) + struct.pack("!H", max(0, length)) + block
    return out + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01"]))


@FUZZ
@given(st.one_of(st.binary(max_size=200), v1_lines(), v2_headers(),
                 st.binary(max_size=40).map(lambda b: V2_SIGNATURE + b)))
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12))
def test_any_input_parses_or_gives_the_parsers_own_error_whole_or_trickled(data):
    check_proxy_header(data)


@FUZZ
@given(st.one_of(v1_lines(), v2_headers()), st.lists(st.integers(0, 300), max_size=5))
def test_any_cut_points(data, cuts):
    assert check_proxy_header(data, cuts=[c for c in cuts if c <= len(data)]) == check_proxy_header(data)
