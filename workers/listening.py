"""Listening sockets that belong to one relay only.

The supervisor binds each ``RELAY_LISTEN`` address once, *without*
``SO_REUSEPORT``: every worker inherits that one socket, so nothing needs
the option, and with it any other process of the same user could bind the
same address and silently take a share of the connections (measured: 8
connections split 6/2 between two relays with different origins). Without
it, a second wsrelay — or anything else — on an address already served gets
``EADDRINUSE`` and refuses to start, as nginx and HAProxy do. A reload keeps
the sockets of the addresses it still serves (:func:`rebind`), so its new
generation inherits them too.

:func:`holder` names the process that holds a port, for the error message
(``/proc/net/tcp*`` and ``/proc/*/fd``: only what this user may see).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable

from relay.config import Address


def bind(addr: Address, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``addr``; raises OSError."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a port whose old connections linger in TIME_WAIT can be
        # bound again at once (it never lets two listeners share a port on Linux).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def probe(addr: Address) -> OSError | None:
    """Whether ``addr`` could be bound now (bound and closed at once, never kept)."""
    try:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr.host, addr.port))
    except OSError as e:
        return e
    return None


def why(variable: str, addr: Address, e: OSError) -> str:
    """One line for an address that cannot be bound."""
    if e.errno == errno.EADDRINUSE:
        who = holder(addr.port)
        return f"{variable}: {addr} is already in use{' by ' + who if who else ''}"
    if e.errno == errno.EACCES and addr.port < 1024:
        return f"{variable}: {addr}: a port below 1024 needs CAP_NET_BIND_SERVICE (the systemd unit grants it)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{variable}: {addr}: no such address on this host"
    return f"{variable}: {addr}: cannot bind: {e.strerror}"


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                out.add(fields[9])
    return out


def holder(port: int, pids: Iterable[str] | None = None) -> str | None:
    """``pid N (its command line)`` of a process holding a socket that listens
    on ``port``, or None if none is visible to this user."""
    inodes = {f"socket:[{i}]" for i in listening_inodes(port)}
    if not inodes:
        return None
    for pid in pids if pids is not None else (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return f"pid {pid} ({command_line(int(pid))})"
            except OSError:
                continue
    return None


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    text = " ".join(raw.decode(errors="replace").replace("\0", " ").split())
    return text if len(text) <= 80 else text[:77] + "..."
