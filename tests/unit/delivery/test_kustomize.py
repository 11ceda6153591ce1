"""The kustomize base and overlays, rendered by the real kubectl (kustomize v5)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.delivery.support import (
    ROOT,
    Manifest,
    documents,
    of_kind,
    one,
    render_chart,
    restricted_violations,
    rule_set,
    validation_errors,
)

kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="kubectl not installed")
CONFIG = ROOT / "config"


def kustomize(path: str) -> list[Manifest]:
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(CONFIG / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return documents(result.stdout)


def test_default_renders_the_crd_rbac_and_operator_deployment() -> None:
    manifests = kustomize("default")
    assert sorted(doc["kind"] for doc in manifests) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "Namespace",
        "ServiceAccount",
    ]
    assert one(manifests, "CustomResourceDefinition")["metadata"]["name"] == "moerouters.moerouter.io"
    for doc in manifests:
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}:
            assert doc["metadata"]["namespace"] == "moe-system", doc["kind"]


@pytest.mark.parametrize("path", ["default", "overlays/production", "overlays/namespaced"])
def test_rendered_manifests_are_valid(path: str) -> None:
    assert validation_errors(kustomize(path)) == []


@pytest.mark.parametrize("path", ["default", "overlays/production", "overlays/namespaced"])
def test_operator_pod_meets_the_restricted_pod_security_standard(path: str) -> None:
    deployment = one(kustomize(path), "Deployment")
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []
    assert deployment["spec"]["strategy"] == {"type": "Recreate"} and deployment["spec"]["replicas"] == 1


def test_crd_base_is_a_byte_identical_copy_of_the_generated_crd() -> None:
    copy = CONFIG / "crd" / "bases" / "moerouter.io_moerouters.yaml"
    assert copy.read_bytes() == (ROOT / "crds" / "moerouter.io_moerouters.yaml").read_bytes(), (
        "config/crd/bases is stale: cp crds/moerouter.io_moerouters.yaml config/crd/bases/"
    )


def test_cluster_role_grants_the_same_rules_as_the_helm_chart() -> None:
    chart_role = one(render_chart(), "ClusterRole")
    assert rule_set(one(kustomize("default"), "ClusterRole")["rules"]) == rule_set(chart_role["rules"])


def test_operator_container_matches_the_helm_chart_defaults() -> None:
    chart_pod = one(render_chart(), "Deployment")["spec"]["template"]["spec"]
    base_pod = one(kustomize("default"), "Deployment")["spec"]["template"]["spec"]
    chart_container, base_container = chart_pod["containers"][0], base_pod["containers"][0]
    for key in ("args", "ports", "livenessProbe", "securityContext", "resources", "volumeMounts"):
        assert base_container[key] == chart_container[key], key
    assert base_pod["securityContext"] == chart_pod["securityContext"]
    assert base_container["image"] == chart_container["image"]


def test_namespaced_overlay_moves_the_operator_rights_into_a_role_in_the_watched_namespace() -> None:
    manifests = kustomize("overlays/namespaced")
    base_rules = rule_set(one(kustomize("default"), "ClusterRole")["rules"])
    role = one(manifests, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    crd_watch = {rule for rule in base_rules if rule[0] == "apiextensions.k8s.io"}
    assert rule_set(role["rules"]) == base_rules - crd_watch
    assert rule_set(one(manifests, "ClusterRole")["rules"]) == crd_watch
    args = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["run", "--namespace", "team-a"] and "--all-namespaces" not in args
    assert of_kind(manifests, "RoleBinding")[0]["subjects"][0]["namespace"] == "moe-system"


def test_production_overlay_pins_the_image_and_raises_resources() -> None:
    container = one(kustomize("overlays/production"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/mirror/moe-router-operator:0.1.0"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["args"] == one(kustomize("default"), "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]


def test_documented_monitoring_patch_grants_what_the_chart_grants_with_monitoring_children(tmp_path: Path) -> None:
    install = (ROOT / "docs" / "install.md").read_text()
    snippet = install.partition("Add the rule in your overlay:\n\n```yaml\n")[2].partition("```")[0]
    overlay = yaml.safe_load(snippet)
    overlay["resources"] = [os.path.relpath(CONFIG / "default", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    assert kubectl is not None
    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    chart_role = one(render_chart({"rbac": {"create": True, "monitoringChildren": True, "watchCRDs": True}}),
                     "ClusterRole")
    assert rule_set(one(documents(result.stdout), "ClusterRole")["rules"]) == rule_set(chart_role["rules"])
