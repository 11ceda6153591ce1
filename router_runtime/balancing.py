"""Load balancing without an auxiliary loss (DeepSeek-V3 style) and an optional expert capacity.

The selection bias changes which experts are chosen, never the weights they get: the router adds it
to the scores only for the top-k choice and gathers the unbiased probabilities afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class SelectionBias(nn.Module):
    """Per-expert bias ``[E]`` nudged by ``rate`` toward even load after every routed batch."""

    bias: torch.Tensor

    def __init__(self, num_experts: int, rate: float) -> None:
        super().__init__()
        if rate < 0:
            raise ValueError(f"bias update rate must be >= 0, got {rate}")
        self.rate = float(rate)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        #: The bias's memory as numpy (shared, CPU): the fused kernel reads it, ``update`` writes it.
        self.bias_view: np.ndarray = self.bias.numpy()

    def pin_memory(self) -> None:
        """Move the bias into pinned host memory (a GPU router copies it to the device after every update)."""
        self.bias = self.bias.pin_memory()
        self.bias_view = self.bias.numpy()

    def update(self, expert_load: np.ndarray) -> None:
        """Raise the bias of under-loaded experts and lower that of over-loaded ones by ``rate``."""
        # E values: numpy on the host is cheaper than a chain of tiny torch ops; in place, so the tensor sees it.
        mean = float(expert_load.sum()) / expert_load.size if expert_load.size else 0.0
        step = np.sign(mean - expert_load, dtype=np.float32)
        step *= np.float32(self.rate)
        self.bias_view += step


def expert_capacity(capacity_factor: float, tokens: int, mean_k: float, num_experts: int) -> int:
    """Most assignments one expert takes in a batch: ceil(capacityFactor * T * meanK / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens * mean_k / num_experts))


def apply_capacity(
    indices: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop each expert's lowest-probability assignments beyond ``capacity`` and compact the rows.

    ``indices [T, K]`` expert ids, ``probs [T, K]`` their router probabilities, ``selected [T, K]``
    which slots are in use. Returns the same three with kept slots first in each row (order kept).
    """
    tokens, slots = indices.shape
    flat_expert = torch.where(selected, indices, num_experts).reshape(-1).to(torch.float64)
    # Group by expert (unused slots last), highest probability first inside a group.
    key = flat_expert * 2.0 + (1.0 - probs.reshape(-1).to(torch.float64))
    order = torch.argsort(key, stable=True)
    grouped_expert = flat_expert[order].to(torch.int64)
    group_size = torch.bincount(grouped_expert, minlength=num_experts + 1)
    group_start = group_size.cumsum(0) - group_size
    rank_in_group = torch.arange(order.numel(), device=order.device) - group_start[grouped_expert]
    rank = torch.empty_like(rank_in_group)
    rank[order] = rank_in_group
    keep = selected & (rank.reshape(tokens, slots) < capacity)
    # Stable sort on "dropped" moves kept slots to the front without reordering them.
    compact = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return indices.gather(1, compact), probs.gather(1, compact), keep.gather(1, compact)
