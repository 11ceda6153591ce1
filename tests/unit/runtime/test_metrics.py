"""Runtime metrics: names, and routing metrics derived from the router's cumulative statistics."""

from __future__ import annotations

import torch
from prometheus_client.parser import text_string_to_metric_families

from router_runtime.config import RouterConfig
from router_runtime.metrics import RuntimeMetrics
from router_runtime.router import DynamicRouter


def scrape(metrics: RuntimeMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples] for family in families}


def routed_metrics() -> tuple[DynamicRouter, RuntimeMetrics]:
    router = DynamicRouter(RouterConfig.model_validate({"inputDim": 8, "numExperts": 4, "maxExperts": 3}))
    router.route(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)))
    return router, RuntimeMetrics(router.cumulative.snapshot)


def test_experts_per_token_histogram_counts_every_routed_token() -> None:
    router, metrics = routed_metrics()
    samples = scrape(metrics)["moe_router_experts_per_token"]
    count = next(value for name, _, value in samples if name.endswith("_count"))
    total = next(value for name, _, value in samples if name.endswith("_sum"))
    assert count == 50
    assert total == router.cumulative.snapshot().mean_k * 50


def test_expert_utilization_is_a_share_per_expert() -> None:
    _, metrics = routed_metrics()
    samples = scrape(metrics)["moe_router_expert_utilization"]
    assert sorted(labels["expert"] for _, labels, _ in samples) == ["0", "1", "2", "3"]
    assert abs(sum(value for _, _, value in samples) - 1.0) < 1e-9


def test_load_cv_matches_the_cumulative_statistics() -> None:
    router, metrics = routed_metrics()
    (_, _, value), *_ = scrape(metrics)["moe_router_load_cv"]
    assert value == router.cumulative.snapshot().load_cv


def test_request_metrics_carry_the_documented_names_and_labels() -> None:
    _, metrics = routed_metrics()
    metrics.requests.labels("200").inc()
    metrics.errors.labels("bad_request").inc()
    metrics.tokens.inc(5)
    metrics.batch_tokens.observe(5)
    metrics.request_duration.observe(0.01)
    names = set(scrape(metrics))
    assert {
        "moe_router_requests",
        "moe_router_errors",
        "moe_router_tokens",
        "moe_router_batch_tokens",
        "moe_router_request_duration_seconds",
    } <= names


def test_a_routed_batch_is_counted_once_with_its_size() -> None:
    router, metrics = routed_metrics()
    result = router.route(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)))
    metrics.observe_batch(30, result.stats)
    samples = scrape(metrics)
    assert ("moe_router_tokens_total", {}, 30.0) in samples["moe_router_tokens"]
    count = next(value for name, _, value in samples["moe_router_batch_tokens"] if name.endswith("_count"))
    assert count == 1
