"""router.device: where the gate runs, and the errors a missing or mismatched device gives (CPU machine)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from router_runtime.config import RouterConfig
from router_runtime.router import DynamicRouter, resolve_device, use_fused_kernel

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")


def config(**fields: object) -> RouterConfig:
    base: dict[str, object] = {"inputDim": 16, "numExperts": 8, "minExperts": 1, "maxExperts": 4}
    base.update(fields)
    return RouterConfig.model_validate(base)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "mps", "CPU", "cuda:123"])
def test_an_unknown_device_is_rejected_naming_the_field(device: str) -> None:
    with pytest.raises(ValidationError, match="device"):
        config(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:15"])
def test_known_devices_are_accepted(device: str) -> None:
    assert config(device=device).device == device


def test_auto_is_the_default() -> None:
    assert RouterConfig().device == "auto"


@no_cuda
def test_auto_routes_on_the_cpu_without_a_gpu() -> None:
    router = DynamicRouter(config())
    assert router.device == torch.device("cpu")
    assert router.route(torch.randn(8, 16)).indices.device.type == "cpu"


def test_auto_keeps_the_fused_kernel_on_the_cpu() -> None:
    assert resolve_device("auto", "fused") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_asking_for_cuda_without_one_is_a_clear_error(device: str) -> None:
    with pytest.raises(ValueError, match=rf"router.device is '{device}' but torch sees no CUDA device"):
        DynamicRouter(config(device=device))


def test_the_fused_kernel_on_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"router.kernel 'fused' runs on the CPU"):
        use_fused_kernel(config(kernel="fused"), torch.device("cuda", 0))


def test_a_gpu_router_uses_the_torch_kernel() -> None:
    assert use_fused_kernel(config(), torch.device("cuda", 0)) is False


def test_the_startup_log_names_the_device(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="router_runtime.router")
    router = DynamicRouter(config(device="cpu", modelName="m1"))
    assert f"router 'm1' routes on {router.device}" in caplog.text
