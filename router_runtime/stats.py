"""Routing statistics: what one routed batch cost and how evenly it spread, per call and cumulative.

Pure torch/numpy: the router fills a ``RoutingStats`` per call, ``CumulativeStats`` folds them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch


def load_cv(load: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of per-expert assignment counts; 0 when nothing was routed."""
    if not load.size:
        return 0.0
    # One float64 dot product instead of numpy's mean/std: this runs on every routed batch.
    values = load.astype(np.float64)
    mean = float(values.sum()) / values.size
    if mean <= 0.0:
        return 0.0
    variance = max(float(values @ values) / values.size - mean * mean, 0.0)
    return math.sqrt(variance) / mean


@dataclass(frozen=True)
class RoutingStats:
    """Statistics of one ``DynamicRouter.route`` call.

    ``flops_ratio`` is the expert compute actually spent relative to static top-``maxExperts``
    routing of the same tokens (mean k / maxExperts); the gate's own cost is the same for both.
    ``dropped_mass`` is the mean router probability left on unselected experts.
    """

    tokens: int
    mean_k: float
    flops_ratio: float
    dropped_mass: float
    expert_load: np.ndarray
    k_counts: np.ndarray

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of ``expert_load``; computed when read, not on every routed batch."""
        return load_cv(self.expert_load)

    @classmethod
    def from_selection(
        cls,
        k: torch.Tensor,
        indices: torch.Tensor,
        selected_mass: torch.Tensor,
        num_experts: int,
        *,
        constant_k: int | None = None,
    ) -> RoutingStats:
        """Build from ``k [T]``, ``indices [T, K]`` (-1 padded) and ``selected_mass [T]``.

        ``constant_k``: every token has exactly this k (static routing), which skips counting ``k``.
        Runs in numpy on the CPU tensors' memory: a handful of microseconds instead of a chain of torch ops.
        """
        tokens = int(k.shape[0])
        max_experts = int(indices.shape[1]) if indices.dim() == 2 else 0
        # Shift by one so the -1 padding lands in bin 0, which is then discarded.
        flat = indices.reshape(-1).numpy()
        load = np.bincount(flat + 1, minlength=num_experts + 1)[1:]
        if constant_k is not None:
            k_counts = np.zeros(max(max_experts, constant_k) + 1, dtype=np.int64)
            k_counts[constant_k] = tokens
        else:
            k_counts = np.bincount(k.numpy(), minlength=max_experts + 1)
        return cls.from_counts(
            tokens, load, k_counts, float(selected_mass.numpy().sum(dtype=np.float64)), max_experts
        )

    @classmethod
    def from_counts(
        cls, tokens: int, load: np.ndarray, k_counts: np.ndarray, selected_mass_sum: float, max_experts: int
    ) -> RoutingStats:
        """Build from histograms already counted (the fused kernel counts while it routes)."""
        mean_k = float(k_counts @ np.arange(k_counts.shape[0])) / tokens if tokens else 0.0
        dropped = (tokens - selected_mass_sum) / tokens if tokens else 0.0
        return cls(
            tokens=tokens,
            mean_k=mean_k,
            flops_ratio=mean_k / max_experts if max_experts else 0.0,
            dropped_mass=max(dropped, 0.0),
            expert_load=load,
            k_counts=k_counts,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "tokens": self.tokens,
            "mean_k": self.mean_k,
            "flops_ratio": self.flops_ratio,
            "dropped_mass": self.dropped_mass,
            "expert_load": self.expert_load.tolist(),
            "load_cv": self.load_cv,
        }


class CumulativeStats:
    """Running totals over every routed token since the router was built (thread-safe reads)."""

    def __init__(self, num_experts: int, max_experts: int) -> None:
        self._lock = threading.Lock()
        self._num_experts = num_experts
        self._max_experts = max_experts
        self.calls = 0
        self.tokens = 0
        self._dropped_mass_sum = 0.0
        self._expert_load = np.zeros(num_experts, dtype=np.int64)
        self._k_counts = np.zeros(max_experts + 1, dtype=np.int64)

    def add(self, stats: RoutingStats) -> None:
        with self._lock:
            self.calls += 1
            self.tokens += stats.tokens
            self._dropped_mass_sum += stats.dropped_mass * stats.tokens
            self._expert_load += stats.expert_load
            self._k_counts += stats.k_counts[: self._max_experts + 1]

    def snapshot(self) -> RoutingStats:
        """The cumulative figures in the same shape as a per-call ``RoutingStats``."""
        with self._lock:
            tokens = self.tokens
            load = self._expert_load.copy()
            k_counts = self._k_counts.copy()
            dropped_sum = self._dropped_mass_sum
        total_k = int((k_counts * np.arange(k_counts.shape[0])).sum())
        mean_k = total_k / tokens if tokens else 0.0
        return RoutingStats(
            tokens=tokens,
            mean_k=mean_k,
            flops_ratio=mean_k / self._max_experts if self._max_experts else 0.0,
            dropped_mass=dropped_sum / tokens if tokens else 0.0,
            expert_load=load,
            k_counts=k_counts,
        )


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F, the reconstruction error the quality benchmark reports."""
    denom = float(torch.linalg.vector_norm(exact))
    if denom == 0.0 or math.isnan(denom):
        return 0.0
    return float(torch.linalg.vector_norm(approx - exact)) / denom
