"""The pure builders: every child valid for Kubernetes, secure by default, owned, and stable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from moe_operator.api import DEFAULT_RUNTIME_IMAGE, MoERouterSpec, parse_spec
from moe_operator.children import (
    CHILD_RESOURCES,
    CONFIG_MAP,
    Owner,
    child_name,
    config_hash,
    desired_children,
    desired_deployment,
    desired_hpa,
    desired_network_policy,
    is_config_map_name,
    mounted_config_maps,
    router_yaml,
    runtime_file_config,
)
from moe_operator.labels import CONFIG_HASH_ANNOTATION, selector_labels
from router_runtime.config import RuntimeFileConfig

ROOT = Path(__file__).resolve().parents[3]
K8S_VERSION = "1.30.0"
OWNER = Owner(name="r1", namespace="ml", uid="2f1c8f0e-6a3c-4f55-9f5e-3a1d7c9b0e11")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def spec_from(**wire: Any):
    return parse_spec(wire)


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in children}


def example_specs() -> list[Any]:
    return [
        doc["spec"]
        for path in sorted((ROOT / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "MoERouter"
    ]


@pytest.mark.parametrize("wire", [*example_specs(), {}], ids=lambda wire: str(sorted(wire))[:40])
def test_every_child_validates_against_the_kubernetes_schemas(wire: dict[str, Any]) -> None:
    for child in desired_children(OWNER, parse_spec(wire), min_replicas_floor=3):
        if child["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_example_renders_six_children_in_apply_order() -> None:
    (example,) = yaml.safe_load_all((ROOT / "examples" / "moerouter.yaml").read_text())
    spec = parse_spec(example["spec"])
    kinds = [child["kind"] for child in desired_children(OWNER, spec)]
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ]
    assert {resource.kind for resource in CHILD_RESOURCES} >= set(kinds)


def test_every_child_is_owned_by_the_moerouter_and_labelled() -> None:
    spec = spec_from(autoscaling={"enabled": True}, monitoring={"serviceMonitor": True, "prometheusRule": True})
    for child in desired_children(OWNER, spec):
        (reference,) = child["metadata"]["ownerReferences"]
        assert reference == {
            "apiVersion": "moerouter.io/v1alpha1",
            "kind": "MoERouter",
            "name": "r1",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = child["metadata"]["labels"]
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels
        assert child["metadata"]["namespace"] == "ml"


def test_runtime_pod_runs_restricted() -> None:
    pod = desired_deployment(OWNER, spec_from())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_use_the_runtime_health_endpoints_and_startup_covers_startup_seconds() -> None:
    (container,) = desired_deployment(OWNER, spec_from(runtime={"startupSeconds": 301}))["spec"]["template"][
        "spec"
    ]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 301


def test_replicas_are_set_only_while_no_hpa_owns_scaling() -> None:
    assert desired_deployment(OWNER, spec_from(replicas=3))["spec"]["replicas"] == 3
    with_hpa = desired_deployment(OWNER, spec_from(replicas=3, autoscaling={"enabled": True}))
    assert "replicas" not in with_hpa["spec"]
    kinds = by_kind(desired_children(OWNER, spec_from(autoscaling={"enabled": False})))
    assert "HorizontalPodAutoscaler" not in kinds


def test_router_config_change_rolls_the_pods_and_other_changes_do_not() -> None:
    def hash_of(wire: dict[str, Any]) -> str:
        deployment = desired_deployment(OWNER, parse_spec(wire))
        return str(deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])

    base = hash_of({"router": {"topP": 0.9}})
    assert hash_of({"router": {"topP": 0.8}}) != base
    assert hash_of({"router": {"topP": 0.9}, "autoscaling": {"enabled": True, "maxReplicas": 40}}) == base


def test_config_map_holds_the_config_the_runtime_reads_back() -> None:
    spec = spec_from(router={"numExperts": 16, "maxExperts": 4, "strategy": "entropy"}, runtime={"port": 9000})
    config_map = by_kind(desired_children(OWNER, spec))["ConfigMap"]
    loaded = RuntimeFileConfig.from_yaml(config_map["data"]["router.yaml"])
    assert loaded.router == spec.router
    assert loaded.server.port == 9000
    assert loaded == runtime_file_config(spec)


def test_router_yaml_holds_what_differs_from_the_defaults_and_the_server_keys_the_pods_rely_on() -> None:
    assert yaml.safe_load(router_yaml(parse_spec({}))) == {"server": {"port": 8080, "shutdownGraceSeconds": 20.0}}
    rendered = yaml.safe_load(router_yaml(parse_spec({"router": {"topP": 0.8, "experts": {"enabled": True}}})))
    assert rendered["router"] == {"topP": 0.8, "experts": {"enabled": True}}


def test_a_field_at_its_default_renders_as_if_absent_so_a_new_defaulted_field_rolls_no_pods() -> None:
    # The API server stores every CRD default in each object: a release that adds a field hands it to every
    # router at once. At its default it must not change the file, its hash, or reach an older runtime image.
    stored_with_defaults = MoERouterSpec().to_wire()  # what the API server holds for an empty spec
    assert stored_with_defaults["router"]["device"] == "auto"
    assert router_yaml(parse_spec(stored_with_defaults)) == router_yaml(parse_spec({}))
    assert "device" not in router_yaml(parse_spec(stored_with_defaults))


def test_the_runtime_image_defaults_to_the_operators_release_and_a_set_one_is_used() -> None:
    def image(wire: dict[str, Any]) -> str:
        deployment = desired_deployment(OWNER, parse_spec(wire))
        return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image({}) == DEFAULT_RUNTIME_IMAGE
    assert image({"runtime": {"image": "registry.local/router-runtime:0.0.9"}}) == "registry.local/router-runtime:0.0.9"


def config_map_and_deployment(wire: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    children = by_kind(desired_children(OWNER, parse_spec(wire)))
    return children["ConfigMap"], children["Deployment"]


def test_the_config_map_is_immutable_and_named_after_its_content_hash() -> None:
    config_map, _ = config_map_and_deployment({})
    digest = config_hash(config_map["data"]["router.yaml"])[:10]
    assert config_map["metadata"]["name"] == f"r1-config-{digest}"
    assert config_map["immutable"] is True


def test_the_deployment_mounts_the_config_map_of_its_own_config() -> None:
    config_map, deployment = config_map_and_deployment({"router": {"topP": 0.7}})
    assert mounted_config_maps(deployment) == {config_map["metadata"]["name"]}


def test_the_config_map_name_is_stable_for_an_unchanged_config_and_new_for_a_changed_one() -> None:
    def name_of(wire: dict[str, Any]) -> str:
        return str(config_map_and_deployment(wire)[0]["metadata"]["name"])

    base = name_of({"router": {"topP": 0.9}})
    assert name_of({"router": {"topP": 0.9}}) == base
    assert name_of({"router": {"topP": 0.9}, "autoscaling": {"enabled": True, "maxReplicas": 40}}) == base
    assert name_of({"router": {"topP": 0.8}}) != base


def test_only_hashed_config_map_names_of_the_router_are_recognised() -> None:
    assert is_config_map_name("r1", "r1-config-0123456789")
    assert not is_config_map_name("r1", "r1-config")  # the fixed name of earlier versions
    assert not is_config_map_name("r1", "r1-config-0123456789-config-abcdefabcd")  # router r1-config-0123456789's
    assert not is_config_map_name("r1", "r1-config-0123456789a")
    assert not is_config_map_name("r1", "r1-config-ABCDEF0123")


def test_the_config_map_has_no_fixed_child_name() -> None:
    with pytest.raises(ValueError, match="config_map_name"):
        child_name(CONFIG_MAP, "r1")


def test_foreign_and_bookkeeping_annotations_are_not_copied_to_children() -> None:
    owner = Owner(
        name="r1",
        namespace="ml",
        uid="u",
        labels={"team": "search", "argocd.argoproj.io/instance": "app"},
        annotations={
            "kopf.zalando.org/last-handled-configuration": "{}",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "argocd.argoproj.io/tracking-id": "x",
            "moerouter.io/last-handled-configuration": "{}",
            "owner.example.com/contact": "ml-platform",
        },
    )
    for child in desired_children(owner, spec_from()):
        metadata = child["metadata"]
        assert metadata.get("annotations") == {"owner.example.com/contact": "ml-platform"}
        assert metadata["labels"]["team"] == "search"
        assert "argocd.argoproj.io/instance" not in metadata["labels"]


def test_hpa_passes_metrics_and_behavior_through_and_defaults_to_cpu() -> None:
    default = desired_hpa(OWNER, spec_from(autoscaling={"enabled": True}))["spec"]
    assert default["metrics"][0]["resource"]["name"] == "cpu"
    assert "behavior" not in default
    custom_metric = {
        "type": "Pods",
        "pods": {"metric": {"name": "rps"}, "target": {"type": "AverageValue", "averageValue": "10"}},
    }
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 60}}
    custom = desired_hpa(
        OWNER, spec_from(autoscaling={"enabled": True, "metrics": [custom_metric], "behavior": behavior})
    )["spec"]
    assert custom["metrics"] == [custom_metric]
    assert custom["behavior"] == behavior


@pytest.mark.parametrize(("floor", "expected"), [(None, 2), (1, 2), (5, 5), (50, 8)])
def test_predictive_floor_raises_min_replicas_within_bounds(floor: int | None, expected: int) -> None:
    spec = spec_from(autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 8})
    assert desired_hpa(OWNER, spec, floor)["spec"]["minReplicas"] == expected


def test_network_policy_admits_clients_and_scrapers_only_on_the_router_port() -> None:
    policy = desired_network_policy(OWNER, spec_from())["spec"]
    assert policy["podSelector"] == {"matchLabels": selector_labels("r1")}
    assert policy["policyTypes"] == ["Ingress"]
    assert [rule["from"] for rule in policy["ingress"]] == [
        [{"podSelector": {}}],
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    ]
    assert all(rule["ports"] == [{"protocol": "TCP", "port": 8080}] for rule in policy["ingress"])


def test_network_policy_never_emits_an_allow_all_rule_for_empty_peer_lists() -> None:
    policy = desired_network_policy(OWNER, spec_from(networkPolicy={"allowedClients": [], "metricsScrapers": []}))
    assert policy["spec"]["ingress"] == []


def test_api_key_comes_from_the_secret_reference_only() -> None:
    spec = spec_from(runtime={"apiKeySecretRef": {"name": "keys", "key": "router"}})
    (container,) = desired_deployment(OWNER, spec)["spec"]["template"]["spec"]["containers"]
    (api_key,) = [env for env in container["env"] if env["name"] == "MOE_ROUTER_API_KEY"]
    assert api_key == {"name": "MOE_ROUTER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "router"}}}


def test_builders_are_deterministic() -> None:
    spec = parse_spec(example_specs()[-1])
    assert desired_children(OWNER, spec) == desired_children(OWNER, spec)


def pod_spec_of(spec: Any) -> dict[str, Any]:
    return dict(desired_deployment(OWNER, spec)["spec"]["template"]["spec"])


def test_a_terminating_pod_sleeps_in_pre_stop_before_the_runtime_sees_sigterm() -> None:
    (container,) = pod_spec_of(spec_from())["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sleep", "5"]


@pytest.mark.parametrize("grace", [1, 6, 10, 30, 3600])
def test_the_grace_period_covers_pre_stop_the_runtime_drain_and_a_margin(grace: int) -> None:
    spec = spec_from(runtime={"terminationGracePeriodSeconds": grace})
    pod = pod_spec_of(spec)
    (container,) = pod["containers"]
    command = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
    pre_stop = int(command[-1]) if command else 0
    drain = runtime_file_config(spec).server.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] == grace
    assert pre_stop + drain + 5 <= grace or (pre_stop == 0 and drain == 0)


def test_a_rollout_is_stuck_only_after_a_pod_had_its_whole_startup_time() -> None:
    def deadline(startup: int) -> int:
        return int(desired_deployment(OWNER, spec_from(runtime={"startupSeconds": startup}))["spec"][
            "progressDeadlineSeconds"
        ])

    assert deadline(300) == 600
    assert deadline(1800) >= 1800 + 300
    assert deadline(7200) > 7200


def test_default_resources_apply_only_when_the_spec_gives_none() -> None:
    (default,) = pod_spec_of(spec_from())["containers"]
    assert default["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    (requested,) = pod_spec_of(spec_from(runtime={"resources": {"requests": {"memory": "8Gi"}}}))["containers"]
    assert requested["resources"] == {"requests": {"memory": "8Gi"}}


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_runtime_workers_reach_the_server_settings_the_runtime_reads(workers: int) -> None:
    config_map = by_kind(desired_children(OWNER, spec_from(runtime={"workers": workers})))["ConfigMap"]
    assert RuntimeFileConfig.from_yaml(config_map["data"]["router.yaml"]).server.workers == workers
