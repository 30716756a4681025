"""What observability costs, measured where it is spent.

End to end (``python -m bench --only metrics-64``) the difference between
``/metrics`` off and on is far inside the shared machine's noise, so this
measures the two places metrics cost anything at all:

- **the worker's sweep** (relay/context.py): once a second it sums the byte
  counts of every open tunnel into the worker's shared-memory slot. Nothing
  is counted per chunk; the sweep is the whole recurring cost on the worker.
  Timed on the real ``Context`` with N tunnels' worth of counters.
- **a scrape** (metrics/endpoint.py in the supervisor): CPU seconds of the
  real supervisor process over many scrapes of a running relay, per scrape.

Both are reported as a share of one core at a given scrape interval.

    python -m bench.metrics_cost [--tunnels 10000] [--scrapes 300] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import procstat
from bench.proxies import _wait_line, free_port


class _Side:
    __slots__ = ("nbytes",)

    def __init__(self, n: int):
        self.nbytes = n


class _Tunnel:
    """What the sweep reads of a tunnel: its two sides' byte counts."""

    __slots__ = ("client", "origin", "last_bytes", "last_active")

    def __init__(self, i: int):
        self.client = _Side(i)
        self.origin = _Side(2 * i)
        self.last_bytes = 0
        self.last_active = time.monotonic()

    def close(self) -> None:
        raise AssertionError("no tunnel is idle long enough to be closed here")


def sweep_cost(tunnels: int, repeat: int = 200) -> float:
    """Seconds one sweep (bytes published + idle check) takes with ``tunnels`` open."""
    from relay.config import load
    from relay.context import Context
    from relay.shared_memory import Admission, SharedState

    async def go() -> float:
        settings = load({"RELAY_ORIGIN": "127.0.0.1:9", "RELAY_IDLE_TIMEOUT": "600"})
        shared = SharedState(1, settings.max_clients)
        ctx = Context(settings, 0, Admission(shared, 0), shared.counters(0))
        ctx.tunnels.update(_Tunnel(i) for i in range(tunnels))
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            ctx._sweep()
            best = min(best, time.perf_counter() - t0)
            ctx._sweeper.cancel()
        return best

    return asyncio.run(go())


def scrape_cost(scrapes: int, workers: int) -> tuple[float, int]:
    """Supervisor CPU seconds per scrape of a running relay, and the page size."""
    tmp = Path(tempfile.mkdtemp(prefix="wsrelay-metrics-cost-"))
    log = tmp / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_ORIGIN="127.0.0.1:9", RELAY_LISTEN=f"127.0.0.1:{free_port()}",
               RELAY_WORKERS=str(workers), RELAY_METRICS_LISTEN="127.0.0.1:0", RELAY_ACCESS_LOG="0")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        line = _wait_line(log, proc, "metrics on http://", 15)
        url = line[line.index("http://"):].split()[0]
        _wait_line(log, proc, "ready:", 15)
        size = len(urllib.request.urlopen(url, timeout=5).read())
        before = procstat.cpu_seconds([proc.pid])
        for _ in range(scrapes):
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
        return (procstat.cpu_seconds([proc.pid]) - before) / scrapes, size
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", type=int, default=10_000, help="open tunnels in the timed sweep")
    ap.add_argument("--scrapes", type=int, default=300, help="scrapes timed on the supervisor")
    ap.add_argument("--workers", type=int, default=2, help="workers of the scraped relay")
    opts = ap.parse_args()
    sweep = sweep_cost(opts.tunnels)
    per_scrape, size = scrape_cost(opts.scrapes, opts.workers)
    print(f"worker sweep, {opts.tunnels:,} open tunnels: {sweep * 1e3:.2f} ms once a second "
          f"= {sweep * 100:.3f}% of one core")
    print(f"scrape ({opts.workers} workers, {size:,} bytes): {per_scrape * 1e3:.2f} ms of supervisor CPU "
          f"= {per_scrape * 100:.3f}% of a core at 1 scrape/s, {per_scrape * 100 / 15:.4f}% at 1/15 s")


if __name__ == "__main__":
    main()
