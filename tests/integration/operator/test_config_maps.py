"""Content-addressed, immutable router ConfigMaps: reconcile() against the API sandbox (no kopf).

The sandbox's fake deployment controller is held back (an hour's delay) so that each test sets the
Deployment's rollout status itself, as the real controller would report it.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from moe_operator.api import parse_spec
from moe_operator.children import CONFIG_MAP, DEPLOYMENT, Owner, desired_config_map, mounted_config_maps
from moe_operator.kube import MOEROUTERS, Kube, KubeError
from moe_operator.labels import common_labels
from moe_operator.reconcile import reconcile, refresh_from_child
from moe_operator.sandbox import Running
from tests.integration.operator.harness import example_router, sandbox_with_client


@pytest.fixture
async def sandbox(tmp_path, monkeypatch) -> AsyncIterator[tuple[Running, Kube]]:
    async with sandbox_with_client(tmp_path / "kubeconfig", monkeypatch, ready_delay=3600) as pair:
        yield pair


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in patch.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


async def router_with(kube: Kube, spec_patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the example router ``r`` with ``spec_patch`` merged into its spec; the stored object."""
    body = example_router("r")
    body["spec"] = merged(body["spec"], spec_patch or {})
    await kube.apply(MOEROUTERS, body)
    return await stored(kube)


async def stored(kube: Kube) -> dict[str, Any]:
    router = await kube.get(MOEROUTERS, "default", "r")
    assert router is not None
    return router


def current_name(router: dict[str, Any]) -> str:
    return str(desired_config_map(Owner.from_body(router), parse_spec(router["spec"]))["metadata"]["name"])


def config_maps(running: Running) -> dict[str, dict[str, Any]]:
    found = running.sandbox.items("", "v1", "configmaps", "default")
    return {cm["metadata"]["name"]: cm for cm in found if cm["metadata"]["name"].startswith("r-config")}


def deployment(running: Running) -> dict[str, Any]:
    found = running.sandbox.object_of("apps", "v1", "deployments", "default", "r")
    assert found is not None
    return found


async def report_rollout(
    kube: Kube, running: Running, *, updated: int | None = None, total: int | None = None,
    available: int | None = None, observed_offset: int = 0,
) -> None:
    """Set the Deployment's status as the deployment controller would (default: rollout complete)."""
    current = deployment(running)
    replicas = current["spec"]["replicas"]
    status = {
        "observedGeneration": current["metadata"]["generation"] + observed_offset,
        "replicas": replicas if total is None else total,
        "updatedReplicas": replicas if updated is None else updated,
        "availableReplicas": replicas if available is None else available,
        "readyReplicas": replicas if available is None else available,
    }
    await kube.patch_status(DEPLOYMENT, "default", "r", status)


async def settled_router(kube: Kube, running: Running) -> tuple[dict[str, Any], str]:
    """A router whose first rollout completed; returns it and its ConfigMap's name."""
    router = await router_with(kube)
    await reconcile(kube, router, trigger="test")
    await report_rollout(kube, running)
    await reconcile(kube, await stored(kube), trigger="test")
    return router, current_name(router)


async def changed_config(kube: Kube) -> tuple[dict[str, Any], Any]:
    router = await router_with(kube, {"router": {"topP": 0.65}})
    return router, await reconcile(kube, router, trigger="test")


async def test_a_config_change_makes_a_new_config_map_beside_the_old_one(sandbox):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    router, outcome = await changed_config(kube)
    new = current_name(router)
    assert new != old and f"ConfigMap/{new}" in outcome.applied and outcome.pruned == []
    assert set(config_maps(running)) == {old, new}
    assert mounted_config_maps(deployment(running)) == {new}
    assert "topP: 0.65" in config_maps(running)[new]["data"]["router.yaml"]


@pytest.mark.parametrize(
    "rollout",
    [
        {"observed_offset": -1},  # the controller has not seen the new template yet
        {"updated": 1, "total": 3, "available": 2},  # one new pod up, two old pods still serving
        {"updated": 2, "total": 2, "available": 1},  # every pod updated, one new pod not available (crashing)
    ],
    ids=["not-observed", "old-pods-left", "new-pod-unavailable"],
)
async def test_the_old_config_map_stays_while_the_rollout_is_incomplete(sandbox, rollout):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    router, _ = await changed_config(kube)
    await report_rollout(kube, running, **rollout)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.pruned == []
    assert set(config_maps(running)) == {old, current_name(router)}


async def test_the_old_config_map_is_pruned_once_the_rollout_completes(sandbox):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    router, _ = await changed_config(kube)
    await report_rollout(kube, running)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.pruned == [f"ConfigMap/{old}"]
    assert set(config_maps(running)) == {current_name(router)}


async def test_a_config_reverted_before_its_rollout_finished_is_pruned_after_the_revert_rolls_out(sandbox):
    running, kube = sandbox
    _, first = await settled_router(kube, running)
    abandoned, _ = await changed_config(kube)
    await reconcile(kube, await router_with(kube), trigger="test")  # back to the first config
    await report_rollout(kube, running)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.pruned == [f"ConfigMap/{current_name(abandoned)}"]
    assert set(config_maps(running)) == {first}


async def test_the_deployment_event_of_a_finished_rollout_prunes_the_old_config_map(sandbox):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    router, _ = await changed_config(kube)
    await report_rollout(kube, running)
    outcome = await refresh_from_child(kube, deployment(running), deleted=False)
    assert outcome is not None and outcome.applied == [] and outcome.pruned == [f"ConfigMap/{old}"]
    assert set(config_maps(running)) == {current_name(router)}


async def test_the_config_map_old_pods_mount_is_never_modified(sandbox):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    before = config_maps(running)[old]
    await changed_config(kube)
    await reconcile(kube, await router_with(kube, {"router": {"topP": 0.5}}), trigger="test")
    after = config_maps(running)[old]
    assert after["immutable"] is True
    assert after["data"] == before["data"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_the_api_sandbox_refuses_to_change_an_immutable_config_map(sandbox):
    running, kube = sandbox
    _, name = await settled_router(kube, running)
    edited = {**config_maps(running)[name], "data": {"router.yaml": "router: {}\n"}}
    with pytest.raises(KubeError) as refused:
        await kube.apply(CONFIG_MAP, edited, field_manager="someone")
    assert refused.value.status == 422 and "immutable" in refused.value.message


async def test_a_settled_router_sends_no_writes_and_no_list_after_the_prune(sandbox):
    running, kube = sandbox
    await settled_router(kube, running)
    await changed_config(kube)
    await report_rollout(kube, running)
    await reconcile(kube, await stored(kube), trigger="test")  # prunes, writes status
    mark = len(running.sandbox.log)
    settled = await reconcile(kube, await stored(kube), trigger="test")
    assert settled.writes == 0
    calls = running.sandbox.log[mark:]
    assert [call for call in calls if call.is_write] == []
    assert [call for call in calls if call.verb == "list"] == []


async def test_an_unchanged_config_keeps_its_config_map(sandbox):
    running, kube = sandbox
    _, name = await settled_router(kube, running)
    router = await router_with(kube, {"autoscaling": {"maxReplicas": 7}})
    outcome = await reconcile(kube, router, trigger="test")
    assert current_name(router) == name
    assert not [applied for applied in outcome.applied if applied.startswith("ConfigMap/")]
    assert set(config_maps(running)) == {name}


async def test_a_deleted_current_config_map_is_recreated(sandbox):
    running, kube = sandbox
    _, name = await settled_router(kube, running)
    data = config_maps(running)[name]["data"]
    assert await kube.delete(CONFIG_MAP, "default", name)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.applied == [f"ConfigMap/{name}"]
    assert config_maps(running)[name]["data"] == data


async def test_the_fixed_name_config_map_of_an_earlier_version_is_pruned_after_the_upgrade_rollout(sandbox):
    running, kube = sandbox
    router = await router_with(kube)
    running.sandbox.seed("", "v1", "configmaps", {
        "metadata": {
            "name": "r-config", "namespace": "default", "labels": common_labels("r"),
            "ownerReferences": [{"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "name": "r",
                                 "uid": router["metadata"]["uid"], "controller": True}],
        },
        "data": {"router.yaml": "router: {}\n"},
    })
    await reconcile(kube, router, trigger="test")
    assert "r-config" in config_maps(running)
    await report_rollout(kube, running)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.pruned == ["ConfigMap/r-config"]
    assert set(config_maps(running)) == {current_name(router)}


async def test_a_config_map_the_router_does_not_own_is_never_pruned(sandbox):
    running, kube = sandbox
    running.sandbox.seed("", "v1", "configmaps", {
        "metadata": {"name": "r-config-notes", "namespace": "default", "labels": common_labels("r")},
        "data": {"notes": "kept by hand"},
    })
    _, name = await settled_router(kube, running)
    assert set(config_maps(running)) == {name, "r-config-notes"}


async def test_without_delete_permission_old_config_maps_stay_and_it_retries_without_degrading(sandbox, monkeypatch):
    running, kube = sandbox
    _, old = await settled_router(kube, running)
    router, _ = await changed_config(kube)
    await report_rollout(kube, running)

    async def forbidden(resource, namespace, name):
        raise KubeError(403, "Forbidden", f'configmaps "{name}" is forbidden: User "op" cannot delete resource')

    allowed = kube.delete
    monkeypatch.setattr(kube, "delete", forbidden)
    outcome = await reconcile(kube, await stored(kube), trigger="test")
    assert outcome.problem is None and outcome.pruned == []
    assert set(config_maps(running)) == {old, current_name(router)}
    monkeypatch.setattr(kube, "delete", allowed)  # the RBAC fixed: the next reconcile prunes
    assert (await reconcile(kube, await stored(kube), trigger="test")).pruned == [f"ConfigMap/{old}"]


async def test_someone_elses_config_map_with_the_hashed_name_is_a_conflict(sandbox):
    running, kube = sandbox
    router = await router_with(kube)
    name = current_name(router)
    running.sandbox.seed("", "v1", "configmaps", {
        "metadata": {"name": name, "namespace": "default"}, "data": {"router.yaml": "router: {}\n"},
    })
    outcome = await reconcile(kube, router, trigger="test")
    assert outcome.problem is not None and outcome.problem.reason == "ChildConflict"
    assert f"ConfigMap default/{name}" in outcome.problem.message
    assert running.sandbox.object_of("apps", "v1", "deployments", "default", "r") is None
    assert config_maps(running)[name]["data"] == {"router.yaml": "router: {}\n"}


async def test_deleting_the_router_removes_every_config_map(sandbox):
    running, kube = sandbox
    await settled_router(kube, running)
    await changed_config(kube)
    assert len(config_maps(running)) == 2
    assert await kube.delete(MOEROUTERS, "default", "r")
    assert config_maps(running) == {}
