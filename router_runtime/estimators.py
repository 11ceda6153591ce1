"""Per-token expert-count estimators: how many experts each token gets, all vectorised.

Shapes: ``T`` tokens, ``E`` experts, ``K = maxExperts`` slots. Every function returns ``k [T]`` int64
clamped to ``[k_min, k_max]``; none loops over tokens in Python.
"""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np
import torch


def top_p_counts(ordered_probs: torch.Tensor, top_p: float, k_min: int, k_max: int) -> torch.Tensor:
    """Smallest prefix of ``ordered_probs [T, K]`` whose cumulative probability reaches ``top_p``.

    A slot is needed while the mass before it is still below ``top_p`` (Huang et al. 2024). The first
    slot always is (``top_p > 0``), so k = 1 + #{j < K-1 : cumsum_j < top_p}: three small ops.
    """
    slots = min(ordered_probs.shape[-1], k_max)
    if slots <= 1:
        fill = max(k_min, 1)
        return torch.full(ordered_probs.shape[:-1], fill, dtype=torch.int64, device=ordered_probs.device).clamp_(
            max=k_max
        )
    if slots == 2:
        # bool + int promotes to int64: k = 1 + [p_1 < top_p] in two ops.
        counts = (ordered_probs[..., 0] < top_p) + 1
    else:
        counts = (ordered_probs[..., : slots - 1].cumsum(-1) < top_p).sum(-1).add_(1)
    return counts.clamp_(min=k_min) if k_min > 1 else counts


def top_p_unneeded(ordered_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[T, K-1]`` bool: slot j+1 of ``ordered_probs [T, K]`` is not needed (the mass up to slot j reaches ``top_p``).

    The cumulative mass never decreases, so the unneeded slots are a suffix of each row and
    ``K - unneeded.sum(-1)`` equals ``top_p_counts`` with ``k_min = 1``; the router masks with it directly.
    """
    prefix = ordered_probs[..., :-1]
    return (prefix.cumsum(-1) if prefix.shape[-1] > 1 else prefix) >= top_p


def entropy_counts(
    probs: torch.Tensor, shifted: torch.Tensor, normaliser: torch.Tensor | None, k_min: int, k_max: int
) -> torch.Tensor:
    """k = round(exp(H)) = round(E ** (H / log E)): the effective number of experts of ``probs [T, E]``.

    The perplexity of the normalised entropy is exactly m for a distribution spread evenly over m
    experts and 1 for a one-hot one, so a confident token gets one expert and an undecided one several.
    With ``log p = shifted - log Z`` (``shifted`` the max-shifted logits, ``normaliser`` Z ``[T]``, or
    the log-probabilities and ``None`` for Z = 1): exp(H) = Z * exp(-sum_e p_e shifted_e), one dot
    product and no logarithm. ``shifted <= 0`` and ``p_e shifted_e >= -1/e`` keep the exponent below
    E/e, far from overflow.
    """
    perplexity = torch.linalg.vecdot(probs, shifted).neg_().exp_()
    if normaliser is not None:
        perplexity.mul_(normaliser)
    return perplexity.round_().clamp_(k_min, k_max).to(torch.int64)


def quantile_to_counts(quantile: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Map scores in [0, 1] evenly onto the integers ``k_min..k_max`` (higher score, more experts)."""
    span = k_max - k_min + 1
    # Truncation is floor here (scores are >= 0); the clamp catches a score of exactly 1.
    return (quantile * span).to(torch.int64).add_(k_min).clamp_(max=k_max)


class ComplexityCalibrator:
    """Running mean/variance of a raw per-token complexity score, so k spreads over its whole range.

    A raw score (a trained linear probe of the hidden state, or the top-1 uncertainty proxy) has an
    arbitrary scale; squashing it with a fixed sigmoid saturates and gives every token the same k.
    Standardising with running statistics and mapping through the normal CDF turns it into a
    quantile in (0, 1) that stays spread as the traffic drifts. ``window`` caps the effective
    sample count so old traffic fades.
    """

    def __init__(self, window: float = 1_000_000.0) -> None:
        if window <= 0:
            raise ValueError(f"calibration window must be positive, got {window}")
        self.window = float(window)
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    def update(self, raw: torch.Tensor) -> None:
        """Fold a batch of raw scores ``[T]`` into the running statistics (Chan's parallel merge)."""
        n = raw.numel()
        if n == 0:
            return
        batch_var_t, batch_mean_t = torch.var_mean(raw.detach().to(torch.float64), unbiased=False)
        self.merge(n, float(batch_mean_t), float(batch_var_t))

    def merge(self, n: int, batch_mean: float, batch_var: float) -> None:
        """Fold a batch given by its size, mean and (population) variance into the running statistics.

        A batch whose statistics are not finite (a token whose scores overflowed) is left out: folded in, it
        would make every later boundary NaN and give every token the same k until the process restarts.
        """
        if not (math.isfinite(batch_mean) and math.isfinite(batch_var)):
            return
        seen = min(self.count, self.window)
        total = seen + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * seen + batch_var * n + delta * delta * seen * n / total) / total
        self.count = total

    def quantile(self, raw: torch.Tensor) -> torch.Tensor:
        """Normal-CDF quantile of ``raw [T]`` under the running statistics, in (0, 1)."""
        scale = 1.0 / (math.sqrt(max(self.var, 1e-12)) * math.sqrt(2.0))
        z = (raw.to(torch.float32) - self.mean).mul_(scale)
        return torch.special.erf(z).add_(1.0).mul_(0.5)

    def counts(self, raw: torch.Tensor, k_min: int, k_max: int, update: bool = True) -> torch.Tensor:
        """k ``[T]`` for raw complexity scores ``[T]``; the batch joins the calibration first.

        Equal to ``quantile_to_counts(self.quantile(raw), ...)`` but cheaper: the CDF is monotone, so
        the k boundaries are moved into the raw score's units (mean + std * Phi^-1(j / span)) and
        one ``bucketize`` counts the boundaries each score has passed.
        """
        if update:
            self.update(raw)
        span = k_max - k_min + 1
        if span == 1:
            return torch.full(raw.shape, k_min, dtype=torch.int64, device=raw.device)
        boundaries = torch.from_numpy(self.boundaries(span)).to(raw.device)
        counts = torch.bucketize(raw.to(torch.float32), boundaries, right=True)
        return counts.add_(k_min) if k_min else counts

    def boundaries(self, span: int) -> np.ndarray:
        """The ``span - 1`` raw scores (float32, ascending) where k steps up by one under the current statistics."""
        std = math.sqrt(max(self.var, 1e-12))
        return np.array([self.mean + std * z for z in _normal_quantiles(span)], dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _normal_quantiles(span: int) -> tuple[float, ...]:
    """Standard normal quantiles Phi^-1(j / span), j = 1..span-1: where k steps up by one."""
    normal = statistics.NormalDist()
    return tuple(normal.inv_cdf(j / span) for j in range(1, span))


def top1_uncertainty_score(shifted: torch.Tensor, normaliser: torch.Tensor | None) -> torch.Tensor:
    """The default complexity score ``-log max_e p_e [T]``: how much the router doubts its first choice.

    With ``shifted`` the max-shifted logits and ``normaliser`` their exp-sum Z, ``max_e p_e = 1 / Z``, so
    the score is ``log Z`` (no extra pass over the activations); with ``normaliser=None`` ``shifted`` are
    the log-probabilities. A token whose top expert holds little of the mass gets more experts; the
    calibration then spreads the scores evenly over the k range. A trained probe (``complexity.weight``)
    replaces it when the weights provide one.
    """
    if normaliser is not None:
        return normaliser.log()
    return shifted.amax(dim=-1).neg_()
