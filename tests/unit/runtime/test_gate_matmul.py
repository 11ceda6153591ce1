"""The host gate matmul: oneDNN's float32 linear where torch has it, torch's otherwise, the same logits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from router_runtime import kernels
from router_runtime import router as router_module
from router_runtime.config import RouterConfig
from router_runtime.router import DynamicRouter, onednn_linear


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    onednn_linear.cache_clear()
    yield
    onednn_linear.cache_clear()


def config(**fields: object) -> RouterConfig:
    base: dict[str, object] = {"inputDim": 96, "numExperts": 16, "minExperts": 1, "maxExperts": 4, "device": "cpu"}
    return RouterConfig.model_validate(base | fields)


def test_this_torch_build_has_onednns_linear_and_it_computes_the_gate() -> None:
    linear = onednn_linear()
    assert linear is not None, "torch.ops.mkldnn._linear_pointwise is missing or changed in this torch build"
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 7, 300):
        x, w = torch.randn(rows, 96, generator=generator), torch.randn(16, 96, generator=generator)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_without_onednn_the_router_uses_torchs_matmul(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert onednn_linear() is None
    router = DynamicRouter(config(kernel="torch"))
    x = torch.randn(50, 96, generator=torch.Generator().manual_seed(2))
    assert router.route(x).indices.shape == (50, 4)


def clearly_ranked(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Tokens whose top 5 logits are no two within rounding of each other (at least 99 % of them here)."""
    top = F.linear(x, gate).topk(5, dim=1).values
    clear = (top[:, :-1] - top[:, 1:]).min(dim=1).values > 1e-4
    assert clear.float().mean() > 0.99
    return clear


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_a_gate_left_to_the_library_matmul_routes_as_torchs_linear(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "GATE_MAX_WEIGHT_BYTES", 0)  # no gate is small enough for the compiled kernel
    with_onednn = DynamicRouter(config(kernel=kernel, loadBalancing={"enabled": False}))
    monkeypatch.setattr(router_module, "onednn_linear", lambda: None)
    with_torch = DynamicRouter(config(kernel=kernel, loadBalancing={"enabled": False}))
    x = torch.randn(2049, 96, generator=torch.Generator().manual_seed(3))
    a, b = with_onednn.route(x), with_torch.route(x)
    clear = clearly_ranked(x, with_torch.gate_weight)
    assert torch.equal(a.indices[clear], b.indices[clear]) and torch.equal(a.k[clear], b.k[clear])
    # 16-bit tokens go through the same matmul after widening.
    half = x.to(torch.bfloat16)
    a16, b16 = with_onednn.route(half), with_torch.route(half)
    clear16 = clearly_ranked(half.float(), with_torch.gate_weight)
    assert torch.equal(a16.indices[clear16], b16.indices[clear16])
    torch.testing.assert_close(a16.weights[clear16], b16.weights[clear16], rtol=1e-4, atol=1e-5)
