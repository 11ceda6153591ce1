"""The fused post-gate kernel decides exactly what the torch-op path decides, for every strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_runtime import kernels
from router_runtime.config import RouterConfig
from router_runtime.experts import COMPLEXITY_BIAS, COMPLEXITY_WEIGHT, seeded_state
from router_runtime.router import DynamicRouter

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed: no fused kernel to compare")


def config(kernel: str, **fields: Any) -> RouterConfig:
    base: dict[str, Any] = {"inputDim": 32, "numExperts": 8, "minExperts": 1, "maxExperts": 3, "strategy": "top_p"}
    # The CPU kernels compared with each other: on a GPU machine "auto" would put the torch path on the GPU.
    return RouterConfig.model_validate(base | fields | {"kernel": kernel, "device": "cpu"})


def pair(**fields: Any) -> tuple[DynamicRouter, DynamicRouter]:
    fused, plain = DynamicRouter(config("fused", **fields)), DynamicRouter(config("torch", **fields))
    assert fused.fused and not plain.fused
    return fused, plain


def selection_scores(router: DynamicRouter, x: torch.Tensor) -> torch.Tensor:
    """Probabilities plus the current selection bias ``[T, E]``: what top-K ranks."""
    e = router.config.num_experts
    probs = torch.softmax(torch.nn.functional.linear(x, router.gate_weight)[:, :e].float(), dim=-1)
    return probs + router.selection_bias.bias if router.selection_bias is not None else probs


def assert_same_decisions(fused: DynamicRouter, plain: DynamicRouter, x: torch.Tensor) -> None:
    scores = selection_scores(plain, x)
    a, b = fused.route(x), plain.route(x)
    assert torch.equal(a.k, b.k)
    differ = a.indices != b.indices
    if differ.any():
        # Only ties may be broken differently (torch.topk does not specify its order for equal values).
        left = scores.gather(1, a.indices.clamp(min=0))[differ]
        right = scores.gather(1, b.indices.clamp(min=0))[differ]
        torch.testing.assert_close(left, right, rtol=0, atol=1e-7)
        return
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.selected_mass, b.selected_mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.stats.expert_load, b.stats.expert_load)
    np.testing.assert_array_equal(a.stats.k_counts[: len(b.stats.k_counts)], b.stats.k_counts)
    assert a.stats.mean_k == pytest.approx(b.stats.mean_k)
    assert a.stats.dropped_mass == pytest.approx(b.stats.dropped_mass, abs=1e-5)


def inputs(seed: int, tokens: int = 257, dim: int = 32, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("strategy", ["top_k", "top_p", "entropy", "complexity"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("balancing", [True, False])
def test_every_strategy_matches_the_torch_path(strategy: str, renormalize: bool, balancing: bool) -> None:
    fused, plain = pair(
        strategy=strategy, renormalize=renormalize, loadBalancing={"enabled": balancing, "biasUpdateRate": 0.01}
    )
    # Several calls: the selection bias and the complexity calibration move between them.
    for seed in range(4):
        assert_same_decisions(fused, plain, inputs(seed))
    torch.testing.assert_close(
        fused.selection_bias.bias if fused.selection_bias is not None else torch.zeros(1),
        plain.selection_bias.bias if plain.selection_bias is not None else torch.zeros(1),
    )


def test_a_trained_complexity_probe_matches_the_torch_path() -> None:
    cfg = config("fused", strategy="complexity", maxExperts=4)
    state = dict(seeded_state(cfg))
    state[COMPLEXITY_WEIGHT] = torch.randn(32, generator=torch.Generator().manual_seed(3))
    state[COMPLEXITY_BIAS] = torch.tensor(0.25)
    fused = DynamicRouter(cfg, state)
    plain = DynamicRouter(config("torch", strategy="complexity", maxExperts=4), state)
    for seed in range(3):
        assert_same_decisions(fused, plain, inputs(seed))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(["top_k", "top_p", "entropy", "complexity"]),
    experts=st.sampled_from([2, 5, 8, 64]),
    k_range=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    top_p=st.floats(0.05, 1.0),
    tokens=st.integers(1, 300),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 10_000),
)
def test_random_configurations_match_the_torch_path(
    strategy: str, experts: int, k_range: tuple[int, int], top_p: float, tokens: int, scale: float, seed: int
) -> None:
    k_max = min(max(k_range), experts)
    k_min = min(min(k_range), k_max)
    fused, plain = pair(
        strategy=strategy, numExperts=experts, minExperts=k_min, maxExperts=k_max, topP=top_p, weights={"seed": seed}
    )
    assert_same_decisions(fused, plain, inputs(seed, tokens, scale=scale))


def test_large_batches_split_across_threads_route_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fused, plain = pair(strategy="entropy")
    x = inputs(7, tokens=3 * kernels.PARALLEL_MIN_TOKENS_PER_THREAD + 5)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(fused._row_ranges(x.shape[0])) == 3
        assert_same_decisions(fused, plain, x)
    finally:
        torch.set_num_threads(previous)


def test_capacity_factor_runs_the_torch_path() -> None:
    router = DynamicRouter(config("auto", loadBalancing={"capacityFactor": 1.0}))
    assert not router.fused


def test_auto_uses_the_fused_kernel_when_numba_is_installed() -> None:
    assert DynamicRouter(config("auto")).fused


def test_fused_without_numba_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    with pytest.raises(ValueError, match="numba is not installed"):
        DynamicRouter(config("fused"))
    assert not DynamicRouter(config("auto")).fused
