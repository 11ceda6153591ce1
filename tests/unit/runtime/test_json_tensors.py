"""Large JSON requests read by simdjson decode exactly as the general decoder decodes them, or not at all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router_runtime import json_tensors
from router_runtime.protocol import ProtocolError, decode_infer_request, encode_request

pytestmark = pytest.mark.skipif(not json_tensors.AVAILABLE, reason="pysimdjson is not installed")

KNOWN = ("expert_indices", "expert_weights", "num_experts")


@pytest.fixture(autouse=True)
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_tensors, "MIN_BYTES", 0)  # small documents take the fast path too


def decode(body: bytes, *, general: bool = False, monkeypatch: pytest.MonkeyPatch | None = None) -> object:
    if general:
        assert monkeypatch is not None
        with monkeypatch.context() as patch:
            patch.setattr(json_tensors, "decode_document", lambda body: None)
            return decode_infer_request(body, None, input_dim=4, max_tokens=10_000, known_outputs=KNOWN)
    return decode_infer_request(body, None, input_dim=4, max_tokens=10_000, known_outputs=KNOWN)


def test_a_json_request_reads_the_same_through_either_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4), dtype=np.float32) * np.float32(10.0) ** rng.integers(-40, 38, (300, 4))
    body, _ = encode_request(x, binary=False, outputs=("num_experts",), request_id="r-1")
    assert json_tensors.decode_document(body) is not None
    fast = decode(body)
    general = decode(body, general=True, monkeypatch=monkeypatch)
    for field in ("shape", "request_id", "outputs", "binary_outputs"):
        assert getattr(fast, field) == getattr(general, field)
    assert fast.tokens.dtype == np.float32  # type: ignore[attr-defined]
    assert fast.tokens.tobytes() == general.tokens.tobytes()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "numbers",
    [
        "0, 1, -2, 3",  # integers
        "-0.0, 1e-45, 1.17549435e-38, 3.4028235e38",  # negative zero, subnormal, the float32 extremes
        "0.1, 0.30000000000000004, 1E5, 2.5e+2",  # decimal fractions, exponent forms
        "16777217, 9007199254740993, -1.0000001, 123456789.123456789",  # more digits than float32 holds
    ],
)
def test_numbers_round_to_the_same_float32(numbers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    head = '{"inputs": [{"name": "hidden_states", "shape": [1, 4], "datatype": "FP32", "data": '
    body = (head + f"[{numbers}]}}]}}").encode()
    assert json_tensors.decode_document(body) is not None
    fast = decode(body).tokens  # type: ignore[attr-defined]
    general = decode(body, general=True, monkeypatch=monkeypatch).tokens  # type: ignore[attr-defined]
    assert fast.tobytes() == general.tobytes()


def tensor(data: str, extra: str = "") -> bytes:
    head = '{"inputs": [{"name": "hidden_states", "shape": [2, 4], "datatype": "FP32", "data": '
    return (head + f"{data}}}]{extra}}}").encode()


@pytest.mark.parametrize(
    "body",
    [
        tensor("[[0, 1, 2, 3], [4, 5, 6, 7]]"),  # nested: the general decoder checks the shape
        tensor("[[0, 1], [2]]"),
        tensor('[0, 1, 2, 3, 4, 5, 6, "7"]'),
        tensor("[0, 1, 2, 3, 4, 5, 6, true]"),
        tensor("[0, 1, 2, 3, 4, 5, 6, null]"),
        tensor("[0, 1, 2, 3, 4, 5, 6, NaN]"),
        tensor("[0, 1, 2, 3, 4, 5, 6, 1e400]"),
        tensor('"not an array"'),
        tensor("[0, 1, 2, 3, 4, 5, 6, 7]", ', "inputs": []'),  # a repeated key: orjson keeps the last
        b'{"inputs": [{"data": [1, 2], "data": [3, 4]}]}',
        b'{"inputs": {"data": [1]}}',
        b'{"inputs": []}',
        b"[1, 2, 3]",
        b'{"inputs": [{"data": [1, 2',
        b'{"id": "\xff", "inputs": [{"data": [1]}]}',
    ],
)
def test_what_is_not_the_plain_case_is_left_to_the_general_decoder(body: bytes) -> None:
    assert json_tensors.decode_document(body) is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (tensor("[[0, 1], [2]]"), "array of numbers"),
        (tensor("[0, 1, 2]"), "holds 3 values"),
        (tensor("[0, 1, 2, 3, 4, 5, 6, 1e39]"), r"holds 1e\+39, outside the FP32 range"),
        (tensor('[0, 1, 2, 3, 4, 5, 6, "1.0"]'), r'data\[7\] is the JSON string "1.0": every element must be a number'),
        (tensor("[0, 1, 2, 3, 4, 5, 6, true]"), r"data\[7\] is the JSON boolean true"),
        (tensor("[0, 1, 2, 3, 4, 5, 6, null]"), r"data\[7\] is null"),
        (tensor("[0, 1, 2, 3, 4, 5, 6, NaN]"), "NaN or Inf"),
        (tensor("[0, 1, 2, 3, 4, 5, 6, 7]", ', "id": 5'), "'id' must be a string"),
        (b'{"inputs": [{"data": [1, 2', "malformed JSON"),
    ],
)
def test_bad_large_requests_get_the_same_answers(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode(body)


def test_small_documents_keep_the_general_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_tensors, "MIN_BYTES", 1 << 20)
    assert json_tensors.decode_document(tensor("[0, 1, 2, 3, 4, 5, 6, 7]")) is None


def test_the_other_fields_come_through_unchanged() -> None:
    body = json.dumps(
        {
            "id": "abc",
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "hidden_states", "shape": [1, 4], "datatype": "BF16", "data": [1, 2, 3, 4],
                        "parameters": {"x": [1, {"y": None}]}}],
            "outputs": [{"name": "num_experts"}],
        }
    ).encode()  # fmt: skip
    document = json_tensors.decode_document(body)
    assert document is not None
    tensor_entry = document["inputs"][0]
    assert tensor_entry["data"].tolist() == [1, 2, 3, 4] and tensor_entry["datatype"] == "BF16"
    assert tensor_entry["parameters"] == {"x": [1, {"y": None}]}
    assert document["id"] == "abc" and document["outputs"] == [{"name": "num_experts"}]
    assert document["parameters"] == {"binary_data_output": True}
