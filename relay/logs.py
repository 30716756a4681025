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
import sys
import time

import msgspec


def setup(level: str) -> None:
    """The service log on stderr at ``level`` (``debug`` … ``error``)."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s wsrelay[%(process)d] %(levelname)s %(message)s")


class AccessRecord(msgspec.Struct, omit_defaults=False):
    """One access log line; fields as the README's "Logs" section lists them."""

    time: float
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
    origin: str


_encode = msgspec.json.Encoder().encode


class AccessLog:
    """A worker's access log on stdout (fd 1)."""

    __slots__ = ("enabled", "worker")

    def __init__(self, enabled: bool, worker: int) -> None:
        self.enabled = enabled
        self.worker = worker

    def record(self, client: str, method: bytes, path: bytes) -> AccessRecord:
        """A record for a request that starts now; callers fill in the rest."""
        return AccessRecord(time=round(time.time(), 3), worker=self.worker, client=client,
                            method=method.decode("latin-1"), path=path.decode("latin-1")[:512],
                            status=0, outcome="", handshake_ms=0.0, duration_s=0.0,
                            bytes_up=0, bytes_down=0, origin="")

    def write(self, record: AccessRecord) -> None:
        if self.enabled:
            try:
                os.write(1, _encode(record) + b"\n")
            except OSError:
                pass
