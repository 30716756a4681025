"""Passive health (nginx's ``max_fails``/``fail_timeout``, Envoy's outlier
detection; README, "Routes and origins"): an origin that fails
``RELAY_MAX_FAILS`` times within ``RELAY_FAIL_TIMEOUT`` seconds — a connect
error, no answer in time, a close before answering, an answer that is no
HTTP, or a 502/503/504 of its own — is taken out for ``RELAY_FAIL_TIMEOUT``,
then one request tries it again (:func:`trial`): an answer brings it back,
a failure takes it out again. With every origin of a pool out, all are tried (panic mode,
relay/origins/balance.py), and the first to answer is back at once.

Counted across every worker in the origin table (relay/origins/table.py),
under the table's lock: failures are rare events, and the worker whose
failure changes the state writes the one log line about it, so a change
is one line however many workers see it.
"""

from __future__ import annotations

import logging

from metrics import layout
from relay.origins.table import OriginTable

log = logging.getLogger("wsrelay.origin")

#: what each reason counts as, in a "down" line
_NOUNS = {"connect": ("connect error", "connect errors"), "timeout": ("timeout", "timeouts"),
          "closed": ("close before answering", "closes before answering"),
          "invalid": ("invalid answer", "invalid answers"), "status_5xx": ("502/503/504 answer", "502/503/504 answers"),
          "cut": ("cut response", "cut responses")}
_REASON = {name: i for i, name in enumerate(layout.ORIGIN_REASONS)}
#: reasons that count towards taking an origin out (a response cut mid-body does not:
#: the origin did answer; nginx and Envoy count it alike)
HEALTH_REASONS = frozenset(_REASON) - {"cut"}


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def failed(table: OriginTable, entry: int, reason: str, detail: str, now: float, max_fails: int,
           fail_timeout: float, who: str) -> str | None:
    """Count a failure of ``entry`` (``reason``: one of layout.ORIGIN_REASONS).
    Returns ``"down"`` when it took the origin out (and logged it), else None.
    ``who``: "origin 10.0.0.5:9000 (pool chat)", for the log line."""
    s = table.state
    base = entry * layout.O_SIZE
    r = _REASON[reason]
    table.lock()
    try:
        s[base + layout.O_ERRORS + r] += 1
        if reason not in HEALTH_REASONS or not max_fails:
            return None
        if s[base + layout.O_EJECTED]:
            if not s[base + layout.O_TRIAL]:
                return None  # cooling down: a failure that was in flight, or panic-mode traffic
            s[base + layout.O_TRIAL] = 0.0  # the trial failed: out again
            s[base + layout.O_DOWN_UNTIL] = now + fail_timeout
            line = (f"{who} still down: {_NOUNS[reason][0]}{': ' + detail if detail else ''} when tried again; "
                    f"out for another {_seconds(fail_timeout)}")
            return _down(line)
        if now - s[base + layout.O_WINDOW] > fail_timeout:
            s[base + layout.O_WINDOW] = now
            s[base + layout.O_FAILS] = 0.0
            for i in range(len(layout.ORIGIN_REASONS)):
                s[base + layout.O_WINDOW_ERRORS + i] = 0.0
        s[base + layout.O_FAILS] += 1
        s[base + layout.O_WINDOW_ERRORS + r] += 1
        if s[base + layout.O_FAILS] < max_fails:
            return None
        counts = []
        for i, name in enumerate(layout.ORIGIN_REASONS):
            n = int(s[base + layout.O_WINDOW_ERRORS + i])
            if n:
                counts.append(f"{n} {_NOUNS[name][n != 1]}")
            s[base + layout.O_WINDOW_ERRORS + i] = 0.0
        span = now - s[base + layout.O_WINDOW]
        s[base + layout.O_FAILS] = 0.0
        s[base + layout.O_EJECTED] = 1.0
        s[base + layout.O_WINDOW] = now  # while out: when it was taken out
        s[base + layout.O_DOWN_UNTIL] = now + fail_timeout
        return _down(f"{who} down: {', '.join(counts)} in {_seconds(span)} (last: {detail or reason}); "
                     f"out for {_seconds(fail_timeout)}")
    finally:
        table.unlock()


def _down(line: str) -> str:
    log.warning("%s", line)
    return "down"


def trial(table: OriginTable, entry: int, now: float, hold: float) -> bool:
    """Claim the trial of ``entry``, taken out and its cool-down over: True for
    the one request (across workers) that tries it; the others keep away
    for ``hold`` seconds, until the trial's answer or failure is known
    (nginx sends one request to a server after its ``fail_timeout``)."""
    s = table.state
    base = entry * layout.O_SIZE
    table.lock()
    try:
        if not s[base + layout.O_EJECTED] or now < s[base + layout.O_DOWN_UNTIL]:
            return False
        s[base + layout.O_TRIAL] = now
        s[base + layout.O_DOWN_UNTIL] = now + hold
        return True
    finally:
        table.unlock()


def answered(table: OriginTable, entry: int, now: float, who: str, panic: bool = False) -> None:
    """``entry`` answered: if it was taken out, the answer to its trial brings
    it back; in ``panic`` mode (every origin of its pool out, so it was tried
    anyway) any answer does: the first origin back serves without waiting."""
    s = table.state
    base = entry * layout.O_SIZE
    if not s[base + layout.O_EJECTED] or not (s[base + layout.O_TRIAL] or panic):
        return  # up, or an answer that was in flight when it was taken out
    table.lock()
    try:
        if not s[base + layout.O_EJECTED]:
            return  # another worker saw it first
        s[base + layout.O_EJECTED] = 0.0
        s[base + layout.O_TRIAL] = 0.0
        s[base + layout.O_DOWN_UNTIL] = now  # its slow start counts from now
        out = now - s[base + layout.O_WINDOW]
        s[base + layout.O_WINDOW] = now
        s[base + layout.O_FAILS] = 0.0
    finally:
        table.unlock()
    log.info("%s up: answering again after %s out", who, _seconds(out))
