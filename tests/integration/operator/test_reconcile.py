"""reconcile() itself against the API sandbox, through the real Kubernetes client (no kopf)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from moe_operator.api import parse_spec
from moe_operator.children import Owner, desired_config_map
from moe_operator.kube import MOEROUTERS, Kube
from moe_operator.reconcile import forget as reconcile_forget
from moe_operator.reconcile import reconcile, refresh_from_child
from moe_operator.sandbox import Running
from tests.integration.operator.harness import example_router, sandbox_with_client


@pytest.fixture
async def sandbox(tmp_path, monkeypatch) -> AsyncIterator[tuple[Running, Kube]]:
    async with sandbox_with_client(tmp_path / "kubeconfig", monkeypatch, ready_delay=0.05) as pair:
        yield pair


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


async def test_children_the_spec_does_not_want_are_looked_for_once_then_again_when_it_wants_them(sandbox):
    running, kube = sandbox
    await reconcile(kube, await created_router(running, kube), trigger="test")
    mark = len(running.sandbox.log)
    await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    looked_up = {call.resource for call in running.sandbox.log[mark:] if call.verb == "get"}
    assert {"servicemonitors", "prometheusrules"}.isdisjoint(looked_up), looked_up
    # Wanted again, then not: the HPA is made, then pruned (and not looked for after that).
    for enabled in (False, True, False):
        router = await kube.get(MOEROUTERS, "default", "r")
        assert router is not None
        router["spec"]["autoscaling"]["enabled"] = enabled
        outcome = await reconcile(kube, router, trigger="test")
        hpa = running.sandbox.object_of("autoscaling", "v2", "horizontalpodautoscalers", "default", "r")
        assert (hpa is not None) == enabled, outcome
    mark = len(running.sandbox.log)
    await reconcile(kube, router, trigger="test")
    assert "horizontalpodautoscalers" not in {call.resource for call in running.sandbox.log[mark:]}


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


async def test_the_degraded_condition_is_exported_for_the_alert_and_cleared_when_fixed(sandbox):
    running, kube = sandbox

    def degraded(reason: str) -> float | None:
        labels = {"namespace": "default", "moerouter": "r", "condition": "Degraded", "reason": reason}
        return REGISTRY.get_sample_value("moe_operator_router_condition", labels)

    router = await created_router(running, kube, {"router": {"numExperts": 4, "minExperts": 3, "maxExperts": 2}})
    await reconcile(kube, router, trigger="test")
    assert degraded("InvalidSpec") == 1.0  # MoERouterDegraded fires on this after 15 minutes
    fixed = await kube.get(MOEROUTERS, "default", "r")
    assert fixed is not None
    fixed["spec"]["router"] = {"numExperts": 4, "minExperts": 1, "maxExperts": 2}
    await kube.apply(MOEROUTERS, {key: fixed[key] for key in ("apiVersion", "kind", "metadata", "spec")})
    await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    assert degraded("InvalidSpec") is None  # one series per condition: the old reason's is gone
    assert degraded("ReconcileSucceeded") == 0.0
    reconcile_forget("default", "r")
    assert degraded("ReconcileSucceeded") is None


async def reconciled_with_api_key_secret(sandbox: tuple[Running, Kube], data: dict[str, bytes]) -> Any:
    """Reconcile router ``r`` whose runtime.apiKeySecretRef is key ``token`` of Secret ``k`` holding ``data``."""
    running, kube = sandbox
    encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
    running.sandbox.seed("", "v1", "secrets", {"metadata": {"name": "k", "namespace": "default"}, "data": encoded})
    router = await created_router(running, kube)
    router["spec"]["runtime"]["apiKeySecretRef"] = {"name": "k", "key": "token"}
    return await reconcile(kube, router, trigger="test")


async def test_a_missing_secret_key_is_named(sandbox):
    outcome = await reconciled_with_api_key_secret(sandbox, {"other": b"x"})
    assert outcome.problem is not None and outcome.problem.reason == "SecretKeyNotFound"
    assert "'token'" in outcome.problem.message and outcome.applied == []


async def test_a_binary_key_beside_the_referenced_one_does_not_matter(sandbox):
    outcome = await reconciled_with_api_key_secret(sandbox, {"token": b"s3cret", "keystore.p12": b"\x80\xff"})
    assert outcome.problem is None and len(outcome.applied) == 6


async def test_a_referenced_key_that_is_not_text_is_named(sandbox):
    outcome = await reconciled_with_api_key_secret(sandbox, {"token": b"\x80\xff"})
    assert outcome.problem is not None and outcome.problem.reason == "SecretKeyInvalid"
    assert outcome.problem.message == "spec.runtime.apiKeySecretRef: key 'token' of Secret default/k is not UTF-8 text"
    assert outcome.applied == []


async def test_a_problem_a_child_event_finds_first_is_reported_with_its_router(sandbox):
    # A spec edit races its own rollout: the Deployment's event can reconcile the new spec before the
    # MoERouter's update handler does. That handler then finds the problem already in the status, so the
    # Warning event has to come from the child's path.
    running, kube = sandbox
    await reconcile(kube, await created_router(running, kube), trigger="test")
    await running.sandbox.settle()
    router = await kube.get(MOEROUTERS, "default", "r")
    assert router is not None
    router["spec"]["runtime"]["apiKeySecretRef"] = {"name": "missing", "key": "token"}
    await kube.apply(MOEROUTERS, {key: router[key] for key in ("apiVersion", "kind", "metadata", "spec")})
    deployment = running.sandbox.object_of("apps", "v1", "deployments", "default", "r")
    outcome = await refresh_from_child(kube, deployment, deleted=False)
    assert outcome is not None and outcome.problem is not None and outcome.problem.reason == "SecretNotFound"
    assert outcome.new_problem and outcome.router is not None and outcome.router["metadata"]["name"] == "r"
    again = await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="update")
    assert again.problem is not None and not again.new_problem  # reported once


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


async def test_monitoring_children_the_operator_may_not_manage_degrade_but_the_rest_is_applied(sandbox):
    running, kube = sandbox
    running.sandbox.forbidden.add("servicemonitors")
    outcome = await reconcile(
        kube, await created_router(running, kube, {"monitoring": {"serviceMonitor": True}}), trigger="test"
    )
    assert outcome.problem is not None and outcome.problem.reason == "MonitoringNotPermitted"
    assert "rbac.monitoringChildren" in outcome.problem.message and outcome.new_problem
    assert len(outcome.applied) == 6 and outcome.status_written
    degraded = next(c for c in (await kube.get(MOEROUTERS, "default", "r"))["status"]["conditions"]
                    if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "MonitoringNotPermitted"


async def test_a_quota_refusal_of_a_child_is_an_apply_rejection_not_a_permission_problem(sandbox, monkeypatch):
    from moe_operator.kube import KubeError

    running, kube = sandbox
    original = kube.apply

    async def quota_exceeded(resource, obj):
        if obj["kind"] == "PodDisruptionBudget":
            raise KubeError(403, "Forbidden", 'poddisruptionbudgets "r" is forbidden: exceeded quota: q')
        return await original(resource, obj)

    monkeypatch.setattr(kube, "apply", quota_exceeded)
    outcome = await reconcile(kube, await created_router(running, kube), trigger="test")
    assert outcome.problem is not None and outcome.problem.reason == "ApplyRejected"
    assert "exceeded quota" in outcome.problem.message


async def test_a_missing_prometheus_credential_secret_does_not_hold_back_the_children(sandbox):
    running, kube = sandbox
    router = await created_router(running, kube, {"autoscaling": {"enabled": True, "predictive": {
        "mode": "ForecastOnly", "capacityPerReplica": 10,
        "prometheus": {"url": "http://prometheus:9090", "bearerTokenSecretRef": {"name": "prom-token", "key": "t"}},
    }}})
    outcome = await reconcile(kube, router, trigger="test")
    assert outcome.problem is None
    assert running.sandbox.object_of("apps", "v1", "deployments", "default", "r") is not None


async def test_a_deployment_is_not_applied_while_its_configmap_belongs_to_someone_else(sandbox):
    running, kube = sandbox
    router = example_router("r")
    name = desired_config_map(Owner.from_body(router), parse_spec(router["spec"]))["metadata"]["name"]
    running.sandbox.seed("", "v1", "configmaps", {
        "metadata": {"name": name, "namespace": "default"}, "data": {"router.yaml": "router: {}\n"},
    })
    outcome = await reconcile(kube, await created_router(running, kube), trigger="test")
    assert outcome.problem is not None and outcome.problem.reason == "ChildConflict"
    assert f"ConfigMap default/{name}" in outcome.problem.message
    assert running.sandbox.object_of("apps", "v1", "deployments", "default", "r") is None
    assert "Service/r" in outcome.applied


async def test_predictive_mode_off_removes_the_prediction_from_the_status(sandbox):
    running, kube = sandbox
    await created_router(running, kube)
    await kube.patch_status(MOEROUTERS, "default", "r", {"prediction": {"predictedLoad": 123.0}})
    await reconcile(kube, await kube.get(MOEROUTERS, "default", "r"), trigger="test")
    assert "prediction" not in (await kube.get(MOEROUTERS, "default", "r"))["status"]


def count_handovers(kube: Kube, monkeypatch) -> list[str]:
    """Record the field manager of every apply the reconciler sends."""
    managers: list[str] = []
    original = kube.apply

    async def recording(resource, obj, **options):
        managers.append(options.get("field_manager", "moe-router-operator"))
        return await original(resource, obj, **options)

    monkeypatch.setattr(kube, "apply", recording)
    return managers


async def test_turning_autoscaling_on_keeps_the_running_replicas_until_the_hpa_acts(sandbox, monkeypatch):
    running, kube = sandbox
    fixed = {"replicas": 5, "autoscaling": {"enabled": False, "minReplicas": 2, "maxReplicas": 10}}
    await reconcile(kube, await created_router(running, kube, fixed), trigger="test")
    assert running.sandbox.object_of("apps", "v1", "deployments", "default", "r")["spec"]["replicas"] == 5
    managers = count_handovers(kube, monkeypatch)
    scaled = {"replicas": 5, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 10}}
    await reconcile(kube, await created_router(running, kube, scaled), trigger="test")
    assert running.sandbox.object_of("apps", "v1", "deployments", "default", "r")["spec"]["replicas"] == 5
    await reconcile(kube, await created_router(running, kube, {**scaled, "runtime": {"port": 9000}}), trigger="test")
    assert managers.count("moe-router-operator-handover") == 1


async def test_a_router_born_autoscaled_needs_no_replicas_handover(sandbox, monkeypatch):
    running, kube = sandbox
    managers = count_handovers(kube, monkeypatch)
    await reconcile(kube, await created_router(running, kube), trigger="test")  # the example autoscales
    await reconcile(kube, await created_router(running, kube, {"runtime": {"port": 9000}}), trigger="test")
    assert "moe-router-operator-handover" not in managers
