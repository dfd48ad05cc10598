"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Request-level series are observed by the HTTP layer as requests end; the scheduler's and
the store's counters are read at scrape time from ``gauges()`` (a dict name -> value).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .jobs import Done, prompt_usage

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The server's series. ``gauges``: called at each scrape, e.g. the store's hits."""

    def __init__(self, gauges: Callable[[], Mapping[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("spanctx_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.prompt_tokens = Counter("spanctx_prompt_tokens", "prompt tokens by where their KV came from",
                                     ["source"], registry=self.registry)
        self.generated = Counter("spanctx_generated_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("spanctx_ttft_seconds", "submission to the scheduler to the first token (queue included)",
                              buckets=_LATENCY, registry=self.registry)
        self.per_token = Histogram("spanctx_time_per_output_token_seconds",
                                   "time per generated token after the first", buckets=_LATENCY,
                                   registry=self.registry)
        self.registry.register(_Gauges(gauges))

    def observe(self, endpoint: str, dones: Sequence[Done], total: float) -> None:
        """Count a finished request from its choices' ``Done``s (one prompt, computed once);
        ``total``: its time in the server, arrival to end. Its outcome: the first choice's
        finish reason, or the first error or cancellation among them."""
        reasons = [d.finish_reason for d in dones]
        outcome = next((r for r in reasons if r in ("error", "cancelled")), reasons[0])
        self.requests.labels(endpoint, outcome).inc()
        prompt, cached = prompt_usage(dones)
        self.prompt_tokens.labels("cached").inc(cached)
        self.prompt_tokens.labels("computed").inc(prompt - cached)
        for done in dones:
            self.generated.inc(done.completion_tokens)
            if done.ttft_s is not None:
                self.ttft.observe(done.ttft_s)
                if done.completion_tokens > 1:
                    self.per_token.observe(max(0.0, total - done.ttft_s) / (done.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges:
    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self.read = read

    def collect(self):
        for name, value in self.read().items():
            yield GaugeMetricFamily(f"spanctx_{name}", name.replace("_", " "), value=float(value))
