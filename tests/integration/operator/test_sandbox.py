"""The API sandbox behaves like an API server where the operator depends on it (over real HTTP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from moe_operator.sandbox import Running, parse_label_selector, serve

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
ROUTERS = "/apis/moerouter.io/v1alpha1/namespaces/default/moerouters"
MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"


class Client:
    def __init__(self, running: Running, session: aiohttp.ClientSession) -> None:
        self.running, self.session = running, session

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                   expect: int | None = None) -> dict:
        async with self.session.request(method, self.running.url + path, data=json.dumps(body) if body else None,
                                        headers={"Content-Type": content_type}) as response:
            payload = await response.json()
        if expect is not None:
            assert response.status == expect, payload
        elif response.status >= 400:
            raise AssertionError(payload)
        return payload


@pytest.fixture
async def api(tmp_path) -> AsyncIterator[Client]:
    async with serve(tmp_path / "kubeconfig", ready_delay=0.05) as running, aiohttp.ClientSession() as session:
        yield Client(running, session)


def configmap(name: str, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"app": name}}, "data": data}


async def test_create_assigns_uid_resource_version_timestamp_and_generation(api):
    created = await api.call("POST", CONFIGMAPS, configmap("a", k="v"), expect=201)
    metadata = created["metadata"]
    assert metadata["uid"] and metadata["creationTimestamp"].endswith("Z")
    assert int(metadata["resourceVersion"]) > 0 and metadata["generation"] == 1
    assert metadata["namespace"] == "default"


async def test_creating_an_existing_name_conflicts(api):
    await api.call("POST", CONFIGMAPS, configmap("a"))
    error = await api.call("POST", CONFIGMAPS, configmap("a"), expect=409)
    assert error["reason"] == "AlreadyExists"


async def test_generate_name_makes_a_unique_name(api):
    body = {"metadata": {"generateName": "evt-"}, "reason": "x"}
    first = await api.call("POST", "/api/v1/namespaces/default/events", body)
    second = await api.call("POST", "/api/v1/namespaces/default/events", body)
    assert first["metadata"]["name"].startswith("evt-") and first["metadata"]["name"] != second["metadata"]["name"]


async def test_generation_moves_on_spec_changes_only(api):
    await api.call("POST", ROUTERS, {"metadata": {"name": "r"}, "spec": {"replicas": 1}})
    labelled = await api.call("PATCH", f"{ROUTERS}/r", {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert labelled["metadata"]["generation"] == 1
    changed = await api.call("PATCH", f"{ROUTERS}/r", {"spec": {"replicas": 2}}, MERGE)
    assert changed["metadata"]["generation"] == 2


async def test_a_no_op_patch_keeps_the_resource_version(api):
    created = await api.call("POST", CONFIGMAPS, configmap("a", k="v"))
    same = await api.call("PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "v"}}, MERGE)
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_status_subresource_separates_status_from_the_main_resource(api):
    await api.call("POST", ROUTERS, {"metadata": {"name": "r"}, "spec": {"replicas": 1}, "status": {"x": 1}})
    assert "status" not in await api.call("GET", f"{ROUTERS}/r")
    ignored = await api.call("PATCH", f"{ROUTERS}/r", {"status": {"replicas": 9}}, MERGE)
    assert "status" not in ignored
    both = {"status": {"replicas": 3}, "spec": {"replicas": 7}}
    written = await api.call("PATCH", f"{ROUTERS}/r/status", both, MERGE)
    assert written["status"] == {"replicas": 3} and written["spec"] == {"replicas": 1}
    assert written["metadata"]["generation"] == 1


async def test_server_side_apply_creates_merges_and_drops_abandoned_fields(api):
    first = configmap("a", one="1", two="2")
    created = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=op&force=true", first, APPLY, expect=201)
    assert created["data"] == {"one": "1", "two": "2"}
    await api.call("PATCH", f"{CONFIGMAPS}/a", {"data": {"theirs": "x"}}, MERGE)
    second = configmap("a", one="1")
    applied = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=op&force=true", second, APPLY, expect=200)
    assert applied["data"] == {"one": "1", "theirs": "x"}
    assert {entry["manager"] for entry in applied["metadata"]["managedFields"]} >= {"op"}


async def test_a_field_another_manager_still_applies_survives_when_one_manager_drops_it(api):
    await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=op", configmap("a", one="1", two="2"), APPLY, expect=201)
    both = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=keeper", configmap("a", two="2"), APPLY, expect=200)
    assert {entry["manager"] for entry in both["metadata"]["managedFields"]} == {"op", "keeper"}
    kept = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=op", configmap("a", one="1"), APPLY, expect=200)
    assert kept["data"] == {"one": "1", "two": "2"}
    gone = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=keeper", configmap("a"), APPLY, expect=200)
    assert gone["data"] == {"one": "1"}


async def test_an_apply_records_the_fields_it_owns(api):
    applied = await api.call("PATCH", f"{CONFIGMAPS}/a?fieldManager=op", configmap("a", one="1"), APPLY, expect=201)
    (entry,) = applied["metadata"]["managedFields"]
    assert entry["operation"] == "Apply"
    assert entry["fieldsV1"] == {"f:metadata": {"f:labels": {"f:app": {}}}, "f:data": {"f:one": {}}}


async def test_dropping_the_last_owner_of_deployment_replicas_defaults_them_to_one(api):
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"replicas": 5, "selector": {"matchLabels": {"app": "d"}}}}
    await api.call("PATCH", f"{DEPLOYMENTS}/d?fieldManager=op", deployment, APPLY, expect=201)
    without = {**deployment, "spec": {"selector": {"matchLabels": {"app": "d"}}}}
    applied = await api.call("PATCH", f"{DEPLOYMENTS}/d?fieldManager=op", without, APPLY, expect=200)
    assert applied["spec"]["replicas"] == 1


async def test_apply_requires_a_field_manager(api):
    error = await api.call("PATCH", f"{CONFIGMAPS}/a", configmap("a"), APPLY, expect=400)
    assert "fieldManager" in error["message"]


async def test_json_patch_operations_apply_in_order(api):
    await api.call("POST", CONFIGMAPS, configmap("a", k="v"))
    patched = await api.call("PATCH", f"{CONFIGMAPS}/a", [
        {"op": "test", "path": "/data/k", "value": "v"},
        {"op": "add", "path": "/data/n", "value": "1"},
        {"op": "remove", "path": "/data/k"},
    ], "application/json-patch+json")
    assert patched["data"] == {"n": "1"}


async def test_a_stale_resource_version_on_replace_conflicts(api):
    created = await api.call("POST", CONFIGMAPS, configmap("a", k="v"))
    await api.call("PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "w"}}, MERGE)
    error = await api.call("PUT", f"{CONFIGMAPS}/a", created, expect=409)
    assert error["reason"] == "Conflict"


@pytest.mark.parametrize(
    ("selector", "names"),
    [("app=a", {"a"}), ("app!=a", {"b", "c"}), ("app in (a,b)", {"a", "b"}), ("app notin (a)", {"b", "c"}),
     ("tier", {"c"}), ("!tier", {"a", "b"}), ("app=c,tier=db", {"c"})],
)
async def test_label_selectors_filter_lists(api, selector, names):
    for name in "abc":
        body = configmap(name)
        if name == "c":
            body["metadata"]["labels"]["tier"] = "db"
        await api.call("POST", CONFIGMAPS, body)
    listed = await api.call("GET", f"{CONFIGMAPS}?labelSelector={selector}")
    assert {item["metadata"]["name"] for item in listed["items"]} == names


def test_a_malformed_label_selector_is_rejected():
    with pytest.raises(Exception, match="unable to parse"):
        parse_label_selector("a=(b")


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict]:
    events: list[dict] = []
    while len(events) < count:
        line = await asyncio.wait_for(response.content.readline(), 5)
        events.append(json.loads(line))
    return events


async def test_watch_resumes_after_a_resource_version(api):
    await api.call("POST", CONFIGMAPS, configmap("a"))
    listed = await api.call("GET", CONFIGMAPS)
    await api.call("POST", CONFIGMAPS, configmap("b"))
    await api.call("DELETE", f"{CONFIGMAPS}/a")
    url = f"{api.running.url}{CONFIGMAPS}?watch=true&resourceVersion={listed['metadata']['resourceVersion']}"
    async with api.session.get(url) as response:
        events = await read_events(response, 2)
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [
        ("ADDED", "b"), ("DELETED", "a")]


async def test_watch_streams_live_changes_matching_the_selector(api):
    url = f"{api.running.url}{CONFIGMAPS}?watch=true&labelSelector=app%3Db"
    async with api.session.get(url) as response:
        await api.call("POST", CONFIGMAPS, configmap("a"))
        await api.call("POST", CONFIGMAPS, configmap("b"))
        (event,) = await read_events(response, 1)
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "b"


async def test_deleting_an_owner_cascades_to_its_dependents(api):
    owner = await api.call("POST", ROUTERS, {"metadata": {"name": "r"}, "spec": {}})
    child = configmap("c")
    child["metadata"]["ownerReferences"] = [{"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter",
                                            "name": "r", "uid": owner["metadata"]["uid"]}]
    await api.call("POST", CONFIGMAPS, child)
    await api.call("POST", CONFIGMAPS, configmap("unrelated"))
    await api.call("DELETE", f"{ROUTERS}/r")
    listed = await api.call("GET", CONFIGMAPS)
    assert [item["metadata"]["name"] for item in listed["items"]] == ["unrelated"]


async def test_finalizers_hold_deletion_until_released(api):
    await api.call("POST", ROUTERS, {"metadata": {"name": "r", "finalizers": ["x/y"]}, "spec": {}})
    marked = await api.call("DELETE", f"{ROUTERS}/r")
    assert marked["metadata"]["deletionTimestamp"]
    await api.call("GET", f"{ROUTERS}/r")
    await api.call("PATCH", f"{ROUTERS}/r", {"metadata": {"finalizers": None}}, MERGE)
    await api.call("GET", f"{ROUTERS}/r", expect=404)


async def test_a_subresource_the_kind_lacks_is_not_found(api):
    await api.call("POST", CONFIGMAPS, configmap("a"))
    await api.call("PATCH", f"{CONFIGMAPS}/a/status", {"status": {}}, MERGE, expect=404)


async def test_unknown_resources_are_not_found(api):
    error = await api.call("GET", "/apis/example.com/v1/namespaces/default/widgets", expect=404)
    assert error["kind"] == "Status"


async def test_discovery_serves_the_moerouter_crd_with_its_subresources(api):
    listed = await api.call("GET", "/apis/moerouter.io/v1alpha1")
    names = {resource["name"]: resource for resource in listed["resources"]}
    assert {"moerouters", "moerouters/status", "moerouters/scale"} <= names.keys()
    assert names["moerouters"]["kind"] == "MoERouter" and names["moerouters"]["namespaced"] is True
    groups = await api.call("GET", "/apis")
    assert "moerouter.io" in {group["name"] for group in groups["groups"]}


async def test_scale_subresource_reads_and_writes_spec_replicas(api):
    await api.call("POST", ROUTERS, {"metadata": {"name": "r"}, "spec": {"replicas": 2}})
    scale = await api.call("GET", f"{ROUTERS}/r/scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2
    await api.call("PATCH", f"{ROUTERS}/r/scale", {"spec": {"replicas": 5}}, MERGE)
    assert (await api.call("GET", f"{ROUTERS}/r"))["spec"]["replicas"] == 5


async def test_the_fake_deployment_controller_reports_availability(api):
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3}}
    created = await api.call("POST", DEPLOYMENTS, body)
    assert "status" not in created
    await api.running.sandbox.settle()
    status = (await api.call("GET", f"{DEPLOYMENTS}/d"))["status"]
    assert status["availableReplicas"] == status["readyReplicas"] == 3 and status["observedGeneration"] == 1


async def test_the_fake_hpa_controller_raises_replicas_to_min_replicas(api):
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {}}
    await api.call("POST", DEPLOYMENTS, deployment)
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "d"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"},
                    "minReplicas": 4, "maxReplicas": 8}}
    await api.call("POST", "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers", hpa)
    assert (await api.call("GET", f"{DEPLOYMENTS}/d"))["spec"]["replicas"] == 4


async def test_every_request_is_logged_in_rbac_terms(api):
    await api.call("POST", CONFIGMAPS, configmap("a"))
    await api.call("PATCH", f"{CONFIGMAPS}/a", {"data": {}}, MERGE)
    await api.call("GET", CONFIGMAPS)
    assert [(call.verb, call.group, call.resource) for call in api.running.sandbox.log] == [
        ("create", "", "configmaps"), ("patch", "", "configmaps"), ("list", "", "configmaps")]
    assert [call.is_write for call in api.running.sandbox.log] == [True, True, False]
