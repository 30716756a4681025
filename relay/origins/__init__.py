"""Everything that chooses, dials, reads or pools an origin connection
(README, "Routes and origins").

- :mod:`relay.origins.balance`: a pool's origins in a worker and which one a
  request goes to (least connections, round-robin, consistent hash; slow
  start; panic mode).
- :mod:`relay.origins.dial`: one request's way to an origin of its pool,
  failing over to the next on a connect error.
- :mod:`relay.origins.outlier`: passive health: failures take an origin out,
  a trial brings it back.
- :mod:`relay.origins.table`: what every process knows of each origin, in
  shared memory of its own.
- :mod:`relay.origins.answer`: reading an origin's answer to an upgrade.
- :mod:`relay.origins.pool`: origin connections for plain HTTP and the idle
  ones kept per origin between requests.
- :mod:`relay.origins.report`: rate-limited failure lines on the service log.

Only addresses from ``RELAY_ORIGIN`` and ``RELAY_POOL_*`` are ever connected
to; a request's path and Host only choose among those pools.
"""
