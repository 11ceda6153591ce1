"""Per-token expert-count estimators: how many experts each token gets, all vectorised.

Shapes: ``T`` tokens, ``E`` experts, ``K = maxExperts`` slots. Every function returns ``k [T]`` int64
clamped to ``[k_min, k_max]``; none loops over tokens in Python.
"""

from __future__ import annotations

import math

import torch


def top_p_counts(ordered_probs: torch.Tensor, top_p: float, k_min: int, k_max: int) -> torch.Tensor:
    """Smallest prefix of ``ordered_probs [T, K]`` whose cumulative probability reaches ``top_p``.

    A slot is needed while the mass before it is still below ``top_p`` (Huang et al. 2024).
    """
    mass_before = ordered_probs.cumsum(-1).sub_(ordered_probs)
    return (mass_before < top_p).sum(-1).clamp_(k_min, k_max)


def entropy_counts(probs: torch.Tensor, log_probs: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """k = round(exp(H)) = round(E ** (H / log E)): the effective number of experts of ``probs [T, E]``.

    The perplexity of the normalised entropy is exactly m for a distribution spread evenly over m
    experts and 1 for a one-hot one, so a confident token gets one expert and an undecided one several.
    """
    entropy = (probs * log_probs).sum(-1).neg_()
    return entropy.exp_().round_().to(torch.int64).clamp_(k_min, k_max)


def quantile_to_counts(quantile: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Map scores in [0, 1] evenly onto the integers ``k_min..k_max`` (higher score, more experts)."""
    span = k_max - k_min + 1
    # Truncation is floor here (scores are >= 0); the clamp catches a score of exactly 1.
    return (quantile * span).to(torch.int64).add_(k_min).clamp_(max=k_max)


class ComplexityCalibrator:
    """Running mean/variance of a raw per-token complexity score, so k spreads over its whole range.

    A raw score (a trained linear probe of the hidden state, or the logit-spread proxy) has an
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
        batch_var_t, batch_mean_t = torch.var_mean(raw.detach().to(torch.float32), unbiased=False)
        batch_mean, batch_var = float(batch_mean_t), float(batch_var_t)
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
        """k ``[T]`` for raw complexity scores ``[T]``; the batch joins the calibration first."""
        if update:
            self.update(raw)
        return quantile_to_counts(self.quantile(raw), k_min, k_max)


def logit_spread_score(logits: torch.Tensor) -> torch.Tensor:
    """The default complexity score ``-log std_e(logits)`` of the gate projection ``W x`` ``[T, E]``.

    The spread of the projected hidden state sets the router's temperature for that token: a small
    spread means a flat distribution, an ambiguous token and more experts. It costs no extra pass over
    the activations; a trained probe (``complexity.weight``) replaces it when the weights provide one.
    Written as E[l^2] - E[l]^2 because ``Tensor.std`` over a short last dim is slow on CPU; pass the
    max-shifted logits for numerical safety (the spread is shift invariant).
    """
    mean = logits.mean(dim=-1)
    variance = logits.square().mean(dim=-1).sub_(mean.square_())
    return variance.clamp_(min=1e-24).log_().mul_(-0.5)
