"""End to end on a real cluster: images in kind, the Helm chart, a MoERouter, a routed request, scaling.

Run with `make e2e` (creates and deletes a kind cluster through scripts/e2e-kind.sh) or
`scripts/e2e-kind.sh`. With E2E_KUBECONFIG set, the cluster there is used as it is (both images must
already be loadable by its nodes). Without docker and kind the module skips and says why.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

#: Building the images and starting kind take far longer than the suite's default per-test timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "e2e-kind.sh"
CHART = ROOT / "charts" / "moe-router-operator"
EXAMPLE = ROOT / "examples" / "moerouter.yaml"
OPERATOR_NAMESPACE = "moe-system"
NAMESPACE = "moe-e2e"
RELEASE = "moe"
#: kind nodes are small: the example's 1 CPU per replica would not fit three replicas.
KIND_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def skip_reason() -> str | None:
    configured = os.environ.get("E2E_KUBECONFIG")
    if configured:
        return None if Path(configured).is_file() else f"E2E_KUBECONFIG={configured} does not exist"
    missing = [tool for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]
    if missing:
        return (
            f"the e2e suite needs docker, kind and kubectl on PATH; missing: {', '.join(missing)} "
            "(no cluster can be created here; run scripts/e2e-kind.sh where they exist)"
        )
    if subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60).returncode != 0:
        return "docker is installed but no Docker engine answers (docker info failed)"
    return None


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    configured = os.environ.get("E2E_KUBECONFIG")
    if configured:
        yield Path(configured)
        return
    path = tmp_path_factory.mktemp("kind") / "kubeconfig"
    env = {**os.environ, "E2E_KUBECONFIG": str(path)}
    subprocess.run([str(SCRIPT), "up"], check=True, env=env, timeout=3600)
    try:
        yield path
    finally:
        if os.environ.get("E2E_KEEP_CLUSTER") != "1":
            subprocess.run([str(SCRIPT), "down"], check=False, env=env, timeout=600)


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def get(kubeconfig: Path, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kubectl(kubeconfig, "-n", namespace, "get", kind, name, "-o", "json"))
    return data


def eventually(condition: Callable[[], bool], what: str, timeout: float = 300.0, every: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def operator_release(kubeconfig: Path) -> Iterator[str]:
    import helm_python as helm

    with helm.Config(kubeconfig_path=kubeconfig, namespace=OPERATOR_NAMESPACE) as config:
        config.install(
            CHART,
            RELEASE,
            {"image": {"repository": "ghcr.io/moe-router-operator/operator", "tag": "", "digest": "",
                       "pullPolicy": "Never"}},
            namespace=OPERATOR_NAMESPACE,
            create_namespace=True,
            wait="watcher",
            timeout=300,
        )
        try:
            yield RELEASE
        finally:
            config.uninstall(RELEASE)


@pytest.fixture(scope="module")
def moerouter(kubeconfig: Path, operator_release: str) -> Iterator[dict[str, Any]]:
    router = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    router["metadata"]["namespace"] = NAMESPACE
    router["spec"]["runtime"]["resources"] = KIND_RESOURCES
    router["spec"]["runtime"]["imagePullPolicy"] = "Never"
    kubectl(kubeconfig, "create", "namespace", NAMESPACE, check=False)
    kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(router))
    try:
        yield router
    finally:
        kubectl(kubeconfig, "-n", NAMESPACE, "delete", "moerouter", router["metadata"]["name"],
                "--ignore-not-found", "--wait=true", check=False)
        kubectl(kubeconfig, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)


@contextlib.contextmanager
def port_forward(kubeconfig: Path, target: str, port: int) -> Iterator[str]:
    process = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE, "port-forward", target, f"0:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"port-forward did not start: {line}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def test_moerouter_becomes_ready_with_all_its_children(kubeconfig: Path, moerouter: dict[str, Any]) -> None:
    name = moerouter["metadata"]["name"]
    kubectl(kubeconfig, "-n", NAMESPACE, "wait", f"moerouter/{name}", "--for=condition=Ready", "--timeout=600s")
    uid = get(kubeconfig, "moerouter", name)["metadata"]["uid"]
    volumes = get(kubeconfig, "deployment", name)["spec"]["template"]["spec"]["volumes"]
    (config_map,) = [volume["configMap"]["name"] for volume in volumes if "configMap" in volume]
    for kind, child in (
        ("configmap", config_map),
        ("deployment", name),
        ("service", name),
        ("horizontalpodautoscaler", name),
        ("networkpolicy", name),
        ("poddisruptionbudget", name),
    ):
        owners = get(kubeconfig, kind, child)["metadata"].get("ownerReferences", [])
        assert [owner["uid"] for owner in owners] == [uid], f"{kind}/{child}"


def test_a_routing_request_through_the_service_is_answered(kubeconfig: Path, moerouter: dict[str, Any]) -> None:
    name = moerouter["metadata"]["name"]
    router = moerouter["spec"]["router"]
    tokens, dim = 4, router["inputDim"]
    rng = random.Random(0)
    body = {
        "inputs": [
            {
                "name": "hidden_states",
                "shape": [tokens, dim],
                "datatype": "FP32",
                "data": [rng.gauss(0.0, 1.0) for _ in range(tokens * dim)],
            }
        ]
    }
    with port_forward(kubeconfig, f"svc/{name}", moerouter["spec"]["runtime"]["port"]) as base:
        status, payload = http(f"{base}/v2/models/{router['modelName']}/infer", body)
        assert status == 200
        outputs = {output["name"]: output for output in json.loads(payload)["outputs"]}
        assert outputs["expert_indices"]["shape"] == [tokens, router["maxExperts"]]
        chosen = outputs["num_experts"]["data"]
        assert all(router["minExperts"] <= k <= router["maxExperts"] for k in chosen)
        status, metrics = http(f"{base}/metrics")
        assert status == 200
        assert b"moe_router_requests_total" in metrics and b"moe_router_experts_per_token" in metrics


def test_raising_min_replicas_scales_the_runtime(kubeconfig: Path, moerouter: dict[str, Any]) -> None:
    name = moerouter["metadata"]["name"]
    wanted = moerouter["spec"]["autoscaling"]["minReplicas"] + 1
    patch = json.dumps({"spec": {"autoscaling": {"minReplicas": wanted}}})
    kubectl(kubeconfig, "-n", NAMESPACE, "patch", "moerouter", name, "--type", "merge", "-p", patch)
    eventually(
        lambda: get(kubeconfig, "horizontalpodautoscaler", name)["spec"]["minReplicas"] == wanted,
        f"the HPA's minReplicas to become {wanted}",
    )
    eventually(
        lambda: get(kubeconfig, "deployment", name).get("status", {}).get("readyReplicas", 0) == wanted,
        f"{wanted} ready runtime pods",
        timeout=600,
    )
    eventually(
        lambda: get(kubeconfig, "moerouter", name).get("status", {}).get("readyReplicas") == wanted,
        f"status.readyReplicas of the MoERouter to become {wanted}",
    )


def test_deleting_the_moerouter_removes_its_children(kubeconfig: Path, moerouter: dict[str, Any]) -> None:
    name = moerouter["metadata"]["name"]
    kubectl(kubeconfig, "-n", NAMESPACE, "delete", "moerouter", name, "--wait=true", "--timeout=300s")
    eventually(
        lambda: kubectl(kubeconfig, "-n", NAMESPACE, "get", "deployment,service,configmap", "-l",
                        f"app.kubernetes.io/instance={name}", "-o", "name") == "",
        "the children to be garbage-collected",
    )
