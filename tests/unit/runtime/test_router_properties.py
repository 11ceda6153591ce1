"""Property tests of DynamicRouter over random configurations and inputs (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from router_runtime.config import RouterConfig
from router_runtime.router import DynamicRouter, RoutingResult

STRATEGIES = ["top_k", "top_p", "entropy", "complexity"]


@st.composite
def routed(
    draw: st.DrawFn, strategy: str | None = None, full_range: bool = False
) -> tuple[RouterConfig, RoutingResult]:
    e = draw(st.integers(1, 12))
    k_max = e if full_range else draw(st.integers(1, e))
    k_min = draw(st.integers(1, k_max))
    d = draw(st.integers(1, 12))
    config = RouterConfig.model_validate(
        {
            "inputDim": d,
            "numExperts": e,
            "minExperts": k_min,
            "maxExperts": k_max,
            "strategy": strategy or draw(st.sampled_from(STRATEGIES)),
            "topP": draw(st.floats(0.05, 1.0)),
            "renormalize": True,
            "loadBalancing": {"enabled": draw(st.booleans()), "biasUpdateRate": 0.01},
            "weights": {"seed": draw(st.integers(0, 1000))},
        }
    )
    t = draw(st.integers(1, 40))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))  # flat, moderate and very sharp routers
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 10_000)))) * scale
    router = DynamicRouter(config)
    router.route(x)  # one call first, so balancing bias and calibration are in play
    return config, router.route(x)


@settings(max_examples=60, deadline=None)
@given(routed())
def test_k_stays_within_min_and_max(case: tuple[RouterConfig, RoutingResult]) -> None:
    config, result = case
    assert bool(((result.k >= config.min_experts) & (result.k <= config.max_experts)).all())


@settings(max_examples=60, deadline=None)
@given(routed())
def test_indices_are_valid_unique_and_padded(case: tuple[RouterConfig, RoutingResult]) -> None:
    config, result = case
    used = torch.arange(config.max_experts) < result.k.unsqueeze(1)
    assert bool((result.indices[used] >= 0).all()) and bool((result.indices[used] < config.num_experts).all())
    assert bool((result.indices[~used] == -1).all())
    for row, k in zip(result.indices.tolist(), result.k.tolist(), strict=True):
        assert len(set(row[:k])) == k


@settings(max_examples=60, deadline=None)
@given(routed())
def test_weights_are_non_negative_and_sum_to_one_over_the_selected_set(
    case: tuple[RouterConfig, RoutingResult],
) -> None:
    _, result = case
    assert bool((result.weights >= 0).all())
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(result.k.shape[0]), rtol=0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(routed(strategy="top_p", full_range=True))
def test_top_p_never_drops_more_than_one_minus_p(case: tuple[RouterConfig, RoutingResult]) -> None:
    config, result = case
    dropped = 1.0 - result.selected_mass
    assert bool((dropped <= 1.0 - config.top_p + 1e-5).all())


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(STRATEGIES), st.integers(0, 1000))
def test_fixed_seed_routes_deterministically(strategy: str, seed: int) -> None:
    config = RouterConfig.model_validate(
        {
            "inputDim": 8,
            "numExperts": 6,
            "minExperts": 1,
            "maxExperts": 3,
            "strategy": strategy,
            "weights": {"seed": seed},
        }
    )
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(seed))
    first, second = DynamicRouter(config), DynamicRouter(config)
    for _ in range(3):
        a, b = first.route(x), second.route(x)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights) and torch.equal(a.k, b.k)
