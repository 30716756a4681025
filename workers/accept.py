"""Accepting connections ourselves, so running out of descriptors is survivable.

Why not ``loop.create_server(sock=...)``: uvloop hands accepting to libuv,
and libuv's answer to EMFILE/ENFILE is its "reserve fd" trick — close a
spare descriptor, then accept *and immediately close* every connection
waiting in the backlog. On our one listening socket shared by every worker
(workers/supervisor.py), that backlog is everybody's: one worker out of
descriptors resets connections that its siblings could have served, the
clients get no answer at all, and nothing is logged or counted (uvloop
drops OSErrors from the listen callback, and closes the server for good
if the trick itself fails).

So each worker watches its listening sockets with ``loop.add_reader`` and
accepts a bounded batch per wake-up. When ``accept()`` fails for lack of
resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) the worker stops watching for
:data:`PAUSE` seconds: what waits in the backlog stays there for a sibling
or for later, open connections keep being served, the failure is counted
in the worker's ``accept_errors`` counter (metrics/counters.py), and logged at most
once per :data:`LOG_EVERY` seconds with the count since the last line.
Nothing spins: a failed accept costs one syscall per pause.

Balance. Every worker watches the one shared listening socket, so every
connection wakes them all and the first to call ``accept()`` wins it; which
one that is depends on the scheduler, and on a busy host one worker can win
two thirds of a burst. So, as nginx does with ``ngx_accept_disabled``, a
worker that holds more open connections than its least-loaded accepting
sibling (by :data:`SLACK` plus 1/16) leaves the wake-up to the siblings and
looks again :data:`DEFER` seconds later. Whatever is still queued by then has
waited long enough: it takes it anyway, a few at first and twice as many on
each consecutive overdue round, so a stalled sibling costs latency, never
service. Loads travel through the workers' shared-memory slots
(``Counters.load`` and ``accepting``), written at each wake-up.

The accepted socket becomes a uvloop transport through
``loop.connect_accepted_socket``; tests/system/relay/test_exhaustion.py and the
handshake benchmark in SECURITY.md show the cost is within noise.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from metrics.counters import Counters

log = logging.getLogger("wsrelay.worker")

#: connections accepted per readiness callback (others wait for the next turn)
BATCH = 64
#: connections a worker may hold beyond its least-loaded sibling (plus 1/16)
SLACK = 4
#: seconds a worker that is ahead waits for its siblings to take a connection
DEFER = 0.005
#: seconds accepting pauses after a resource error
PAUSE = 0.25
#: at most one log line per this many seconds about accept errors
LOG_EVERY = 10.0

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection died in the backlog, or a firewall refused it: the next one may be fine.
_PER_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                             errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                             errno.EOPNOTSUPP, errno.ENETUNREACH})


class _Accepted(socket.socket):
    """An accepted connection, as cheap as a socket object gets: built from
    the descriptor ``_accept()`` returns, with the family and type given (no
    getsockopt), and both read back as plain ints — ``socket.socket`` turns
    them into enums on every access, and uvloop reads them three times."""

    __slots__ = ()
    family = _socket.socket.family
    type = _socket.socket.type


class Acceptor:
    """Accepts from one listening socket into ``factory()`` protocols."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], counters: Counters,
                 siblings: tuple[Counters, ...] = (), load: Callable[[], int] = lambda: 0):
        self.sock = sock
        self.factory = factory
        self.counters = counters
        #: the other workers' counter slots, to compare loads with
        self.siblings = siblings
        #: this worker's open connections (the accepted ones not yet made are added)
        self.load = load
        self.pending = 0
        self.overdue_batch = 1
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.family = sock.family
        self.watching = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.unlogged = 0
        self.last_log = -LOG_EVERY

    def start(self) -> None:
        if not self.closed and not self.watching:
            self.loop.add_reader(self.fd, self._accept)
            self.watching = True
            self.counters.accepting = True

    def close(self) -> None:
        """Stop accepting and close this process's copy of the socket."""
        self.closed = True
        self.counters.accepting = False
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sock.close()

    def _accept(self) -> None:
        if self.siblings and self._ahead():
            self._pause(DEFER, self._overdue)
            return
        self.overdue_batch = 1
        self._take(BATCH, balanced=bool(self.siblings))

    def _ahead(self) -> bool:
        """Publish this worker's load; is it ahead of the least-loaded accepting sibling?"""
        mine = self.load() + self.pending
        self.counters.load = mine
        least = None
        for c in self.siblings:
            if c.accepting and (least is None or c.load < least):
                least = c.load
        return least is not None and mine > least + SLACK + mine // 16

    def _overdue(self) -> None:
        """Back from deferring: what still waits, the siblings did not take."""
        self.timer = None
        if self.closed:
            return
        self.start()
        if self._take(self.overdue_batch, balanced=False):
            self.overdue_batch = min(BATCH, 2 * self.overdue_batch)
        else:
            self.overdue_batch = 1

    def _take(self, n: int, balanced: bool) -> int:
        """Accept up to ``n`` connections (fewer once ahead, if ``balanced``)."""
        sock = self.sock
        taken = 0
        for _ in range(n):
            try:
                fd, _addr = sock._accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _PER_CONNECTION:
                    continue
                self._failed(e)
                break
            # No setblocking(False): libuv's uv_tcp_open makes the descriptor
            # non-blocking when the transport adopts it.
            conn = _Accepted(self.family, socket.SOCK_STREAM, 0, fd)
            taken += 1
            self.pending += 1
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
            task.add_done_callback(self._accepted)
            if balanced and self._ahead():
                break
        return taken

    def _accepted(self, task: asyncio.Task) -> None:
        self.pending -= 1
        # connect_accepted_socket closes the transport itself when it fails;
        # nothing to do but not leave the exception unretrieved.
        if not task.cancelled():
            task.exception()

    def _failed(self, e: OSError) -> None:
        self.counters.accept_error()
        self.unlogged += 1
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY:
            what = "out of file descriptors" if e.errno in (errno.EMFILE, errno.ENFILE) else "failing"
            log.error("accept() %s (%s, %d failures since the last report): pausing accepts for %gs "
                      "at a time; open connections are still served (raise LimitNOFILE / fs.file-max?)",
                      what, errno.errorcode.get(e.errno, e.errno), self.unlogged, PAUSE)
            self.last_log = now
            self.unlogged = 0
        self._pause(PAUSE, self._resume)

    def _pause(self, seconds: float, then: Callable[[], None]) -> None:
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False
        if self.timer is None:
            self.timer = self.loop.call_later(seconds, then)

    def _resume(self) -> None:
        self.timer = None
        self.start()
