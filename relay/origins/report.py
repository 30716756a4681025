"""Origin failures on the service log (stderr), so a person tailing the
journal sees why clients get 502 or 504 (README, "Logs").

At most one line per origin and kind of failure every :data:`EVERY`
seconds, with the number of failures since the previous line: a dead
origin under load costs one line per 10 s, not one per client.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("wsrelay.origin")

#: seconds between two lines about the same origin and kind of failure
EVERY = 10.0


class FailureLog:
    """A worker's rate-limited warnings about its origins."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        #: (origin, kind) -> [time of the last line, failures not yet reported]
        self.seen: dict[tuple[str, str], list] = {}

    def failed(self, origin: str, kind: str, detail: str = "", answer: int = 502) -> None:
        """``origin`` failed with ``kind`` (``connect``, ``closed``, ``answer``,
        ``timeout``, ``cut``); clients got ``answer``."""
        now = time.monotonic()
        key = (origin, kind)
        entry = self.seen.get(key)
        if entry is None:
            entry = self.seen[key] = [now - self.every, 0]
        entry[1] += 1
        if now - entry[0] < self.every:
            return
        count, entry[0], entry[1] = entry[1], now, 0
        what = f"{kind}: {detail}" if detail else kind
        # a failover may still have served the client: the answer is what it gets when none does
        log.warning("origin %s %s (%d in the last %gs; %d unless another origin answers)", origin or "(none)",
                    what, count, self.every, answer)
