"""reconcile() itself against the API sandbox, through the real Kubernetes client (no kopf)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from moe_operator.kube import MOEROUTERS, Kube
from moe_operator.reconcile import reconcile
from moe_operator.sandbox import Running, serve
from tests.integration.operator.harness import example_router


@pytest.fixture
async def sandbox(tmp_path, monkeypatch) -> AsyncIterator[tuple[Running, Kube]]:
    async with serve(tmp_path / "kubeconfig", ready_delay=0.05) as running:
        monkeypatch.setenv("KUBECONFIG", str(running.kubeconfig_path))
        kube = Kube.from_environment()
        try:
            yield running, kube
        finally:
            kube.close()


async def created_router(running: Running, kube: Kube, spec_patch: dict[str, Any] | None = None) -> dict:
    body = example_router("r")
    body["spec"].update(spec_patch or {})
    await kube.apply(MOEROUTERS, body)
    router = await kube.get(MOEROUTERS, "default", "r")
    assert router is not None
    return router


async def test_reconciling_a_settled_router_sends_no_writes(sandbox):
    running, kube = sandbox
    router = await created_router(running, kube)
    first = await reconcile(kube, router, trigger="test")
    assert len(first.applied) == 6 and first.status_written
    await running.sandbox.settle()
    became_ready = await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    assert became_ready.applied == [] and became_ready.status_written
    mark = len(running.sandbox.log)
    settled = await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    assert settled.writes == 0
    assert [call for call in running.sandbox.log[mark:] if call.is_write] == []


async def test_a_foreign_object_with_a_child_name_is_not_taken_over(sandbox):
    running, kube = sandbox
    running.sandbox.seed("", "v1", "services", {"metadata": {"name": "r", "namespace": "default"}, "spec": {}})
    outcome = await reconcile(kube, await created_router(running, kube), trigger="test")
    assert outcome.problem is not None and outcome.problem.reason == "ChildConflict"
    assert "Service/r" not in outcome.applied
    assert running.sandbox.object_of("", "v1", "services", "default", "r")["spec"] == {}


async def test_the_predictive_floor_in_status_raises_the_hpa_min_replicas(sandbox):
    running, kube = sandbox
    router = await created_router(running, kube)
    router["spec"]["autoscaling"]["predictive"] = {
        "mode": "Active", "prometheus": {"url": "http://prometheus:9090"}, "capacityPerReplica": 10,
    }
    router["status"] = {"prediction": {"appliedMinReplicas": 5}}
    await reconcile(kube, router, trigger="test")
    hpa = running.sandbox.object_of("autoscaling", "v2", "horizontalpodautoscalers", "default", "r")
    assert hpa["spec"]["minReplicas"] == 5


async def test_an_invalid_spec_applies_nothing_and_says_why(sandbox):
    running, kube = sandbox
    router = await created_router(running, kube, {"router": {"numExperts": 4, "minExperts": 3, "maxExperts": 2}})
    outcome = await reconcile(kube, router, trigger="test")
    assert outcome.invalid_spec and outcome.applied == []
    assert outcome.problem is not None and "spec.router" in outcome.problem.message
    degraded = next(c for c in (await kube.get(MOEROUTERS, "default", "r"))["status"]["conditions"]
                    if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"


async def test_a_missing_secret_key_is_named(sandbox):
    running, kube = sandbox
    running.sandbox.seed("", "v1", "secrets", {
        "metadata": {"name": "k", "namespace": "default"}, "data": {"other": base64.b64encode(b"x").decode()},
    })
    router = await created_router(running, kube)
    router["spec"]["runtime"]["apiKeySecretRef"] = {"name": "k", "key": "token"}
    outcome = await reconcile(kube, router, trigger="test")
    assert outcome.problem is not None and outcome.problem.reason == "SecretKeyNotFound"
    assert "'token'" in outcome.problem.message and outcome.applied == []


def test_the_kubeconfig_env_is_what_the_client_reads(sandbox):
    running, _ = sandbox
    assert os.environ["KUBECONFIG"] == str(running.kubeconfig_path)


async def test_kinds_the_operator_may_not_read_are_skipped_after_the_first_refusal(sandbox, monkeypatch):
    from moe_operator import reconcile as reconcile_module

    monkeypatch.setattr(reconcile_module, "_unreadable_kinds", set())
    running, kube = sandbox
    running.sandbox.forbidden.update({"servicemonitors", "prometheusrules"})
    first = await reconcile(kube, await created_router(running, kube), trigger="test")
    assert first.problem is None and len(first.applied) == 6
    mark = len(running.sandbox.log)
    again = await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    assert again.problem is None
    assert [call for call in running.sandbox.log[mark:] if call.group == "monitoring.coreos.com"] == []
