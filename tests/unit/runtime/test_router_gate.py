"""Gating a batch where its requests lie (``DynamicRouter.gate`` + ``route_logits``) decides as ``route`` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from router_runtime import router as router_module
from router_runtime.config import RouterConfig
from router_runtime.dtypes import bf16_bits
from router_runtime.experts import seeded_state
from router_runtime.protocol import rejected_by_gate
from router_runtime.router import DynamicRouter


def config(**fields: object) -> RouterConfig:
    base: dict[str, object] = {"inputDim": 16, "numExperts": 8, "minExperts": 1, "maxExperts": 4, "device": "cpu"}
    base.update(fields)
    return RouterConfig.model_validate(base)


def parts(sizes: list[int], d: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((size, d), dtype=np.float32) for size in sizes]


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("strategy", ["top_k", "top_p", "entropy", "complexity"])
def test_routing_from_in_place_logits_equals_routing_the_concatenated_batch(kernel: str, strategy: str) -> None:
    cfg = config(kernel=kernel, strategy=strategy)
    in_place, concatenated = DynamicRouter(cfg), DynamicRouter(cfg)
    for seed in range(3):  # several batches: the balancing bias and calibration evolve alike
        batch = parts([5, 1, 17, 9], seed=seed)
        got = in_place.route_logits(in_place.gate(batch))
        want = concatenated.route(torch.from_numpy(np.concatenate(batch)))
        assert torch.equal(got.indices, want.indices) and torch.equal(got.k, want.k)
        assert torch.allclose(got.weights, want.weights)
        assert got.stats.expert_load.tolist() == want.stats.expert_load.tolist()
    got_total, want_total = in_place.cumulative.snapshot(), concatenated.cumulative.snapshot()
    assert got_total.tokens == want_total.tokens and got_total.k_counts.tolist() == want_total.k_counts.tolist()
    assert got_total.dropped_mass == pytest.approx(want_total.dropped_mass)
    assert in_place.selection_bias is not None and concatenated.selection_bias is not None
    assert torch.equal(in_place.selection_bias.bias, concatenated.selection_bias.bias)


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_a_trained_complexity_probe_is_gated_in_place_too(kernel: str) -> None:
    cfg = config(kernel=kernel, strategy="complexity")
    state = seeded_state(cfg) | {"complexity.weight": torch.linspace(-1, 1, 16), "complexity.bias": torch.tensor(0.5)}
    in_place, concatenated = DynamicRouter(cfg, state), DynamicRouter(cfg, state)
    batch = parts([7, 3, 12])
    got = in_place.route_logits(in_place.gate(batch))
    want = concatenated.route(torch.from_numpy(np.concatenate(batch)))
    assert in_place.gate(batch).shape == (22, 9)  # the probe is the gate's last row
    assert torch.equal(got.indices, want.indices) and torch.equal(got.k, want.k)


def test_read_only_and_strided_parts_are_gated_correctly() -> None:
    router = DynamicRouter(config())
    writeable = parts([6, 4])
    read_only = np.frombuffer(writeable[0].tobytes(), dtype=np.float32).reshape(6, 16)
    strided = np.asfortranarray(writeable[1])
    logits = router.gate([read_only, strided])
    want = torch.from_numpy(np.concatenate(writeable)) @ router.gate_weight.t()
    assert torch.allclose(logits, want, atol=1e-5)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (np.zeros((2, 8), np.float32), r"\(uint16\) \[T, 16\]"),
        (np.zeros((2, 16), np.float64), "float32"),
        (np.zeros((2, 2, 16), np.float32), "float32"),
    ],
)
def test_gate_names_a_part_it_cannot_read(part: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DynamicRouter(config()).gate([part])


def test_a_router_with_expert_ffns_needs_the_whole_batch() -> None:
    router = DynamicRouter(config(experts={"enabled": True, "hiddenDim": 8}))
    assert not router.gates_in_place
    with pytest.raises(ValueError, match="expert FFNs"):
        router.gate(parts([2]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_token_is_caught_through_its_logits(bad: float) -> None:
    router = DynamicRouter(config())
    batch = parts([3, 4, 2])
    batch[1][2, 7] = bad
    rejected = rejected_by_gate(router.gate(batch).numpy(), batch)
    assert list(rejected) == [1]
    assert rejected[1].status == 400 and "NaN or Inf" in rejected[1].message


def test_a_non_finite_token_is_caught_even_where_the_gate_weight_is_zero() -> None:
    weight = torch.randn(8, 16)
    weight[:, 5] = 0.0  # Inf x 0 is NaN: the row is still caught
    router = DynamicRouter(config(), state={"gate.weight": weight})
    batch = parts([2, 2])
    batch[0][1, 5] = np.inf
    assert list(rejected_by_gate(router.gate(batch).numpy(), batch)) == [0]


def test_finite_values_whose_logits_overflow_are_refused_by_name() -> None:
    router = DynamicRouter(config())
    batch = parts([2, 3])
    batch[1][0, :] = 3e38
    rejected = rejected_by_gate(router.gate(batch).numpy(), batch)
    assert list(rejected) == [1] and "too large" in rejected[1].message


def test_a_clean_batch_has_nothing_rejected() -> None:
    router = DynamicRouter(config())
    batch = parts([8, 8])
    assert rejected_by_gate(router.gate(batch).numpy(), batch) == {}


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_fp16_and_bf16_parts_are_gated_and_routed_exactly_as_their_float32_values(kernel: str) -> None:
    sixteen, reference = DynamicRouter(config(kernel=kernel)), DynamicRouter(config(kernel=kernel))
    batch = parts([5, 9, 3, 6], seed=7)
    sent = [
        bf16_bits(batch[0]),
        batch[1].astype(np.float16),
        batch[2],
        np.frombuffer(bf16_bits(batch[3]).tobytes(), dtype=np.uint16).reshape(6, 16),  # read-only, as a body
    ]
    values = [
        torch.from_numpy(batch[0]).bfloat16().float().numpy(),
        sent[1].astype(np.float32),
        batch[2],
        torch.from_numpy(batch[3]).bfloat16().float().numpy(),
    ]
    logits = sixteen.gate(sent)
    assert torch.equal(logits, reference.gate(values))
    got = sixteen.route_logits(logits)
    want = reference.route(torch.from_numpy(np.concatenate(values)))
    assert torch.equal(got.indices, want.indices) and torch.equal(got.weights, want.weights)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["BF16", "FP16"])
def test_a_non_finite_16_bit_token_is_caught_through_its_logits(dtype: str, bad: float) -> None:
    router = DynamicRouter(config())
    batch = parts([3, 4])
    batch[1][1, 2] = bad
    sent = [bf16_bits(part) if dtype == "BF16" else part.astype(np.float16) for part in batch]
    rejected = rejected_by_gate(router.gate(sent).numpy(), sent)
    assert list(rejected) == [1] and "NaN or Inf" in rejected[1].message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["top_k", "top_p", "entropy", "complexity"])
def test_16_bit_tensors_are_routed_in_chunks_as_their_float32_values(
    dtype: torch.dtype, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "_WIDEN_BYTES", 7 * 4 * 16)  # 7 rows at a time: 50 tokens in 8 chunks
    sixteen, reference = DynamicRouter(config(strategy=strategy)), DynamicRouter(config(strategy=strategy))
    for seed in range(2):
        x = torch.from_numpy(parts([50], seed=seed)[0]).to(dtype).reshape(2, 25, 16)
        got, want = sixteen.route(x), reference.route(x.float())
        assert torch.equal(got.indices, want.indices) and torch.equal(got.k, want.k)
        assert torch.allclose(got.weights, want.weights)  # a matmul over 7 rows may round apart in the last bit
    assert sixteen.cumulative.snapshot().k_counts.tolist() == reference.cumulative.snapshot().k_counts.tolist()
