"""The fused post-gate kernel decides exactly what the torch-op path decides, for every strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_runtime import kernels
from router_runtime import router as router_module
from router_runtime.config import RouterConfig
from router_runtime.dtypes import bf16_bits
from router_runtime.experts import COMPLEXITY_BIAS, COMPLEXITY_WEIGHT, seeded_state
from router_runtime.router import DynamicRouter

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed: no fused kernel to compare")


@pytest.fixture(autouse=True)
def torch_gate_logits(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The comparisons below are of what follows the gate: both routers get torch's (MKL's) logits, bit for bit.

    The fused router's own gate kernel rounds differently in the last bit (``test_the_gate_kernel_*``), which
    could break a near-tie differently; that is tested apart from the decisions.
    """
    if "gate_kernel" in request.node.name:
        return

    def torch_rows(x: np.ndarray, w: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        out[start:stop] = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()[start:stop]

    monkeypatch.setattr(kernels, "gate_rows", torch_rows)
    monkeypatch.setattr(router_module, "onednn_linear", lambda: None)  # the torch-kernel router: torch's matmul


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


@pytest.mark.parametrize("outputs", [1, 8, 9, 64])
@pytest.mark.parametrize("tokens", [0, 1, 3, 4, 5, 258])
def test_the_gate_kernel_computes_the_logits(outputs: int, tokens: int) -> None:
    rng = np.random.default_rng(outputs * 1000 + tokens)
    x = rng.standard_normal((tokens, 96), dtype=np.float32)
    w = rng.standard_normal((outputs, 96), dtype=np.float32)
    out = np.full((tokens, outputs), np.nan, dtype=np.float32)
    kernels.gate_rows(x, w, 0, tokens, out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_the_gate_kernel_gives_a_token_the_same_bits_wherever_it_sits() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((11, 64), dtype=np.float32)
    w = rng.standard_normal((9, 64), dtype=np.float32)
    alone = np.empty((11, 9), dtype=np.float32)
    kernels.gate_rows(x, w, 0, 11, alone)
    for shift in (1, 2, 3):  # every offset against the blocks of four, the padded tail included
        shifted = np.concatenate([rng.standard_normal((shift, 64), dtype=np.float32), x])
        out = np.empty((11 + shift, 9), dtype=np.float32)
        kernels.gate_rows(shifted, w, 0, 11 + shift, out)
        np.testing.assert_array_equal(out[shift:], alone)
    split = np.empty_like(alone)
    kernels.gate_rows(x, w, 0, 6, split)
    kernels.gate_rows(x, w, 6, 11, split)
    np.testing.assert_array_equal(split, alone)


def test_the_gate_kernel_keeps_nan_and_inf_for_the_server_to_find() -> None:
    x = np.ones((6, 16), dtype=np.float32)
    w = np.ones((3, 16), dtype=np.float32)
    w[:, 2] = 0.0
    x[1, 0], x[3, 2], x[4, 5] = np.nan, np.inf, -np.inf  # Inf x 0 is NaN: still caught
    out = np.empty((6, 3), dtype=np.float32)
    kernels.gate_rows(x, w, 0, 6, out)
    assert np.isfinite(out).all(axis=1).tolist() == [True, False, True, False, False, True]


def test_routing_through_the_gate_kernel_agrees_with_torch_up_to_near_ties() -> None:
    fused, plain = pair(strategy="top_k", loadBalancing={"enabled": False})
    x = inputs(11, tokens=2049)
    a, b = fused.route(x), plain.route(x)
    logits = torch.nn.functional.linear(x, plain.gate_weight)
    top4 = logits.topk(4, dim=1).values
    clear = (top4[:, :-1] - top4[:, 1:]).min(dim=1).values > 1e-4  # no two of the top 4 within rounding
    assert clear.float().mean() > 0.99
    assert torch.equal(a.indices[clear], b.indices[clear])
    torch.testing.assert_close(a.weights[clear], b.weights[clear], rtol=1e-5, atol=1e-6)


def test_the_gate_kernel_is_left_out_for_a_gate_too_big_for_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = kernels.gate_rows

    def counting(*args: Any) -> None:
        calls.append(1)
        original(*args)

    monkeypatch.setattr(kernels, "gate_rows", counting)
    small = DynamicRouter(config("fused"))
    small.route(inputs(0, tokens=8))
    assert calls
    calls.clear()
    monkeypatch.setattr(kernels, "GATE_MAX_WEIGHT_BYTES", 8 * 32 * 4 - 1)  # this gate is 8 x 32 float32
    big = DynamicRouter(config("fused"))
    assert big.fused
    result = big.route(inputs(0, tokens=8))
    assert not calls and result.indices.shape == (8, 3)


@pytest.mark.parametrize("outputs", [1, 8, 9])
@pytest.mark.parametrize("rows", [(0, 0), (0, 1), (0, 4), (1, 7), (3, 258)])
def test_the_bf16_gate_kernel_gives_the_bits_of_the_widened_tokens(outputs: int, rows: tuple[int, int]) -> None:
    start, stop = rows
    rng = np.random.default_rng(outputs + stop)
    values = rng.standard_normal((stop + 2, 96), dtype=np.float32)
    values[0, :3] = [np.nan, np.inf, -0.0]
    bits = bf16_bits(values)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    w = rng.standard_normal((outputs, 96), dtype=np.float32)
    got = np.full((stop + 2, outputs), 7.0, dtype=np.float32)
    want = got.copy()
    kernels.gate_rows_bf16(bits, w, start, stop, got)
    kernels.gate_rows(widened, w, start, stop, want)
    np.testing.assert_array_equal(got, want)  # NaN rows compare equal as NaN; rows outside the range untouched
