"""Which certificate answers a ClientHello: its SNI against each
certificate's names, sans-I/O (RFC 6066 §3, RFC 6125 §6.4).

A name is a DNS name, or a wildcard ``*.example.com`` standing for exactly
one left-most label (``a.example.com``, not ``example.com`` nor
``a.b.example.com``); comparison ignores case and a trailing dot. Exact names
win over wildcards, then the first certificate listed; a name no certificate
has (or no SNI at all) gets the first, the default, as nginx's
``default_server`` and HAProxy's first ``crt`` do.
"""

from __future__ import annotations


def normal(name: str) -> str:
    return name.strip().rstrip(".").lower()


def matches(pattern: str, host: str) -> bool:
    """Whether certificate name ``pattern`` covers ``host`` (both as given)."""
    pattern, host = normal(pattern), normal(host)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


class Chooser:
    """Index of the certificate for a server name, from each certificate's names."""

    def __init__(self, names: list[list[str]]):
        self.exact: dict[str, int] = {}
        self.wild: dict[str, int] = {}
        for i, certificate_names in enumerate(names):
            for n in map(normal, certificate_names):
                table = self.wild if n.startswith("*.") else self.exact
                table.setdefault(n[2:] if n.startswith("*.") else n, i)

    def choose(self, server_name: str | None) -> int | None:
        """The certificate for ``server_name``; None when none has that name."""
        if not server_name:
            return None
        host = normal(server_name)
        i = self.exact.get(host)
        if i is not None:
            return i
        label, dot, rest = host.partition(".")
        if label and dot:
            return self.wild.get(rest)
        return None
