"""Prometheus metrics of one server, in a registry of its own (two apps in one process do not mix counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; a tiny model answers in milliseconds, a large one on CPU in seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.registry = r = CollectorRegistry()

        r.register(_EngineCollector(engine_stats))
        self.prompt_tokens = Counter("hilt_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("hilt_generation_tokens", "Tokens generated", registry=r)
        self.errors = Counter("hilt_http_errors", "Error responses, by status", ["status"], registry=r)
        self.ttft = Histogram(
            "hilt_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "hilt_time_per_output_token_seconds",
            "Between consecutive generated tokens of one request",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "hilt_request_latency_seconds",
            "From submission to the last token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Read from the engine's own counters at each scrape, so they count what the engine did (a request
    cancelled because its client left included), not what the HTTP side saw."""

    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats() or {"running": 0, "waiting": 0, "finished": {}}
        yield GaugeMetricFamily(
            "hilt_requests_running", "Requests decoding now (slots in use)", stats["running"]
        )
        yield GaugeMetricFamily("hilt_requests_waiting", "Requests queued for a slot", stats["waiting"])
        if stats.get("threads") is not None:
            yield GaugeMetricFamily(
                "hilt_decode_threads", "torch threads the decode thread runs with now", stats["threads"]
            )
        finished = CounterMetricFamily(
            "hilt_requests_finished",
            "Requests ended, by finish reason (cancelled: the client left, the request timed out, or shutdown)",
            labels=["finish_reason"],
        )
        for reason, count in stats["finished"].items():
            finished.add_metric([reason], count)
        yield finished
