"""Prometheus metrics of one server (``GET /metrics``), in its own registry.

Gauges and counters are read from the engine and the store when scraped; latencies
are observed as each request closes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .request import Request

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    """Values the engine and the store keep anyway, read at scrape time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.last = (time.monotonic(), engine.tokens_generated)

    def collect(self):
        engine, store = self.engine, self.engine.store
        now, tokens = time.monotonic(), engine.tokens_generated
        then, before = self.last
        if now - then >= 1.0:  # the rate since the previous scrape (at least a second)
            self.last = (now, tokens)
        yield GaugeMetricFamily("lorakit_requests_running", "Requests decoding now.", value=len(engine.rows))
        yield GaugeMetricFamily("lorakit_requests_waiting", "Requests queued for the batch.",
                                value=engine.waiting.qsize() + len(engine.admitting))
        yield CounterMetricFamily("lorakit_generation_tokens", "Tokens generated.", value=tokens)
        yield GaugeMetricFamily("lorakit_generation_tokens_per_second", "Tokens generated per second since the "
                                "previous scrape.", value=(tokens - before) / max(now - then, 1e-9))
        yield GaugeMetricFamily("lorakit_adapters_loaded", "Adapters in slots.", value=len(store.loaded))
        yield CounterMetricFamily("lorakit_adapter_loads", "Adapters read into a slot.", value=store.loads)
        yield CounterMetricFamily("lorakit_adapter_evictions", "Adapters taken out of a slot.",
                                  value=store.evictions)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.requests = Counter("lorakit_requests", "Finished requests (choices) by adapter and finish reason.",
                                ["adapter", "finish_reason"], registry=self.registry)
        self.first_token = Histogram("lorakit_time_to_first_token_seconds", "From arrival to the first token.",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram("lorakit_time_per_output_token_seconds", "Mean time between output tokens "
                                   "of a request.", buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, request: Request) -> None:
        self.requests.labels(request.adapter or "", request.finish_reason or "unknown").inc()
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.arrived)
            if len(request.generated) > 1:
                self.per_token.observe((time.perf_counter() - request.first_token_at) / (len(request.generated) - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
