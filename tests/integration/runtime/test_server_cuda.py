"""``moe-router serve`` with router.device cuda: the served answers are the GPU router's, equal to the CPU's.

Runs where torch sees a CUDA GPU; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from router_runtime.client import route
from router_runtime.protocol import encode_request
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


def test_a_gpu_router_refuses_finite_values_whose_logits_overflow_and_keeps_routing(tmp_path: Path) -> None:
    # The GPU gathers each batch into one buffer: its logits are checked on the device before anything is chosen.
    wire = small_config(device="cuda", strategy="complexity").to_wire()
    huge = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    huge[1] = 3e38
    x = np.random.default_rng(2).standard_normal((256, 16)).astype(np.float32)
    with serve_process(wire, tmp_path) as (url, _process):
        before = route(url, "tiny", x).k
        body, headers = encode_request(huge, binary=True)
        response = httpx.post(url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=10)
        assert response.status_code == 400 and "too large for the router" in response.json()["error"]
        after = route(url, "tiny", x).k
    assert len(np.unique(after)) == len(np.unique(before)) > 1  # the calibration still spreads k
