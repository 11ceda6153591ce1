"""Back-pressure (503 + Retry-After when the queue or the in-flight byte budget is full) and graceful SIGTERM of the
real process."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from router_runtime.client import route
from router_runtime.config import RuntimeFileConfig
from router_runtime.protocol import HEADER_LENGTH, encode_request
from router_runtime.router import DynamicRouter, RoutingResult
from tests.integration.runtime.conftest import small_config
from tests.integration.runtime.serving import running_server, serve_process


class GatedRouter(DynamicRouter):
    """A real router whose routing waits until the test opens the gate: a deterministic slow backend."""

    def __init__(self, config: RuntimeFileConfig) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.armed = False  # the router may route once while it is built (kernel warm-up): not gated
        super().__init__(config.router)
        self.armed = True

    def route_logits(self, logits: torch.Tensor, **kwargs: Any) -> RoutingResult:  # the server's way in
        if self.armed:
            self.entered.set()
            self.release.wait(timeout=30)
        return super().route_logits(logits, **kwargs)


def test_full_queue_is_answered_503_with_retry_after() -> None:
    wire = small_config().model_dump(by_alias=True, mode="json")
    wire["server"]["batching"]["maxQueueRequests"] = 1
    config = RuntimeFileConfig.model_validate(wire)
    router = GatedRouter(config)
    body, headers = encode_request(np.full((300, 16), 0.1, np.float32), binary=True)
    with running_server(config, router=router) as (url, app), ThreadPoolExecutor(2) as pool:
        infer = url + "/v2/models/tiny/infer"
        try:
            first = pool.submit(httpx.post, infer, content=body, headers=headers, timeout=30)
            assert router.entered.wait(10)  # the worker thread is now busy with the first request
            second = pool.submit(httpx.post, infer, content=body, headers=headers, timeout=30)
            deadline = time.monotonic() + 10
            while app.state.batcher.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            rejected = httpx.post(infer, content=body, headers=headers, timeout=30)
        finally:
            router.release.set()
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    assert rejected.status_code == 503
    assert rejected.headers["retry-after"] == "1"
    assert "overloaded" in rejected.json()["error"]


def budgeted_config(max_inflight_bytes: int) -> RuntimeFileConfig:
    wire = small_config().model_dump(by_alias=True, mode="json")
    wire["server"]["maxInflightBytes"] = max_inflight_bytes
    return RuntimeFileConfig.model_validate(wire)


def infer_request(t: int) -> tuple[bytes, bytes]:
    """Head and body of a binary infer request; 512 tokens of 16 (32 kB) take the transport's direct buffer."""
    body, headers = encode_request(np.full((t, 16), 0.1, np.float32), binary=True)
    head = f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    head += f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\n\r\n"
    return head.encode(), body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of the one response ``sock`` has to read."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(fields["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split(" ", 2)[1]), fields, body


def test_a_request_past_the_inflight_byte_budget_is_answered_503_with_retry_after() -> None:
    head, body = infer_request(512)
    with running_server(budgeted_config(len(body) + 1000)) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first, socket.create_connection(
            ("127.0.0.1", port), timeout=10
        ) as second:
            first.sendall(head + body[: len(body) // 2])  # admitted, its body still arriving
            deadline = time.monotonic() + 10
            while app.state.inflight.held == 0:
                assert time.monotonic() < deadline, "the first request was never admitted"
                time.sleep(0.01)
            second.sendall(head + body)
            status, fields, answer = read_answer(second)
            assert status == 503 and fields["retry-after"] == "1"
            assert "would pass the budget" in json.loads(answer)["error"]
            first.sendall(body[len(body) // 2 :])
            assert read_answer(first)[0] == 200
            second.sendall(head + body)  # its refused body was read and dropped: the connection is in step
            assert read_answer(second)[0] == 200
        assert app.state.inflight.held == 0
        assert 'moe_router_errors_total{reason="overloaded"} 1.0' in httpx.get(url + "/metrics").text


def test_a_request_larger_than_the_budget_is_admitted_when_alone() -> None:
    body, headers = encode_request(np.full((512, 16), 0.1, np.float32), binary=True)
    with running_server(budgeted_config(1024)) as (url, _app):
        assert httpx.post(url + "/v2/models/tiny/infer", content=body, headers=headers).status_code == 200


def test_sigterm_finishes_in_flight_requests_and_exits_within_grace(tmp_path: Path) -> None:
    config = small_config().model_dump(by_alias=True, mode="json")
    config["server"]["batching"]["maxDelayMs"] = 1000.0  # keeps the request in flight while SIGTERM arrives
    config["server"]["shutdownGraceSeconds"] = 10.0
    with serve_process(config, tmp_path) as (url, process):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(route, url, "tiny", np.ones((4, 16), np.float32))
            deadline = time.monotonic() + 10
            while "moe_router_inflight_requests 1.0" not in httpx.get(url + "/metrics").text:
                assert time.monotonic() < deadline, "the request never reached the server"
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            result = pending.result(timeout=15)
        assert result.k.shape == (4,)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 10


def test_readiness_turns_false_while_draining() -> None:
    with running_server(small_config()) as (url, app):
        app.state.runtime.draining = True
        assert httpx.get(url + "/v2/health/ready").status_code == 503
        assert httpx.get(url + "/ready").json() == {"ready": False}
        assert httpx.get(url + "/v2/health/live").status_code == 200
