"""The OIP v2 codec: decoding JSON and binary requests, rejecting bad ones by name, encoding answers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from router_runtime.dtypes import bf16_bits
from router_runtime.protocol import (
    ProtocolError,
    decode_infer_request,
    decode_response,
    encode_infer_response,
    encode_request,
    parse_header_length,
)

KNOWN = ("expert_indices", "expert_weights", "num_experts")


def decode(body: bytes | memoryview, header_length: int | None = None, max_tokens: int = 100):
    return decode_infer_request(body, header_length, input_dim=4, max_tokens=max_tokens, known_outputs=KNOWN)


def request(shape: list[int], data: object, **extra: object) -> bytes:
    tensor = {"name": "hidden_states", "shape": shape, "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def typed(datatype: str) -> bytes:
    tensor = {"name": "hidden_states", "shape": [1, 4], "datatype": datatype, "data": [0] * 4}
    return json.dumps({"inputs": [tensor]}).encode()


def test_json_request_decodes_to_float32_tokens() -> None:
    decoded = decode(request([2, 4], list(range(8))))
    assert decoded.tokens.dtype == np.float32
    assert decoded.tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert decoded.outputs == KNOWN and not decoded.binary_outputs


def test_nested_json_data_is_accepted() -> None:
    assert decode(request([1, 2, 4], [[[1, 2, 3, 4], [5, 6, 7, 8]]])).tokens.shape == (2, 4)


def test_binary_request_round_trips_the_tensor() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    body, headers = encode_request(x, binary=True)
    decoded = decode(body, parse_header_length(headers["Inference-Header-Content-Length"], len(body)))
    assert np.array_equal(decoded.tokens, x)
    assert decoded.binary_outputs == frozenset(KNOWN)


def test_a_body_in_a_receive_buffer_decodes_without_copying_the_tensor() -> None:
    x = np.random.default_rng(1).standard_normal((3, 4), dtype=np.float32)
    body, headers = encode_request(x, binary=True)
    buffer = np.frombuffer(bytearray(body), dtype=np.uint8)  # what the transport hands over: a memoryview
    decoded = decode(buffer.data, int(headers["Inference-Header-Content-Length"]))
    assert np.array_equal(decoded.tokens, x)
    assert np.shares_memory(decoded.tokens, buffer)


def test_per_output_binary_flag_is_honoured() -> None:
    body = request([1, 4], [0] * 4, outputs=[{"name": "num_experts", "parameters": {"binary_data": True}}])
    decoded = decode(body)
    assert decoded.outputs == ("num_experts",) and decoded.binary_outputs == {"num_experts"}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"", 400, "empty request body"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"{bad", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (request([2, 5], [0] * 10), 400, "dimension mismatch"),
        (request([8], [0] * 8), 400, "wrong shape"),
        (request([2, -1, 4], [0] * 8), 400, "must be >= 0"),
        (request([0, 4], []), 400, "empty tensor"),
        (request([101, 4], [0] * 404), 413, "too many tokens"),
        (request([2, 4], [0] * 7), 400, "holds 7 values"),
        (request([2, 4], [[0, 1], [2]]), 400, "array of numbers"),
        (request([1, 4], [1e39, 0, 0, 0]), 400, "holds 1e+39, outside the FP32 range (largest finite value 3.40e38)"),
        (request([1, 4], [0, "1.0", 0, 0]), 400, 'data[1] is the JSON string "1.0": every element must be a number'),
        (request([1, 4], [0, 0, True, 0]), 400, "data[2] is the JSON boolean true"),
        (request([1, 4], [None, 0, 0, 0]), 400, "data[0] is null"),
        (request([2, 4], [[0, 1, 2, 3], [0, {"a": 1}, 2, 3]]), 400, 'data[1][1] is the JSON object {"a": 1}'),
        (request([1, 4], [float("nan"), 0, 0, 0]), 400, "NaN or Inf"),  # a NaN literal: not strict JSON
        (b'{"inputs": [1, 2}', 400, "malformed JSON: Expecting ',' delimiter at line 1 column 17"),
        (request([1, 4], [0] * 4, outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
        (request([1, 4], [0] * 4, id=5), 400, "'id' must be a string"),
        (typed("FP64"), 400, "wrong datatype 'FP64' for 'hidden_states': FP32, FP16 or BF16 is accepted"),
        (typed("X"), 400, "unknown datatype 'X'"),
    ],
)  # fmt: skip
def test_bad_requests_raise_a_protocol_error_naming_the_problem(body: bytes, status: int, fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(body)
    assert caught.value.status == status
    assert fragment in caught.value.message


def test_truncated_binary_tensor_is_named() -> None:
    body, headers = encode_request(np.zeros((2, 4), np.float32), binary=True)
    with pytest.raises(ProtocolError, match="truncated binary body"):
        decode(body[:-1], int(headers["Inference-Header-Content-Length"]))


def test_binary_size_must_match_the_shape() -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "hidden_states", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="needs 32 bytes"):
        decode(header + b"\0" * 4, len(header))


@pytest.mark.parametrize(
    ("value", "fragment"), [("abc", "must be an integer"), ("-1", ">= 0"), ("99", "only 10 bytes")]
)
def test_bad_header_length_is_named(value: str, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        parse_header_length(value, 10)


def test_response_round_trips_json_and_binary_outputs() -> None:
    outputs: dict[str, np.ndarray] = {
        "expert_indices": np.array([[1, -1]], np.int64),
        "expert_weights": np.array([[1.0, 0.0]], np.float32),
    }
    encoded = encode_infer_response("m", "1", outputs, request_id="r", binary=frozenset({"expert_weights"}))
    document, arrays = decode_response(encoded.body, encoded.json_header_length)
    assert document["id"] == "r" and document["model_name"] == "m"
    assert arrays["expert_indices"].tolist() == [[1, -1]]
    assert arrays["expert_weights"].tolist() == [[1.0, 0.0]]
    assert encoded.content_type == "application/octet-stream"


def test_json_in_utf16_is_decoded_as_before() -> None:
    # The fast parser takes UTF-8 only; the standard one, its fall-back, detects UTF-16 by the BOM.
    assert decode(request([1, 4], [0, 1, 2, 3]).decode().encode("utf-16")).tokens.tolist() == [[0, 1, 2, 3]]


def test_integers_beyond_64_bits_are_accepted_as_numbers() -> None:
    assert decode(request([1, 4], [2**70, 0, 0, 0])).tokens[0, 0] == np.float32(2**70)


def test_an_id_with_a_lone_surrogate_is_echoed_as_before() -> None:
    # Valid JSON syntax that the fast parser refuses and the fast encoder cannot write back.
    body = request([1, 4], [0, 1, 2, 3], id="a\ud800")
    decoded = decode(body)
    assert decoded.request_id == "a\ud800"
    encoded = encode_infer_response("m", "1", {"num_experts": np.array([2], np.int64)}, request_id=decoded.request_id)
    document, arrays = decode_response(encoded.body, encoded.json_header_length)
    assert document["id"] == "a\ud800" and arrays["num_experts"].tolist() == [2]


def test_json_float32_outputs_round_trip_exactly() -> None:
    weights = np.random.default_rng(2).random((64, 2), dtype=np.float32)[::2]  # a non-contiguous view
    encoded = encode_infer_response("m", "1", {"expert_weights": weights})
    _, arrays = decode_response(encoded.body, encoded.json_header_length)
    assert np.array_equal(arrays["expert_weights"], weights)


def test_json_request_tensor_round_trips_exactly() -> None:
    x = np.random.default_rng(3).standard_normal((3, 4), dtype=np.float32)
    body, headers = encode_request(x, binary=False)
    assert headers["Content-Type"] == "application/json"
    assert np.array_equal(decode(body).tokens, x)


def test_all_json_response_has_no_header_length() -> None:
    encoded = encode_infer_response("m", "1", {"num_experts": np.array([2], np.int64)})
    assert encoded.json_header_length is None and encoded.content_type == "application/json"
    assert json.loads(encoded.body)["outputs"][0] == {
        "name": "num_experts",
        "shape": [1],
        "datatype": "INT64",
        "data": [2],
    }


def test_non_finite_values_in_a_binary_tensor_are_rejected() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 4), np.float32)
        x[1, 2] = bad
        body, headers = encode_request(x, binary=True)
        with pytest.raises(ProtocolError, match="NaN or Inf"):
            decode(body, int(headers["Inference-Header-Content-Length"]))


def binary_body(x: np.ndarray, datatype: str) -> tuple[bytes, int]:
    body, headers = encode_request(x, binary=True, datatype=datatype)
    return body, int(headers["Inference-Header-Content-Length"])


def test_fp16_and_bf16_binary_tensors_travel_in_half_the_bytes_and_decode_as_sent() -> None:
    x = np.random.default_rng(2).standard_normal((3, 4), dtype=np.float32)
    fp32, fp32_header = binary_body(x, "FP32")
    for datatype, dtype in (("FP16", np.dtype("<f2")), ("BF16", np.dtype("<u2"))):
        body, header = binary_body(x, datatype)
        assert len(body) - header == (len(fp32) - fp32_header) // 2 == 24
        decoded = decode(body, header)
        assert decoded.tokens.dtype == dtype and decoded.tokens.shape == (3, 4)
    assert np.array_equal(decode(*binary_body(x, "FP16")).tokens, x.astype(np.float16))
    assert np.array_equal(decode(*binary_body(x, "BF16")).tokens, bf16_bits(x))


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_json_numbers_are_rounded_to_the_declared_datatype(datatype: str) -> None:
    x = np.random.default_rng(3).standard_normal((2, 4), dtype=np.float32)
    body, _ = encode_request(x, binary=False, datatype=datatype)
    assert json.loads(body)["inputs"][0]["datatype"] == datatype
    assert np.array_equal(decode(body).tokens, decode(*binary_body(x, datatype)).tokens)


@pytest.mark.parametrize(
    ("datatype", "value", "fragment"),
    [
        ("FP16", 70000.0, "holds 70000, outside the FP16 range (largest finite value 65504)"),
        ("FP16", -1e6, "holds -1e+06, outside the FP16 range"),
        ("BF16", 3.4e38, "outside the BF16 range"),
    ],
)
def test_a_json_value_the_datatype_cannot_hold_is_named(datatype: str, value: float, fragment: str) -> None:
    tensor = {"name": "hidden_states", "shape": [1, 4], "datatype": datatype, "data": [1.0, value, 0.0, 0.0]}
    with pytest.raises(ProtocolError, match=re.escape(fragment)):
        decode(json.dumps({"inputs": [tensor]}).encode())
    with pytest.raises(ValueError, match=re.escape(fragment)):  # the client refuses to send it in binary
        encode_request(np.array([[1.0, value, 0.0, 0.0]], np.float32), binary=True, datatype=datatype)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_a_json_value_beyond_float32_is_named_with_the_datatypes_range(datatype: str) -> None:
    largest = {"FP32": "3.40e38", "FP16": "65504", "BF16": "3.39e38"}[datatype]
    tensor = {"name": "hidden_states", "shape": [1, 4], "datatype": datatype, "data": [1.0, -1e39, 0.0, 0.0]}
    expected = f"holds -1e+39, outside the {datatype} range (largest finite value {largest})"
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        decode(json.dumps({"inputs": [tensor]}).encode())


def test_a_16_bit_binary_size_must_match_its_datatype() -> None:
    header = json.dumps(
        {"inputs": [{"name": "hidden_states", "shape": [2, 4], "datatype": "BF16",
                     "parameters": {"binary_data_size": 32}}]}
    ).encode()  # fmt: skip
    with pytest.raises(ProtocolError, match=re.escape("binary_data_size is 32 but BF16 shape [2, 4] needs 16 bytes")):
        decode(header + b"\0" * 32, len(header))


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_nan_in_a_16_bit_tensor_is_refused(datatype: str) -> None:
    x = np.zeros((2, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        decode_infer_request(*binary_body(x, datatype), input_dim=4, max_tokens=100, known_outputs=KNOWN)


def test_the_client_names_a_datatype_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="datatype must be one of FP32, FP16, BF16, got 'FP64'"):
        encode_request(np.zeros((1, 4), np.float32), binary=True, datatype="FP64")


def test_tokens_already_in_16_bits_are_sent_as_they_are() -> None:
    x = np.random.default_rng(4).standard_normal((3, 4), dtype=np.float32)
    half, bits = x.astype(np.float16), bf16_bits(x)
    assert encode_request(half, binary=True, datatype="FP16") == encode_request(x, binary=True, datatype="FP16")
    assert encode_request(bits, binary=True, datatype="BF16") == encode_request(x, binary=True, datatype="BF16")
    assert np.array_equal(decode(*binary_body(x, "BF16")).tokens, bits)
    for datatype, held in (("FP16", half), ("BF16", bits)):  # JSON carries their values
        body, _ = encode_request(held, binary=False, datatype=datatype)
        assert np.array_equal(decode(body).tokens, decode(*binary_body(x, datatype)).tokens)
    with pytest.raises(ValueError, match="uint16 array is taken for BF16 patterns"):
        encode_request(bits, binary=True, datatype="FP32")


def test_a_stale_header_length_names_the_bytes_it_made_the_server_read() -> None:
    body, headers = encode_request(np.zeros((2, 4), np.float32), binary=True)
    stale = int(headers["Inference-Header-Content-Length"]) - 5  # left over from another request
    with pytest.raises(ProtocolError) as caught:
        decode(body, stale)
    assert caught.value.status == 400
    assert caught.value.message.startswith(
        f"the first {stale} bytes (Inference-Header-Content-Length: {stale}) are not a JSON object: malformed JSON"
    )


@pytest.mark.parametrize("name", ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"])
def test_an_input_in_shared_memory_is_refused_by_name(name: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(request([1, 4], [0.0] * 4).replace(b'"data"', f'"parameters": {{"{name}": 1}}, "data"'.encode()))
    assert caught.value.status == 400
    assert f"input 'hidden_states' parameters.{name} is not supported: the shared-memory extension" in (
        caught.value.message
    )


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("classification", "the classification extension"), ("shared_memory_region", "the shared-memory extension")],
)
def test_an_output_parameter_that_changes_the_answer_is_refused_by_name(name: str, fragment: str) -> None:
    outputs = [{"name": "expert_indices", "parameters": {name: 2}}]
    with pytest.raises(ProtocolError) as caught:
        decode(request([1, 4], [0.0] * 4, outputs=outputs))
    assert caught.value.status == 400
    assert f"output 'expert_indices' parameters.{name} is not supported: {fragment}" in caught.value.message


def test_binary_flags_and_custom_parameters_are_still_accepted() -> None:
    outputs = [{"name": "expert_indices", "parameters": {"binary_data": False, "my_trace_id": "x"}}]
    document = json.loads(request([1, 4], [0.0] * 4, outputs=outputs))
    document["inputs"][0]["parameters"] = {"my_tag": 3}
    assert decode(json.dumps(document).encode()).outputs == ("expert_indices",)
