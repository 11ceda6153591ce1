"""The operator scenarios of issue 2 on a real cluster (kind): runs when KUBECONFIG points at one.

The operator runs locally as ``moe-operator run --namespace <fresh namespace>`` against that cluster;
the CRD from ``crds/`` is applied first. Pods need not become Ready (the runtime image may not be
pullable in CI), so these tests check objects, owner references, drift repair, deletion, Degraded and
the absence of writes (resourceVersions that do not move across resyncs).

    kind create cluster && make e2e
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from moe_operator.sandbox import free_port

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _cluster_reason() -> str | None:
    """Why the e2e suite cannot run here, or None when a cluster answers."""
    path = os.environ.get("KUBECONFIG", "")
    if not path:
        return "KUBECONFIG is not set: the e2e suite needs a real cluster (e.g. `kind create cluster`)"
    if not all(Path(part).exists() for part in path.split(os.pathsep) if part):
        return f"KUBECONFIG={path} does not exist"
    try:
        from kubernetes.client import ApiClient, VersionApi

        from moe_operator.kube import load_configuration

        VersionApi(ApiClient(load_configuration())).get_code(_request_timeout=5)
    except Exception as exc:
        return f"the cluster in KUBECONFIG={path} is unreachable: {type(exc).__name__}: {exc}"
    return None


SKIP_REASON = _cluster_reason()
if SKIP_REASON:
    pytestmark.append(pytest.mark.skip(reason=SKIP_REASON))


def eventually(check: Callable[[], T | None], *, within: float = 60.0, message: str = "") -> T:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s: {message}")
        time.sleep(0.5)


class Cluster:
    def __init__(self, namespace: str) -> None:
        from kubernetes import client, dynamic

        from moe_operator.kube import load_configuration

        self.namespace = namespace
        self.metrics_url = ""
        self.api = client.ApiClient(load_configuration())
        self.dynamic = dynamic.DynamicClient(self.api)

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str) -> dict[str, Any] | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            return dict(self.resource(api_version, kind).get(name=name, namespace=self.namespace).to_dict())
        except NotFoundError:
            return None

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        resource = self.resource(body["apiVersion"], body["kind"])
        namespace = self.namespace if resource.namespaced else None
        result = resource.server_side_apply(body=body, name=body["metadata"]["name"], namespace=namespace,
                                            field_manager="e2e-test", force_conflicts=True)
        return dict(result.to_dict())

    def patch(self, api_version: str, kind: str, name: str, patch: Any, content_type: str) -> None:
        self.resource(api_version, kind).patch(body=patch, name=name, namespace=self.namespace,
                                               content_type=content_type)

    def delete(self, api_version: str, kind: str, name: str) -> None:
        self.resource(api_version, kind).delete(name=name, namespace=self.namespace)


#: The ConfigMap's name carries its content's hash: ``_children`` finds it through the Deployment.
CHILDREN = (
    ("v1", "ConfigMap", ""),
    ("apps/v1", "Deployment", "e2e-router"),
    ("v1", "Service", "e2e-router"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "e2e-router"),
    ("networking.k8s.io/v1", "NetworkPolicy", "e2e-router"),
    ("policy/v1", "PodDisruptionBudget", "e2e-router"),
)


def router_body() -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "moerouter.yaml").read_text())
    body["metadata"] = {"name": "e2e-router"}
    return body


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    namespace = f"moer-e2e-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(namespace)
    for crd in yaml.safe_load_all((REPO / "crds" / "moerouter.io_moerouters.yaml").read_text()):
        if crd:
            cluster.apply(crd)
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    eventually(lambda: _served(cluster), message="the MoERouter CRD is served")
    log_path = tmp_path_factory.mktemp("e2e") / "operator.log"
    env = {**os.environ, "MOE_OPERATOR_RESYNC_SECONDS": "2", "MOE_OPERATOR_RETRY_BASE_SECONDS": "1"}
    cluster.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "moe_operator", "run", "--namespace", namespace,
             "--liveness", "", "--metrics-port", cluster.metrics_url.split(":")[-1].split("/")[0]],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        yield cluster
    finally:
        process.terminate()
        process.wait(30)
        with contextlib.suppress(Exception):
            cluster.delete("v1", "Namespace", namespace)
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])


def _served(cluster: Cluster) -> bool:
    cluster.dynamic.resources.invalidate_cache()
    try:
        cluster.resource("moerouter.io/v1alpha1", "MoERouter")
    except Exception:
        return False
    return True


def _config_map_name(k8s: Cluster) -> str | None:
    deployment = k8s.get("apps/v1", "Deployment", "e2e-router")
    if not deployment:
        return None
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return next(volume["configMap"]["name"] for volume in volumes if volume.get("configMap"))


def _children(k8s: Cluster) -> dict[str, dict[str, Any]]:
    found = {kind: k8s.get(api_version, kind, name) for api_version, kind, name in CHILDREN if name}
    config_map = _config_map_name(k8s)
    found["ConfigMap"] = k8s.get("v1", "ConfigMap", config_map) if config_map else None
    return {kind: child for kind, child in found.items() if child}


def _condition(k8s: Cluster, type: str) -> dict[str, Any] | None:
    body = k8s.get("moerouter.io/v1alpha1", "MoERouter", "e2e-router") or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type), None)


def test_1_create_makes_every_child_with_an_owner_reference(k8s: Cluster) -> None:
    router = k8s.apply(router_body())
    found = eventually(lambda: _children(k8s) if len(_children(k8s)) == len(CHILDREN) else None,
                       message="six children")
    for child in found.values():
        assert child["metadata"]["ownerReferences"][0]["uid"] == router["metadata"]["uid"]


def test_2_spec_change_rolls_the_pods(k8s: Cluster) -> None:
    def config_hash() -> str:
        deployment = k8s.get("apps/v1", "Deployment", "e2e-router") or {}
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["moerouter.io/config-hash"])

    before = config_hash()
    k8s.patch("moerouter.io/v1alpha1", "MoERouter", "e2e-router", {"spec": {"router": {"topP": 0.65}}},
              "application/merge-patch+json")
    eventually(lambda: config_hash() != before, message="the config hash on the pod template changes")


def test_3_a_child_deleted_by_hand_is_restored(k8s: Cluster) -> None:
    old = (k8s.get("v1", "Service", "e2e-router") or {})["metadata"]["uid"]
    k8s.delete("v1", "Service", "e2e-router")
    eventually(lambda: (k8s.get("v1", "Service", "e2e-router") or {"metadata": {"uid": old}})["metadata"]["uid"]
               != old, message="the Service is recreated")


def operator_requests(k8s: Cluster) -> dict[str, float]:
    """The operator's own counter of Kubernetes requests by verb (its /metrics)."""
    with urllib.request.urlopen(k8s.metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("moe_operator_kubernetes_requests_total{"):
            verb = line.split('verb="')[1].split('"')[0]
            counts[verb] = counts.get(verb, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_4_steady_state_writes_nothing(k8s: Cluster) -> None:
    time.sleep(5)  # let the status settle

    def versions() -> dict[str, str]:
        # Kinds no cluster controller writes to: any change would be the operator's.
        children = _children(k8s)
        return {kind: children[kind]["metadata"]["resourceVersion"] for kind in ("ConfigMap", "NetworkPolicy")}

    before, requests_before = versions(), operator_requests(k8s)
    time.sleep(8)  # four drift resyncs at MOE_OPERATOR_RESYNC_SECONDS=2
    requests_after = operator_requests(k8s)
    assert versions() == before
    assert requests_after.get("get", 0) > requests_before.get("get", 0), "the resyncs ran"
    for verb in ("patch", "delete"):
        assert requests_after.get(verb, 0) == requests_before.get(verb, 0), f"{verb} requests during resyncs"


def test_5_a_missing_secret_degrades_and_deletes_nothing(k8s: Cluster) -> None:
    k8s.patch("moerouter.io/v1alpha1", "MoERouter", "e2e-router",
              {"spec": {"runtime": {"apiKeySecretRef": {"name": "absent", "key": "token"}}}},
              "application/merge-patch+json")
    degraded = eventually(lambda: (_condition(k8s, "Degraded") or {}).get("status") == "True"
                          and _condition(k8s, "Degraded"), message="Degraded=True")
    assert degraded["reason"] == "SecretNotFound"
    events = k8s.resource("v1", "Event").get(namespace=k8s.namespace).to_dict()["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "SecretNotFound" for e in events)
    assert len(_children(k8s)) == len(CHILDREN)


def test_6_deleting_the_router_deletes_its_children(k8s: Cluster) -> None:
    k8s.delete("moerouter.io/v1alpha1", "MoERouter", "e2e-router")
    eventually(lambda: k8s.get("moerouter.io/v1alpha1", "MoERouter", "e2e-router") is None,
               message="the router is gone (finalizer released)")
    eventually(lambda: not _children(k8s), within=120, message="the garbage collector removed the children")
