"""Metrics: the layout of the per-worker counters kept in shared memory, the
Prometheus collector over them, and the supervisor's /metrics, /healthz and
/readyz endpoint. Imports nothing else of wsrelay's, so the data plane can
depend on it and not the other way round."""
