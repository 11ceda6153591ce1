"""Router and expert weights: safetensors loading with shape checks, seeded initialisation, expert FFNs.

Tensor names in a weights file (all float):
  ``gate.weight``        [E, d]   required
  ``complexity.weight``  [d]      optional trained complexity probe (strategy ``complexity``)
  ``complexity.bias``    []       optional
  ``experts.w1``         [E, h, d]  required when experts are enabled
  ``experts.w2``         [E, d, h]  required when experts are enabled
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from router_runtime.config import RouterConfig

log = logging.getLogger(__name__)

GATE_WEIGHT = "gate.weight"
COMPLEXITY_WEIGHT = "complexity.weight"
COMPLEXITY_BIAS = "complexity.bias"
EXPERT_W1 = "experts.w1"
EXPERT_W2 = "experts.w2"

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class WeightsError(ValueError):
    """A weights file is missing a tensor or holds one of the wrong shape."""


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (the one I/O of the core, done once at start-up)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"weights file {file} does not exist")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"weights file {file} is not a readable safetensors file: {exc}") from exc


def check_tensor(state: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor ``name`` of ``state``, or a ``WeightsError`` naming what is wrong."""
    if name not in state:
        raise WeightsError(f"weights are missing tensor {name!r} (expected shape {list(shape)})")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    if not tensor.is_floating_point():
        raise WeightsError(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating point type")
    return tensor.to(torch.float32).contiguous()


def seeded_state(config: RouterConfig) -> dict[str, torch.Tensor]:
    """Deterministic weights from ``config.weights.seed`` (logged: nothing here was trained)."""
    generator = torch.Generator().manual_seed(config.weights.seed)
    d, e = config.input_dim, config.num_experts
    # Logit std 2 for unit-variance inputs: the sharpness of trained routers (mean top-1 probability
    # about 0.55 at E=8, 0.3 at E=64), so the dynamic strategies behave as they would in production.
    state = {GATE_WEIGHT: 2.0 * torch.randn(e, d, generator=generator) / math.sqrt(d)}
    if config.experts.enabled:
        h = config.experts.hidden_dim
        state[EXPERT_W1] = torch.randn(e, h, d, generator=generator) / math.sqrt(d)
        state[EXPERT_W2] = torch.randn(e, d, h, generator=generator) / math.sqrt(h)
    log.info(
        "no weights file configured: router %r uses seeded initialisation (seed=%d, d=%d, E=%d, experts=%s)",
        config.model_name,
        config.weights.seed,
        d,
        e,
        config.experts.enabled,
    )
    return state


class ExpertFFNs(nn.Module):
    """E independent FFNs ``act(x W1^T) W2^T`` combined with the router's weights: [T, d] -> [T, d]."""

    w1: torch.Tensor
    w2: torch.Tensor

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, activation: str) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.activation: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[activation]

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x [T, d]``, ``indices [T, K]`` (-1 unused), ``weights [T, K]`` -> mixture output ``[T, d]``."""
        slots = indices.shape[1]
        out = torch.zeros_like(x, dtype=torch.float32)
        flat = indices.reshape(-1)
        used = (flat >= 0).nonzero().squeeze(1)
        # Sort assignments by expert so each expert runs one dense matmul over its tokens.
        order = used[torch.argsort(flat[used], stable=True)]
        per_expert = torch.bincount(flat[order], minlength=self.num_experts).tolist()
        token_of = torch.div(order, slots, rounding_mode="floor")
        weight_of = weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(per_expert):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            hidden = self.activation(F.linear(x[rows].to(torch.float32), self.w1[expert]))
            out.index_add_(0, rows, F.linear(hidden, self.w2[expert]) * weight_of[start : start + count, None])
            start += count
        return out

    def dense(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The dense mixture ``sum_e probs[:, e] * FFN_e(x)`` over all experts: the quality reference."""
        out = torch.zeros_like(x, dtype=torch.float32)
        for expert in range(self.num_experts):
            hidden = self.activation(F.linear(x.to(torch.float32), self.w1[expert]))
            out.add_(F.linear(hidden, self.w2[expert]) * probs[:, expert : expert + 1])
        return out
