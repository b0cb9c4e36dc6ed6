"""Prometheus metrics of one server, in a CollectorRegistry of its own (never the global one).

Gauges mirror ``engine.stats()`` after every step; the bridge observes latencies and counts
finished requests. ``start_http`` serves ``/metrics`` in a daemon thread.
This module must not import jax or touch the engine.
"""

from __future__ import annotations

import threading
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: sub-millisecond decode steps up to multi-minute generations.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Every metric the server exports. Thread-safe (prometheus_client locks internally)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("xlaserve_requests", "Finished requests by finish reason "
                                "(stop, length, abort, error)", ["finish_reason"], registry=r)
        self.rejected = Counter("xlaserve_requests_rejected",
                                "Requests refused because the queue was full", registry=r)
        self.queue_depth = Gauge("xlaserve_queue_depth", "Requests waiting to be scheduled",
                                 registry=r)
        self.running = Gauge("xlaserve_running_sequences", "Sequences being generated",
                             registry=r)
        self.pages_total = Gauge("xlaserve_kv_pages_total", "KV cache pages", registry=r)
        self.pages_used = Gauge("xlaserve_kv_pages_used", "KV pages owned by requests",
                                registry=r)
        self.pages_cached = Gauge("xlaserve_kv_pages_cached",
                                  "Unowned KV pages kept for prefix reuse", registry=r)
        self.pages_free = Gauge("xlaserve_kv_pages_free", "Free KV pages", registry=r)
        self.prefix_hit_rate = Gauge("xlaserve_prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries since start", registry=r)
        self.preemptions = Counter("xlaserve_preemptions", "Requests preempted", registry=r)
        self.failed_steps = Counter("xlaserve_engine_step_failures",
                                    "Engine steps that raised (their requests were failed)",
                                    registry=r)
        self.compiles_after_warmup = Counter("xlaserve_compiles_after_warmup",
                                             "XLA compiles after warm-up (should be 0)",
                                             registry=r)
        self.step_time = Histogram("xlaserve_step_time_seconds", "Engine step wall time",
                                   buckets=_STEP_BUCKETS, registry=r)
        self.ttft = Histogram("xlaserve_time_to_first_token_seconds",
                              "Arrival to first generated token", buckets=_TOKEN_BUCKETS,
                              registry=r)
        self.itl = Histogram("xlaserve_inter_token_latency_seconds",
                             "Time between generated tokens", buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("xlaserve_e2e_latency_seconds", "Arrival to last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.generated_tokens = Counter("xlaserve_generated_tokens", "Tokens generated",
                                        registry=r)
        self._lock = threading.Lock()
        self._last_preemptions = 0
        self._last_compiles = 0

    def observe_stats(self, stats: Any) -> None:
        """Copies an EngineStats snapshot into the gauges (counters advance by the difference)."""
        self.queue_depth.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.pages_total.set(stats.num_pages_total)
        self.pages_used.set(stats.num_pages_used)
        self.pages_cached.set(stats.num_pages_cached)
        self.pages_free.set(stats.num_pages_free)
        queries = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / queries if queries else 0.0)
        with self._lock:
            if stats.num_preemptions > self._last_preemptions:
                self.preemptions.inc(stats.num_preemptions - self._last_preemptions)
                self._last_preemptions = stats.num_preemptions
            if stats.compiles_after_warmup > self._last_compiles:
                self.compiles_after_warmup.inc(stats.compiles_after_warmup - self._last_compiles)
                self._last_compiles = stats.compiles_after_warmup

    def render(self) -> str:
        """The text exposition format (what /metrics returns)."""
        return prometheus_client.generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's current value, e.g. ``value("xlaserve_kv_pages_used")``; for tests."""
        return self.registry.get_sample_value(name, labels)

    def start_http(self, host: str, port: int) -> tuple[Any, int]:
        """Serves /metrics on host:port (0: any free port). Returns (http server, bound port)."""
        httpd, _thread = prometheus_client.start_http_server(port, addr=host,
                                                             registry=self.registry)
        return httpd, int(httpd.server_port)
