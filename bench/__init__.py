"""wsrelay benchmarks: wsrelay against nginx, HAProxy, a naive asyncio relay
and a direct connection, measured in one interleaved run.

Run ``python -m bench --help``. Every process here speaks only to 127.0.0.1.
The pieces, each usable on its own:

- :mod:`bench.origin` — picows echo origin (``python -m bench.origin``)
- :mod:`bench.loadgen` — one picows load-generator process (echo, handshake, idle)
- :mod:`bench.naive_relay` — the obvious asyncio-streams relay, the "naive" row
- :mod:`bench.proxies` — starts each system under test (configs generated into a temp dir)
- :mod:`bench.runner` — workloads, interleaving, aggregation
- :mod:`bench.report` — console table, Markdown, PNG chart
"""
