"""Everything that dials, reads or pools an origin connection.

- :mod:`relay.origins.dial`: which origin next (round-robin) and connecting
  to it, failing over to the next on a connect error.
- :mod:`relay.origins.answer`: reading an origin's answer to an upgrade.
- :mod:`relay.origins.pool`: origin connections for plain HTTP and the
  per-worker pool that keeps them alive between requests.

Only addresses from ``RELAY_ORIGIN`` are ever connected to; nothing in a
request can name another destination.
"""
