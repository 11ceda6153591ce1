"""The MoERouter API (moerouter.io/v1alpha1): spec and status models.

The CRD's openAPIV3Schema is generated from these models (see ``crd.py``);
``spec.router`` is the runtime's own ``RouterConfig``, so the operator and the
runtime share one schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from router_runtime.config import BatchingConfig, CamelModel, RouterConfig

GROUP = "moerouter.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MoERouter"
PLURAL = "moerouters"
SINGULAR = "moerouter"
SHORT_NAMES = ["moer"]

#: Free-form Kubernetes objects passed through to the children (validated by the API server there).
FreeForm = dict[str, Any]
FREE_FORM_SCHEMA: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

DEFAULT_RUNTIME_IMAGE = "ghcr.io/moe-router-operator/router-runtime:0.1.0"


def free_form(description: str) -> Any:
    """A pass-through object field whose schema is left open (x-kubernetes-preserve-unknown-fields)."""
    return Field(None, description=description, json_schema_extra=FREE_FORM_SCHEMA)


class SecretKeyRef(CamelModel):
    """A key in a Secret in the MoERouter's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(..., min_length=1, max_length=253, description="Key inside the Secret.")


DEFAULT_REQUESTS = {"cpu": "500m", "memory": "1Gi"}
DEFAULT_LIMITS = {"memory": "2Gi"}


class ResourceRequirements(CamelModel):
    """Runtime container resources; only without requests and limits: requests 500m/1Gi, limit memory 2Gi."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _defaults_only_when_omitted(cls, data: Any) -> Any:
        # A default limit next to a user's larger request would be rejected by the API server.
        if isinstance(data, Mapping) and "requests" not in data and "limits" not in data:
            return {**data, "requests": dict(DEFAULT_REQUESTS), "limits": dict(DEFAULT_LIMITS)}
        return data


class RuntimeSpec(CamelModel):
    """How the router runtime pods run."""

    image: str | None = Field(
        None,
        min_length=1,
        description="Router runtime image. Default: the runtime of the operator's own release "
        f"({DEFAULT_RUNTIME_IMAGE} for this one), so an operator upgrade moves routers that leave it unset to "
        "the matching runtime; set it to pin one.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets.")
    port: int = Field(8080, ge=1024, le=65535, description="Container port of the HTTP API (non-root).")
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_request_tokens: int = Field(65536, ge=1, le=16_777_216, description="Most tokens per request.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key clients must send (Bearer or X-API-Key)."
    )
    startup_seconds: int = Field(
        300,
        ge=1,
        le=7200,
        description="Expected time from pod creation to ready (image pull, weights); sizes the startup "
        "probe and the default prediction horizon.",
    )
    termination_grace_period_seconds: int = Field(
        30,
        ge=1,
        le=3600,
        description="The pod's grace period: a preStop sleep (5 s), the runtime's drain of in-flight requests "
        "and a 5 s margin fit in it.",
    )
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Server processes per pod (router.yaml server.workers), each holding its own copy of the "
        "weights; 0 = auto: the container's CPU limit, 1 without a limit. Set 1 with large hosted experts.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[FreeForm] = Field(
        default_factory=list, json_schema_extra={"items": FREE_FORM_SCHEMA}
    )
    affinity: FreeForm | None = free_form("Pod affinity (core/v1 Affinity), passed through.")
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    env: list[FreeForm] = Field(
        default_factory=list,
        description="Extra environment variables (core/v1 EnvVar), passed through.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )
    volumes: list[FreeForm] = Field(
        default_factory=list,
        description="Extra volumes (core/v1 Volume), e.g. expert weights.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )
    volume_mounts: list[FreeForm] = Field(
        default_factory=list,
        description="Extra volume mounts (core/v1 VolumeMount) of the runtime container.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )
    service_account_name: str | None = Field(None, description="Service account of the pods.")


class PrometheusTLS(CamelModel):
    insecure_skip_verify: bool = False
    ca_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding a PEM CA bundle.")


class BasicAuthSecretRef(CamelModel):
    name: str = Field(..., min_length=1, max_length=253)
    username_key: str = "username"
    password_key: str = "password"


class PrometheusSpec(CamelModel):
    """Where the history of the request rate comes from."""

    url: str = Field(..., min_length=1, pattern=r"^https?://", description="Base URL of the Prometheus API.")
    query: str | None = Field(
        None,
        description="PromQL for the request rate (requests/s). Default: the rate of the runtime's "
        "moe_router_requests_total over this MoERouter's pods.",
    )
    bearer_token_secret_ref: SecretKeyRef | None = None
    basic_auth_secret_ref: BasicAuthSecretRef | None = None
    tls: PrometheusTLS = Field(default_factory=PrometheusTLS)
    timeout_seconds: float = Field(10.0, gt=0.0, le=120.0)


class PredictiveSpec(CamelModel):
    """Forecast the request rate and raise the HPA's minReplicas ahead of the load."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.mode == 'Off' || has(self.prometheus)",
                    "message": "autoscaling.predictive.prometheus is required unless mode is Off",
                },
                {
                    "rule": "self.mode == 'Off' || has(self.capacityPerReplica)",
                    "message": "autoscaling.predictive.capacityPerReplica is required unless mode is Off",
                },
            ]
        }
    )

    mode: Literal["Off", "ForecastOnly", "Active"] = Field(
        "Off", description="Off; ForecastOnly: status and metrics only; Active: patch the HPA's minReplicas."
    )
    prometheus: PrometheusSpec | None = None
    capacity_per_replica: float | None = Field(
        None, gt=0.0, description="Requests/s one replica serves at 100% utilisation."
    )
    target_utilization: float = Field(0.7, gt=0.0, le=1.0)
    horizon_seconds: int | None = Field(
        None,
        ge=15,
        le=86400,
        description="How far ahead to provision; must be > runtime.startupSeconds. "
        "Default: runtime.startupSeconds + 120.",
    )
    lookback_seconds: int = Field(
        8 * 86400, ge=3600, le=35 * 86400, description="History fetched from Prometheus."
    )
    step_seconds: int = Field(60, ge=5, le=3600, description="Resolution of the fetched history.")
    interval_seconds: int = Field(60, ge=10, le=3600, description="How often the forecast is recomputed.")
    seasonality: Literal["auto", "daily", "weekly", "none"] = "auto"
    grace_period_seconds: int = Field(
        600, ge=0, le=86400, description="How long the last good recommendation is kept when Prometheus fails."
    )
    scale_down_stabilization_seconds: int = Field(
        600, ge=0, le=86400, description="A lower recommendation takes effect only after holding this long."
    )

    @model_validator(mode="after")
    def _enabled_needs_source(self) -> PredictiveSpec:
        if self.mode != "Off":
            if self.prometheus is None:
                raise ValueError("autoscaling.predictive.prometheus is required unless mode is Off")
            if self.capacity_per_replica is None:
                raise ValueError("autoscaling.predictive.capacityPerReplica is required unless mode is Off")
        return self


class AutoscalingSpec(CamelModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) for the runtime, plus predictive scaling."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                }
            ]
        }
    )

    enabled: bool = Field(False, description="Create an HPA; spec.replicas is then ignored.")
    min_replicas: int = Field(1, ge=1, le=10000)
    max_replicas: int = Field(10, ge=1, le=10000)
    target_cpu_utilization: int = Field(
        70, ge=1, le=100, description="CPU target used when metrics is empty."
    )
    metrics: list[FreeForm] = Field(
        default_factory=list,
        description="autoscaling/v2 MetricSpec list, passed through.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )
    behavior: FreeForm | None = free_form("autoscaling/v2 HorizontalPodAutoscalerBehavior, passed through.")
    predictive: PredictiveSpec = Field(default_factory=PredictiveSpec)

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.min_replicas}) must be <= "
                f"autoscaling.maxReplicas ({self.max_replicas})"
            )
        return self


class NetworkPolicySpec(CamelModel):
    """Ingress to the router pods: the configured clients and the metrics scraper; the rest denied."""

    enabled: bool = True
    allowed_clients: list[FreeForm] | None = Field(
        None,
        description="NetworkPolicyPeer list allowed to call the API. Default: pods in the same namespace. "
        "An empty list allows no client.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )
    metrics_scrapers: list[FreeForm] = Field(
        default_factory=lambda: [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        description="NetworkPolicyPeer list allowed to scrape /metrics.",
        json_schema_extra={"items": FREE_FORM_SCHEMA},
    )


class PodDisruptionBudgetSpec(CamelModel):
    enabled: bool = True
    max_unavailable: int = Field(
        1,
        ge=0,
        le=10000,
        description=(
            "Router pods that voluntary disruptions may take down at once. 0 blocks every eviction of "
            "this router's pods: node drains and cluster-autoscaler scale-downs then wait until it is raised."
        ),
    )


class MonitoringSpec(CamelModel):
    """prometheus-operator objects (need its CRDs in the cluster)."""

    service_monitor: bool = Field(False, description="Create a ServiceMonitor for the runtime pods.")
    prometheus_rule: bool = Field(False, description="Create a PrometheusRule with the router alerts.")
    scrape_interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")


class MoERouterSpec(CamelModel):
    """Desired state of a MoERouter."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # runtime (and its startupSeconds), autoscaling and predictive are defaulted before validation.
                    "rule": "!has(self.autoscaling.predictive.horizonSeconds) || "
                    "self.autoscaling.predictive.horizonSeconds > self.runtime.startupSeconds",
                    "message": "autoscaling.predictive.horizonSeconds must be > runtime.startupSeconds: pods "
                    "added for a nearer forecast are not ready before the demand arrives",
                }
            ]
        }
    )

    router: RouterConfig = Field(default_factory=RouterConfig)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    replicas: int = Field(2, ge=0, le=10000, description="Replicas when autoscaling is off (/scale target).")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    pod_disruption_budget: PodDisruptionBudgetSpec = Field(
        default_factory=PodDisruptionBudgetSpec
    )
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)

    @model_validator(mode="after")
    def _horizon_outlasts_startup(self) -> MoERouterSpec:
        horizon, startup = self.autoscaling.predictive.horizon_seconds, self.runtime.startup_seconds
        if horizon is not None and horizon <= startup:
            raise ValueError(
                f"autoscaling.predictive.horizonSeconds ({horizon}) must be > runtime.startupSeconds ({startup}): "
                "pods added for a nearer forecast are not ready before the demand arrives"
            )
        return self


class Condition(CamelModel):
    """metav1.Condition."""

    model_config = ConfigDict(frozen=False)

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str


class PredictionStatus(CamelModel):
    model_config = ConfigDict(frozen=False)

    predicted_load: float | None = Field(None, description="Upper-quantile forecast (requests/s) over the horizon.")
    horizon_seconds: int | None = None
    recommended_replicas: int | None = None
    applied_min_replicas: int | None = Field(
        None, description="The HPA minReplicas the predictive controller holds in effect (Active mode)."
    )
    model: str | None = Field(None, description="Forecaster chosen by backtest.")
    backtest_error: float | None = None
    updated_at: str | None = None


class MoERouterStatus(CamelModel):
    """Observed state of a MoERouter."""

    model_config = ConfigDict(frozen=False, extra="allow")

    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        # As metav1.Condition lists: one entry per type, so server-side apply merges them by type.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    prediction: PredictionStatus | None = None


class SpecError(ValueError):
    """A MoERouter spec that cannot be used; the message names the offending fields."""


def _field_path(location: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(spec: Mapping[str, Any] | None) -> MoERouterSpec:
    """Validate a MoERouter ``spec`` (wire form); raise SpecError naming every bad field."""
    try:
        return MoERouterSpec.model_validate(dict(spec or {}))
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            location = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            problems.append(f"{_field_path(location)}: {error['msg']}")
        raise SpecError("; ".join(problems)) from None
