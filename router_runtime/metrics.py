"""Prometheus metrics of the runtime, on a registry per app (several apps can live in one process).

Request metrics are updated by the server; routing metrics are read from the router's cumulative
statistics at scrape time, so the hot path does no per-token Python work for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from router_runtime.stats import RoutingStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = tuple(float(2**i) for i in range(0, 21))


class RoutingCollector(Collector):
    """``moe_router_experts_per_token``, ``moe_router_expert_utilization``, ``moe_router_load_cv``."""

    def __init__(self, snapshot: Callable[[], RoutingStats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        counts = stats.k_counts
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for k, count in enumerate(counts.tolist()):
            cumulative += count
            buckets.append((str(float(k)), float(cumulative)))
        buckets.append(("+Inf", float(cumulative)))
        total_k = float(sum(k * c for k, c in enumerate(counts.tolist())))
        yield HistogramMetricFamily(
            "moe_router_experts_per_token",
            "Number of experts each routed token was sent to.",
            buckets=buckets,
            sum_value=total_k,
        )
        utilization = GaugeMetricFamily(
            "moe_router_expert_utilization",
            "Share of all token-expert assignments that went to each expert since start (1/E when even).",
            labels=["expert"],
        )
        assignments = float(stats.expert_load.sum())
        for expert, load in enumerate(stats.expert_load.tolist()):
            utilization.add_metric([str(expert)], load / assignments if assignments else 0.0)
        yield utilization
        yield GaugeMetricFamily(
            "moe_router_load_cv",
            "Coefficient of variation of per-expert load since start (0 = perfectly even).",
            value=stats.load_cv,
        )


class RuntimeMetrics:
    """All runtime metrics, registered on their own registry."""

    def __init__(self, snapshot: Callable[[], RoutingStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "moe_router_requests", "Inference requests by HTTP status code.", ["code"], registry=self.registry
        )
        self.request_duration = Histogram(
            "moe_router_request_duration_seconds",
            "Inference request latency, body read to response encoded.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "moe_router_errors", "Failed inference requests by reason.", ["reason"], registry=self.registry
        )
        self.tokens = Counter("moe_router_tokens", "Tokens routed.", registry=self.registry)
        self.inflight = Gauge(
            "moe_router_inflight_requests", "Inference requests being handled right now.", registry=self.registry
        )
        self.batch_tokens = Histogram(
            "moe_router_batch_tokens",
            "Tokens per routed batch (dynamic batching across requests).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(RoutingCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
