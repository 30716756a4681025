"""Where each per-worker figure lives in a worker's slot of shared memory.

A slot is an array of float64 written only by its worker (plain stores, no
lock: one writer, and readers tolerate a value one update old). Counters are
cumulative for the slot's lifetime; the supervisor folds a dead worker's final
values into the history of its worker index, so a series never goes backwards.

The origin table's layout (relay/origins/table.py) is here too, so the
shared-memory fingerprint covers it.
"""

from __future__ import annotations

from bisect import bisect_left as _bisect_left

OUTCOMES = ("upgraded", "origin_rejected", "bad_request", "forbidden", "limit",
            "origin_error", "timeout", "draining", "limit_ip", "no_route", "limit_origin")
DIRECTIONS = ("upstream", "downstream")
# Why a connection was closed in its PROXY protocol phase (README, "Behind a
# load balancer"): from a source outside RELAY_TRUSTED_PROXIES, bytes that are
# no PROXY header, a header breaking the spec, a header cut by the client's
# close, or not complete within RELAY_HANDSHAKE_TIMEOUT.
PROXY_ERRORS = ("untrusted", "missing", "invalid", "truncated", "timeout")
SIDES = ("client", "origin")
# Close codes tracked by frames mode; anything else is counted as "other".
CLOSE_CODES = (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
               1012, 1013, 1014, 1015)
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
HTTP_CODES = 600  # one counter per status code 0..599
# How TLS handshakes ended (README, "TLS"): full and resumed succeeded.
TLS_OUTCOMES = ("full", "resumed", "failed_protocol", "failed_cipher", "failed_sni",
                "failed_client_certificate", "failed_other", "plain_http", "client_abort", "timeout")

# Gauges: current values, not folded into history when a worker dies.
CONNECTIONS = 0           # open tunnels
# Counters.
UPGRADES = 1                                   # + OUTCOMES.index(outcome)
BYTES = UPGRADES + len(OUTCOMES)               # + DIRECTIONS.index(direction)
MESSAGES = BYTES + 2                           # + direction (frames mode)
HANDSHAKE = MESSAGES + 2                       # buckets..., +Inf, sum
DURATION = HANDSHAKE + len(HANDSHAKE_BUCKETS) + 2
CLOSES = DURATION + len(DURATION_BUCKETS) + 2  # + side * (len(CLOSE_CODES)+1) + code index
ACCEPT_ERRORS = CLOSES + 2 * (len(CLOSE_CODES) + 1)
PING_TIMEOUTS = ACCEPT_ERRORS + 1
PROXY_PROTOCOL_ERRORS = PING_TIMEOUTS + 1      # + PROXY_ERRORS.index(reason)
HTTP = PROXY_PROTOCOL_ERRORS + len(PROXY_ERRORS)  # + status code
TLS_HANDSHAKES = HTTP + HTTP_CODES             # + TLS_OUTCOMES.index(outcome)
# Gauges read by sibling workers to balance accepts (workers/accept.py).
LOAD = TLS_HANDSHAKES + len(TLS_OUTCOMES)  # open connections of any kind, as of the last accept
ACCEPTING = LOAD + 1      # 1 while the worker takes new connections
# time.monotonic() of the worker's last 1 s sweep: the supervisor replaces a
# worker whose event loop stopped turning (workers/supervisor.py, HUNG_AFTER).
HEARTBEAT = ACCEPTING + 1
SIZE = HEARTBEAT + 1

GAUGES = (CONNECTIONS, LOAD, ACCEPTING, HEARTBEAT)


# -- the origin table (relay/origins/table.py) ---------------------------------------
# Its own shared memory: one entry per (pool, origin) of the configurations
# running, named in the table itself, so /metrics labels come from there.
ORIGIN_CAPACITY = 256       # entries; a configuration needing more is refused
ORIGIN_NAME_BYTES = 128     # "pool/host:port", UTF-8, NUL-padded; empty = a free entry
ORIGIN_REASONS = ("connect", "timeout", "closed", "invalid", "status_5xx", "cut")
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Per entry (float64), read by every process. The check fields have one
# writer (the supervisor's health checker), the rest change under the
# table's lock (workers/health.py, relay/origins/outlier.py).
O_CHECK = 0          # active health check: 1 up, 0 down (1 without checks)
O_CHECK_SINCE = 1    # time.monotonic() of its last change
O_DOWN_UNTIL = 2     # passive: taken out until then (time.monotonic())
O_EJECTED = 3        # passive: 1 from being taken out until it answers again
O_FAILS = 4          # failures in the current window (RELAY_FAIL_TIMEOUT)
O_WINDOW = 5         # when that window started; while taken out, when it was
O_PROBES = 6         # health probes sent
O_TRIAL = 7          # passive: when one request was sent to try it again (0: none pending)
O_ERRORS = 8                                  # + ORIGIN_REASONS.index(reason): cumulative
O_WINDOW_ERRORS = O_ERRORS + len(ORIGIN_REASONS)  # + reason: in the current window
O_SIZE = O_WINDOW_ERRORS + len(ORIGIN_REASONS)
# Per worker slot and entry (float64, one writer each): the connect-time histogram.
O_CONNECT_SIZE = len(CONNECT_BUCKETS) + 2     # buckets..., +Inf, sum


def bucket_index(buckets: tuple[float, ...], value: float) -> int:
    """Index of the first bucket whose bound holds ``value`` (len(buckets) = +Inf).
    bisect_left is that index (bounds ascend), found in C: this runs twice per
    handshake cycle."""
    return _bisect_left(buckets, value)


def close_index(side: int, code: int) -> int:
    try:
        i = CLOSE_CODES.index(code)
    except ValueError:
        i = len(CLOSE_CODES)
    return CLOSES + side * (len(CLOSE_CODES) + 1) + i
