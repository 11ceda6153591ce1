"""Large inference bodies read straight into one buffer by the HTTP protocol, over real sockets."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from router_runtime import transport
from router_runtime.config import RuntimeFileConfig
from router_runtime.protocol import HEADER_LENGTH, decode_response, encode_request
from router_runtime.router import DynamicRouter
from tests.integration.runtime.serving import running_server

TOKENS, DIM = 512, 64  # a 128 kB tensor: above the size that switches to the direct buffer
INFER = "/v2/models/big/infer"


def config() -> RuntimeFileConfig:
    return RuntimeFileConfig.model_validate(
        {
            # No balancing: every answer equals in-process routing of the same tokens, whatever the batch.
            "router": {"modelName": "big", "inputDim": DIM, "numExperts": 8, "maxExperts": 2,
                       "loadBalancing": {"enabled": False}},
            "server": {"maxRequestTokens": 4096, "maxBodyBytes": 4 * 1024 * 1024,
                       "batching": {"maxBatchTokens": 4096, "maxDelayMs": 1.0}},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, int]]:
    with running_server(config()) as (url, _app):
        yield url, int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def reference() -> DynamicRouter:
    return DynamicRouter(config().router)


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((TOKENS, DIM), dtype=np.float32)


def expected_indices(reference: DynamicRouter, x: np.ndarray) -> np.ndarray:
    return reference.route(x, update_state=False).indices.numpy()


def raw_request(x: np.ndarray, path: str = INFER, extra: str = "", datatype: str = "FP32") -> tuple[bytes, bytes]:
    """Head and body of a binary infer request, as a client would put them on the wire."""
    body, headers = encode_request(x, binary=True, datatype=datatype)
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode(), body


def read_response(sock: socket.socket, buffered: bytearray) -> tuple[int, np.ndarray]:
    """One HTTP response from ``sock`` (bytes past it stay in ``buffered``): status and expert indices."""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(65536)
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    fields = {name.lower(): value for name, value in fields.items()}
    length = int(fields["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    buffered[:] = rest[length:]
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        return status, np.empty(0)
    _, arrays = decode_response(rest[:length], int(fields[HEADER_LENGTH.lower()]))
    return status, arrays["expert_indices"]


def count_direct_bodies(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    created = {"bodies": 0}
    original = transport.DirectBody.__init__

    def counting(self: transport.DirectBody, *args: object) -> None:
        created["bodies"] += 1
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(transport.DirectBody, "__init__", counting)
    return created


def test_a_large_binary_body_goes_into_one_buffer_and_routes_like_in_process(
    served: tuple[str, int], reference: DynamicRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = count_direct_bodies(monkeypatch)
    x = tokens(1)
    body, headers = encode_request(x, binary=True)
    response = httpx.post(served[0] + INFER, content=body, headers=headers)
    assert response.status_code == 200
    _, arrays = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
    assert np.array_equal(arrays["expert_indices"], expected_indices(reference, x))
    assert created["bodies"] == 1


def test_consecutive_requests_reuse_one_buffer_without_mixing_bodies(
    served: tuple[str, int], reference: DynamicRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    original = transport._BufferPool.take

    def recording(self: transport._BufferPool, size: int) -> np.ndarray:
        buffer = original(self, size)
        taken.append(buffer.ctypes.data)
        return buffer

    monkeypatch.setattr(transport._BufferPool, "take", recording)
    with httpx.Client(base_url=served[0]) as client:
        for seed in range(2, 6):
            x = tokens(seed)
            body, headers = encode_request(x, binary=True)
            response = client.post(INFER, content=body, headers=headers)
            _, arrays = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
            assert np.array_equal(arrays["expert_indices"], expected_indices(reference, x))
    assert len(taken) == 4 and len(set(taken)) == 1  # released after each answer, taken by the next request


def test_a_body_sent_in_slow_pieces_arrives_whole(served: tuple[str, int], reference: DynamicRouter) -> None:
    x = tokens(7)
    head, body = raw_request(x)
    with socket.create_connection(("127.0.0.1", served[1]), timeout=10) as sock:
        sock.sendall(head + body[:100])  # the head and the start of the body in one segment
        for start in range(100, len(body), 40_000):
            time.sleep(0.01)
            sock.sendall(body[start : start + 40_000])
        status, indices = read_response(sock, bytearray())
    assert status == 200
    assert np.array_equal(indices, expected_indices(reference, x))


def test_pipelined_requests_are_answered_in_order(served: tuple[str, int], reference: DynamicRouter) -> None:
    first, second = tokens(8), tokens(9)
    with socket.create_connection(("127.0.0.1", served[1]), timeout=10) as sock:
        sock.sendall(b"".join(raw_request(first)) + b"".join(raw_request(second)))
        buffered = bytearray()
        answers = [read_response(sock, buffered), read_response(sock, buffered)]
    assert [status for status, _ in answers] == [200, 200]
    assert np.array_equal(answers[0][1], expected_indices(reference, first))
    assert np.array_equal(answers[1][1], expected_indices(reference, second))


def test_expect_100_continue_uploads_still_work(served: tuple[str, int], reference: DynamicRouter) -> None:
    x = tokens(10)
    head, body = raw_request(x, extra="Expect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", served[1]), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        status, indices = read_response(sock, bytearray())
    assert status == 200
    assert np.array_equal(indices, expected_indices(reference, x))


def test_a_chunked_upload_is_routed(served: tuple[str, int], reference: DynamicRouter) -> None:
    x = tokens(11)
    body, headers = encode_request(x, binary=True)
    pieces = (body[i : i + 50_000] for i in range(0, len(body), 50_000))
    response = httpx.post(served[0] + INFER, content=pieces, headers=headers)  # Transfer-Encoding: chunked
    assert response.status_code == 200
    _, arrays = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
    assert np.array_equal(arrays["expert_indices"], expected_indices(reference, x))


def test_an_early_answer_leaves_the_connection_usable(served: tuple[str, int]) -> None:
    head, body = raw_request(tokens(12), path="/v2/models/unknown/infer")
    follow_up = b"".join(raw_request(tokens(13)))
    with socket.create_connection(("127.0.0.1", served[1]), timeout=10) as sock:
        sock.sendall(head + body + follow_up)
        buffered = bytearray()
        assert read_response(sock, buffered)[0] == 404  # answered from the path, the body still drained
        assert read_response(sock, buffered)[0] == 200


def test_a_client_leaving_mid_body_does_not_disturb_the_server(served: tuple[str, int]) -> None:
    head, body = raw_request(tokens(14))
    with socket.create_connection(("127.0.0.1", served[1]), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
    x = tokens(15)
    encoded, headers = encode_request(x, binary=True)
    assert httpx.post(served[0] + INFER, content=encoded, headers=headers).status_code == 200
    assert json.loads(httpx.get(served[0] + "/v2/health/ready").content) == {"ready": True}


def side_by_side(
    port: int, first: np.ndarray, second: np.ndarray, datatypes: tuple[str, str] = ("FP32", "FP32")
) -> tuple[tuple[int, np.ndarray], ...]:
    """Send two requests on two connections at once (so they can share a batch); both responses."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as one, socket.create_connection(
        ("127.0.0.1", port), timeout=10
    ) as other:
        one.sendall(b"".join(raw_request(first, datatype=datatypes[0])))
        other.sendall(b"".join(raw_request(second, datatype=datatypes[1])))
        return read_response(one, bytearray()), read_response(other, bytearray())


def test_a_binary_tensor_with_nan_is_answered_400_and_its_batch_mates_are_routed(
    served: tuple[str, int], reference: DynamicRouter
) -> None:
    good, bad = tokens(16), tokens(17)
    bad[100, 3] = np.nan
    rejected, routed = side_by_side(served[1], bad, good)
    assert rejected[0] == 400
    assert routed[0] == 200 and np.array_equal(routed[1], expected_indices(reference, good))


def test_finite_values_too_large_for_the_gate_are_answered_400_and_their_batch_mates_are_routed(
    served: tuple[str, int], reference: DynamicRouter
) -> None:
    good, huge = tokens(18), tokens(19)
    huge[7, :] = 3e38  # finite, but the gate's logits overflow float32: the routing would be NaN
    rejected, routed = side_by_side(served[1], huge, good)
    assert rejected[0] == 400
    assert routed[0] == 200 and np.array_equal(routed[1], expected_indices(reference, good))


def test_bf16_and_fp16_bodies_are_routed_as_the_float32_tensors_of_their_values(
    served: tuple[str, int], reference: DynamicRouter
) -> None:
    x, y = tokens(20) * 4, tokens(21)
    as_bf16 = torch.from_numpy(x).bfloat16().float().numpy()
    as_fp16 = y.astype(np.float16).astype(np.float32)
    assert not np.array_equal(as_bf16, x)  # the rounding is real: the answers below are for the rounded values
    first, second = side_by_side(served[1], x, y, datatypes=("BF16", "FP16"))
    assert first[0] == 200 and np.array_equal(first[1], expected_indices(reference, as_bf16))
    assert second[0] == 200 and np.array_equal(second[1], expected_indices(reference, as_fp16))


def test_a_bf16_tensor_with_inf_is_answered_400_and_its_batch_mate_is_routed(
    served: tuple[str, int], reference: DynamicRouter
) -> None:
    good, bad = tokens(22), tokens(23)
    bad[5, 9] = np.inf
    rejected, routed = side_by_side(served[1], bad, good, datatypes=("BF16", "FP32"))
    assert rejected[0] == 400
    assert routed[0] == 200 and np.array_equal(routed[1], expected_indices(reference, good))
