"""The router configuration: one schema shared by the operator, the CRD and the runtime.

This module must stay importable without torch: the operator image embeds
``RouterConfig`` as ``MoERouter.spec.router`` and renders ``RuntimeFileConfig``
into the ConfigMap that the runtime reads back with the same models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

Strategy = Literal["top_k", "top_p", "entropy", "complexity"]

#: Environment variable that overrides the config file path.
CONFIG_PATH_ENV = "MOE_ROUTER_CONFIG"
#: Environment variable holding the API key (set from a Secret by the operator).
API_KEY_ENV = "MOE_ROUTER_API_KEY"
#: File holding the API key when the Secret is mounted instead of exposed as env.
API_KEY_FILE_ENV = "MOE_ROUTER_API_KEY_FILE"
#: The file name inside the ConfigMap and the mount path the runtime reads by default.
CONFIG_FILE_NAME = "router.yaml"
DEFAULT_CONFIG_PATH = f"/etc/moe-router/{CONFIG_FILE_NAME}"


class CamelModel(BaseModel):
    """Base for every API model: camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict a Kubernetes object or the config file holds."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


class LoadBalancingConfig(CamelModel):
    """Auxiliary-loss-free balancing: a per-expert selection bias nudged toward even load."""

    enabled: bool = Field(True, description="Update the per-expert selection bias from observed load.")
    bias_update_rate: float = Field(
        0.001, ge=0.0, le=1.0, description="Step gamma of the bias update per routed batch."
    )
    capacity_factor: float | None = Field(
        None,
        ge=1.0,
        le=64.0,
        description="If set, an expert takes at most capacityFactor * T * meanK / E tokens per batch; "
        "lower-scored assignments beyond that are dropped.",
    )


class WeightsConfig(CamelModel):
    """Where the gate (and expert) weights come from."""

    path: str | None = Field(
        None, description="A safetensors file inside the pod. When absent, weights are seeded and logged as such."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the deterministic initialisation.")


class ExpertsConfig(CamelModel):
    """Optional expert FFNs, so the runtime can return the full MoE layer output."""

    enabled: bool = Field(False, description="Host the expert FFNs and return moe_output [T, inputDim].")
    hidden_dim: int = Field(1024, ge=1, le=65536, description="Hidden width of each expert FFN.")
    activation: Literal["silu", "gelu", "relu"] = "silu"


class RouterConfig(CamelModel):
    """The dynamic-expert router: a gate Linear(inputDim, numExperts) and a per-token expert count."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minExperts <= self.maxExperts",
                    "message": "router.minExperts must be <= router.maxExperts",
                },
                {
                    "rule": "self.maxExperts <= self.numExperts",
                    "message": "router.maxExperts must be <= router.numExperts",
                },
            ]
        }
    )

    model_name: str = Field(
        "moe-router",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="The model name served under /v2/models/{name}.",
    )
    input_dim: int = Field(768, ge=1, le=65536, description="Hidden size d of the incoming activations.")
    num_experts: int = Field(8, ge=1, le=1024, description="Number of experts E.")
    min_experts: int = Field(1, ge=1, le=1024, description="Fewest experts any token is routed to.")
    max_experts: int = Field(2, ge=1, le=1024, description="Most experts any token is routed to.")
    strategy: Strategy = Field(
        "top_p",
        description="top_k: static maxExperts; top_p: smallest set reaching topP probability; "
        "entropy: k from the normalised entropy of the scores; complexity: k from a calibrated "
        "hidden-state estimator.",
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Cumulative probability threshold for top_p.")
    renormalize: bool = Field(True, description="Renormalise the weights over the selected experts.")
    kernel: Literal["auto", "fused", "torch"] = Field(
        "auto",
        description="Post-gate routing code: fused (compiled passes over the rows, needs numba), torch "
        "(a chain of torch ops), or auto (fused when numba is installed). Both give the same decisions.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$",
        description="Where the gate and the expert FFNs run: cpu, cuda, cuda:N, or auto (the first CUDA GPU "
        "torch sees, else cpu). Results come back to the host either way; the fused kernel is CPU-only.",
    )
    load_balancing: LoadBalancingConfig = Field(default_factory=LoadBalancingConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)

    @model_validator(mode="after")
    def _expert_counts_are_ordered(self) -> RouterConfig:
        if self.min_experts > self.max_experts:
            raise ValueError(
                f"router.minExperts ({self.min_experts}) must be <= router.maxExperts ({self.max_experts})"
            )
        if self.max_experts > self.num_experts:
            raise ValueError(
                f"router.maxExperts ({self.max_experts}) must be <= router.numExperts ({self.num_experts})"
            )
        return self


class BatchingConfig(CamelModel):
    """Dynamic batching across concurrent requests."""

    max_batch_tokens: int = Field(8192, ge=1, le=1_048_576, description="Most tokens routed in one batch.")
    max_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="Longest a request waits for others to join its batch."
    )
    max_queue_requests: int = Field(
        256, ge=1, le=100_000, description="Bounded queue; when full the server answers 503 with Retry-After."
    )


class ServerConfig(CamelModel):
    """HTTP server settings of the runtime."""

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_request_tokens: int = Field(
        65536, ge=1, le=16_777_216, description="Most tokens one request may carry (413 beyond)."
    )
    max_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_inflight_bytes: int | None = Field(
        None,
        ge=1024,
        description="Most bytes of request bodies one worker holds at once; a request that would pass it is "
        "answered 503 with Retry-After (one request alone is always admitted). Absent: derived from the "
        "container's memory limit (cgroup) shared among the workers; no budget without a limit.",
    )
    shutdown_grace_seconds: float = Field(
        20.0, ge=0.0, le=3600.0, description="Time in-flight requests get to finish after SIGTERM."
    )
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Server processes sharing the port, each with its own router, batcher and "
        "cpus/workers torch threads; 0 = auto: the container's CPU limit (cgroup), 1 without a limit.",
    )


class RuntimeFileConfig(CamelModel):
    """The whole file the runtime reads: what the operator renders into the ConfigMap."""

    router: RouterConfig = Field(default_factory=RouterConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> RuntimeFileConfig:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("the router config file must hold a mapping at its top level")
        return cls.model_validate(data)

    @classmethod
    def load(cls, path: str | Path | None) -> RuntimeFileConfig:
        """Read a config file; ``None`` gives the embedded defaults."""
        if path is None:
            return cls()
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"))
