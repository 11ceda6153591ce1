"""DynamicRouter: output layout, strategies, balancing, capacity, weights, statistics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from router_runtime.config import RouterConfig
from router_runtime.estimators import (
    ComplexityCalibrator,
    entropy_counts,
    quantile_to_counts,
    top_p_counts,
    top_p_unneeded,
)
from router_runtime.experts import WeightsError, seeded_state
from router_runtime.router import FUSED_SOFTMAX_MIN_EXPERTS, DynamicRouter, softmax_fp32


def config(**fields: object) -> RouterConfig:
    # CPU semantics, checked against CPU references; test_router_cuda checks that a GPU router decides alike.
    base: dict[str, object] = {"inputDim": 16, "numExperts": 8, "minExperts": 1, "maxExperts": 4, "device": "cpu"}
    base.update(fields)
    return RouterConfig.model_validate(base)


def tokens(t: int = 64, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed))


def gate_state(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"gate.weight": weight}


def test_outputs_are_token_major_padded_and_typed() -> None:
    result = DynamicRouter(config(strategy="top_p", topP=0.5)).route(tokens())
    assert result.indices.shape == (64, 4) and result.indices.dtype == torch.int64
    assert result.weights.shape == (64, 4) and result.weights.dtype == torch.float32
    assert result.k.shape == (64,)
    unused = torch.arange(4) >= result.k.unsqueeze(1)
    assert bool((result.indices[unused] == -1).all()) and bool((result.weights[unused] == 0).all())


def test_batch_sequence_input_is_flattened_token_major() -> None:
    router = DynamicRouter(config())
    x = tokens(12).reshape(3, 4, 16)
    assert torch.equal(router.route(x).indices, router.route(x.reshape(12, 16)).indices)


def test_numpy_input_is_accepted() -> None:
    result = DynamicRouter(config()).route(tokens(5).numpy())
    assert result.k.shape == (5,)


def test_top_k_gives_every_token_max_experts_by_descending_probability() -> None:
    result = DynamicRouter(config(strategy="top_k", loadBalancing={"enabled": False})).route(tokens())
    assert bool((result.k == 4).all())
    assert bool((result.weights[:, :-1] >= result.weights[:, 1:]).all())


def test_top_p_gives_confident_tokens_fewer_experts() -> None:
    weight = torch.zeros(8, 16)
    weight[0, 0] = 20.0  # feature 0 pushes expert 0 hard; a zero feature leaves the router undecided
    router = DynamicRouter(config(strategy="top_p", topP=0.9, loadBalancing={"enabled": False}), gate_state(weight))
    confident, undecided = torch.zeros(2, 16)
    confident[0] = 1.0
    result = router.route(torch.stack([confident, undecided]))
    assert result.k.tolist() == [1, 4]


def test_entropy_k_is_the_effective_number_of_experts() -> None:
    weight = torch.zeros(8, 16)
    weight[0, 0] = weight[1, 0] = 10.0  # feature 0 splits the mass evenly over experts 0 and 1
    router = DynamicRouter(config(strategy="entropy", loadBalancing={"enabled": False}), gate_state(weight))
    two_way, uniform = torch.zeros(2, 16)
    two_way[0] = 1.0
    result = router.route(torch.stack([two_way, uniform]))
    assert result.k.tolist() == [2, 4]
    assert sorted(result.indices[0, :2].tolist()) == [0, 1]


def test_complexity_counts_spread_over_the_whole_range() -> None:
    router = DynamicRouter(config(strategy="complexity", minExperts=1, maxExperts=4))
    scales = torch.logspace(-1, 1, 512).unsqueeze(1)
    result = router.route(tokens(512) * scales)
    counts = torch.bincount(result.k, minlength=5)[1:]
    assert bool((counts > 512 / 4 * 0.6).all()), counts  # no saturation at one end


def test_complexity_gives_tokens_with_flatter_gate_logits_more_experts() -> None:
    router = DynamicRouter(config(strategy="complexity"))
    scales = torch.logspace(-1, 1, 256).unsqueeze(1)
    k = router.route(tokens(256) * scales).k.float()
    assert k[:64].mean() > k[-64:].mean() + 1.5


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("experts", [8, 64])
def test_complexity_gives_tokens_whose_top_expert_holds_less_mass_more_experts(kernel: str, experts: int) -> None:
    router = DynamicRouter(config(strategy="complexity", numExperts=experts, maxExperts=4, kernel=kernel))
    x = tokens(512) * torch.logspace(-1, 1, 512).unsqueeze(1)
    k = router.route(x).k
    top1 = torch.softmax(x @ router.gate_weight.t(), dim=-1).max(dim=-1).values
    k_by_confidence = k[top1.argsort(descending=True)]
    assert bool((k_by_confidence[1:] >= k_by_confidence[:-1]).all())  # the less confident, the more experts
    assert k_by_confidence[0] == 1 and k_by_confidence[-1] == 4


def test_complexity_uses_a_trained_probe_from_the_weights() -> None:
    state = seeded_state(config()) | {"complexity.weight": torch.zeros(16), "complexity.bias": torch.tensor(0.0)}
    state["complexity.weight"][3] = 1.0
    router = DynamicRouter(config(strategy="complexity"), state)
    x = tokens(256)
    x[:, 3] = torch.linspace(-3, 3, 256)
    k = router.route(x).k.float()
    assert k[-64:].mean() > k[:64].mean() + 1.5


def test_weights_are_renormalised_over_the_selected_set() -> None:
    result = DynamicRouter(config(strategy="top_p", topP=0.6)).route(tokens())
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(64))


def test_without_renormalisation_weights_are_the_router_probabilities() -> None:
    result = DynamicRouter(config(strategy="top_k", renormalize=False)).route(tokens())
    torch.testing.assert_close(result.weights.sum(-1), result.selected_mass)
    assert bool((result.selected_mass < 1).all())


def test_same_seed_routes_identically_and_another_seed_differently() -> None:
    x = tokens()
    first = DynamicRouter(config(weights={"seed": 7})).route(x)
    again = DynamicRouter(config(weights={"seed": 7})).route(x)
    other = DynamicRouter(config(weights={"seed": 8})).route(x)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.weights, again.weights)
    assert not torch.equal(first.indices, other.indices)


def skewed_router(rate: float, **fields: object) -> DynamicRouter:
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) / 4
    weight[0, 0] = 2.0  # with feature 0 always on, expert 0 is everybody's favourite
    return DynamicRouter(
        config(strategy="top_k", maxExperts=2, loadBalancing={"biasUpdateRate": rate, **fields}), gate_state(weight)
    )


def skewed_tokens(t: int) -> torch.Tensor:
    x = tokens(t)
    x[:, 0] = 1.0
    return x


def test_selection_bias_evens_out_a_skewed_load() -> None:
    x = skewed_tokens(512)
    router = skewed_router(0.005)
    before = router.route(x, update_state=False).stats.load_cv
    for _ in range(200):
        router.route(x)
    assert router.route(x, update_state=False).stats.load_cv < before / 4


def test_disabled_balancing_keeps_the_skew() -> None:
    x = skewed_tokens(512)
    router = skewed_router(0.005, enabled=False)
    before = router.route(x).stats.load_cv
    for _ in range(20):
        router.route(x)
    assert router.route(x).stats.load_cv == pytest.approx(before)


def test_selection_bias_changes_choices_but_not_weights() -> None:
    x = skewed_tokens(256)
    router = skewed_router(0.05)
    for _ in range(50):
        router.route(x)
    result = router.route(x, update_state=False)
    probs = torch.softmax(x @ router.gate_weight.t(), -1)
    assert not torch.equal(result.indices, probs.topk(2, -1).indices)  # the bias moved some choices
    chosen = probs.gather(1, result.indices)
    torch.testing.assert_close(result.weights, chosen / chosen.sum(-1, keepdim=True))


def test_capacity_factor_caps_every_experts_load() -> None:
    router = skewed_router(0.0, capacityFactor=1.0)
    result = router.route(skewed_tokens(400))
    capacity = math.ceil(1.0 * 400 * 2 / 8)
    assert int(result.stats.expert_load.max()) <= capacity
    assert bool((result.k < 2).any())  # the favourite expert overflowed and dropped assignments


def test_capacity_drops_keep_rows_compact() -> None:
    result = skewed_router(0.0, capacityFactor=1.0).route(skewed_tokens(400))
    used = result.indices >= 0
    assert torch.equal(used, torch.arange(2) < result.k.unsqueeze(1))


def test_statistics_report_k_flops_dropped_mass_and_load() -> None:
    router = DynamicRouter(config(strategy="top_p", topP=0.5))
    result = router.route(tokens())
    stats = result.stats
    assert stats.tokens == 64
    assert stats.mean_k == pytest.approx(result.k.float().mean().item())
    assert stats.flops_ratio == pytest.approx(stats.mean_k / 4)
    assert stats.dropped_mass == pytest.approx(1 - result.selected_mass.mean().item(), abs=1e-6)
    assert int(stats.expert_load.sum()) == int(result.k.sum())
    load = stats.expert_load
    assert stats.load_cv == pytest.approx(load.std() / load.mean())


def test_cumulative_statistics_add_up_calls() -> None:
    router = DynamicRouter(config(strategy="entropy"))
    first, second = router.route(tokens(10, seed=1)), router.route(tokens(30, seed=2))
    total = router.cumulative.snapshot()
    assert total.tokens == 40
    assert total.mean_k == pytest.approx((first.k.sum() + second.k.sum()).item() / 40)
    assert np.array_equal(total.expert_load, first.stats.expert_load + second.stats.expert_load)


def test_routing_without_state_update_leaves_cumulative_stats_alone() -> None:
    router = DynamicRouter(config())
    router.route(tokens(), update_state=False)
    assert router.cumulative.snapshot().tokens == 0


def test_empty_input_routes_to_empty_outputs() -> None:
    result = DynamicRouter(config()).route(torch.zeros(0, 16))
    assert result.indices.shape == (0, 4) and result.stats.tokens == 0


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(4, 15), "last dimension 15"),
        (torch.zeros(16), "must be \\[T, d\\]"),
        (torch.zeros(4, 16, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_input_raises_a_specific_error(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DynamicRouter(config()).route(x)


def test_expert_outputs_with_all_experts_equal_the_dense_mixture() -> None:
    cfg = config(numExperts=4, maxExperts=4, minExperts=4, strategy="top_k", experts={"enabled": True, "hiddenDim": 8})
    router = DynamicRouter(cfg)
    x = tokens(32)
    result = router.route(x)
    assert router.experts is not None and result.output is not None
    probs = torch.softmax(x @ router.gate_weight.t(), -1)
    torch.testing.assert_close(result.output, router.experts.dense(x, probs), rtol=1e-4, atol=1e-5)


def test_weights_are_loaded_from_a_safetensors_file(tmp_path: Path) -> None:
    state = seeded_state(config(weights={"seed": 3}, experts={"enabled": True, "hiddenDim": 4}))
    path = tmp_path / "router.safetensors"
    save_file(state, str(path))
    from_file = DynamicRouter(config(weights={"path": str(path)}, experts={"enabled": True, "hiddenDim": 4}))
    seeded = DynamicRouter(config(weights={"seed": 3}, experts={"enabled": True, "hiddenDim": 4}))
    x = tokens()
    assert torch.equal(from_file.route(x).indices, seeded.route(x).indices)


def test_weights_file_with_a_wrong_shape_is_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"gate.weight": torch.zeros(8, 15)}, str(path))
    with pytest.raises(WeightsError, match=r"'gate.weight' has shape \[8, 15\], expected \[8, 16\]"):
        DynamicRouter(config(weights={"path": str(path)}))


def test_missing_expert_tensors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "gate-only.safetensors"
    save_file({"gate.weight": torch.zeros(8, 16)}, str(path))
    with pytest.raises(WeightsError, match=r"missing tensor 'experts\.w1'"):
        DynamicRouter(config(weights={"path": str(path)}, experts={"enabled": True}))


def test_missing_or_corrupt_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        DynamicRouter(config(weights={"path": str(tmp_path / "none.safetensors")}))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        DynamicRouter(config(weights={"path": str(corrupt)}))


def test_seeded_initialisation_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="router_runtime.experts"):
        DynamicRouter(config(weights={"seed": 5}))
    assert "seeded initialisation (seed=5" in caplog.text


def test_quantiles_map_evenly_onto_the_k_range() -> None:
    quantiles = torch.tensor([0.0, 0.24, 0.26, 0.49, 0.51, 0.74, 0.76, 0.99, 1.0])
    assert quantile_to_counts(quantiles, 1, 4).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 4]


@pytest.mark.parametrize("experts", [8, FUSED_SOFTMAX_MIN_EXPERTS])
def test_softmax_fp32_matches_torch_softmax_and_its_log_identity(experts: int) -> None:
    logits = torch.randn(50, experts, generator=torch.Generator().manual_seed(1)) * 4
    probs, shifted, normaliser = softmax_fp32(logits)
    assert shifted is not None
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    log_z = torch.zeros(50) if normaliser is None else normaliser.log()
    torch.testing.assert_close(shifted - log_z.unsqueeze(1), torch.log_softmax(logits, -1))


def test_entropy_counts_equal_the_rounded_perplexity() -> None:
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(2)) * 2
    probs, shifted, normaliser = softmax_fp32(logits)
    assert shifted is not None
    perplexity = torch.exp(-(probs * probs.log()).sum(-1))
    expected = perplexity.round().clamp(1, 8).to(torch.int64)
    close_to_half = (perplexity - perplexity.floor() - 0.5).abs() < 1e-4  # rounding ties may go either way
    assert torch.equal(entropy_counts(probs, shifted, normaliser, 1, 8)[~close_to_half], expected[~close_to_half])


def test_top_p_unneeded_slots_are_the_complement_of_top_p_counts() -> None:
    ordered = torch.softmax(torch.randn(300, 8, generator=torch.Generator().manual_seed(3)), -1).sort(-1, True).values
    for slots in (2, 3, 4):
        unneeded = top_p_unneeded(ordered[:, :slots], 0.7)
        assert torch.equal(slots - unneeded.sum(-1), top_p_counts(ordered[:, :slots], 0.7, 1, slots))


def test_calibrated_counts_equal_the_normal_cdf_quantiles() -> None:
    raw = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 3 + 1
    calibrator = ComplexityCalibrator()
    calibrator.update(raw)
    direct = quantile_to_counts(calibrator.quantile(raw), 1, 4)
    assert (calibrator.counts(raw, 1, 4, update=False) != direct).sum() <= 2  # float rounding at the boundaries


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_batch_with_non_finite_statistics_leaves_the_calibration_as_it_was(bad: float) -> None:
    calibrator = ComplexityCalibrator()
    calibrator.update(torch.randn(100, generator=torch.Generator().manual_seed(2)))
    before = (calibrator.mean, calibrator.var, calibrator.count)
    calibrator.merge(10, bad, 1.0)
    calibrator.merge(10, 0.5, bad)
    calibrator.update(torch.tensor([1.0, bad]))
    assert (calibrator.mean, calibrator.var, calibrator.count) == before


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_a_token_whose_logits_overflow_does_not_break_the_complexity_calibration(kernel: str) -> None:
    # Routed directly (the server refuses such a request before this): the later batches must still spread k.
    router = DynamicRouter(config(strategy="complexity", kernel=kernel))
    huge = tokens(4)
    huge[1] = 3e38
    router.route(huge)
    assert router.calibrator is not None
    assert math.isfinite(router.calibrator.mean) and math.isfinite(router.calibrator.var)
    assert len(torch.unique(router.route(tokens(256, seed=5)).k)) == 4


def test_route_logits_with_expert_input_equals_route() -> None:
    routed, gated = DynamicRouter(config(experts={"enabled": True, "hiddenDim": 8})), DynamicRouter(
        config(experts={"enabled": True, "hiddenDim": 8})
    )
    x = tokens(32, seed=6)
    expected = routed.route(x)
    expert_input, logits = gated.gate_batch(x)
    assert expert_input is not None
    got = gated.route_logits(logits, expert_input=expert_input)
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.weights, expected.weights)
    assert got.output is not None and expected.output is not None and torch.equal(got.output, expected.output)
    with pytest.raises(ValueError, match="rows"):
        gated.route_logits(logits, expert_input=expert_input[:3])


def test_calibration_merged_from_moments_equals_calibration_from_scores() -> None:
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 3 + 1
    from_scores, from_moments = ComplexityCalibrator(), ComplexityCalibrator()
    for chunk in scores.split(250):
        from_scores.update(chunk)
        values = chunk.double()
        from_moments.merge(len(chunk), float(values.mean()), float(values.var(unbiased=False)))
    assert from_moments.mean == pytest.approx(from_scores.mean)
    assert from_moments.var == pytest.approx(from_scores.var)
    assert from_moments.mean == pytest.approx(float(scores.double().mean()), rel=1e-9)
