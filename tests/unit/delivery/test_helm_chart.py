"""The Helm chart: lint, render with several value sets, validate every manifest, security, RBAC, HA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.unit.delivery.support import (
    CHART,
    FULLNAME,
    RELEASE_NAMESPACE,
    ROOT,
    Manifest,
    of_kind,
    one,
    render_chart,
    render_notes,
    restricted_violations,
    rule_set,
    validation_errors,
)

EVERYTHING_ON: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "runtimePodMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True, "annotations": {"grafana_folder": "MoE"}},
    "rbac": {"create": True, "monitoringChildren": True, "watchCRDs": True},
}
NAMESPACED = {"watch": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}}
HA = {"ha": {"enabled": True, "replicas": 3, "peeringName": "moe-peers"}}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-on": EVERYTHING_ON,
    "namespaced": NAMESPACED,
    "ha-cluster-wide": HA,
    "ha-namespaced": {**HA, **NAMESPACED, **EVERYTHING_ON},
    "custom-pod": {
        "image": {"repository": "registry.example.com/moe/operator", "tag": "", "pullPolicy": "Always",
                  "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": ["regcred", {"name": "other"}],
        "operator": {"livenessPort": 8081, "metricsPort": 0, "verbose": True,
                     "extraEnv": [{"name": "KOPF_LOG", "value": "debug"}]},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "podLabels": {"team": "ml"},
        "podAnnotations": {"example.com/owner": "ml"},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "rbac": {"create": False, "monitoringChildren": False, "watchCRDs": False},
    },
}

#: Every API call the operator makes, as (apiGroup, resource, verb); the ClusterRole must grant exactly these.
OPERATOR_CALLS = {
    *{("moerouter.io", "moerouters", verb) for verb in ("get", "list", "watch", "patch")},
    *{("moerouter.io", "moerouters/status", verb) for verb in ("get", "patch")},
    # blockOwnerDeletion on the children's owner references, under OwnerReferencesPermissionEnforcement (OpenShift).
    ("moerouter.io", "moerouters/finalizers", "update"),
    *{
        (group, resource, verb)
        for group, resource in (("", "configmaps"), ("", "services"), ("apps", "deployments"))
        for verb in ("get", "list", "watch", "create", "patch")
    },
    ("", "configmaps", "delete"),  # the immutable ConfigMaps of earlier configs, once a rollout completes
    *{
        (group, resource, verb)
        for group, resource in (
            ("autoscaling", "horizontalpodautoscalers"),
            ("networking.k8s.io", "networkpolicies"),
            ("policy", "poddisruptionbudgets"),
        )
        for verb in ("get", "list", "watch", "create", "patch", "delete")
    },
    ("", "secrets", "get"),
    ("", "events", "create"),
}
CRD_WATCH = {("apiextensions.k8s.io", "customresourcedefinitions", verb) for verb in ("list", "watch")}
MONITORING = {
    ("monitoring.coreos.com", resource, verb)
    for resource in ("servicemonitors", "prometheusrules")
    for verb in ("get", "list", "watch", "create", "patch", "delete")
}


def operator_workload(manifests: list[Manifest]) -> Manifest:
    workloads = of_kind(manifests, "Deployment") + of_kind(manifests, "StatefulSet")
    assert len(workloads) == 1
    return workloads[0]


def operator_container(manifests: list[Manifest]) -> Manifest:
    containers = operator_workload(manifests)["spec"]["template"]["spec"]["containers"]
    assert [container["name"] for container in containers] == ["operator"]
    return containers[0]


def test_chart_metadata_declares_kube_version_app_version_icon_and_maintainers() -> None:
    with helm.Chart.load(CHART) as chart:
        metadata = chart.metadata
    assert metadata["appVersion"] == "0.1.0"
    assert metadata["kubeVersion"].startswith(">=1.28")
    assert metadata["icon"].startswith("https://")
    assert metadata["maintainers"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version="v1.28.0", namespace=RELEASE_NAMESPACE)
    assert report["errors"] == [], report
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_manifest_is_valid_for_supported_kubernetes_versions(name: str) -> None:
    manifests = render_chart(VALUE_SETS[name])
    assert manifests
    assert validation_errors(manifests) == []


def test_chart_crds_are_valid_custom_resource_definitions() -> None:
    with helm.Chart.load(CHART) as chart:
        crds = [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]
    assert {crd["metadata"]["name"] for crd in crds} == {
        "moerouters.moerouter.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert validation_errors(crds) == []


def test_chart_crd_is_a_byte_identical_copy_of_the_generated_crd() -> None:
    generated = ROOT / "crds" / "moerouter.io_moerouters.yaml"
    copy = CHART / "crds" / "moerouter.io_moerouters.yaml"
    assert copy.read_bytes() == generated.read_bytes(), (
        "charts/moe-router-operator/crds/ is stale: cp crds/moerouter.io_moerouters.yaml "
        "charts/moe-router-operator/crds/"
    )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    pod_spec = operator_workload(render_chart(VALUE_SETS[name]))["spec"]["template"]["spec"]
    assert restricted_violations(pod_spec) == []


def test_restricted_check_reports_a_weakened_pod() -> None:
    pod_spec = operator_workload(render_chart())["spec"]["template"]["spec"]
    pod_spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    pod_spec["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    assert restricted_violations(pod_spec) == [
        "operator: capabilities do not drop ALL",
        "operator: adds capabilities",
        "operator: root filesystem is writable",
    ]


def test_single_operator_is_a_deployment_with_recreate_strategy_and_standalone_kopf() -> None:
    manifests = render_chart()
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert of_kind(manifests, "StatefulSet") == []
    assert operator_container(manifests)["args"] == [
        "run",
        "--all-namespaces",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        "--metrics-port",
        "9090",
        "--standalone",
    ]


def test_operator_has_resources_and_a_liveness_probe_on_the_kopf_liveness_endpoint() -> None:
    container = operator_container(render_chart({"operator": {"livenessPort": 8081, "metricsPort": 9090,
                                                              "verbose": False}}))
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert "http://0.0.0.0:8081/healthz" in container["args"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {port["name"]: port["containerPort"] for port in container["ports"]}[probe["port"]] == 8081


def test_operator_image_defaults_to_the_app_version_and_prefers_a_digest() -> None:
    assert operator_container(render_chart())["image"] == "ghcr.io/moe-router-operator/operator:0.1.0"
    digest = "sha256:" + "0f" * 32
    pinned = render_chart({"image": {"repository": "r.example/op", "tag": "0.2.0", "digest": digest,
                                     "pullPolicy": "IfNotPresent"}})
    assert operator_container(pinned)["image"] == f"r.example/op@{digest}"


def test_ha_runs_peered_pods_with_distinct_priorities_from_the_pod_index() -> None:
    manifests = render_chart(HA)
    statefulset = one(manifests, "StatefulSet")
    assert of_kind(manifests, "Deployment") == []
    assert statefulset["spec"]["replicas"] == 3
    container = operator_container(manifests)
    args = container["args"]
    assert args[args.index("--peering") + 1] == "moe-peers"
    assert args[args.index("--priority") + 1] == "$(POD_INDEX)"
    assert "--standalone" not in args
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    peering = one(manifests, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["name"] == "moe-peers"
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in rule_set(one(manifests, "ClusterRole")["rules"])


def test_ha_in_namespaced_mode_creates_one_kopf_peering_per_served_namespace() -> None:
    manifests = render_chart({**HA, **NAMESPACED})
    peerings = of_kind(manifests, "KopfPeering")
    assert sorted(peering["metadata"]["namespace"] for peering in peerings) == ["team-a", "team-b"]
    assert of_kind(manifests, "ClusterKopfPeering") == []
    for role in of_kind(manifests, "Role"):
        assert ("kopf.dev", "kopfpeerings", "get") in rule_set(role["rules"])


def test_operator_arguments_are_accepted_by_the_operator_cli() -> None:
    runner = pytest.importorskip("moe_operator.runner", reason="moe_operator.runner is not written yet")
    for values in (VALUE_SETS["defaults"], VALUE_SETS["ha-namespaced"], VALUE_SETS["custom-pod"]):
        parser = argparse.ArgumentParser()
        runner.add_arguments(parser)
        args = operator_container(render_chart(values))["args"]
        assert args[0] == "run"
        parser.parse_args([arg.replace("$(POD_INDEX)", "2") for arg in args[1:]])


def test_cluster_wide_rbac_grants_exactly_the_calls_the_operator_makes() -> None:
    manifests = render_chart()
    cluster_role = one(manifests, "ClusterRole")
    assert rule_set(cluster_role["rules"]) == OPERATOR_CALLS | CRD_WATCH
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}]
    assert of_kind(manifests, "Role") == []


def test_monitoring_rights_are_granted_only_when_enabled() -> None:
    with_monitoring = render_chart({"rbac": {"create": True, "monitoringChildren": True, "watchCRDs": False}})
    assert rule_set(one(with_monitoring, "ClusterRole")["rules"]) == OPERATOR_CALLS | MONITORING


def test_namespaced_rbac_is_a_role_per_watched_namespace_and_a_crd_only_cluster_role() -> None:
    manifests = render_chart(NAMESPACED)
    roles = of_kind(manifests, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_set(role["rules"]) == OPERATOR_CALLS
    bindings = of_kind(manifests, "RoleBinding")
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    assert rule_set(one(manifests, "ClusterRole")["rules"]) == CRD_WATCH
    args = operator_container(manifests)["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"] == ["team-a", "team-b"]


def test_namespaced_mode_without_namespaces_serves_the_release_namespace() -> None:
    manifests = render_chart({"watch": {"clusterWide": False, "namespaces": []},
                              "rbac": {"create": True, "monitoringChildren": False, "watchCRDs": False}})
    assert [role["metadata"]["namespace"] for role in of_kind(manifests, "Role")] == [RELEASE_NAMESPACE]
    assert of_kind(manifests, "ClusterRole") == []


def test_rbac_and_service_account_can_be_left_to_the_user() -> None:
    manifests = render_chart(VALUE_SETS["custom-pod"])
    kinds = {doc["kind"] for doc in manifests}
    assert kinds.isdisjoint({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"})
    assert operator_workload(manifests)["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"


def test_prometheus_rule_is_built_from_the_shipped_rule_file() -> None:
    rule = one(render_chart(EVERYTHING_ON), "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "monitoring" / "rules" / "moe-router.rules.yaml").read_text())
    assert rule["spec"] == shipped


def test_dashboard_config_map_carries_the_shipped_dashboard_with_the_sidecar_label() -> None:
    config_maps = of_kind(render_chart(EVERYTHING_ON), "ConfigMap")
    config_map = next(doc for doc in config_maps if doc["metadata"]["name"].endswith("-dashboard"))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "monitoring" / "dashboards" / "moe-router.json").read_text())
    assert json.loads(config_map["data"]["moe-router.json"]) == shipped


def test_chart_copies_of_the_rules_and_dashboard_are_identical_to_monitoring() -> None:
    for shipped, copy in (
        ("monitoring/rules/moe-router.rules.yaml", "files/moe-router.rules.yaml"),
        ("monitoring/dashboards/moe-router.json", "files/moe-router.json"),
    ):
        assert (CHART / copy).read_bytes() == (ROOT / shipped).read_bytes(), f"cp {shipped} {CHART / copy}"


def test_service_monitor_keeps_the_operator_metric_labels_and_names_the_job() -> None:
    monitor = one(render_chart(EVERYTHING_ON), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/part-of"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_runtime_pod_monitor_scrapes_router_pods_and_labels_series_by_moerouter() -> None:
    monitor = one(render_chart({**EVERYTHING_ON, **NAMESPACED}), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "moe-router",
        "app.kubernetes.io/component": "router",
    }
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_moerouter_io_router"], "targetLabel": "moerouter"} in (
        endpoint["relabelings"]
    )


def test_service_monitor_without_metrics_port_fails_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceMonitor\.enabled needs operator\.metricsPort > 0"):
        render_chart({"serviceMonitor": {"enabled": True},
                      "operator": {"livenessPort": 8080, "metricsPort": 0, "verbose": False}})


def test_namespaces_listed_while_cluster_wide_fail_the_render_naming_both_values() -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render_chart({"watch": {"clusterWide": True, "namespaces": ["team-a", "team-b"]}})
    message = str(raised.value)
    assert "watch.namespaces (team-a, team-b) is only used with watch.clusterWide=false" in message


def test_cluster_wide_with_no_namespaces_listed_renders() -> None:
    manifests = render_chart({"watch": {"clusterWide": True, "namespaces": []}})
    assert "--all-namespaces" in operator_container(manifests)["args"]


def test_optional_monitoring_objects_are_off_by_default() -> None:
    kinds = {doc["kind"] for doc in render_chart()}
    assert kinds.isdisjoint({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
    assert [doc["metadata"]["name"] for doc in of_kind(render_chart(), "ConfigMap")] == []


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"ha": {"enabled": True, "replicas": "two", "peeringName": "p"}}, "/ha/replicas"),
        ({"ha": {"enabled": True, "replicas": 1, "peeringName": "p"}}, "/ha/replicas"),
        ({"image": {"repository": "r", "tag": "latest", "digest": "", "pullPolicy": "Always"}}, "/image/tag"),
        ({"image": {"repository": "r", "tag": "", "digest": "md5:x", "pullPolicy": "Always"}}, "/image/digest"),
        ({"watch": {"clusterWide": "yes", "namespaces": []}}, "/watch/clusterWide"),
        ({"watch": {"clusterWide": False, "namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
        ({"operator": {"livenessPort": 80, "metricsPort": 9090, "verbose": False}}, "/operator/livenessPort"),
        ({"serviceMonitor": {"enabled": True, "interval": "often"}}, "/serviceMonitor/interval"),
        ({"rbac": {"create": True, "monitoringChildren": False, "watchCRDs": True, "superuser": True}},
         "additional properties 'superuser' not allowed"),
        ({"runAsUser": 0}, "/runAsUser"),
        ({"podLabels": {"team": 7}}, "/podLabels/team"),
    ],
)
def test_values_schema_rejects_wrong_types_and_unknown_keys(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert complaint in str(raised.value)


def test_values_yaml_itself_passes_the_schema_and_documents_every_key() -> None:
    text = (CHART / "values.yaml").read_text()
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(yaml.safe_load(text))
        schema = chart.schema
    assert schema is not None
    assert set(schema["properties"]) - {"global"} == set(yaml.safe_load(text))
    assert text.count("# ") >= len(schema["properties"])


def test_notes_tell_the_user_what_to_do_next() -> None:
    notes = render_notes(NAMESPACED)
    assert "team-a, team-b" in notes
    assert "kubectl apply -f examples/moerouter.yaml" in notes
    assert "helm upgrade` never changes the CRDs" in notes


def test_notes_upgrade_commands_force_crd_conflicts_and_keep_the_release_values() -> None:
    lines = [line.strip() for line in render_notes().splitlines()]
    [crd_apply] = [line for line in lines if line.startswith("kubectl apply") and "crds/" in line]
    assert crd_apply.startswith("kubectl apply --server-side --force-conflicts -f https://")
    assert crd_apply.endswith("/v0.1.0/crds/moerouter.io_moerouters.yaml")
    [upgrade] = [line for line in lines if line.startswith("helm upgrade")]
    assert upgrade.startswith("helm upgrade moe <chart> -n moe-system --reset-then-reuse-values")


def test_app_version_matches_the_project_version_and_the_default_runtime_image() -> None:
    import tomllib

    from moe_operator.api import DEFAULT_RUNTIME_IMAGE

    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert app_version == project["version"]
    assert f"ghcr.io/moe-router-operator/router-runtime:{app_version}" == DEFAULT_RUNTIME_IMAGE


def test_kopf_peering_objects_match_the_peering_crds_the_chart_ships() -> None:
    with helm.Chart.load(CHART) as chart:
        crds = [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]
    served = {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"]): crd["spec"]["scope"]
        for crd in crds
        for version in crd["spec"]["versions"]
        if version["served"]
    }
    for values in (HA, {**HA, **NAMESPACED}):
        for doc in render_chart(values):
            if doc["apiVersion"].startswith("kopf.dev/"):
                scope = served[(doc["apiVersion"], doc["kind"])]
                assert ("namespace" in doc["metadata"]) == (scope == "Namespaced"), doc["kind"]


def test_packaged_chart_keeps_its_crds_and_monitoring_files(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert {crd["filename"].rpartition("crds/")[2] for crd in packaged.crds} == {
            "moerouter.io_moerouters.yaml",
            "kopf.dev_peerings.yaml",
        }
        rendered = packaged.render(EVERYTHING_ON, name="moe", namespace=RELEASE_NAMESPACE)
    assert "MoERouterHighErrorRate" in rendered["moe-router-operator/templates/prometheusrule.yaml"]
    assert '"uid": "moe-router"' in rendered["moe-router-operator/templates/dashboard.yaml"]
