"""The dynamic-expert router: gate ``Linear(d, E)``, fp32 softmax, a per-token expert count.

``DynamicRouter.route(x)`` maps ``x [T, d]`` (or ``[B, S, d]``, flattened token-major to ``[B*S, d]``) to

* ``indices [T, maxExperts]`` int64, chosen experts by descending selection score, -1 in unused slots,
* ``weights [T, maxExperts]`` float32, 0 in unused slots (renormalised over the selected set if configured),
* ``k [T]`` int64 in ``[minExperts, maxExperts]`` (a capacity factor may drop assignments below it),

plus per-call and cumulative statistics. Every strategy is vectorised: one gate matmul, a softmax,
one ``topk`` with ``maxExperts`` slots, then a per-token mask; no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from router_runtime.balancing import SelectionBias, apply_capacity, expert_capacity
from router_runtime.config import RouterConfig
from router_runtime.estimators import (
    ComplexityCalibrator,
    entropy_counts,
    logit_spread_score,
    top_p_counts,
)
from router_runtime.experts import (
    COMPLEXITY_BIAS,
    COMPLEXITY_WEIGHT,
    EXPERT_W1,
    EXPERT_W2,
    GATE_WEIGHT,
    ExpertFFNs,
    check_tensor,
    load_weights_file,
    seeded_state,
)
from router_runtime.stats import CumulativeStats, RoutingStats


@dataclass(frozen=True)
class RoutingResult:
    """What one ``route`` call decided; tensors are token-major, ``T`` = number of tokens."""

    indices: torch.Tensor
    weights: torch.Tensor
    k: torch.Tensor
    selected_mass: torch.Tensor
    stats: RoutingStats
    output: torch.Tensor | None = None


def softmax_fp32(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities ``[T, E]``, max-shifted logits ``[T, E]`` and normaliser ``[T, 1]``, in fp32.

    Written out because ``torch.softmax`` over a short last dim (E=8) is several times slower on CPU
    than these vectorised passes; ``log_probs = shifted - log(normaliser)`` is then one more op.
    """
    shifted = logits.to(torch.float32) - logits.amax(dim=-1, keepdim=True).to(torch.float32)
    probs = shifted.exp()
    normaliser = probs.sum(dim=-1, keepdim=True)
    probs.div_(normaliser)
    return probs, shifted, normaliser


class DynamicRouter(nn.Module):
    """Routes tokens to a per-token number of experts; see the module docstring for the layout.

    ``state`` maps tensor names (see ``router_runtime.experts``) to weights; without it the router reads
    ``config.weights.path`` or, when that is unset, initialises deterministically from the seed.
    Routing mutates only the load-balancing bias, the complexity calibration and the cumulative stats.
    """

    gate_weight: torch.Tensor
    slots: torch.Tensor

    def __init__(self, config: RouterConfig, state: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        if state is None:
            state = load_weights_file(config.weights.path) if config.weights.path else seeded_state(config)
        d, e, k_max = config.input_dim, config.num_experts, config.max_experts
        gate = check_tensor(state, GATE_WEIGHT, (e, d))
        self.probe_bias = 0.0
        self.has_probe = config.strategy == "complexity" and COMPLEXITY_WEIGHT in state
        if self.has_probe:
            probe = check_tensor(state, COMPLEXITY_WEIGHT, (d,))
            if COMPLEXITY_BIAS in state:
                self.probe_bias = float(check_tensor(state, COMPLEXITY_BIAS, ()))
            # One matmul computes the gate logits and the probe score: the activations are read once.
            gate = torch.cat([gate, probe.unsqueeze(0)], dim=0)
        self.register_buffer("gate_weight", gate)
        self.register_buffer("slots", torch.arange(k_max))
        balancing = config.load_balancing
        self.selection_bias = SelectionBias(e, balancing.bias_update_rate) if balancing.enabled else None
        self.calibrator = ComplexityCalibrator() if config.strategy == "complexity" else None
        self.experts: ExpertFFNs | None = None
        if config.experts.enabled:
            h = config.experts.hidden_dim
            self.experts = ExpertFFNs(
                check_tensor(state, EXPERT_W1, (e, h, d)),
                check_tensor(state, EXPERT_W2, (e, d, h)),
                config.experts.activation,
            )
        self.cumulative = CumulativeStats(e, k_max)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def as_tokens(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``[T, d]`` or ``[B, S, d]`` floating input as a float32 ``[T, d]`` view (copy only if needed)."""
        tensor = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        d = self.config.input_dim
        if tensor.dim() not in (2, 3):
            raise ValueError(f"router input must be [T, d] or [B, S, d], got shape {list(tensor.shape)}")
        if tensor.shape[-1] != d:
            raise ValueError(f"router input has last dimension {tensor.shape[-1]}, the router's inputDim is {d}")
        if not tensor.is_floating_point():
            raise ValueError(f"router input must be a floating point tensor, got {tensor.dtype}")
        return tensor.reshape(-1, d).to(torch.float32)

    @torch.inference_mode()
    def route(
        self, x: torch.Tensor | np.ndarray, *, update_state: bool = True, compute_output: bool = True
    ) -> RoutingResult:
        """Route ``x [T, d] | [B, S, d]`` -> ``RoutingResult`` (indices/weights ``[T, maxExperts]``, k ``[T]``).

        ``update_state=False`` leaves the balancing bias, calibration and cumulative stats untouched.
        """
        cfg = self.config
        tokens = self.as_tokens(x)
        e, k_max = cfg.num_experts, cfg.max_experts
        logits = F.linear(tokens, self.gate_weight)
        probs, shifted, normaliser = softmax_fp32(logits[:, :e] if self.has_probe else logits)
        complexity_raw = None
        if self.has_probe:
            complexity_raw = logits[:, e] + self.probe_bias
        elif self.calibrator is not None:
            complexity_raw = logit_spread_score(shifted)

        if self.selection_bias is not None:
            _, indices = torch.topk(probs + self.selection_bias.bias, k_max, dim=-1)
            top_probs = probs.gather(1, indices)
        else:
            top_probs, indices = torch.topk(probs, k_max, dim=-1)

        k = self._counts(tokens, probs, shifted, normaliser, top_probs, complexity_raw, update_state)
        capacity_factor = cfg.load_balancing.capacity_factor
        weights = top_probs
        # Every slot is used when k is constant and nothing is dropped: skip the masking passes.
        if capacity_factor is not None or (cfg.min_experts < k_max and cfg.strategy != "top_k"):
            selected = self.slots < k.unsqueeze(1)
            if capacity_factor is not None and tokens.shape[0] > 0:
                mean_k = float(k.sum()) / tokens.shape[0]
                capacity = expert_capacity(capacity_factor, tokens.shape[0], mean_k, e)
                indices, weights, selected = apply_capacity(indices, weights, selected, e, capacity)
                k = selected.sum(-1)
            weights.mul_(selected)
            indices.masked_fill_(~selected, -1)
        selected_mass = weights.sum(-1)
        if cfg.renormalize:
            weights.div_(selected_mass.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1))
        stats = RoutingStats.from_selection(k, indices, selected_mass, e)
        if update_state:
            if self.selection_bias is not None:
                self.selection_bias.update(stats.expert_load)
            self.cumulative.add(stats)
        output = None
        if self.experts is not None and compute_output:
            output = self.experts(tokens, indices, weights)
        return RoutingResult(indices, weights, k, selected_mass, stats, output)

    def _counts(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor,
        shifted: torch.Tensor,
        normaliser: torch.Tensor,
        top_probs: torch.Tensor,
        complexity_raw: torch.Tensor | None,
        update_state: bool,
    ) -> torch.Tensor:
        """Per-token expert count ``k [T]`` of the configured strategy."""
        cfg = self.config
        k_min, k_max = cfg.min_experts, cfg.max_experts
        if cfg.strategy == "top_k":
            return torch.full((tokens.shape[0],), k_max, dtype=torch.int64)
        if cfg.strategy == "top_p":
            return top_p_counts(top_probs, cfg.top_p, k_min, k_max)
        if cfg.strategy == "entropy":
            log_probs = shifted.sub_(normaliser.log())
            return entropy_counts(probs, log_probs, k_min, k_max)
        assert self.calibrator is not None and complexity_raw is not None
        return self.calibrator.counts(complexity_raw, k_min, k_max, update=update_state)
