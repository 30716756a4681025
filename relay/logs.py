"""The two logs (README, "Logs"): the service log — lifecycle events and
errors, on stderr through :mod:`logging` — and the access log, one JSON
object per finished WebSocket session or HTTP request, on stdout.

The access log is written with one ``os.write`` per line, from the worker's
event loop: no logging handler, no buffering across a crash. Records are
built only when the access log is on (:attr:`AccessLog.enabled`).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import msgspec


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald: systemd sets JOURNAL_STREAM to
    its device:inode (systemd.exec(5)), and the journal stamps every line itself."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _JournalFormatter(logging.Formatter):
    """No timestamp (the journal has one per line) and sd-daemon(3)'s ``<N>``
    priority prefix, so ``journalctl -p warning`` selects by level."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def setup(level: str) -> None:
    """The service log on stderr at ``level`` (``debug`` … ``error``); on the
    journal without our timestamp and with a priority prefix per line."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(_JournalFormatter("wsrelay[%(process)d] %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s wsrelay[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


class AccessRecord(msgspec.Struct, omit_defaults=False):
    """One access log line; fields as the README's "Logs" section lists them."""

    time: str            # RFC 3339 UTC, when the line was written (the end)
    worker: int
    client: str
    method: str
    path: str
    status: int
    outcome: str
    handshake_ms: float
    duration_s: float
    bytes_up: int
    bytes_down: int
    origin: str           # the origin that served it, or the last one tried
    pool: str             # the pool it was routed to ("" when none)
    tries: int            # origins tried (more than 1: failed over)
    user_agent: str
    x_forwarded_for: str  # as the client sent it
    request_id: str       # the X-Request-ID the origin got
    #: which data plane relayed the session (relay/native): "native" or "python"
    data_plane: str = "python"
    tls_version: str = ""     # "TLSv1.3", "TLSv1.2"; "" on a plain listener
    tls_resumed: bool = False  # the TLS session was resumed (a ticket), not a full handshake


_encode = msgspec.json.Encoder().encode
# Workers are fresh interpreters (workers/child.py): each seeds its own generator.
_random = random.Random(os.urandom(16))


def new_request_id() -> bytes:
    """A request id: 32 hex digits, 128 random bits, as nginx's ``$request_id``
    (a seeded PRNG, not a syscall per request: ids need to be unique, not secret)."""
    return b"%032x" % _random.getrandbits(128)


class _Clock:
    """RFC 3339 timestamps with milliseconds, the date part formatted once a second."""

    __slots__ = ("second", "prefix")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((t - second) * 1000):03d}Z"


def _text(value: bytes | None, limit: int = 512) -> str:
    return value[:limit].decode("latin-1") if value else ""


class AccessLog:
    """A worker's access log on stdout (fd 1)."""

    __slots__ = ("enabled", "worker", "clock")

    def __init__(self, enabled: bool, worker: int) -> None:
        self.enabled = enabled
        self.worker = worker
        self.clock = _Clock()

    def record(self, client: str, method: bytes, path: bytes, user_agent: bytes | None = None,
               x_forwarded_for: bytes | None = None, request_id: str = "") -> AccessRecord:
        """A record for a request; callers fill in the rest and :meth:`write` it at the end."""
        return AccessRecord(time="", worker=self.worker, client=client,
                            method=_text(method, 32), path=_text(path),
                            status=0, outcome="", handshake_ms=0.0, duration_s=0.0,
                            bytes_up=0, bytes_down=0, origin="", pool="", tries=0, user_agent=_text(user_agent),
                            x_forwarded_for=_text(x_forwarded_for), request_id=request_id)

    def write(self, record: AccessRecord) -> None:
        if self.enabled:
            record.time = self.clock.now()
            try:
                os.write(1, _encode(record) + b"\n")
            except OSError:
                pass
