"""Pure builders of a MoERouter's children: one function per child, no I/O.

The live operator and ``moe-operator render`` call the same ``desired_children``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from moe_operator.api import API_VERSION, DEFAULT_RUNTIME_IMAGE, GROUP, KIND, MoERouterSpec
from moe_operator.labels import (
    CONFIG_HASH_ANNOTATION,
    common_labels,
    selector_labels,
    without_foreign,
)
from router_runtime.config import (
    API_KEY_ENV,
    CONFIG_FILE_NAME,
    CONFIG_PATH_ENV,
    RuntimeFileConfig,
    ServerConfig,
)

Manifest = dict[str, Any]

CONTAINER_NAME = "router"
PORT_NAME = "http"
CONFIG_MOUNT_DIR = "/etc/moe-router"
CONFIG_PATH = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"
RUNTIME_UID = 65532
#: Seconds the runtime keeps for itself between its own drain deadline and the kubelet's SIGKILL.
SHUTDOWN_MARGIN_SECONDS = 5.0
#: The preStop sleep: Services and load balancers stop sending to a terminating pod before it stops listening.
PRE_STOP_SLEEP_SECONDS = 5
#: How much longer than runtime.startupSeconds one new pod may take before a rollout counts as stuck.
PROGRESS_DEADLINE_MARGIN_SECONDS = 300
#: Kubernetes' own default progressDeadlineSeconds, never undercut.
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600


@dataclass(frozen=True)
class Owner:
    """Identity of the MoERouter that owns the children."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        metadata = body.get("metadata") or {}
        return cls(
            name=metadata["name"],
            namespace=metadata.get("namespace") or "default",
            uid=metadata.get("uid") or "",
            labels=dict(metadata.get("labels") or {}),
            annotations=dict(metadata.get("annotations") or {}),
        )


@dataclass(frozen=True)
class ChildResource:
    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


CONFIG_MAP = ChildResource("", "v1", "ConfigMap", "configmaps")
DEPLOYMENT = ChildResource("apps", "v1", "Deployment", "deployments")
SERVICE = ChildResource("", "v1", "Service", "services")
HPA = ChildResource("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
NETWORK_POLICY = ChildResource("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies")
PDB = ChildResource("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets")
MONITORING_GROUP = "monitoring.coreos.com"
SERVICE_MONITOR = ChildResource(MONITORING_GROUP, "v1", "ServiceMonitor", "servicemonitors")
PROMETHEUS_RULE = ChildResource(MONITORING_GROUP, "v1", "PrometheusRule", "prometheusrules")

#: Every kind of child, in the order they are applied (the ConfigMap before the pods that mount it).
CHILD_RESOURCES: tuple[ChildResource, ...] = (
    CONFIG_MAP,
    DEPLOYMENT,
    SERVICE,
    HPA,
    NETWORK_POLICY,
    PDB,
    SERVICE_MONITOR,
    PROMETHEUS_RULE,
)


#: Hex digits of the config hash in a ConfigMap's name (40 bits: collisions between one router's configs are moot).
CONFIG_MAP_HASH_LENGTH = 10


def config_map_prefix(router_name: str) -> str:
    """What every router ConfigMap's name starts with; the config's hash follows."""
    return f"{router_name}-config-"


def config_map_name(router_name: str, config_yaml: str) -> str:
    """``NAME-config-<hash>``: a new config gets a new immutable ConfigMap, old pods keep reading theirs."""
    return f"{config_map_prefix(router_name)}{config_hash(config_yaml)[:CONFIG_MAP_HASH_LENGTH]}"


def is_config_map_name(router_name: str, name: str) -> bool:
    """Whether ``name`` has the form of one of this router's hashed ConfigMap names."""
    prefix = config_map_prefix(router_name)
    suffix = name[len(prefix):]
    return (
        name.startswith(prefix)
        and len(suffix) == CONFIG_MAP_HASH_LENGTH
        and all(char in "0123456789abcdef" for char in suffix)
    )


def mounted_config_maps(deployment: Mapping[str, Any]) -> set[str]:
    """The ConfigMaps a Deployment's pod template mounts as volumes."""
    volumes = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or []
    return {str(volume["configMap"].get("name")) for volume in volumes if isinstance(volume.get("configMap"), Mapping)}


def child_name(resource: ChildResource, router_name: str) -> str:
    """The name a MoERouter's child of this kind has (every kind but the ConfigMap, whose name carries a hash)."""
    if resource.kind == CONFIG_MAP.kind:
        raise ValueError("a router ConfigMap's name depends on its content: use config_map_name(name, config_yaml)")
    return router_name


def pre_stop_seconds(spec: MoERouterSpec) -> int:
    """The preStop sleep, shortened when the grace period is too short to hold it and the margin."""
    budget = spec.runtime.termination_grace_period_seconds - SHUTDOWN_MARGIN_SECONDS
    return int(min(PRE_STOP_SLEEP_SECONDS, max(budget, 0.0)))


def shutdown_grace_seconds(spec: MoERouterSpec) -> float:
    """The runtime's drain time after SIGTERM: the pod's grace period minus the preStop sleep and the margin.

    The kubelet counts terminationGracePeriodSeconds from the start of preStop, so the three add up to it.
    """
    runtime = spec.runtime
    return max(runtime.termination_grace_period_seconds - pre_stop_seconds(spec) - SHUTDOWN_MARGIN_SECONDS, 0.0)


def progress_deadline_seconds(spec: MoERouterSpec) -> int:
    """The Deployment's progressDeadlineSeconds: a new pod gets its whole startup time and a margin."""
    return max(DEFAULT_PROGRESS_DEADLINE_SECONDS, spec.runtime.startup_seconds + PROGRESS_DEADLINE_MARGIN_SECONDS)


def runtime_file_config(spec: MoERouterSpec) -> RuntimeFileConfig:
    """The ``router.yaml`` the runtime reads: the router schema plus the server settings from spec.runtime."""
    grace = shutdown_grace_seconds(spec)
    server = ServerConfig(
        port=spec.runtime.port,
        batching=spec.runtime.batching,
        max_request_tokens=spec.runtime.max_request_tokens,
        shutdown_grace_seconds=grace,
        workers=spec.runtime.workers,
    )
    return RuntimeFileConfig(router=spec.router, server=server)


#: Server keys the Deployment is built around (container port, termination grace): written whatever their value.
_PINNED_SERVER_KEYS = ("port", "shutdownGraceSeconds")


def router_yaml(spec: MoERouterSpec) -> str:
    """The ConfigMap's ``router.yaml``: what differs from the runtime's defaults, plus the pinned server keys.

    The API server stores every CRD default in each object, and the operator would render each field the
    schema has. Left at that, a release that adds a field (at its default) would change every router's
    config hash at once: a fleet-wide roll on an operator upgrade, and pods of an older runtime image
    (which refuses keys it does not know) handed a key they cannot read. Written this way a field appears
    only once a router sets it to something else, and an unchanged spec renders the same file release
    after release.
    """
    config = runtime_file_config(spec)
    wire = config.model_dump(by_alias=True, mode="json", exclude_none=True, exclude_defaults=True)
    server = config.server.to_wire()
    wire["server"] = {**wire.get("server", {}), **{key: server[key] for key in _PINNED_SERVER_KEYS}}
    return yaml.safe_dump(wire, sort_keys=True)


def config_hash(config_yaml: str) -> str:
    """Short digest of the rendered config; a change rolls the pods through the template annotation."""
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()[:16]


def _owned_by(owner: Owner) -> list[Manifest]:
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": owner.name,
            "uid": owner.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _propagated(values: Mapping[str, str]) -> dict[str, str]:
    """Owner labels/annotations minus other tools' keys and our own bookkeeping (``moerouter.io/*``)."""
    return {key: value for key, value in without_foreign(values).items() if not key.startswith(f"{GROUP}/")}


def _metadata(owner: Owner, name: str, annotations: Mapping[str, str] | None = None) -> Manifest:
    metadata: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**_propagated(owner.labels), **common_labels(owner.name)},
        "ownerReferences": _owned_by(owner),
    }
    merged_annotations = {**_propagated(owner.annotations), **(annotations or {})}
    if merged_annotations:
        metadata["annotations"] = merged_annotations
    return metadata


def _child(resource: ChildResource, metadata: Manifest, **body: Any) -> Manifest:
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata, **body}


def desired_config_map(owner: Owner, spec: MoERouterSpec) -> Manifest:
    """The router.yaml, immutable under a name that carries its hash: a change makes a new ConfigMap."""
    config_yaml = router_yaml(spec)
    return _child(
        CONFIG_MAP,
        _metadata(owner, config_map_name(owner.name, config_yaml)),
        immutable=True,
        data={CONFIG_FILE_NAME: config_yaml},
    )


def _probe(path: str, *, period: int, failures: int, timeout: int = 2) -> Manifest:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _lifecycle(spec: MoERouterSpec) -> Manifest:
    """preStop: keep serving while the endpoint removal reaches every Service proxy (the image has /bin/sleep)."""
    seconds = pre_stop_seconds(spec)
    if seconds <= 0:
        return {}
    return {"lifecycle": {"preStop": {"exec": {"command": ["/bin/sleep", str(seconds)]}}}}


def _runtime_container(spec: MoERouterSpec) -> Manifest:
    runtime = spec.runtime
    env: list[Manifest] = [{"name": CONFIG_PATH_ENV, "value": CONFIG_PATH}]
    if runtime.api_key_secret_ref is not None:
        env.append(
            {
                "name": API_KEY_ENV,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": runtime.api_key_secret_ref.name,
                        "key": runtime.api_key_secret_ref.key,
                    }
                },
            }
        )
    env.extend(runtime.env)
    resources = {
        key: dict(value)
        for key, value in (("requests", runtime.resources.requests), ("limits", runtime.resources.limits))
        if value
    }
    startup_period = 10
    return {
        "name": CONTAINER_NAME,
        "image": runtime.image or DEFAULT_RUNTIME_IMAGE,
        "imagePullPolicy": runtime.image_pull_policy,
        "args": ["serve", "--config", CONFIG_PATH],
        "ports": [{"name": PORT_NAME, "containerPort": runtime.port, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        "startupProbe": _probe(
            "/v2/health/live",
            period=startup_period,
            failures=max(math.ceil(runtime.startup_seconds / startup_period), 1),
        ),
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=2),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        **_lifecycle(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *runtime.volume_mounts,
        ],
    }


def desired_deployment(owner: Owner, spec: MoERouterSpec) -> Manifest:
    runtime = spec.runtime
    config_yaml = router_yaml(spec)
    pod_labels = {**runtime.pod_labels, **common_labels(owner.name)}
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(runtime.port),
        "prometheus.io/path": "/metrics",
        **runtime.pod_annotations,
        CONFIG_HASH_ANNOTATION: config_hash(config_yaml),
    }
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": runtime.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_runtime_container(spec)],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(owner.name, config_yaml)}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            *runtime.volumes,
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector_labels(owner.name)},
            }
        ],
    }
    if runtime.service_account_name:
        pod_spec["serviceAccountName"] = runtime.service_account_name
    if runtime.node_selector:
        pod_spec["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        pod_spec["tolerations"] = list(runtime.tolerations)
    if runtime.affinity:
        pod_spec["affinity"] = dict(runtime.affinity)
    if runtime.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in runtime.image_pull_secrets]

    deployment_spec: Manifest = {
        "selector": {"matchLabels": selector_labels(owner.name)},
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": progress_deadline_seconds(spec),
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec},
    }
    if not spec.autoscaling.enabled:
        # While an HPA owns scaling the operator never writes replicas (GitOps-friendly, no fight).
        deployment_spec = {"replicas": spec.replicas, **deployment_spec}
    return _child(DEPLOYMENT, _metadata(owner, owner.name), spec=deployment_spec)


def desired_service(owner: Owner, spec: MoERouterSpec) -> Manifest:
    return _child(
        SERVICE,
        _metadata(owner, owner.name),
        spec={
            "type": "ClusterIP",
            "selector": selector_labels(owner.name),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": spec.runtime.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    )


def hpa_min_replicas(spec: MoERouterSpec, min_replicas_floor: int | None) -> int:
    """The HPA's minReplicas: the spec's, raised by the predictive floor, never above maxReplicas."""
    autoscaling = spec.autoscaling
    raised = max(autoscaling.min_replicas, min_replicas_floor or 0)
    return min(raised, autoscaling.max_replicas)


def desired_hpa(owner: Owner, spec: MoERouterSpec, min_replicas_floor: int | None = None) -> Manifest:
    autoscaling = spec.autoscaling
    metrics = list(autoscaling.metrics) or [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": autoscaling.target_cpu_utilization},
            },
        }
    ]
    hpa_spec: Manifest = {
        "scaleTargetRef": {"apiVersion": DEPLOYMENT.api_version, "kind": DEPLOYMENT.kind, "name": owner.name},
        "minReplicas": hpa_min_replicas(spec, min_replicas_floor),
        "maxReplicas": autoscaling.max_replicas,
        "metrics": metrics,
    }
    if autoscaling.behavior:
        hpa_spec["behavior"] = dict(autoscaling.behavior)
    return _child(HPA, _metadata(owner, owner.name), spec=hpa_spec)


def desired_network_policy(owner: Owner, spec: MoERouterSpec) -> Manifest:
    policy = spec.network_policy
    port = [{"protocol": "TCP", "port": spec.runtime.port}]
    clients = [{"podSelector": {}}] if policy.allowed_clients is None else list(policy.allowed_clients)
    # An ingress rule with an empty `from` allows everyone, so empty peer lists produce no rule at all.
    rules = [{"from": peers, "ports": port} for peers in (clients, list(policy.metrics_scrapers)) if peers]
    return _child(
        NETWORK_POLICY,
        _metadata(owner, owner.name),
        spec={
            "podSelector": {"matchLabels": selector_labels(owner.name)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    )


def desired_pod_disruption_budget(owner: Owner, spec: MoERouterSpec) -> Manifest:
    return _child(
        PDB,
        _metadata(owner, owner.name),
        spec={
            "maxUnavailable": spec.pod_disruption_budget.max_unavailable,
            "selector": {"matchLabels": selector_labels(owner.name)},
        },
    )


def desired_service_monitor(owner: Owner, spec: MoERouterSpec) -> Manifest:
    return _child(
        SERVICE_MONITOR,
        _metadata(owner, owner.name),
        spec={
            "selector": {"matchLabels": selector_labels(owner.name)},
            "endpoints": [
                {
                    "port": PORT_NAME,
                    "path": "/metrics",
                    "interval": spec.monitoring.scrape_interval,
                    # The fleet alerts and the dashboard group runtime series by this label.
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_moerouter_io_router"],
                            "targetLabel": "moerouter",
                        }
                    ],
                }
            ],
        },
    )


def desired_prometheus_rule(owner: Owner, spec: MoERouterSpec) -> Manifest:
    """Alerts scoped to this router's series; thresholds and severities match the fleet rules in monitoring/rules/.

    Every alert aggregates ``by (namespace, moerouter)`` so that same-named routers in two namespaces raise
    alerts with distinct label sets (Alertmanager would merge identical ones).
    """
    scope = f'namespace="{owner.namespace}",moerouter="{owner.name}"'
    by_router = "by (namespace, moerouter)"
    router = f"MoERouter {owner.namespace}/{owner.name}"
    rules = [
        {
            "alert": "MoERouterHighErrorRate",
            "expr": f'sum {by_router} (rate(moe_router_requests_total{{{scope},code=~"5.."}}[5m])) '
            f"/ sum {by_router} (rate(moe_router_requests_total{{{scope}}}[5m])) > 0.05",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {"summary": f"{router}: over 5% of requests fail"},
        },
        {
            "alert": "MoERouterHighLatencyP95",
            "expr": "histogram_quantile(0.95, sum by (namespace, moerouter, le) "
            f"(rate(moe_router_request_duration_seconds_bucket{{{scope}}}[5m]))) > 0.5",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": f"{router}: p95 latency above 500 ms"},
        },
        {
            "alert": "MoERouterExpertLoadImbalance",
            "expr": f"max {by_router} (moe_router_load_cv{{{scope}}}) > 0.5",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": f"{router}: expert load coefficient of variation > 0.5"},
        },
    ]
    return _child(
        PROMETHEUS_RULE,
        _metadata(owner, owner.name),
        spec={"groups": [{"name": f"moe-router.{owner.namespace}.{owner.name}", "rules": rules}]},
    )


def desired_children(
    owner: Owner, spec: MoERouterSpec, *, min_replicas_floor: int | None = None
) -> list[Manifest]:
    """Every child the MoERouter should have, in apply order; disabled features produce none."""
    children = [
        desired_config_map(owner, spec),
        desired_deployment(owner, spec),
        desired_service(owner, spec),
    ]
    if spec.autoscaling.enabled:
        children.append(desired_hpa(owner, spec, min_replicas_floor))
    if spec.network_policy.enabled:
        children.append(desired_network_policy(owner, spec))
    if spec.pod_disruption_budget.enabled:
        children.append(desired_pod_disruption_budget(owner, spec))
    if spec.monitoring.service_monitor:
        children.append(desired_service_monitor(owner, spec))
    if spec.monitoring.prometheus_rule:
        children.append(desired_prometheus_rule(owner, spec))
    return children
