"""The operator's own predictive-scaling metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moe_operator.scaling.metrics import ScalingMetrics, server_label


def test_metrics_expose_prediction_recommendation_error_latency_and_failures() -> None:
    registry = CollectorRegistry()
    metrics = ScalingMetrics(registry)
    metrics.predicted_load.labels("ns", "r").set(12.5)
    metrics.recommended_replicas.labels("ns", "r").set(4)
    metrics.backtest_error.labels("ns", "r").set(0.1)
    metrics.query_seconds.labels("http://prometheus:9090").observe(0.02)
    metrics.query_failures.labels("ns", "r", "PrometheusUnavailable").inc()
    assert registry.get_sample_value("moe_operator_predicted_load", {"namespace": "ns", "moerouter": "r"}) == 12.5
    assert registry.get_sample_value(
        "moe_operator_prometheus_query_failures_total",
        {"namespace": "ns", "moerouter": "r", "reason": "PrometheusUnavailable"},
    ) == 1
    assert b"moe_operator_prometheus_query_duration_seconds_bucket" in generate_latest(registry)


def test_forget_drops_every_series_of_a_deleted_router() -> None:
    registry = CollectorRegistry()
    metrics = ScalingMetrics(registry)
    for name in ("gone", "kept"):
        metrics.predicted_load.labels("ns", name).set(1)
        metrics.query_failures.labels("ns", name, "QueryFailed").inc()
    metrics.forget("ns", "gone")
    text = generate_latest(registry).decode()
    assert 'moerouter="gone"' not in text
    assert 'moerouter="kept"' in text


def test_forget_floor_drops_only_the_held_floor() -> None:
    registry = CollectorRegistry()
    metrics = ScalingMetrics(registry)
    metrics.applied_min_replicas.labels("ns", "r").set(6)
    metrics.backtest_error.labels("ns", "r").set(0.7)
    metrics.forget_floor("ns", "r")
    metrics.forget_floor("ns", "never-seen")  # nothing to drop is no error
    labels = {"namespace": "ns", "moerouter": "r"}
    assert registry.get_sample_value("moe_operator_applied_min_replicas", labels) is None
    assert registry.get_sample_value("moe_operator_backtest_error", labels) == 0.7


@pytest.mark.parametrize(("url", "label"), [
    ("http://prometheus.monitoring:9090", "http://prometheus.monitoring:9090"),
    ("https://user:secret@thanos.example.com/api/prom?tenant=a", "https://thanos.example.com"),
    ("http://[::1]:9090/", "http://[::1]:9090"),
])
def test_query_latency_is_labelled_by_the_server_without_credentials_or_path(url: str, label: str) -> None:
    assert server_label(url) == label
