"""Prometheus metrics of the runtime, on a registry per app (several apps can live in one process).

Request metrics are updated by the server (per request) and per routed batch; routing metrics are read
from the router's cumulative statistics at scrape time, so the hot path does no per-token Python work.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` is imported,
which ``router_runtime.workers`` does) every value lives in a per-process file in that directory and any
worker's ``/metrics`` shows the sums over all workers (prometheus_client's multiprocess mode). The
routing statistics are then published per batch as two internal counters (tokens per k, assignments
per expert) and turned back into the same public families at scrape time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from router_runtime.stats import RoutingStats, load_cv

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = tuple(float(2**i) for i in range(0, 21))
_K_TOKENS = "moe_router_internal_k_tokens"
_EXPERT_LOAD = "moe_router_internal_expert_load"

#: ``(k_counts [maxExperts + 1], expert_load [E])``: tokens per k and assignments per expert since start.
RoutingTotals = Callable[[], tuple[np.ndarray, np.ndarray]]


def routing_families(k_counts: np.ndarray, expert_load: np.ndarray) -> Iterator[Metric]:
    """``moe_router_experts_per_token``, ``moe_router_expert_utilization``, ``moe_router_load_cv``."""
    counts = k_counts.tolist()
    cumulative = 0.0
    buckets: list[tuple[str, float]] = []
    for k, count in enumerate(counts):
        cumulative += count
        buckets.append((str(float(k)), float(cumulative)))
    buckets.append(("+Inf", float(cumulative)))
    yield HistogramMetricFamily(
        "moe_router_experts_per_token",
        "Number of experts each routed token was sent to.",
        buckets=buckets,
        sum_value=float(sum(k * c for k, c in enumerate(counts))),
    )
    utilization = GaugeMetricFamily(
        "moe_router_expert_utilization",
        "Share of all token-expert assignments that went to each expert since start (1/E when even).",
        labels=["expert"],
    )
    assignments = float(expert_load.sum())
    for expert, load in enumerate(expert_load.tolist()):
        utilization.add_metric([str(expert)], load / assignments if assignments else 0.0)
    yield utilization
    yield GaugeMetricFamily(
        "moe_router_load_cv",
        "Coefficient of variation of per-expert load since start (0 = perfectly even).",
        value=load_cv(expert_load),
    )


class RoutingCollector(Collector):
    """The routing families from this process's router (one worker)."""

    def __init__(self, snapshot: Callable[[], RoutingStats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        yield from routing_families(stats.k_counts, stats.expert_load)


class MultiprocessCollector(Collector):
    """Every worker's metrics summed from ``path``; the internal routing counters become the public families."""

    def __init__(self, path: str, num_experts: int, max_experts: int) -> None:
        self._inner = MultiProcessCollector(None, path=path)
        self._num_experts = num_experts
        self._max_experts = max_experts

    def collect(self) -> Iterator[Metric]:
        k_counts = np.zeros(self._max_experts + 1)
        expert_load = np.zeros(self._num_experts)
        for family in self._inner.collect():
            if family.name in (_K_TOKENS, _EXPERT_LOAD):
                target, label = (k_counts, "k") if family.name == _K_TOKENS else (expert_load, "expert")
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        target[int(sample.labels[label])] += sample.value
            else:
                yield family
        yield from routing_families(k_counts, expert_load)


class RuntimeMetrics:
    """All runtime metrics, registered on their own registry (or, across workers, in shared files)."""

    def __init__(
        self, snapshot: Callable[[], RoutingStats], *, num_experts: int | None = None, max_experts: int | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        if self.multiprocess_dir is not None and (num_experts is None or max_experts is None):
            raise ValueError("multiprocess metrics need num_experts and max_experts")
        # In multiprocess mode the values are read back from the files, so nothing is registered twice.
        own = None if self.multiprocess_dir else self.registry
        self.requests = Counter(
            "moe_router_requests", "Inference requests by HTTP status code.", ["code"], registry=own
        )
        self.request_duration = Histogram(
            "moe_router_request_duration_seconds",
            "Inference request latency, body read to response encoded.",
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.errors = Counter("moe_router_errors", "Failed inference requests by reason.", ["reason"], registry=own)
        self.tokens = Counter("moe_router_tokens", "Tokens routed.", registry=own)
        self.inflight = Gauge(
            "moe_router_inflight_requests",
            "Inference requests being handled right now.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.batch_tokens = Histogram(
            "moe_router_batch_tokens",
            "Tokens per routed batch (dynamic batching across requests).",
            buckets=_BATCH_BUCKETS,
            registry=own,
        )
        if self.multiprocess_dir is None:
            self._k_tokens: list[Counter] = []
            self._expert_load: list[Counter] = []
            self.registry.register(RoutingCollector(snapshot))
        else:
            assert num_experts is not None and max_experts is not None
            k_family = Counter(_K_TOKENS, "Routed tokens per expert count (internal).", ["k"], registry=None)
            load_family = Counter(_EXPERT_LOAD, "Assignments per expert (internal).", ["expert"], registry=None)
            self._k_tokens = [k_family.labels(str(k)) for k in range(max_experts + 1)]
            self._expert_load = [load_family.labels(str(e)) for e in range(num_experts)]
            self.registry.register(MultiprocessCollector(self.multiprocess_dir, num_experts, max_experts))

    def observe_batch(self, tokens: int, stats: RoutingStats) -> None:
        """Once per routed batch (on the worker thread): batch size, tokens and, across workers, routing totals."""
        self.batch_tokens.observe(tokens)
        self.tokens.inc(tokens)
        if self._k_tokens:
            for child, count in zip(self._k_tokens, stats.k_counts.tolist(), strict=False):
                if count:
                    child.inc(count)
            for child, load in zip(self._expert_load, stats.expert_load.tolist(), strict=False):
                if load:
                    child.inc(load)

    def render(self) -> bytes:
        return generate_latest(self.registry)
