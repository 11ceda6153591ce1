"""The real operator (``moe-operator run``) against the API sandbox: every scenario of issue 2."""

from __future__ import annotations

import asyncio
import base64

import pytest

from moe_operator.labels import CONFIG_HASH_ANNOTATION, FINALIZER, MANAGED_BY_LABEL, OPERATOR_NAME
from tests.integration.operator.harness import ROUTERS, Cluster, cluster, eventually, example_router

pytestmark = pytest.mark.timeout(90)

#: The children with fixed names; the ConfigMap's name carries its content's hash (``demo-router-config-<hash>``).
NAMED_CHILDREN = (
    ("apps", "v1", "deployments", "demo-router"),
    ("", "v1", "services", "demo-router"),
    ("autoscaling", "v2", "horizontalpodautoscalers", "demo-router"),
    ("networking.k8s.io", "v1", "networkpolicies", "demo-router"),
    ("policy", "v1", "poddisruptionbudgets", "demo-router"),
)
CHILD_KINDS = len(NAMED_CHILDREN) + 1
SERVICES = "/api/v1/namespaces/default/services"


def config_maps(k8s: Cluster) -> list[dict]:
    """Every ConfigMap of the router, current or kept for old pods."""
    return [config_map for config_map in k8s.sandbox.items("", "v1", "configmaps", "default")
            if config_map["metadata"]["name"].startswith("demo-router-config-")]


def children(k8s: Cluster) -> dict[str, dict]:
    """The router's children by plural; the ConfigMap is the one its Deployment mounts."""
    found = {plural: k8s.get(group, version, plural, name) for group, version, plural, name in NAMED_CHILDREN}
    if found["deployments"] is not None:
        (volume,) = [v for v in found["deployments"]["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
        found["configmaps"] = k8s.get("", "v1", "configmaps", volume["configMap"]["name"])
    return {plural: child for plural, child in found.items() if child is not None}


def deployment(k8s: Cluster) -> dict:
    return k8s.get("apps", "v1", "deployments", "demo-router")


async def ready_router(k8s: Cluster) -> dict:
    await k8s.apply_router(example_router())
    await eventually(lambda: (k8s.condition("demo-router", "Ready") or {}).get("status") == "True",
                     message="Ready=True")
    return k8s.router()


async def test_create_makes_every_child_with_an_owner_reference(tmp_path):
    async with cluster(tmp_path) as k8s:
        await k8s.apply_router(example_router())
        found = await eventually(lambda: children(k8s) if len(children(k8s)) == CHILD_KINDS else None,
                                 message="all six children")
        router = k8s.router()
        for child in found.values():
            (reference,) = child["metadata"]["ownerReferences"]
            assert reference["uid"] == router["metadata"]["uid"]
            assert reference["kind"] == "MoERouter" and reference["controller"] is True
            assert child["metadata"]["labels"][MANAGED_BY_LABEL] == OPERATOR_NAME
        assert router["metadata"]["finalizers"] == [FINALIZER]
        assert not [key for key in router["metadata"].get("annotations", {}) if key.startswith("kopf.zalando.org/")]


async def test_other_tools_annotations_stay_off_the_children(tmp_path):
    async with cluster(tmp_path) as k8s:
        body = example_router()
        body["metadata"]["annotations"] = {
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "argocd.argoproj.io/tracking-id": "app:moerouter.io/MoERouter:default/demo-router",
            "team": "ml-platform",
        }
        await k8s.apply_router(body)
        await eventually(lambda: children(k8s) if len(children(k8s)) == CHILD_KINDS else None,
                         message="all six children")
        # kopf records the handled spec on the router after the handler has applied the children.
        await eventually(
            lambda: any(key.startswith("moerouter.io/") for key in k8s.router()["metadata"].get("annotations", {})),
            message="the operator's own annotation on the router",
        )
        for child in children(k8s).values():
            annotations = child["metadata"].get("annotations") or {}
            assert annotations.get("team") == "ml-platform"
            assert not [key for key in annotations if key.startswith(("kubectl.kubernetes.io/", "argocd.argoproj.io/",
                                                                       "kopf.zalando.org/"))]
            assert "moerouter.io/last-handled-configuration" not in annotations


async def test_ready_follows_the_deployments_availability(tmp_path):
    async with cluster(tmp_path, ready_delay=1.5) as k8s:
        await k8s.apply_router(example_router())
        await eventually(lambda: deployment(k8s), message="Deployment exists")
        not_yet = await eventually(lambda: k8s.condition("demo-router", "Ready"), message="Ready condition")
        assert not_yet["status"] == "False"
        ready = await eventually(
            lambda: (k8s.condition("demo-router", "Ready") or {}).get("status") == "True"
            and k8s.condition("demo-router", "Ready"),
            message="Ready=True after the fake deployment controller reports availability",
        )
        assert ready["reason"] == "Available"
        status = k8s.router()["status"]
        assert status["readyReplicas"] == deployment(k8s)["status"]["readyReplicas"] == 2
        assert status["selector"].startswith("app.kubernetes.io/component=router")


async def test_spec_change_updates_children_and_rolls_the_pods(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        before = deployment(k8s)
        old_hash = before["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        await k8s.patch_router("demo-router", {"spec": {"router": {"topP": 0.65}}})
        after = await eventually(
            lambda: deployment(k8s)["metadata"]["generation"] > before["metadata"]["generation"]
            and deployment(k8s),
            message="the Deployment's template changed",
        )
        assert after["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != old_hash
        assert "topP: 0.65" in children(k8s)["configmaps"]["data"]["router.yaml"]
        await eventually(lambda: k8s.router()["status"].get("observedGeneration") == 2,
                         message="status.observedGeneration follows the spec")


async def test_a_config_change_rolls_onto_a_new_config_map_and_the_old_one_goes_after_the_rollout(tmp_path):
    async with cluster(tmp_path, resync_seconds=60, ready_delay=2.0) as k8s:
        await ready_router(k8s)
        (old,) = [config_map["metadata"]["name"] for config_map in config_maps(k8s)]
        await k8s.patch_router("demo-router", {"spec": {"router": {"topP": 0.65}}})
        def names(count: int) -> set[str] | None:
            found = {config_map["metadata"]["name"] for config_map in config_maps(k8s)}
            return found if len(found) == count else None

        both = await eventually(lambda: names(2), message="a second ConfigMap for the new config")
        assert old in both  # kept while the pods roll
        # The fake deployment controller reports the rollout done: the Deployment's event prunes (resync is 60 s away).
        await eventually(lambda: names(1), message="the old ConfigMap pruned after the rollout")
        (kept,) = config_maps(k8s)
        assert kept["metadata"]["name"] != old and "topP: 0.65" in kept["data"]["router.yaml"]
        assert kept["metadata"]["name"] == children(k8s)["configmaps"]["metadata"]["name"]


async def test_turning_a_feature_off_prunes_its_child(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        await k8s.patch_router("demo-router", {"spec": {"podDisruptionBudget": {"enabled": False}}})
        await eventually(lambda: k8s.get("policy", "v1", "poddisruptionbudgets", "demo-router") is None,
                         message="the PodDisruptionBudget is deleted")
        assert len(children(k8s)) == CHILD_KINDS - 1


async def test_a_child_deleted_by_hand_is_restored(tmp_path):
    async with cluster(tmp_path, resync_seconds=60) as k8s:
        await ready_router(k8s)
        old_uid = k8s.get("", "v1", "services", "demo-router")["metadata"]["uid"]
        await k8s.delete(f"{SERVICES}/demo-router")
        restored = await eventually(
            lambda: (k8s.get("", "v1", "services", "demo-router") or {}).get("metadata"),
            message="the Service is back (through the child watch: the resync timer is 60 s away)",
        )
        assert restored["uid"] != old_uid


async def test_a_child_edited_by_hand_is_put_back(tmp_path):
    async with cluster(tmp_path, resync_seconds=60) as k8s:
        await ready_router(k8s)
        await k8s.request(
            "PATCH", "/apis/apps/v1/namespaces/default/deployments/demo-router",
            {"spec": {"template": {"spec": {"containers": [{"name": "router", "image": "evil:latest"}]}}}},
            "application/merge-patch+json",
        )
        await eventually(
            lambda: deployment(k8s)["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:latest",
            message="the hand edit is reverted",
        )
        assert deployment(k8s)["spec"]["template"]["spec"]["containers"][0]["image"].startswith("ghcr.io/")


async def test_deleting_the_router_deletes_its_children(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        await k8s.delete("/apis/moerouter.io/v1alpha1/namespaces/default/moerouters/demo-router")
        await eventually(lambda: k8s.router() is None, message="the finalizer is released and the router gone")
        await eventually(lambda: not children(k8s) and not config_maps(k8s),
                         message="owner-reference cascade removed every child")


async def test_steady_state_sends_zero_writes_across_resyncs(tmp_path):
    async with cluster(tmp_path, resync_seconds=0.5) as k8s:
        await ready_router(k8s)
        await asyncio.sleep(1.0)  # let the status settle after the last Deployment event
        mark = len(k8s.sandbox.log)
        await asyncio.sleep(3.0)
        resync_reads = [
            call for call in k8s.operator_calls(mark) if call.verb == "get" and call.resource == "deployments"
        ]
        assert len(resync_reads) >= 3, "the drift timer must actually have run several times"
        assert k8s.operator_writes(mark) == []


async def test_restarted_operator_resumes_without_writes(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        await asyncio.sleep(0.5)
    # A second operator process against a fresh sandbox holding the same objects.
    state = [(ROUTERS, k8s.router())] + [
        ((child["apiVersion"].rpartition("/")[0], child["apiVersion"].rpartition("/")[2], plural), child)
        for plural, child in children(k8s).items()
    ]
    (tmp_path / "again").mkdir()
    async with cluster(tmp_path / "again", objects=tuple(state)) as again:
        await asyncio.sleep(3.0)
        assert [(c.verb, c.resource) for c in again.operator_writes() if "events" not in c.resource] == []


async def test_a_missing_secret_degrades_with_a_warning_and_keeps_the_children(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        running = deployment(k8s)
        secret_ref = {"apiKeySecretRef": {"name": "api-key", "key": "token"}}
        await k8s.patch_router("demo-router", {"spec": {"runtime": secret_ref}})
        degraded = await eventually(
            lambda: (k8s.condition("demo-router", "Degraded") or {}).get("status") == "True"
            and k8s.condition("demo-router", "Degraded"),
            message="Degraded=True",
        )
        assert degraded["reason"] == "SecretNotFound"
        assert "api-key" in degraded["message"]
        events = await eventually(
            lambda: [e for e in k8s.sandbox.items("", "v1", "events", "default")
                     if e.get("type") == "Warning" and e.get("reason") == "SecretNotFound"],
            message="a Warning event",
        )
        assert events[0]["involvedObject"]["name"] == "demo-router"
        assert len(children(k8s)) == CHILD_KINDS
        assert deployment(k8s)["metadata"]["generation"] == running["metadata"]["generation"]

        # The retry with backoff picks up the Secret once it exists.
        k8s.sandbox.seed("", "v1", "secrets", {
            "metadata": {"name": "api-key", "namespace": "default"},
            "data": {"token": base64.b64encode(b"s3cret").decode()},
        })
        await eventually(lambda: (k8s.condition("demo-router", "Degraded") or {}).get("status") == "False",
                         message="Degraded clears after the Secret appears")
        env = deployment(k8s)["spec"]["template"]["spec"]["containers"][0]["env"]
        assert any((item.get("valueFrom") or {}).get("secretKeyRef", {}).get("name") == "api-key" for item in env)


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"router": {"minExperts": 6, "maxExperts": 2}}, "spec.router"),
        # A rule across two sections of the spec (MoERouterSpec itself), stored before the CRD had it.
        (
            {"runtime": {"startupSeconds": 300}, "autoscaling": {"predictive": {"horizonSeconds": 120}}},
            "autoscaling.predictive.horizonSeconds (120) must be > runtime.startupSeconds (300)",
        ),
    ],
    ids=["router-rule", "horizon-within-startup"],
)
async def test_an_invalid_spec_degrades_with_a_warning_and_deletes_nothing(tmp_path, patch, named):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        before = children(k8s)
        await k8s.patch_router("demo-router", {"spec": patch})
        degraded = await eventually(
            lambda: (k8s.condition("demo-router", "Degraded") or {}).get("status") == "True"
            and k8s.condition("demo-router", "Degraded"),
            message="Degraded=True",
        )
        assert degraded["reason"] == "InvalidSpec"
        assert named in degraded["message"]
        events = await eventually(
            lambda: [e for e in k8s.sandbox.items("", "v1", "events", "default")
                     if e.get("type") == "Warning" and e.get("reason") == "InvalidSpec"],
            message="a Warning event",
        )
        assert named in events[0]["message"]
        await asyncio.sleep(1.5)
        after = children(k8s)
        assert after.keys() == before.keys()
        assert after["configmaps"]["data"] == before["configmaps"]["data"]


async def test_liveness_and_metrics_endpoints_answer(tmp_path):
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        async with k8s.session.get(k8s.liveness_url) as response:
            assert response.status == 200
        async with k8s.session.get(k8s.metrics_url) as response:
            text = await response.text()
        assert 'moe_operator_reconciles_total{result="ok",trigger="create"}' in text


async def test_the_child_watches_ask_the_api_server_for_the_operators_own_objects_only(tmp_path):
    async with cluster(tmp_path) as k8s:
        await k8s.apply_router(example_router())
        await eventually(lambda: len(children(k8s)) == CHILD_KINDS, message="all six children")
        plurals = {plural for _, _, plural, _ in NAMED_CHILDREN} | {"configmaps"}

        def watches() -> dict[str, str] | None:
            found = {call.resource: call.label_selector for call in k8s.operator_calls() if call.verb == "watch"}
            return found if plurals <= set(found) and "moerouters" in found else None

        selectors = await eventually(watches, message="a watch of every child kind")
        assert {selectors[plural] for plural in plurals} == {f"{MANAGED_BY_LABEL}={OPERATOR_NAME}"}
        assert selectors["moerouters"] == ""


async def test_monitoring_children_without_rbac_degrade_with_a_warning_and_the_router_still_runs(tmp_path):
    async with cluster(tmp_path) as k8s:
        k8s.sandbox.forbidden.add("servicemonitors")
        body = example_router()
        body["spec"]["monitoring"] = {"serviceMonitor": True}
        await k8s.apply_router(body)
        degraded = await eventually(
            lambda: (k8s.condition("demo-router", "Degraded") or {}).get("status") == "True"
            and k8s.condition("demo-router", "Degraded"),
            message="Degraded=True",
        )
        assert degraded["reason"] == "MonitoringNotPermitted" and "rbac.monitoringChildren" in degraded["message"]
        await eventually(
            lambda: [e for e in k8s.sandbox.items("", "v1", "events", "default")
                     if e.get("type") == "Warning" and e.get("reason") == "MonitoringNotPermitted"],
            message="a Warning event",
        )
        await eventually(lambda: (k8s.condition("demo-router", "Ready") or {}).get("status") == "True",
                         message="Ready=True from the runtime Deployment")
        assert len(children(k8s)) == CHILD_KINDS
        assert (k8s.condition("demo-router", "Degraded") or {}).get("reason") == "MonitoringNotPermitted"


async def test_the_log_leaves_out_kopfs_routine_successes_but_not_the_operators_writes(tmp_path):
    # At 200 MoERouters kopf's "Timer ... succeeded." and "Handler 'watch-...' succeeded." lines were
    # over a thousand a minute; the drift timer still runs (it reads the router every second here).
    async with cluster(tmp_path) as k8s:
        await ready_router(k8s)
        mark = len(k8s.sandbox.log)
        await asyncio.sleep(3.0)
        drift_reads = [call for call in k8s.operator_calls(mark)
                       if call.verb == "get" and call.resource == "moerouters" and call.name == "demo-router"]
        assert len(drift_reads) >= 2
        log = k8s.operator_log()
        assert "reconciled default/demo-router (create)" in log
        assert "Timer 'drift' succeeded." not in log
        assert "Handler 'watch-" not in log
