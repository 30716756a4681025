"""What the supervisor shows its operator on ``RELAY_METRICS_LISTEN``
(README, "Observability"): ``/metrics`` fed from the workers' slots and the
history of dead ones, ``/healthz``, ``/readyz``, and ``/config`` — what runs
now, and how the last reload ended.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

import msgspec

from metrics.source import History, LiveWorker, OriginFigures, Source
from relay import __version__
from relay.config import Settings
from relay.errors import ConfigError
from relay.shared_memory import SharedState
from workers.listeners import why
from workers.workerset import Restarts, WorkerSet

log = logging.getLogger("wsrelay")


class Supervised(Protocol):
    """What :class:`Status` reads of the supervisor (workers/supervisor.py)."""

    settings: Settings
    env_file: str | None
    generation: int
    reload: object | None    # a reload in progress
    stopping: bool
    workers: WorkerSet
    shared: SharedState
    history: History
    restarts: Restarts


class Status:
    """The supervisor's face: read-only views over its public state."""

    def __init__(self, sup: Supervised) -> None:
        self.sup = sup
        self.started_at = time.time()
        #: finished reloads, applied or refused
        self.reloads = 0
        self.last_reload: dict | None = None
        self.endpoint = None

    def start_endpoint(self, sel) -> None:
        """Serve /metrics, /healthz, /readyz, /config; raises ConfigError if the address is taken."""
        from metrics.endpoint import serve

        sup = self.sup
        source = Source(__version__, sup.history,
                        live=lambda: [LiveWorker(w.index, w.pid, sup.shared.values(w.slot)) for w in sup.workers],
                        indices=lambda: sup.settings.effective_workers(), clients=sup.shared.total_clients,
                        limit=lambda: sup.shared.limit, restarts=lambda: sup.restarts.count,
                        data_plane=lambda: sup.settings.effective_data_plane(),
                        certificates=sup.listeners.tls.expiries,
                        origins=lambda: [OriginFigures(*f) for f in sup.origins.figures()],
                        cluster=lambda: sup.limits.figures())
        addr = sup.settings.metrics_listen
        try:
            self.endpoint = serve(addr.host, addr.port, source, self.healthy, self.ready, self.config)
        except OSError as e:
            raise ConfigError([why("RELAY_METRICS_LISTEN", addr, e)]) from None
        self.endpoint.register(sel)
        log.info("metrics on http://%s:%d/metrics", addr.host, self.endpoint.port)

    def healthy(self) -> bool:
        """``/healthz``: the supervisor runs and a worker is alive."""
        return len(self.sup.workers) > 0

    def ready(self) -> bool:
        """``/readyz``: a worker accepts and the relay is not draining. Not
        every worker: the first one serves (upgrades get their 101) while its
        siblings start; systemd's ``READY=1`` still waits for all of them."""
        return not self.sup.stopping and any(w.ready and not w.draining for w in self.sup.workers)

    def reloaded(self, problems: list[str]) -> None:
        """Record how the last SIGHUP ended (no ``problems``: applied)."""
        self.reloads += 1
        self.last_reload = {"count": self.reloads, "time": _iso(time.time()),
                            "result": "refused" if problems else "applied", "problems": problems}

    def config(self) -> bytes:
        """``/config``: what runs now. ``settings`` are the current generation's
        (the one starting, while ``reloading``), secrets redacted."""
        sup = self.sup
        return msgspec.json.encode({
            "version": __version__, "pid": os.getpid(), "started": _iso(self.started_at),
            "generation": sup.generation, "reloading": sup.reload is not None, "env_file": sup.env_file,
            "last_reload": self.last_reload, "workers": sup.workers.describe(),
            "settings": sup.settings.to_dict()})

    def expire(self) -> None:
        if self.endpoint is not None:
            self.endpoint.expire()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
