"""Listening sockets: bound once by the supervisor (or handed over by
systemd socket activation), inherited by every worker, moved on a reload.

Why one inherited listening socket and not one per worker: with a socket
per worker the kernel hashes each connection to one worker's queue, and the
connections queued on a worker that exits are reset. With one socket shared by
every worker, a worker that stops accepting leaves its queue to the others, so
drains and reloads drop nothing; each worker accepts from the shared queue
whenever its loop is free, which spreads load by actual availability
(measured in tests/system/workers/test_lifecycle.py).

The supervisor binds each ``RELAY_LISTEN`` address once, *without*
``SO_REUSEPORT``: every worker inherits that one socket, so nothing needs
the option, and with it any other process of the same user could bind the
same address and silently take a share of the connections (measured: 8
connections split 6/2 between two relays with different origins). Without
it, a second wsrelay — or anything else — on an address already served gets
``EADDRINUSE`` and refuses to start, as nginx and HAProxy do. A reload keeps
the sockets of the addresses it still serves (:meth:`Listeners.prepare`),
so its new generation inherits them too.

``RELAY_TLS_LISTEN`` addresses are bound the same way; :attr:`Listeners.tls`
says, socket by socket, which ones the workers serve with TLS. Under socket
activation, a socket whose ``FileDescriptorName=`` starts with ``tls`` is a
TLS listener (deploy/wsrelay.socket).

:func:`holder` names the process that holds a port, for the error message
(``/proc/net/tcp*`` and ``/proc/*/fd``: only what this user may see).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable

from relay.config import Address, Settings
from relay.errors import ConfigError
from workers import systemd
from workers.tls import Tls


class Listeners:
    """The supervisor's listening sockets, across reloads (gunicorn's ``sock.py``).

    ``current`` are the sockets the newest generation of workers gets;
    ``running`` those of the generation serving while a reload starts (the
    same list but during a reload that moves ``RELAY_LISTEN``). Every socket
    held is closed once no generation uses it.
    """

    def __init__(self, environ=None) -> None:
        self.current: list[socket.socket] = []
        self.running: list[socket.socket] = []
        #: every socket held -> its address (None when systemd handed it over)
        self.held: dict[socket.socket, Address | None] = {}
        self.activated = False
        #: the addresses the current sockets were bound for, each with its TLS flag
        self.listen: tuple[tuple[Address, bool], ...] = ()
        #: per socket of ``current``: served with TLS
        self.is_tls: list[bool] = []
        #: the TLS listeners' certificates and ticket keys, which move with them
        self.tls = Tls(environ)
        self.running_tls: list[bool] = []

    def open(self, settings: Settings) -> None:
        """Take systemd's sockets, or bind ``RELAY_LISTEN`` and ``RELAY_TLS_LISTEN``; raises ConfigError."""
        activated = systemd.listen_fds()
        if activated:
            self.activated = True
            for sock, _name in activated:
                sock.setblocking(False)
            self.current = [sock for sock, _name in activated]
            self.held = dict.fromkeys(self.current)
            self.is_tls = [name.startswith("tls") for _sock, name in activated]
        else:
            self.current = _bind_all(settings, {})
            self.held = dict(zip(self.current, (a for a, _tls in addresses(settings))))
            self.is_tls = [tls for _a, tls in addresses(settings)]
        self.running, self.running_tls = self.current, self.is_tls
        self.listen = addresses(settings)
        self.tls.open(settings)

    def prepare(self, settings: Settings, reloading: bool) -> None:
        """A reload to ``settings``: when ``RELAY_LISTEN`` changed, sockets for
        its addresses, those held kept, new ones bound. Raises ConfigError
        (nothing changes then). ``reloading``: an earlier reload is still
        starting (its sockets are not the running ones and are closed if this
        one does not use them)."""
        self.tls.prepare(settings, reloading)
        if addresses(settings) == self.listen:
            return
        try:
            socks = _bind_all(settings, self.held)
        except ConfigError:
            self.tls.rollback()
            raise
        for (addr, _tls), sock in zip(addresses(settings), socks):
            self.held.setdefault(sock, addr)
        if not reloading:
            self.running, self.running_tls = self.current, self.is_tls
        self._close_all_but((*self.running, *socks))
        self.current = socks
        self.is_tls = [tls for _a, tls in addresses(settings)]
        self.listen = addresses(settings)

    def commit(self) -> None:
        """The reload's generation accepts: the old sockets go."""
        self._close_all_but(self.current)
        self.running, self.running_tls = self.current, self.is_tls
        self.tls.commit()

    def rollback(self, settings: Settings) -> None:
        """The reload was refused: back to the running generation's sockets
        (``settings``: the running generation's)."""
        self._close_all_but(self.running)
        self.current, self.is_tls = self.running, self.running_tls
        self.listen = addresses(settings)
        self.tls.rollback()

    def close(self) -> None:
        """Drain: once the workers close theirs, new connections are refused, not queued."""
        self._close_all_but(())

    @property
    def port(self) -> int:
        """The port of the first listening socket (the demo's, and tests')."""
        return self.current[0].getsockname()[1]

    @property
    def tls_port(self) -> int | None:
        """The port of the first TLS listening socket, if any."""
        return next((s.getsockname()[1] for s, tls in zip(self.current, self.is_tls) if tls), None)

    def names(self) -> str:
        return ", ".join(_sockname(s) + (" (TLS)" if tls else "") for s, tls in zip(self.current, self.is_tls))

    def _close_all_but(self, keep) -> None:
        for sock in list(self.held):
            if not any(sock is k for k in keep):
                del self.held[sock]
                sock.close()


def addresses(settings: Settings) -> tuple[tuple[Address, bool], ...]:
    """Every address to listen on, with whether it serves TLS: RELAY_LISTEN, then RELAY_TLS_LISTEN."""
    return tuple((a, False) for a in settings.listen) + tuple((a, True) for a in settings.tls_listen)


def _bind_all(settings: Settings, held: dict[socket.socket, Address | None]) -> list[socket.socket]:
    """One listening socket per address (:func:`addresses`): the one in ``held``
    when this relay serves that address already, else a new one, never shared
    with another process. Raises ConfigError naming the address when one
    cannot be bound; nothing bound here is then kept."""
    reuse = {addr: sock for sock, addr in held.items() if addr is not None}
    socks: list[socket.socket] = []
    fresh: list[socket.socket] = []
    try:
        for addr, tls in addresses(settings):
            variable = "RELAY_TLS_LISTEN" if tls else "RELAY_LISTEN"
            sock = reuse.get(addr)
            if sock is None:
                try:
                    sock = bind(addr, settings.backlog)
                except OSError as e:
                    if held and holder(addr.port, pids=[str(os.getpid())]):
                        raise ConfigError([f"{variable}: {addr} overlaps an address this relay serves now; "
                                           f"moving between overlapping addresses needs a restart"]) from None
                    line = why(variable, addr, e)
                    if e.errno == errno.EADDRINUSE:
                        line += ": refusing to share it with another process; stop that one or choose another address"
                    raise ConfigError([line]) from None
                fresh.append(sock)
            socks.append(sock)
    except ConfigError:
        for sock in fresh:
            sock.close()
        raise
    return socks


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
