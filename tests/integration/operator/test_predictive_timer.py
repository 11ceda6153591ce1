"""The predictive timer's wiring in the real operator: Secrets, PredictionReady, the HPA floor."""

from __future__ import annotations

import pytest

from moe_operator.scaling.prometheus import UNAVAILABLE
from tests.integration.operator.harness import cluster, eventually, example_router

pytestmark = pytest.mark.timeout(90)


def predictive_router(**prometheus: object) -> dict:
    body = example_router()
    body["spec"]["autoscaling"]["predictive"] = {
        "mode": "Active",
        "prometheus": {"url": "http://127.0.0.1:9", "timeoutSeconds": 1, **prometheus},
        "capacityPerReplica": 20,
        "intervalSeconds": 10,
    }
    return body


async def test_an_unreachable_prometheus_is_reported_and_the_floor_stays_at_min_replicas(tmp_path):
    async with cluster(tmp_path) as k8s:
        await k8s.apply_router(predictive_router())
        condition = await eventually(lambda: k8s.condition("demo-router", "PredictionReady"),
                                     message="PredictionReady is reported")
        assert condition["status"] == "False" and condition["reason"] == UNAVAILABLE
        assert k8s.router()["status"]["prediction"]["appliedMinReplicas"] == 2
        hpa = await eventually(lambda: k8s.get("autoscaling", "v2", "horizontalpodautoscalers", "demo-router"),
                               message="the HPA")
        assert hpa["spec"]["minReplicas"] == 2


async def test_a_missing_prometheus_token_secret_is_named_in_a_warning(tmp_path):
    async with cluster(tmp_path) as k8s:
        await k8s.apply_router(predictive_router(bearerTokenSecretRef={"name": "prom-token", "key": "token"}))
        condition = await eventually(
            lambda: (k8s.condition("demo-router", "PredictionReady") or {}).get("reason") == "SecretNotFound"
            and k8s.condition("demo-router", "PredictionReady"),
            message="PredictionReady=False SecretNotFound",
        )
        assert "prom-token" in condition["message"]
        await eventually(
            lambda: [e for e in k8s.sandbox.items("", "v1", "events", "default")
                     if e.get("type") == "Warning" and e.get("reason") == "SecretNotFound"],
            message="a Warning event",
        )


async def test_predictive_mode_off_runs_no_timer(tmp_path):
    async with cluster(tmp_path) as k8s:
        await k8s.apply_router(example_router())
        await eventually(lambda: (k8s.condition("demo-router", "Ready") or {}).get("status") == "True",
                         message="Ready")
        assert k8s.condition("demo-router", "PredictionReady") is None
        assert "prediction" not in k8s.router()["status"]
