"""The HTTP server: Open Inference Protocol v2 on FastAPI/uvicorn, dynamic batching, metrics, API key.

Client mistakes are answered with a 4xx naming the problem (``{"error": "..."}``, the OIP error
shape); the server never answers 5xx for them and never dies from them. On SIGTERM readiness turns
false at once, in-flight and queued requests finish, and the process exits within the grace period.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router_runtime import __version__
from router_runtime.batching import BatchSlab, DynamicBatcher, InflightBytes, Overloaded, Stopped
from router_runtime.config import RuntimeFileConfig
from router_runtime.metrics import CONTENT_TYPE, RuntimeMetrics
from router_runtime.process import cgroup_cpu_limit as cgroup_cpu_limit
from router_runtime.process import resolve_api_key as resolve_api_key
from router_runtime.process import usable_cpus
from router_runtime.protocol import (
    HEADER_LENGTH,
    INPUT_DATATYPES,
    INPUT_NAME,
    OUTPUT_COUNTS,
    OUTPUT_INDICES,
    OUTPUT_MOE,
    OUTPUT_WEIGHTS,
    ProtocolError,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
    rejected_by_gate,
)
from router_runtime.router import DynamicRouter, RoutingResult, token_tensor
from router_runtime.transport import BODY_EXTENSION, BodyIncomplete, DirectBody, direct_body_protocol, infer_target

log = logging.getLogger(__name__)

MODEL_VERSION = "1"
PLATFORM = "pytorch_moe_router"


@dataclass
class RoutedSlice:
    """One request's share of a routed batch, as numpy arrays ready to encode."""

    outputs: dict[str, np.ndarray]
    mean_k: float
    dropped_mass: float
    flops_ratio: float
    batch_tokens: int


class RuntimeState:
    """Readiness of this process: ready after start-up, not ready once draining for shutdown."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


def _presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return x_api_key


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
_INFER_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {"type": "array", "items": _TENSOR_SCHEMA},
    },
}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _json_response("The request is malformed; the message names the problem.", _ERROR_SCHEMA),
    401: _json_response("Missing or wrong API key.", _ERROR_SCHEMA),
    404: _json_response("Unknown model or version.", _ERROR_SCHEMA),
    413: _json_response("Request body or token count over the limit.", _ERROR_SCHEMA),
    415: _json_response("A compressed (Content-Encoding) request body.", _ERROR_SCHEMA),
    503: _json_response(
        "Queue or in-flight byte budget full, or shutting down; retry after Retry-After seconds.", _ERROR_SCHEMA
    ),
}
_STATUS_SCHEMA = {"type": "object"}
_INFER_OK = {
    "description": "Routing decision; binary outputs follow a JSON header of Inference-Header-Content-Length bytes.",
    "content": {
        "application/json": {"schema": _INFER_RESPONSE_SCHEMA},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
#: JSON bodies above this size are decoded off the event loop so other requests keep moving.
_OFFLOAD_JSON_BYTES = 256 * 1024
_HEADER_LENGTH_BYTES = HEADER_LENGTH.lower().encode()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: (status, body, headers) of an inference answer, sent as two raw ASGI messages.
RawResponse = tuple[int, bytes, list[tuple[bytes, bytes]]]


#: ``handler(model name, version or None, scope, receive)``: the inference answer.
InferHandler = Callable[[str, str | None, Scope, Receive], Awaitable[RawResponse]]


class InferFastPath:
    """ASGI middleware: ``POST /v2/models/{name}[/versions/{version}]/infer`` goes straight to the inference handler.

    FastAPI's routing, dependency solving, per-route exception/exit-stack wrappers and Starlette's
    Request/Response objects cost a few hundred microseconds of event-loop time per request, which is
    most of the server's CPU for a 256-token binary request; the handler validates everything itself
    and turns every failure into a response, so it needs none of them. Everything else (and any path
    the simple match is unsure of, such as a mounted ``root_path``) goes through the FastAPI app
    unchanged, which still documents the endpoint in the OpenAPI document.
    """

    def __init__(self, app: ASGIApp, handler: InferHandler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = infer_target(scope) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        status, body, headers = await self.handler(target[0], target[1], scope, receive)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _raw_error(status: int, message: str, headers: dict[str, str] | None = None) -> RawResponse:
    body = json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return status, body, raw


#: Request headers the inference handler reads; the rest of the list is skipped unseen.
_INFER_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"content-length", b"content-encoding", HEADER_LENGTH.lower().encode()}
)


def _infer_headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope["headers"] if name in _INFER_HEADERS}


def gate_rejections(logits: torch.Tensor, parts: Sequence[np.ndarray]) -> dict[int, ProtocolError]:
    """``rejected_by_gate`` for logits on the router's device: a GPU's come to the host only when one is bad."""
    if logits.device.type == "cpu":
        return rejected_by_gate(logits.numpy(), parts)
    if bool(torch.isfinite(logits.sum())):  # one reduction and one small sync in the common case
        return {}
    return rejected_by_gate(logits.cpu().numpy(), parts)


def create_app(config: RuntimeFileConfig, api_key: str | None = None, router: DynamicRouter | None = None) -> FastAPI:
    """The OIP v2 app for ``config``; ``api_key`` (if set) guards model metadata and inference."""
    router_config = config.router
    server_config = config.server
    model = router if router is not None else DynamicRouter(router_config)
    state = RuntimeState()
    metrics = RuntimeMetrics(
        model.cumulative.snapshot, num_experts=router_config.num_experts, max_experts=router_config.max_experts
    )
    known_outputs: tuple[str, ...] = (OUTPUT_INDICES, OUTPUT_WEIGHTS, OUTPUT_COUNTS)
    if router_config.experts.enabled:
        known_outputs += (OUTPUT_MOE,)
    expected_key = api_key.encode() if api_key else None

    # Only for a router that needs the batch in one array (a GPU's pinned staging buffer, expert FFNs).
    slab = BatchSlab(
        model.host_array,
        min_rows=server_config.batching.max_batch_tokens,
        dtype=np.dtype(np.float32),
        copy=lambda target, part: torch.from_numpy(target).copy_(token_tensor(part)),  # FP16 / BF16 widened
    )

    def route_batch(parts: Sequence[np.ndarray]) -> list[RoutedSlice | Exception]:
        """Runs on the batcher's worker thread: route the requests as one batch, cut it back into requests.

        Every request is checked through its gate logits before anything is decided (``rejected_by_gate``):
        a NaN, Inf, or finite values whose logits overflow float32 get their 400, and their rows never reach
        the selection bias, the calibration or the expert FFNs.
        """
        expert_input: torch.Tensor | None = None
        rejected: dict[int, Exception] = {}
        if model.gates_in_place:  # each body is gated where it lies
            admitted = list(range(len(parts)))
            sizes = [part.shape[0] for part in parts]
            logits = model.gate(parts)
        else:  # the batch in one array (a GPU's pinned staging buffer, expert FFNs)
            # No NaN/Inf pass here: a non-finite token makes its logits non-finite, refused below.
            tokens, sizes, rejected = slab.gather(parts)
            if not sizes:
                return [rejected[index] for index in range(len(parts))]
            admitted = [index for index in range(len(parts)) if index not in rejected]
            expert_input, logits = model.gate_batch(torch.from_numpy(tokens))
        refused = gate_rejections(logits, [parts[index] for index in admitted])
        if refused:
            keep = torch.from_numpy(np.repeat([slot not in refused for slot in range(len(admitted))], sizes))
            logits = logits[keep.to(logits.device)]
            if expert_input is not None:
                expert_input = expert_input[keep.to(expert_input.device)]
            sizes = [size for slot, size in enumerate(sizes) if slot not in refused]
            rejected.update({admitted[slot]: error for slot, error in refused.items()})
        result = model.route_logits(logits, expert_input=expert_input) if sizes else None
        routed = iter(cut_batch(result, sizes) if result is not None else [])
        return [rejected[index] if index in rejected else next(routed) for index in range(len(parts))]

    def cut_batch(result: RoutingResult, sizes: Sequence[int]) -> list[RoutedSlice]:
        indices = result.indices.numpy()
        weights = result.weights.numpy()
        k = result.k.numpy()
        output = result.output.numpy() if result.output is not None else None
        batch = indices.shape[0]
        metrics.observe_batch(batch, result.stats)
        # Per-request means in one vectorised pass over the batch, not two numpy calls per request.
        bounds = np.cumsum([0, *sizes])
        starts = bounds[:-1]
        lengths = np.asarray(sizes, dtype=np.float64)
        mean_k = (np.add.reduceat(k, starts) / lengths).tolist()
        mass = (np.add.reduceat(result.selected_mass.numpy(), starts, dtype=np.float64) / lengths).tolist()
        slices: list[RoutedSlice] = []
        for index, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
            outputs = {
                OUTPUT_INDICES: indices[start:end],
                OUTPUT_WEIGHTS: weights[start:end],
                OUTPUT_COUNTS: k[start:end],
            }
            if output is not None:
                outputs[OUTPUT_MOE] = output[start:end]
            slices.append(
                RoutedSlice(
                    outputs=outputs,
                    mean_k=mean_k[index],
                    dropped_mass=max(0.0, 1.0 - mass[index]),
                    flops_ratio=mean_k[index] / router_config.max_experts,
                    batch_tokens=batch,
                )
            )
        return slices

    batching = server_config.batching
    batcher: DynamicBatcher[RoutedSlice] = DynamicBatcher(
        route_batch,
        max_batch_tokens=batching.max_batch_tokens,
        max_delay_s=batching.max_delay_ms / 1000.0,
        max_queue_requests=batching.max_queue_requests,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        state.started = True
        log.info(
            "router %r ready: d=%d E=%d k=[%d,%d] strategy=%s",
            router_config.model_name,
            router_config.input_dim,
            router_config.num_experts,
            router_config.min_experts,
            router_config.max_experts,
            router_config.strategy,
        )
        try:
            yield
        finally:
            state.draining = True
            await batcher.stop(server_config.shutdown_grace_seconds)

    app = FastAPI(
        title="MoE router runtime",
        version=__version__,
        description="Dynamic-expert routing behind the Open Inference Protocol v2 REST API.",
        lifespan=lifespan,
    )
    app.state.runtime = state
    app.state.router = model
    app.state.metrics = metrics
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(400, "; ".join(str(error.get("msg", error)) for error in exc.errors()))

    def authorized(authorization: str | None, x_api_key: str | None) -> bool:
        if expected_key is None:
            return True
        presented = _presented_key(authorization, x_api_key)
        return presented is not None and hmac.compare_digest(presented.encode(), expected_key)

    def unauthorized() -> Response:
        return _error(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            {"WWW-Authenticate": "Bearer"},
        )

    def not_served(name: str, version: str | None) -> str | None:
        """The 404 message for a model or version this server does not serve, else None."""
        if name != router_config.model_name:
            return f"unknown model {name!r}; this server serves {router_config.model_name!r}"
        if version is not None and version != MODEL_VERSION:
            return f"model {name!r} has no version {version!r}; this server serves version {MODEL_VERSION!r} only"
        return None

    def readiness() -> Response:
        if state.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    @app.get("/v2/health/live", responses={200: _json_response("Alive.", _STATUS_SCHEMA)})
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/health", responses={200: _json_response("Alive.", _STATUS_SCHEMA)})
    async def health() -> Response:
        return JSONResponse({"live": True})

    @app.get(
        "/v2/health/ready",
        responses={200: _json_response("Ready.", _STATUS_SCHEMA), 503: _json_response("Not ready.", _STATUS_SCHEMA)},
    )
    async def ready_v2() -> Response:
        return readiness()

    @app.get(
        "/ready",
        responses={200: _json_response("Ready.", _STATUS_SCHEMA), 503: _json_response("Not ready.", _STATUS_SCHEMA)},
    )
    async def ready() -> Response:
        return readiness()

    @app.get("/v2", responses={200: _json_response("Server metadata.", _STATUS_SCHEMA)})
    async def server_metadata() -> Response:
        return JSONResponse({"name": "moe-router", "version": __version__, "extensions": ["binary_tensor_data"]})

    _metadata_responses: dict[int | str, dict[str, Any]] = {
        200: _json_response("Model metadata.", _STATUS_SCHEMA),
        401: _ERRORS[401],
        404: _ERRORS[404],
    }

    @app.get("/v2/models/{model_name}", responses=_metadata_responses)
    async def model_metadata(model_name: str, request: Request) -> Response:
        return metadata_response(model_name, None, request)

    @app.get("/v2/models/{model_name}/versions/{model_version}", responses=_metadata_responses)
    async def model_version_metadata(model_name: str, model_version: str, request: Request) -> Response:
        return metadata_response(model_name, model_version, request)

    def metadata_response(model_name: str, model_version: str | None, request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), request.headers.get("x-api-key")):
            return unauthorized()
        missing = not_served(model_name, model_version)
        if missing is not None:
            return _error(404, missing)
        k_max = router_config.max_experts
        outputs = [
            {"name": OUTPUT_INDICES, "datatype": "INT64", "shape": [-1, k_max]},
            {"name": OUTPUT_WEIGHTS, "datatype": "FP32", "shape": [-1, k_max]},
            {"name": OUTPUT_COUNTS, "datatype": "INT64", "shape": [-1]},
        ]
        if router_config.experts.enabled:
            outputs.append({"name": OUTPUT_MOE, "datatype": "FP32", "shape": [-1, router_config.input_dim]})
        return JSONResponse(
            {
                "name": router_config.model_name,
                "versions": [MODEL_VERSION],
                "platform": PLATFORM,
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, router_config.input_dim]}],
                "outputs": outputs,
                "parameters": {
                    "strategy": router_config.strategy,
                    "num_experts": router_config.num_experts,
                    "min_experts": router_config.min_experts,
                    "max_experts": k_max,
                    # The tensor metadata has room for one datatype: FP32, and the 16-bit ones also taken.
                    "input_datatypes": list(INPUT_DATATYPES),
                },
            }
        )

    _ready_responses: dict[int | str, dict[str, Any]] = {
        200: _json_response("Model ready.", _STATUS_SCHEMA),
        404: _ERRORS[404],
        503: _json_response("Not ready.", _STATUS_SCHEMA),
    }

    @app.get("/v2/models/{model_name}/ready", responses=_ready_responses)
    async def model_ready(model_name: str) -> Response:
        missing = not_served(model_name, None)
        return readiness() if missing is None else _error(404, missing)

    @app.get("/v2/models/{model_name}/versions/{model_version}/ready", responses=_ready_responses)
    async def model_version_ready(model_name: str, model_version: str) -> Response:
        missing = not_served(model_name, model_version)
        return readiness() if missing is None else _error(404, missing)

    @app.get("/metrics", responses={200: {"description": "Prometheus metrics.", "content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    limit = server_config.max_body_bytes
    unauthorized_answer = _raw_error(
        401,
        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        {"WWW-Authenticate": "Bearer"},
    )
    ok_requests = metrics.requests.labels("200")

    inflight = InflightBytes(server_config.max_inflight_bytes)

    async def read_body(scope: Scope, receive: Receive) -> bytes | memoryview:
        direct: DirectBody | None = scope.get("extensions", {}).get(BODY_EXTENSION)
        if direct is not None:  # received by the transport straight into one buffer (released by the caller)
            return await direct.wait()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BodyIncomplete(f"client disconnected after {size} bytes")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def refusal(model_name: str, version: str | None, headers: dict[bytes, bytes]) -> RawResponse | None:
        """The answer to a request refused from its path and headers alone, before its body is read."""
        if expected_key is not None:
            authorization, x_api_key = headers.get(b"authorization"), headers.get(b"x-api-key")
            if not authorized(
                authorization.decode("latin-1") if authorization is not None else None,
                x_api_key.decode("latin-1") if x_api_key is not None else None,
            ):
                metrics.errors.labels("unauthorized").inc()
                return unauthorized_answer
        if model_name != router_config.model_name or version is not None:
            missing = not_served(model_name, version)
            if missing is not None:
                metrics.errors.labels("unknown_model").inc()
                return _raw_error(404, missing)
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            metrics.errors.labels("bad_request").inc()
            return _raw_error(
                415,
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the request body "
                "uncompressed (binary tensors compress little)",
                {"Accept-Encoding": "identity"},
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            metrics.errors.labels("too_large").inc()
            return _raw_error(413, f"request body of {declared.decode()} bytes is over the limit of {limit} bytes")
        return None

    async def infer_response(model_name: str, version: str | None, scope: Scope, receive: Receive) -> RawResponse:
        headers = _infer_headers(scope)
        direct: DirectBody | None = scope.get("extensions", {}).get(BODY_EXTENSION)
        refused = refusal(model_name, version, headers)
        held = 0  # body bytes counted against server.maxInflightBytes
        if refused is None and inflight.budget is not None:
            declared = headers.get(b"content-length")
            size = int(declared) if declared is not None and declared.isdigit() else 0  # chunked: counted once in
            try:
                inflight.admit(size)
                held = size
            except Overloaded as exc:
                metrics.errors.labels("overloaded").inc()
                refused = _raw_error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        if refused is not None:
            if direct is not None:
                direct.discard()  # the rest of its body is read and dropped, never stored
            return refused
        try:
            return await routed_response(scope, receive, headers, direct)
        finally:
            if held:
                inflight.release(held)

    async def routed_response(
        scope: Scope, receive: Receive, headers: dict[bytes, bytes], direct: DirectBody | None
    ) -> RawResponse:
        reusable = True
        chunked_held = 0
        try:
            body = await read_body(scope, receive)
            if inflight.budget is not None and b"content-length" not in headers:
                inflight.admit(len(body))
                chunked_held = len(body)
            raw_length = headers.get(HEADER_LENGTH.lower().encode())
            header_length = parse_header_length(raw_length.decode("latin-1") if raw_length else None, len(body))
            decode = functools.partial(
                decode_infer_request,
                body,
                header_length,
                input_dim=router_config.input_dim,
                max_tokens=server_config.max_request_tokens,
                known_outputs=known_outputs,
                check_finite=False,  # the batcher's validate does it
            )
            offload = header_length is None and len(body) > _OFFLOAD_JSON_BYTES
            decoded = await asyncio.to_thread(decode) if offload else decode()
            routed = await batcher.submit(decoded.tokens)
        except ProtocolError as exc:
            metrics.errors.labels("too_large" if exc.status == 413 else "bad_request").inc()
            return _raw_error(exc.status, exc.message)
        except Overloaded as exc:
            metrics.errors.labels("overloaded").inc()
            return _raw_error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        except Stopped as exc:
            metrics.errors.labels("shutting_down").inc()
            return _raw_error(503, str(exc), {"Retry-After": "1"})
        except BodyIncomplete as exc:  # nobody is left to read the answer
            metrics.errors.labels("bad_request").inc()
            return _raw_error(400, f"truncated request body: {exc}")
        except asyncio.CancelledError:
            reusable = False  # the worker may still be copying this body
            raise
        finally:
            if direct is not None and reusable:
                direct.release()  # the batch holding it has been copied (or it was never queued)
            if chunked_held:
                inflight.release(chunked_held)
        lead = decoded.shape[:-1]
        outputs = {}
        for name in decoded.outputs:
            array = routed.outputs[name]
            outputs[name] = array.reshape(lead + array.shape[1:])
        encoded = encode_infer_response(
            router_config.model_name,
            MODEL_VERSION,
            outputs,
            request_id=decoded.request_id,
            binary=decoded.binary_outputs,
            parameters={
                "mean_k": routed.mean_k,
                "dropped_mass": routed.dropped_mass,
                "flops_ratio": routed.flops_ratio,
                "batch_tokens": routed.batch_tokens,
            },
        )
        raw_headers = [
            (b"content-type", encoded.content_type.encode()),
            (b"content-length", str(len(encoded.body)).encode()),
        ]
        if encoded.json_header_length is not None:
            raw_headers.append((_HEADER_LENGTH_BYTES, str(encoded.json_header_length).encode()))
        return 200, encoded.body, raw_headers

    async def infer_raw(model_name: str, version: str | None, scope: Scope, receive: Receive) -> RawResponse:
        started = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await infer_response(model_name, version, scope, receive)
        except Exception:
            log.exception("inference failed")
            metrics.errors.labels("internal").inc()
            response = _raw_error(500, "internal error while routing; see the server log")
        finally:
            metrics.inflight.dec()
        (ok_requests if response[0] == 200 else metrics.requests.labels(str(response[0]))).inc()
        metrics.request_duration.observe(time.perf_counter() - started)
        return response

    _infer_request_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _INFER_REQUEST_SCHEMA},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    async def documented_infer(model_name: str, version: str | None, request: Request) -> Response:
        """The documented routes; requests normally reach ``infer_raw`` through ``InferFastPath`` instead."""
        status, body, headers = await infer_raw(model_name, version, request.scope, request.receive)
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response

    @app.post("/v2/models/{model_name}/infer", responses={200: _INFER_OK, **_ERRORS}, openapi_extra=_infer_request_body)
    async def infer(model_name: str, request: Request) -> Response:
        return await documented_infer(model_name, None, request)

    @app.post(
        "/v2/models/{model_name}/versions/{model_version}/infer",
        responses={200: _INFER_OK, **_ERRORS},
        openapi_extra=_infer_request_body,
    )
    async def infer_version(model_name: str, model_version: str, request: Request) -> Response:
        return await documented_infer(model_name, model_version, request)

    # Inside FastAPI too, so an embedding app (without ``uvicorn_config``) still skips the routing machinery.
    app.add_middleware(InferFastPath, handler=infer_raw)
    app.state.infer_raw = infer_raw
    app.state.inflight = inflight
    return app


def fit_threads_to_cpu_limit() -> None:
    """Use no more torch threads than the pod's CPU limit or affinity mask unless OMP_NUM_THREADS says otherwise.

    torch sizes its pool from the node's cores; in a pod limited to 2 CPUs on a 64-core node that
    oversubscribes the quota and throttles every batch.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    quota = cgroup_cpu_limit()
    limit = min(quota, usable_cpus()) if quota is not None else usable_cpus()
    if limit < torch.get_num_threads():
        log.info("%d usable CPUs: using %d torch threads instead of %d", limit, limit, torch.get_num_threads())
        torch.set_num_threads(limit)


class StartupError(Exception):
    """The router the config describes cannot be built (a one-line cause for the CLI and the pod's log)."""


class _DrainingServer(uvicorn.Server):
    """uvicorn that turns readiness false the moment SIGTERM/SIGINT arrives, before draining."""

    def __init__(
        self, config: uvicorn.Config, state: RuntimeState, on_started: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._runtime_state = state
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()  # the router is built and the socket is served: tell the supervisor

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._runtime_state.draining:
            log.info("received %s: readiness off, draining in-flight requests", signal.Signals(sig).name)
        self._runtime_state.draining = True
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        # A drained SIGTERM is a clean stop: exit 0 rather than re-raising the signal afterwards.
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def uvicorn_config(
    app: FastAPI, config: RuntimeFileConfig, host: str | None = None, port: int | None = None, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn settings for ``app``: the direct-body HTTP protocol, no access log, the configured grace."""
    grace = config.server.shutdown_grace_seconds
    # The fast path in front of FastAPI itself: Starlette's middleware stack (error middleware wrapping
    # every send) and uvicorn's proxy-headers middleware are Python layers per request the router needs
    # none of (it logs no client addresses).
    return uvicorn.Config(
        InferFastPath(app, handler=app.state.infer_raw),
        proxy_headers=False,
        server_header=False,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
        http=direct_body_protocol(config.server.max_body_bytes),  # type: ignore[arg-type]  # a BufferedProtocol
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(grace)) if grace > 0 else None,
    )


def serve(
    config: RuntimeFileConfig,
    api_key: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "info",
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Serve ``config`` with uvicorn on ``host:port`` (or ``sockets``) until SIGTERM; one process.

    ``on_started`` is called once the app is built and serving (a worker process tells its supervisor).
    """
    fit_threads_to_cpu_limit()
    try:
        app = create_app(config, api_key=api_key)
    except ValueError as exc:  # the weights file, the device, the kernel: what the config asks cannot be built
        log.debug("router start-up failed", exc_info=True)
        raise StartupError(f"cannot start the router: {exc}") from exc
    # Everything built so far lives until exit: keep the collector from walking it on every full pass.
    gc.collect()
    gc.freeze()
    server = _DrainingServer(uvicorn_config(app, config, host, port, log_level), app.state.runtime, on_started)
    server.run(sockets=sockets)
    return 0 if server.started else 1
