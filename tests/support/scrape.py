"""The suite's one ``/metrics`` scraper (and the other endpoints of the
metrics listener): parsed with prometheus-client's own text parser."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def _url(where, path: str) -> str:
    """``where``: a Relay (its metrics_port), a port number, or a full URL."""
    if isinstance(where, str):
        return where if where.endswith(path) or path == "/metrics" and where.endswith("/metrics") else where + path
    port = where if isinstance(where, int) else where.metrics_port
    return f"http://127.0.0.1:{port}{path}"


def get(where, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the metrics listener; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(_url(where, path), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def text(where) -> str:
    """The /metrics exposition text."""
    status, body = get(where, "/metrics")
    assert status == 200, (status, body[:200])
    return body


def samples(where) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted label pairs) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text(where)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(where, name: str, **labels) -> float:
    """The sample with exactly these labels (0.0 when absent)."""
    return samples(where).get((name, tuple(sorted(labels.items()))), 0.0)


def metric(where, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``
    (over workers, outcomes, ...)."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples(where).items() if n == name and want <= set(lbl))
