"""A bounded soak in the suite (bench/soak.py runs the long one): 60 s of
clients churning connections and verified echoes through a 2-worker relay
in front of two origins, while an origin is killed and restarted and a
worker is SIGKILLed now and then.

Asserts: no message corrupted, none lost on a connection that was not
deliberately cut; the relay's RSS and descriptors (sum over its workers, at
quiet moments) back within 10% of their level after warm-up; every slot
given back; no traceback; a clean exit on SIGTERM.
"""

from __future__ import annotations

import pytest

import os

import uvloop

from bench.soak import soak, verdict

pytestmark = pytest.mark.slow

DURATION = float(os.environ.get("SOAK_SECONDS", "60"))


def test_soak_60s_with_origin_restarts_and_worker_kills():
    lines: list[str] = []
    report = uvloop.run(soak(duration=DURATION, clients=20, workers=2, origins=2, origin_restart_every=15,
                             kill_worker_every=20, warmup=10, seed=8, progress=lines.append))
    summary = "\n".join(lines) + f"\n{report}"
    assert verdict(report, tolerance=0.10) == [], summary
    assert report["connections"] > 200 and report["messages_verified"] > 2000, summary
    assert report["chaos"].get("origin restart", 0) >= 2 and report["chaos"].get("worker kill", 0) >= 2, summary
    assert report["worker_restarts"] >= 2, summary
