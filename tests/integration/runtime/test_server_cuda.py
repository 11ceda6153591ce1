"""``moe-router serve`` with router.device cuda: the served answers are the GPU router's, equal to the CPU's.

Runs where torch sees a CUDA GPU; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from router_runtime.client import route
from router_runtime.router import DynamicRouter
from tests.integration.runtime.conftest import small_config
from tests.integration.runtime.serving import serve_process

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here"
)


def test_served_gpu_routing_equals_the_cpu_router(tmp_path: Path) -> None:
    wire = small_config(device="cuda", loadBalancing={"enabled": False}).to_wire()
    cpu = DynamicRouter(small_config(device="cpu", kernel="torch", loadBalancing={"enabled": False}).router)
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    expected = cpu.route(x)
    with serve_process(wire, tmp_path, "--workers", "2") as (url, _process):
        for binary in (True, False):
            answer = route(url, "tiny", x, binary=binary)
            same = (answer.indices == expected.indices.numpy()).all(1)
            assert same.mean() >= 0.99
            np.testing.assert_allclose(answer.weights[same], expected.weights.numpy()[same], atol=1e-5)
            assert answer.moe_output is not None and expected.output is not None
            np.testing.assert_allclose(answer.moe_output[same], expected.output.numpy()[same], atol=1e-4)
