"""A small httpx client of the router's OIP v2 API, for ``moe-router route``, the demo and smoke tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from router_runtime.protocol import (
    HEADER_LENGTH,
    OUTPUT_COUNTS,
    OUTPUT_INDICES,
    OUTPUT_MOE,
    OUTPUT_WEIGHTS,
    decode_response,
    encode_request,
)
from router_runtime.stats import load_cv


class RouterClientError(RuntimeError):
    """The server answered with an error; ``status`` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RouteResponse:
    """The routing decision for the request's tokens (token-major, -1 / 0 in unused slots)."""

    indices: np.ndarray
    weights: np.ndarray
    k: np.ndarray
    moe_output: np.ndarray | None
    parameters: dict[str, Any]

    def summary(self, num_experts: int | None = None) -> dict[str, Any]:
        """Routing statistics of this response: tokens, mean k, k histogram, per-expert load, load CV."""
        experts = num_experts if num_experts is not None else int(self.indices.max(initial=-1)) + 1
        flat = self.indices.reshape(-1)
        load = np.bincount(flat[flat >= 0], minlength=max(experts, 0))
        k = self.k.reshape(-1)
        return {
            "tokens": int(k.size),
            "mean_k": float(k.mean()) if k.size else 0.0,
            "k_histogram": {int(v): int(c) for v, c in zip(*np.unique(k, return_counts=True), strict=True)},
            "expert_load": load.tolist(),
            "load_cv": load_cv(load),
            "server": self.parameters,
        }


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def infer_url(url: str, model: str) -> str:
    return f"{url.rstrip('/')}/v2/models/{model}/infer"


def parse_route_response(response: httpx.Response) -> RouteResponse:
    """Decode an infer response (JSON or binary) or raise ``RouterClientError`` with the server's message."""
    if response.status_code != 200:
        try:
            message = str(response.json().get("error", response.text))
        except ValueError:
            message = response.text
        raise RouterClientError(response.status_code, message)
    header = response.headers.get(HEADER_LENGTH)
    document, arrays = decode_response(response.content, int(header) if header is not None else None)
    return RouteResponse(
        indices=arrays[OUTPUT_INDICES],
        weights=arrays[OUTPUT_WEIGHTS],
        k=arrays[OUTPUT_COUNTS],
        moe_output=arrays.get(OUTPUT_MOE),
        parameters=dict(document.get("parameters", {})),
    )


def route(
    url: str,
    model: str,
    tokens: np.ndarray,
    *,
    binary: bool = True,
    api_key: str | None = None,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
    datatype: str = "FP32",
) -> RouteResponse:
    """Route ``tokens [T, d]`` through the server at ``url``; binary tensor extension by default.

    ``datatype`` (FP32, FP16 or BF16) is what the tokens are sent as: 16 bits halve the bytes on the wire.
    Tokens already in it (float16, or BF16 patterns as uint16) go as they are (``protocol.encode_request``).
    """
    body, headers = encode_request(tokens, binary=binary, datatype=datatype)
    headers.update(_auth_headers(api_key))
    if client is not None:
        return parse_route_response(client.post(infer_url(url, model), content=body, headers=headers))
    with httpx.Client(timeout=timeout) as own:
        return parse_route_response(own.post(infer_url(url, model), content=body, headers=headers))


async def route_async(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    tokens: np.ndarray,
    *,
    binary: bool = True,
    api_key: str | None = None,
    datatype: str = "FP32",
) -> RouteResponse:
    """``route`` on an ``httpx.AsyncClient`` (for load generation)."""
    body, headers = encode_request(tokens, binary=binary, datatype=datatype)
    headers.update(_auth_headers(api_key))
    return parse_route_response(await client.post(infer_url(url, model), content=body, headers=headers))


def model_metadata(url: str, model: str, *, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /v2/models/{model}``: input shape, outputs and routing parameters."""
    response = httpx.get(f"{url.rstrip('/')}/v2/models/{model}", headers=_auth_headers(api_key), timeout=timeout)
    if response.status_code != 200:
        raise RouterClientError(response.status_code, response.text)
    result: dict[str, Any] = response.json()
    return result


def wait_ready(url: str, timeout: float = 60.0, interval: float = 0.1) -> None:
    """Poll ``/v2/health/ready`` until it answers 200 or ``timeout`` seconds pass (``TimeoutError``)."""
    import time

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url.rstrip('/')}/v2/health/ready", timeout=interval * 10)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s ({last})")
