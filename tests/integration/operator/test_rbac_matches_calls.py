"""The Helm chart's RBAC against the API calls the real operator made in a full scenario run.

Every (group, resource, verb) the operator used must be granted by the chart's rules, and every rule
the chart grants must be used (or be listed below with the reason the scenario cannot exercise it).
"""

from __future__ import annotations

import asyncio
import base64

import helm_python as helm
import pytest
import yaml

from moe_operator.sandbox import Call
from tests.integration.operator.harness import REPO, TEST_AGENT, cluster, eventually, example_router

pytestmark = pytest.mark.timeout(120)

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

#: Granted but not exercised by the scenario here, with the reason.
NOT_EXERCISED: dict[Permission, str] = {
    ("", "events", "patch"): "kopf patches an event only to aggregate repeats of the same one",
    ("moerouter.io", "moerouters/status", "get"): "status is read with the object; kept for kubectl-like tools",
    ("moerouter.io", "moerouters/finalizers", "update"): (
        "no API call: OwnerReferencesPermissionEnforcement (OpenShift) checks it when a child's owner reference "
        "sets blockOwnerDeletion"
    ),
}


#: Used but deliberately not granted by default (``rbac.monitoringChildren: false``), with the reason.
FORBIDDEN_IS_HANDLED: dict[Permission, str] = {
    ("monitoring.coreos.com", "servicemonitors", "get"): "prune probe for a disabled child; 403 is skipped",
    ("monitoring.coreos.com", "prometheusrules", "get"): "prune probe for a disabled child; 403 is skipped",
}


#: Granted by the chart but never needed: these children always exist while their MoERouter does and
#: the garbage collector (not the operator) deletes them. Reported to the chart's owner; may be dropped.
KNOWN_EXCESS: set[Permission] = {
    ("", "services", "delete"),
    ("apps", "deployments", "delete"),
}


def granted_permissions() -> set[Permission]:
    with helm.Chart.load(REPO / "charts" / "moe-router-operator") as chart:
        rendered = chart.render({}, name="moe", namespace="moe-system", is_install=True)
    granted: set[Permission] = set()
    for template, text in rendered.items():
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt is prose
        for doc in yaml.safe_load_all(text):
            if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
                continue
            for rule in doc.get("rules") or []:
                for group in rule.get("apiGroups") or []:
                    for resource in rule.get("resources") or []:
                        for verb in rule.get("verbs") or []:
                            granted.add((group, resource, verb))
    return granted


def needed_permissions(calls: list[Call]) -> set[Permission]:
    needed: set[Permission] = set()
    for call in calls:
        needed.add((call.group, call.resource, call.verb))
        if call.content_type.startswith("application/apply-patch"):
            needed.add((call.group, call.resource, "create"))  # apply creates absent objects: RBAC checks create
    return needed


WAIT = 30.0  # generous: this runs beside other suites on two cores


async def scenario(tmp_path) -> list[Call]:
    """Create, update, drift repair, prune, a Degraded reference, deletion: every kind of call."""
    async with cluster(tmp_path, extra_args=("--all-namespaces",)) as k8s:
        await k8s.apply_router(example_router())
        await eventually(lambda: (k8s.condition("demo-router", "Ready") or {}).get("status") == "True",
                         message="Ready", within=WAIT)
        await k8s.delete("/api/v1/namespaces/default/services/demo-router")
        await eventually(lambda: k8s.get("", "v1", "services", "demo-router"), message="Service restored", within=WAIT)
        await k8s.patch_router("demo-router", {"spec": {"router": {"topP": 0.65}}})
        await eventually(lambda: [("topP: 0.65" in cm["data"]["router.yaml"])
                                  for cm in k8s.sandbox.items("", "v1", "configmaps", "default")] == [True],
                         message="a new ConfigMap, the old one pruned after the rollout", within=WAIT)
        await k8s.patch_router("demo-router", {"spec": {
            "podDisruptionBudget": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "autoscaling": {"enabled": False},
        }})
        pruned = (("policy", "v1", "poddisruptionbudgets"), ("networking.k8s.io", "v1", "networkpolicies"),
                  ("autoscaling", "v2", "horizontalpodautoscalers"))
        await eventually(lambda: all(k8s.get(*kind, "demo-router") is None for kind in pruned),
                         message="disabled children pruned", within=WAIT)
        await k8s.patch_router("demo-router", {"spec": {"runtime": {"apiKeySecretRef": {"name": "k", "key": "t"}}}})
        await eventually(lambda: [e for e in k8s.sandbox.items("", "v1", "events") if e.get("type") == "Warning"],
                         message="a Warning event", within=WAIT)
        k8s.sandbox.seed("", "v1", "secrets", {"metadata": {"name": "k", "namespace": "default"},
                                                "data": {"t": base64.b64encode(b"x").decode()}})
        await eventually(lambda: (k8s.condition("demo-router", "Degraded") or {}).get("status") == "False",
                         message="Degraded clears", within=WAIT)
        await k8s.delete("/apis/moerouter.io/v1alpha1/namespaces/default/moerouters/demo-router")
        await eventually(lambda: k8s.router() is None, message="router deleted", within=WAIT)
        await asyncio.sleep(0.5)
        return [call for call in k8s.sandbox.log if call.user_agent != TEST_AGENT]


async def test_the_chart_grants_every_call_the_operator_makes_and_nothing_unused(tmp_path):
    needed = needed_permissions(await scenario(tmp_path))
    granted = granted_permissions()
    assert needed - granted - FORBIDDEN_IS_HANDLED.keys() == set(), "calls the chart's RBAC would forbid"
    assert granted - needed - NOT_EXERCISED.keys() <= KNOWN_EXCESS, "rules no call in the scenario needed"
