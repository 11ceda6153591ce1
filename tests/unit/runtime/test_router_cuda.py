"""router.device cuda: the GPU router decides as the CPU router does and hands results back on the host.

Runs where torch sees a CUDA GPU (a CUDA torch build on a GPU machine); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from router_runtime.config import RouterConfig
from router_runtime.experts import COMPLEXITY_WEIGHT, seeded_state
from router_runtime.router import DynamicRouter, RoutingResult

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here"
)

D = 64


def config(**fields: object) -> RouterConfig:
    base: dict[str, object] = {"inputDim": D, "numExperts": 8, "minExperts": 1, "maxExperts": 4}
    base.update(fields)
    return RouterConfig.model_validate(base)


def tokens(t: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


CASES: dict[str, dict[str, object]] = {
    "top_k": {"strategy": "top_k"},
    "top_p": {"strategy": "top_p", "topP": 0.7},
    "top_p_min2": {"strategy": "top_p", "topP": 0.7, "minExperts": 2},
    "entropy": {"strategy": "entropy"},
    "complexity": {"strategy": "complexity"},
    "no_balancing_no_renorm": {"strategy": "top_p", "renormalize": False, "loadBalancing": {"enabled": False}},
    "capacity": {"strategy": "top_p", "topP": 0.7, "loadBalancing": {"capacityFactor": 1.25}},
    "e64": {"strategy": "top_p", "numExperts": 64, "maxExperts": 8},
    "experts": {"strategy": "entropy", "experts": {"enabled": True, "hiddenDim": 32}},
}


def pair(fields: dict[str, object]) -> tuple[DynamicRouter, DynamicRouter]:
    cpu_config = config(device="cpu", kernel="torch", **fields)
    state = seeded_state(cpu_config)
    cpu = DynamicRouter(cpu_config, state)
    gpu = DynamicRouter(config(device="cuda", **fields), state)
    return cpu, gpu


def assert_same_decisions(a: RoutingResult, b: RoutingResult) -> None:
    same = (a.indices == b.indices).all(1) & (a.k == b.k)
    # fp32 matmuls on two devices round differently: a token on a near-tie may go either way.
    assert float(same.float().mean()) >= 0.995
    torch.testing.assert_close(a.weights[same], b.weights[same], atol=1e-5, rtol=1e-4)
    assert a.stats.tokens == b.stats.tokens
    assert abs(a.stats.mean_k - b.stats.mean_k) < 0.01


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_routes_as_the_cpu_torch_path(case: str) -> None:
    cpu, gpu = pair(CASES[case])
    assert gpu.device.type == "cuda" and not gpu.fused
    for seed in range(3):  # the balancing bias and the calibration evolve alike
        x = tokens(seed=seed)
        assert_same_decisions(cpu.route(x), gpu.route(x))


def test_results_come_back_on_the_host() -> None:
    _, gpu = pair(CASES["experts"])
    result = gpu.route(tokens(256))
    assert result.output is not None
    for tensor in (result.indices, result.weights, result.k, result.selected_mass, result.output):
        assert tensor.device.type == "cpu"


def test_a_device_tensor_input_is_routed_too() -> None:
    cpu, gpu = pair(CASES["top_p"])
    x = tokens(512)
    assert_same_decisions(cpu.route(x), gpu.route(x.cuda()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_tokens_are_routed_as_the_cpu_routes_them(dtype: torch.dtype) -> None:
    cpu, gpu = pair(CASES["top_p"])
    x = tokens(512).to(dtype)  # sent to the device at 16 bits, widened there
    assert_same_decisions(cpu.route(x), gpu.route(x))


def test_expert_outputs_match_the_cpu() -> None:
    cpu, gpu = pair(CASES["experts"])
    x = tokens(1024)
    a, b = cpu.route(x), gpu.route(x)
    same = (a.indices == b.indices).all(1)
    assert a.output is not None and b.output is not None
    torch.testing.assert_close(a.output[same], b.output[same], atol=1e-4, rtol=1e-4)


def test_the_device_bias_follows_the_host_bias() -> None:
    _, gpu = pair({"loadBalancing": {"biasUpdateRate": 0.01}})
    for seed in range(5):
        gpu.route(tokens(1024, seed=seed))
    assert gpu.selection_bias is not None and gpu._device_bias is not None
    assert bool(gpu.selection_bias.bias.abs().sum() > 0)
    assert torch.equal(gpu._device_bias.cpu(), gpu.selection_bias.bias)


def test_a_trained_complexity_probe_runs_on_the_gpu() -> None:
    fields: dict[str, object] = {"strategy": "complexity"}
    cpu_config = config(device="cpu", kernel="torch", **fields)
    state = seeded_state(cpu_config) | {COMPLEXITY_WEIGHT: torch.linspace(-1, 1, D)}
    cpu = DynamicRouter(cpu_config, state)
    gpu = DynamicRouter(config(device="cuda", **fields), state)
    assert gpu.has_probe
    x = tokens()
    assert_same_decisions(cpu.route(x), gpu.route(x))


def test_empty_input_routes_to_empty_outputs_on_the_gpu() -> None:
    _, gpu = pair(CASES["top_p"])
    result = gpu.route(torch.empty(0, D))
    assert result.indices.shape == (0, 4) and result.k.shape == (0,)


def test_a_missing_device_index_is_named() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"torch sees {count} CUDA device"):
        DynamicRouter(config(device=f"cuda:{count}"))
