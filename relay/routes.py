"""Which pool a request goes to (README, "Routes and origins"), sans-I/O:
decided once per request, from its head, by :class:`Router`.

A request takes the routes of its Host first (the exact name, then ``*.``
wildcards, the longest suffix first), then the routes for any host; within
those, the longest path prefix on whole segments (``/chat`` takes ``/chat``
and ``/chat/x``, never ``/chatx``); then the default target, or none (404).

The cost does not grow with the number of routes: prefixes are grouped by
their first path segment, so a match is a dict lookup on that segment and a
``startswith`` per prefix sharing it, longest first. The only allocation is
that segment (and, where host routes exist, the host name lowered).

A path that decodes or resolves to something else (``%2e%2e``, ``/./``,
``//``) is matched in both forms and refused (400) if they route apart:
otherwise ``/public/../admin`` would take the rules of ``/public`` to an
origin that serves ``/admin``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

from relay.errors import HeadError

T = TypeVar("T")


class _Prefixes(Generic[T]):
    """Path prefixes of one host (or of any host), grouped by first segment."""

    __slots__ = ("by_segment", "root")

    def __init__(self) -> None:
        #: first segment -> [(prefix, target)], the longest prefix first
        self.by_segment: dict[bytes, list[tuple[bytes, T]]] = {}
        #: the target of "/" (every path), if routed
        self.root: T | None = None

    def add(self, prefix: bytes, target: T) -> None:
        if prefix == b"/":
            self.root = target
            return
        end = prefix.find(b"/", 1)
        segment = prefix[1:end] if end > 0 else prefix[1:]
        entries = self.by_segment.setdefault(segment, [])
        entries.append((prefix, target))
        entries.sort(key=lambda e: len(e[0]), reverse=True)

    def match(self, path: bytes) -> T | None:
        end = path.find(b"/", 1)
        entries = self.by_segment.get(path[1:end] if end > 0 else path[1:])
        if entries is not None:
            n = len(path)
            for prefix, target in entries:
                k = len(prefix)
                if path.startswith(prefix) and (k == n or path[k] == 0x2F):  # "/"
                    return target
        return self.root


class Router(Generic[T]):
    """Routes ``(host, path prefix, target)`` plus a default target (None: 404).

    ``host`` is ``""`` (any), a name (``app.example.com``) or a wildcard
    (``*.example.com``, its subdomains). :meth:`route` never allocates more
    than the path's first segment (and the host lowered, where host routes
    exist)."""

    def __init__(self, routes: Iterable[tuple[str, str, T]], default: T | None) -> None:
        self.any: _Prefixes[T] = _Prefixes()
        self.hosts: dict[bytes, _Prefixes[T]] = {}
        #: (".example.com", routes) for ``*.example.com``, the longest suffix first
        self.wildcards: list[tuple[bytes, _Prefixes[T]]] = []
        self.default = default
        for host, path, target in routes:
            if not host:
                table = self.any
            elif host.startswith("*."):
                suffix = host[1:].encode()
                table = next((t for s, t in self.wildcards if s == suffix), None)
                if table is None:
                    table = _Prefixes()
                    self.wildcards.append((suffix, table))
                    self.wildcards.sort(key=lambda w: len(w[0]), reverse=True)
            else:
                table = self.hosts.setdefault(host.encode(), _Prefixes())
            table.add(path.encode(), target)
        #: nothing routes by path: every request gets the default
        self.flat = not (self.any.by_segment or self.any.root is not None or self.hosts or self.wildcards)

    def route(self, path: bytes, host: bytes | None) -> T | None:
        """The target for a request to ``path`` (no query) with ``host`` (the
        Host field or an absolute-form target's authority, any case, maybe
        with a port). Raises HeadError(400) for a path whose decoded form
        routes elsewhere."""
        if self.flat:
            return self.default
        target = self._match(path, host)
        if b"%" in path or b"/." in path or b"//" in path:
            if self._match(_normal(path), host) is not target:
                raise HeadError(400, "the path routes elsewhere once decoded")
        return target

    def _match(self, path: bytes, host: bytes | None) -> T | None:
        if host is not None and (self.hosts or self.wildcards):
            found = self._by_host(path, host)
            if found is not None:
                return found
        found = self.any.match(path)
        return self.default if found is None else found

    def _by_host(self, path: bytes, host: bytes) -> T | None:
        table = self.hosts.get(host)
        if table is None:
            name = _host_name(host)
            table = self.hosts.get(name)
            if table is None:
                for suffix, wild in self.wildcards:
                    if name.endswith(suffix) and len(name) > len(suffix):
                        table = wild
                        break
                else:
                    return None
        return table.match(path)


def _host_name(host: bytes) -> bytes:
    """``Host`` -> the name routes are keyed by: lower case, no port, no final dot."""
    if host.startswith(b"["):
        name = host[: host.find(b"]") + 1]
    else:
        name = host.partition(b":")[0]
    return name.lower().rstrip(b".")


def _normal(path: bytes) -> bytes:
    """The path decoded and dot-resolved, as an origin would read it."""
    decoded = unquote_to_bytes(path)
    normal = posixpath.normpath(decoded)
    if normal.startswith(b"//"):
        normal = b"/" + normal.lstrip(b"/")
    return normal
