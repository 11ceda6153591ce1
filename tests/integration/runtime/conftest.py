from __future__ import annotations

from collections.abc import Iterator

import pytest

from router_runtime.config import RuntimeFileConfig
from tests.integration.runtime.serving import running_server

API_KEY = "s3cret-key"


def small_config(**router: object) -> RuntimeFileConfig:
    base: dict[str, object] = {
        "modelName": "tiny",
        "inputDim": 16,
        "numExperts": 8,
        "minExperts": 1,
        "maxExperts": 4,
        "strategy": "top_p",
        "topP": 0.8,
        "experts": {"enabled": True, "hiddenDim": 8},
    }
    base.update(router)
    return RuntimeFileConfig.model_validate(
        {
            "router": base,
            "server": {
                "maxRequestTokens": 512,
                "maxBodyBytes": 65536,
                "batching": {"maxBatchTokens": 1024, "maxDelayMs": 1.0, "maxQueueRequests": 64},
            },
        }
    )


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with running_server(small_config()) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def secured_url() -> Iterator[str]:
    with running_server(small_config(), api_key=API_KEY) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def stateless_url() -> Iterator[str]:
    """The small server without load balancing: the same tokens are always routed the same, whatever came before."""
    with running_server(small_config(loadBalancing={"enabled": False})) as (url, _app):
        yield url
