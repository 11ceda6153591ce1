"""The operator's own metrics about predictive scaling (served on the operator's ``/metrics``).

Labelled by MoERouter ``namespace`` and ``moerouter`` (the labels the alerts and the dashboard group
by); ``forget`` drops a deleted MoERouter's series so routers coming and going do not leak label sets,
and the series of one whose forecast no longer runs, so no alert fires on a value nothing updates.
The query latency histogram is the exception: labelled by the Prometheus server queried (``prometheus``,
its scheme, host and port), since 13 series per MoERouter were most of the operator's /metrics at scale
(5,162 series at 200 routers) and what a slow query says is which server is slow.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("namespace", "moerouter")


def server_label(url: str) -> str:
    """``scheme://host[:port]`` of a Prometheus URL: no credentials, path or query in a label value."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


class ScalingMetrics:
    """The collectors, registered once per registry (the default one in the operator)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.predicted_load = Gauge(
            "moe_operator_predicted_load",
            "Upper-quantile forecast of the peak request rate over the horizon (requests/s).",
            LABELS, registry=registry,
        )
        self.recommended_replicas = Gauge(
            "moe_operator_recommended_replicas",
            "Replicas the forecast asks for, clamped to [minReplicas, maxReplicas].",
            LABELS, registry=registry,
        )
        self.applied_min_replicas = Gauge(
            "moe_operator_applied_min_replicas",
            "HPA minReplicas the predictive controller holds (Active mode).",
            LABELS, registry=registry,
        )
        self.backtest_error = Gauge(
            "moe_operator_backtest_error",
            "Pinball loss of the chosen forecaster in its rolling-origin backtest, relative to the mean load.",
            LABELS, registry=registry,
        )
        self.query_seconds = Histogram(
            "moe_operator_prometheus_query_duration_seconds",
            "Latency of the Prometheus range queries behind the forecasts, by the server queried.",
            ("prometheus",), registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.query_failures = Counter(
            "moe_operator_prometheus_query_failures_total",
            "Forecast ticks that got no usable history from Prometheus, by reason (a failed or empty query, or "
            "a missing or unusable credentials Secret: SecretNotFound, SecretKeyNotFound, SecretKeyInvalid).",
            (*LABELS, "reason"), registry=registry,
        )

    def forget_floor(self, namespace: str, name: str) -> None:
        """Drop one MoERouter's ``applied_min_replicas`` (its mode is not Active: no floor is held)."""
        with contextlib.suppress(KeyError):
            self.applied_min_replicas.remove(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of one MoERouter (call when it is deleted or its predictive mode goes Off)."""
        for gauge in (self.predicted_load, self.recommended_replicas, self.applied_min_replicas, self.backtest_error):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        for labels in list(self.query_failures._metrics):
            if labels[:2] == (namespace, name):
                self.query_failures.remove(*labels)


_default: ScalingMetrics | None = None


def scaling_metrics() -> ScalingMetrics:
    """The process-wide collectors on the default registry (created on first use)."""
    global _default
    if _default is None:
        _default = ScalingMetrics()
    return _default
