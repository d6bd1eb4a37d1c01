"""Prometheus metrics of the serving path (names ``streamrec_serve_<what>_<unit>``).

Each Serve replica is its own process with its own registry; ``/metrics`` shows the replica that
answered, and in a cluster Prometheus scrapes every replica (the chart's PodMonitor) and sums.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("streamrec_serve_requests_total", "HTTP requests by route, source and status",
                                ["route", "source", "status"], registry=self.registry)
        self.latency = Histogram("streamrec_serve_request_latency_seconds", "request latency by route and source",
                                 ["route", "source"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cache = Counter("streamrec_serve_cache_lookups_total",
                             "Redis answer-cache lookups: hit, stale (served and refreshed), miss, outdated "
                             "(a newer click), error; hit ratio = (hit + stale) / all",
                             ["result"], registry=self.registry)
        self.fallbacks = Counter("streamrec_serve_fallbacks_total",
                                 "a step of the request path skipped, by step and reason "
                                 "(timeout, error, circuit_open, not_found, no_model)",
                                 ["step", "reason"], registry=self.registry)
        self.late = Counter("streamrec_serve_late_answers_total",
                            "dependency answers used although the step's timer fired first: the answer had "
                            "arrived, the replica's busy event loop ran the timer before it (see chain._step)",
                            ["step"], registry=self.registry)
        self.coalesced = Counter("streamrec_serve_coalesced_total",
                                 "requests that waited for a computation already running for the same key",
                                 registry=self.registry)
