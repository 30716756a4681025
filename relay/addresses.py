"""Client addresses, sans-I/O: which peers are trusted proxies
(``RELAY_TRUSTED_PROXIES``), and which addresses count as one client for
``RELAY_MAX_CLIENTS_PER_IP`` (README, "Behind a load balancer").

Addresses arrive as the strings a socket or a PROXY header gives
(``"203.0.113.7"``, ``"2001:db8::1"``, ``"::ffff:203.0.113.7"``); an IPv4
address mapped into IPv6 (a dual-stack listener's view of an IPv4 client)
is that IPv4 address in both questions.
"""

from __future__ import annotations

import ipaddress
import socket

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def packed(address: str) -> bytes | None:
    """16 bytes: the IPv6 address, or the IPv4 one mapped (``::ffff:a.b.c.d``);
    ``None`` for a string that is neither."""
    try:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, address)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return None


class TrustedProxies:
    """Membership in a list of networks (``("10.0.0.0/8", "2001:db8::/32")``,
    as relay/config.py normalises them), as nginx's ``set_real_ip_from``."""

    __slots__ = ("_nets", "networks")

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = networks
        nets = []
        for text in networks:
            net = ipaddress.ip_network(text)
            if net.version == 4:  # held as its IPv4-mapped IPv6 network
                net = ipaddress.ip_network(f"::ffff:{net.network_address}/{96 + net.prefixlen}")
            nets.append((int(net.network_address), int(net.netmask)))
        self._nets = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self._nets)

    def networks_int(self) -> tuple[tuple[int, int], ...]:
        """Each network as (address, mask), 128-bit integers, IPv4 mapped
        (for the fast path in C, relay/native/fast_path.c fp_trusted)."""
        return self._nets

    def __contains__(self, address: str) -> bool:
        raw = packed(address)
        if raw is None:
            return False
        a = int.from_bytes(raw, "big")
        for net, mask in self._nets:
            if a & mask == net:
                return True
        return False


def per_ip_key(address: str, v6_prefix: int) -> bytes | None:
    """What one client is for the per-IP limit: 16 bytes, an IPv4 address
    (mapped) or an IPv6 address cut to its first ``v6_prefix`` bits
    (``RELAY_PER_IP_V6_PREFIX``, /64 by default: one host's addresses, RFC 4291
    §2.5.4 and RFC 8981's temporary addresses, all share it). ``None`` for a
    string that is not an address."""
    raw = packed(address)
    if raw is None or raw[:12] == _V4_MAPPED or v6_prefix >= 128:
        return raw
    full, bits = divmod(v6_prefix, 8)
    if bits:
        return raw[:full] + bytes([raw[full] & (0xFF << (8 - bits)) & 0xFF]) + b"\0" * (15 - full)
    return raw[:full] + b"\0" * (16 - full)
