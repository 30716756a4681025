"""Signals for the supervisor's select loop (gunicorn's rule: "NO LOGGING,
just queue the signal"). Handlers only append to a queue; a wake-up socket
registered with the selector makes the loop notice at once, and the loop
dispatches what is queued.
"""

from __future__ import annotations

import selectors
import signal
import socket


class SignalQueue:
    """Queue ``signals`` for a loop polling ``sel``."""

    def __init__(self, sel: selectors.BaseSelector, signals: tuple[int, ...]) -> None:
        self.pending: list[int] = []
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._r, self._w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        sel.register(r, selectors.EVENT_READ, self._drain)
        for sig in signals:
            signal.signal(sig, self._queue)

    def _queue(self, signum, _frame) -> None:
        self.pending.append(signum)  # nothing else here: the loop does the work

    def _drain(self, sock, _ev) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def pop(self) -> int | None:
        """The oldest queued signal, or None."""
        return self.pending.pop(0) if self.pending else None
