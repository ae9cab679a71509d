"""The server's Prometheus metrics (``/metrics``), kept with prometheus_client in a registry of the server's own.

Requests running and waiting, slots, retrieval pages in use and free, KV cache bytes allocated and in use (a
slot's streaming row and a page have fixed sizes: serve/memory.py), preemptions,
generated tokens (a counter; Prometheus' ``rate()`` gives tokens/s) and the generation rate over the last few
seconds, requests ended by reason, and histograms of the time to first token, the inter-token latency and the
whole request's latency, all measured on the server from a request's arrival.
"""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_RATE_WINDOW = 10.0  # seconds over which tokens_per_second is measured


class Metrics:
    """What ``/metrics`` shows; ``counts`` is called at each scrape for (running, waiting, pages used,
    preemptions); ``plan`` is the server's ``memory.KVPlan``."""

    def __init__(self, counts, plan):
        self.registry = CollectorRegistry()
        self._counts = counts
        self._lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        r = self.registry
        Gauge("duo_requests_running", "requests holding a slot", registry=r).set_function(lambda: counts()[0])
        Gauge("duo_requests_waiting", "requests waiting for a slot", registry=r).set_function(lambda: counts()[1])
        Gauge("duo_slots", "streaming cache rows (slots) of the engine", registry=r).set(plan.slots)
        Gauge("duo_kv_pages", "retrieval KV pages in the pool", registry=r).set(plan.pages)
        Gauge("duo_kv_page_size", "positions per retrieval KV page", registry=r).set(plan.page_size)
        Gauge("duo_kv_pages_used", "retrieval KV pages held by running requests",
              registry=r).set_function(lambda: counts()[2])
        Gauge("duo_kv_pages_free", "retrieval KV pages free",
              registry=r).set_function(lambda: plan.pages - counts()[2])
        Gauge("duo_kv_cache_bytes", "KV cache bytes allocated (streaming rows and retrieval pages)",
              registry=r).set(plan.kv_bytes)
        Gauge("duo_kv_cache_used_bytes", "KV cache bytes of the slots and pages in use",
              registry=r).set_function(lambda: counts()[0] * plan.row_bytes + counts()[2] * plan.page_bytes)
        Gauge("duo_kv_cache_usage_ratio", "fraction of the retrieval pages in use",
              registry=r).set_function(lambda: counts()[2] / plan.pages)
        Gauge("duo_preemptions", "requests preempted (pages given back, recomputed later) since the start",
              registry=r).set_function(lambda: counts()[3])
        Gauge("duo_generation_tokens_per_second", f"tokens generated per second over the last {_RATE_WINDOW:g} s",
              registry=r).set_function(self._rate)
        self.tokens = Counter("duo_generation_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("duo_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.finished = Counter("duo_requests_finished", "requests ended, by reason", ["reason"], registry=r)
        self.refused = Counter("duo_requests_refused", "requests refused, by HTTP status", ["status"], registry=r)
        self.ttft = Histogram("duo_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("duo_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("duo_request_latency_seconds", "arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def token(self, count: int = 1) -> None:
        self.tokens.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / _RATE_WINDOW

    def text(self) -> bytes:
        return generate_latest(self.registry)
