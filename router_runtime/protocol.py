"""Open Inference Protocol v2 codec for the router: JSON tensors and the binary tensor extension.

Pure functions of bytes and arrays; no HTTP. Every client mistake raises ``ProtocolError`` with the
HTTP status to answer (400, 404, 413) and a message naming the problem.

Binary extension (as in Triton/KServe): the body starts with a JSON header of
``Inference-Header-Content-Length`` bytes; each tensor sent in binary has
``"parameters": {"binary_data_size": N}`` and its raw little-endian bytes follow the header in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from router_runtime import json_tensors
from router_runtime.dtypes import BF16_BITS, bf16_bits, bf16_non_finite

INPUT_NAME = "hidden_states"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"

OUTPUT_INDICES = "expert_indices"
OUTPUT_WEIGHTS = "expert_weights"
OUTPUT_COUNTS = "num_experts"
OUTPUT_MOE = "moe_output"

#: OIP datatype name of each numpy dtype the router returns.
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
}
#: The datatypes ``hidden_states`` may be sent in, and how each is held once decoded. Models keep their
#: hidden states in BF16 or FP16; sending them as they are halves the bytes on the wire, and the router
#: widens them to float32 before the gate, so they are routed exactly as the FP32 tensor of the same values.
INPUT_DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "BF16": BF16_BITS,
}
_ACCEPTED = "FP32, FP16 or BF16"
_KNOWN_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                    "FP16", "FP32", "FP64", "BF16", "BYTES"}  # fmt: skip


class ProtocolError(Exception):
    """A request the server must answer with ``status`` and ``message`` (a client mistake)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: the hidden states and how to answer."""

    tokens: np.ndarray  # [T, d] in the sent datatype's storage (``INPUT_DATATYPES``)
    shape: tuple[int, ...]
    request_id: str | None = None
    outputs: tuple[str, ...] = ()
    binary_outputs: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    json_header_length: int | None

    @property
    def content_type(self) -> str:
        return "application/json" if self.json_header_length is None else BINARY_CONTENT_TYPE


def _require(condition: bool, message: str, status: int = 400) -> None:
    if not condition:
        raise ProtocolError(status, message)


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header length of a binary request, ``None`` for a plain JSON body."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise ProtocolError(400, f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    _require(length >= 0, f"{HEADER_LENGTH} must be >= 0, got {length}")
    _require(length <= body_size, f"{HEADER_LENGTH} is {length} but the request body has only {body_size} bytes")
    return length


def _json_object(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is strict (UTF-8 only, no NaN literals or lone surrogates, nesting up to 1024): what it
        # refuses goes to the standard parser, which accepts it as before or says precisely what is wrong.
        document = _lenient_json(bytes(raw))
    _require(isinstance(document, dict), "the inference request must be a JSON object")
    return document


def _binary_header(body: bytes | bytearray | memoryview, header_length: int) -> dict[str, Any]:
    """The JSON header of a binary-extension request: its first ``header_length`` bytes."""
    try:
        return _json_object(body[:header_length])
    except ProtocolError as exc:
        # Often a stale header: tritonclient and kserve write it into the headers dict the caller passed.
        raise ProtocolError(
            400,
            f"the first {header_length} bytes ({HEADER_LENGTH}: {header_length}) are not a JSON object: {exc.message}",
        ) from None


def _lenient_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, f"malformed JSON: the request is not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ProtocolError(400, "malformed JSON: nested too deeply") from None


def _dumps(document: Mapping[str, Any]) -> bytes:
    """Compact JSON of ``document``, numpy arrays included."""
    try:
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        # What orjson cannot write (e.g. an id holding a lone surrogate, which the lenient parser let
        # in) the standard encoder escapes, as before.
        return json.dumps(document, separators=(",", ":"), default=_as_list).encode()


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _loads(raw: bytes | bytearray | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw))


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    _require(isinstance(params, dict), f"{where}.parameters must be an object")
    return params


def _shape(tensor: Mapping[str, Any], input_dim: int) -> tuple[int, ...]:
    shape = tensor.get("shape")
    _require(isinstance(shape, list), f"input {INPUT_NAME!r} needs a 'shape' list, e.g. [T, {input_dim}]")
    assert isinstance(shape, list)
    _require(
        all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape),
        f"input {INPUT_NAME!r} shape must hold integers, got {shape}",
    )
    _require(
        len(shape) in (2, 3), f"wrong shape {shape}: {INPUT_NAME!r} must be [T, {input_dim}] or [B, S, {input_dim}]"
    )
    _require(all(dim >= 0 for dim in shape), f"wrong shape {shape}: dimensions must be >= 0")
    _require(
        shape[-1] == input_dim,
        f"dimension mismatch: shape {shape} has last dimension {shape[-1]}, the model's inputDim is {input_dim}",
    )
    return tuple(shape)


#: The largest finite value of each accepted datatype, as the range errors quote it.
_LARGEST = {"FP32": "3.40e38", "FP16": "65504", "BF16": "3.39e38"}
_JSON_TYPES = {str: "string", bool: "boolean", type(None): "null", dict: "object"}


def _non_number(data: list[Any], path: str = "") -> tuple[str, Any] | None:
    """The position and value of the first element of (nested) ``data`` that is not a JSON number, if any.

    numpy would read ``"1.0"`` and ``true`` as 1.0 and ``null`` as NaN; a tensor is numbers only. One
    ``set(map(type, ...))`` per row keeps the common, all-numbers case at C speed.
    """
    kinds = set(map(type, data))
    if kinds <= {int, float}:
        return None
    for index, value in enumerate(data):
        kind = type(value)
        if kind is list:
            found = _non_number(value, f"{path}[{index}]")
            if found is not None:
                return found
        elif kind is not int and kind is not float:
            return f"{path}[{index}]", value
    return None


def _json_data(data: Any, count: int, shape: tuple[int, ...], datatype: str = "FP32") -> np.ndarray:
    if isinstance(data, np.ndarray):  # read by ``json_tensors``: flat float32 already
        array = data
        _require(
            array.size == count,
            f"input {INPUT_NAME!r} data holds {array.size} values but shape {list(shape)} needs {count}",
        )
        return array.reshape(-1, shape[-1])
    _require(isinstance(data, list), f"input {INPUT_NAME!r} needs 'data' as a JSON array of numbers")
    found = _non_number(data)
    if found is not None:
        position, value = found
        shown = json.dumps(value)
        what = "null" if value is None else f"the JSON {_JSON_TYPES.get(type(value), 'value')} "
        what += "" if value is None else shown if len(shown) <= 40 else shown[:37] + "..."
        raise ProtocolError(400, f"input {INPUT_NAME!r} data{position} is {what}: every element must be a number")
    try:
        # Out-of-range numbers become inf here: told apart from a NaN/Inf below.
        with np.errstate(over="ignore"):
            array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(
            400, f"input {INPUT_NAME!r} data must be a flat or nested array of numbers of shape {list(shape)}"
        ) from None
    _require(
        array.size == count,
        f"input {INPUT_NAME!r} data holds {array.size} values but shape {list(shape)} needs {count}",
    )
    if not np.isfinite(array).all():  # JSON numbers are finite: beyond float32 (Python's NaN literals aside)
        wide = np.asarray(data, dtype=np.float64)
        overflow = np.isinf(array) & np.isfinite(wide)
        if overflow.any():
            raise ProtocolError(
                400,
                f"input {INPUT_NAME!r} holds {float(wide[overflow][0]):g}, outside the {datatype} range "
                f"(largest finite value {_LARGEST[datatype]})",
            )
    return array.reshape(-1, shape[-1])


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    *,
    input_dim: int,
    max_tokens: int,
    known_outputs: Sequence[str],
    check_finite: bool = True,
) -> InferRequest:
    """Decode a JSON or binary-extension request into ``tokens [T, d]`` and output choices.

    ``tokens`` is held as sent (``INPUT_DATATYPES``: float32, float16, or BF16 bits); JSON numbers are rounded to
    the declared datatype, so a tensor is routed the same whichever way it was sent.

    ``check_finite=False`` leaves the NaN/Inf check (``non_finite_error``) to the caller, e.g. for a
    server that runs it where the tensor is already in cache.
    """
    _require(len(body) > 0, "empty request body: expected an inference request JSON object")
    if header_length is None:
        # A large JSON tensor's numbers go straight into numpy where they can (``json_tensors``).
        document = json_tensors.decode_document(body) or _json_object(body)
    else:
        document = _binary_header(body, header_length)
    request_params = _parameters(document, "request")
    inputs = document.get("inputs")
    _require(isinstance(inputs, list) and len(inputs) > 0, "the request needs a non-empty 'inputs' list")
    assert isinstance(inputs, list)
    _require(len(inputs) == 1, f"the model takes exactly one input named {INPUT_NAME!r}, got {len(inputs)} inputs")
    tensor = inputs[0]
    _require(isinstance(tensor, dict), "each entry of 'inputs' must be an object")
    name = tensor.get("name")
    _require(name == INPUT_NAME, f"unknown input {name!r}: the model takes one input named {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    _require(isinstance(datatype, str), f"input {INPUT_NAME!r} needs a 'datatype' string ({_ACCEPTED})")
    _require(
        datatype in INPUT_DATATYPES,
        f"wrong datatype {datatype!r} for {INPUT_NAME!r}: {_ACCEPTED} is accepted"
        if datatype in _KNOWN_DATATYPES
        else f"unknown datatype {datatype!r} for {INPUT_NAME!r}: {_ACCEPTED} is accepted",
    )
    storage = INPUT_DATATYPES[datatype]
    shape = _shape(tensor, input_dim)
    tokens = math.prod(shape[:-1])
    _require(tokens > 0, f"empty tensor: shape {list(shape)} holds no tokens")
    _require(tokens <= max_tokens, f"too many tokens: {tokens} in one request, the limit is {max_tokens}", status=413)
    count = tokens * shape[-1]
    params = _parameters(tensor, f"input {INPUT_NAME!r}")
    _refuse_unsupported(params, f"input {INPUT_NAME!r}", _UNSUPPORTED_INPUT_PARAMETERS)
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        _require(header_length is not None, f"binary_data_size is set but the {HEADER_LENGTH} header is missing")
        assert header_length is not None
        _require(
            isinstance(binary_size, int) and not isinstance(binary_size, bool) and binary_size >= 0,
            f"binary_data_size must be a non-negative integer, got {binary_size!r}",
        )
        _require("data" not in tensor, f"input {INPUT_NAME!r} has both 'data' and binary_data_size: send one")
        expected = count * storage.itemsize
        _require(
            binary_size == expected,
            f"binary_data_size is {binary_size} but {datatype} shape {list(shape)} needs {expected} bytes",
        )
        available = len(body) - header_length
        _require(
            available >= expected,
            f"truncated binary body: {INPUT_NAME!r} needs {expected} bytes after the header, got {available}",
        )
        _require(
            available == expected,
            f"binary body has {available - expected} bytes after the last tensor; expected exactly {expected}",
        )
        array = np.frombuffer(body, dtype=storage, count=count, offset=header_length).reshape(-1, shape[-1])
    else:
        _require("data" in tensor, f"input {INPUT_NAME!r} needs 'data' (or binary_data_size with the binary extension)")
        array = _as_datatype(_json_data(tensor["data"], count, shape, datatype), datatype)
    if check_finite:
        error = non_finite_error(array)
        if error is not None:
            raise error
    outputs, binary = _requested_outputs(document, request_params, known_outputs)
    request_id = document.get("id")
    _require(request_id is None or isinstance(request_id, str), "'id' must be a string")
    return InferRequest(tokens=array, shape=shape, request_id=request_id, outputs=outputs, binary_outputs=binary)


def non_finite_error(tokens: np.ndarray) -> ProtocolError | None:
    """The 400 for a tensor (float32, float16 or BF16 bits) holding NaN or Inf, else None."""
    if tokens.dtype == BF16_BITS:
        finite = not bool(bf16_non_finite(tokens).any())
    else:
        # min/max propagate NaN and expose +-Inf without allocating a mask the size of the tensor.
        finite = math.isfinite(float(tokens.min())) and math.isfinite(float(tokens.max()))
    return None if finite else ProtocolError(400, f"input {INPUT_NAME!r} contains NaN or Inf")


def _as_datatype(values: np.ndarray, datatype: str) -> np.ndarray:
    """JSON numbers (parsed as float32) held as ``datatype``; a finite number the datatype cannot hold is refused."""
    if datatype == "FP32":
        return values
    with np.errstate(over="ignore"):
        held = bf16_bits(values) if datatype == "BF16" else values.astype(np.float16)
    infinite = bf16_non_finite(held) if datatype == "BF16" else ~np.isfinite(held)
    overflow = infinite & np.isfinite(values)
    if overflow.any():
        largest = _LARGEST[datatype]
        raise ProtocolError(
            400,
            f"input {INPUT_NAME!r} holds {float(values[overflow][0]):g}, outside the {datatype} range "
            f"(largest finite value {largest})",
        )
    return held


def rejected_by_gate(logits: np.ndarray, parts: Sequence[np.ndarray]) -> dict[int, ProtocolError]:
    """The 400s of requests (``parts``, whose rows make up ``logits [T, L]`` in order) whose gate logits are not
    finite, by index.

    A NaN or Inf anywhere in a token makes every logit of its row NaN or Inf (IEEE: NaN propagates,
    Inf times a weight is Inf, or NaN when the weight is 0, and Inf - Inf is NaN), so checking the few logits
    replaces reading the whole tensor again. A finite token whose logits overflow float32 is refused too:
    its routing would be NaN.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf and overflow are what is looked for
        total = float(logits.sum())
    if math.isfinite(total):  # the common case: one pass over T x L values
        return {}
    finite = np.isfinite(logits).all(axis=1)
    rejected: dict[int, ProtocolError] = {}
    start = 0
    for index, part in enumerate(parts):
        end = start + part.shape[0]
        if not finite[start:end].all():
            rejected[index] = non_finite_error(part) or ProtocolError(
                400, f"input {INPUT_NAME!r} has values too large for the router: its gate logits overflow float32"
            )
        start = end
    return rejected


_SHARED_MEMORY = "the shared-memory extension is not served: send the tensor in the request body"
#: Parameters of the OIP/Triton extensions that would change what a tensor holds, refused instead of ignored (and
#: why); binary_data, binary_data_size and any other parameter are accepted as before.
_UNSUPPORTED_INPUT_PARAMETERS = {
    "shared_memory_region": _SHARED_MEMORY,
    "shared_memory_byte_size": _SHARED_MEMORY,
    "shared_memory_offset": _SHARED_MEMORY,
}
_UNSUPPORTED_OUTPUT_PARAMETERS = {
    "classification": "the classification extension is not served: the outputs are the routing tensors",
    "shared_memory_region": "the shared-memory extension is not served: outputs come in the response body",
    "shared_memory_byte_size": "the shared-memory extension is not served: outputs come in the response body",
    "shared_memory_offset": "the shared-memory extension is not served: outputs come in the response body",
}


def _refuse_unsupported(params: Mapping[str, Any], where: str, unsupported: Mapping[str, str]) -> None:
    if unsupported.keys().isdisjoint(params):  # the common case: one hash lookup per parameter sent
        return
    name = next(name for name in params if name in unsupported)
    raise ProtocolError(400, f"{where} parameters.{name} is not supported: {unsupported[name]}")


def _requested_outputs(
    document: Mapping[str, Any], request_params: Mapping[str, Any], known: Sequence[str]
) -> tuple[tuple[str, ...], frozenset[str]]:
    """Which outputs to return (all when none are named) and which of them in binary."""
    all_binary = request_params.get("binary_data_output", False)
    _require(isinstance(all_binary, bool), "parameters.binary_data_output must be true or false")
    requested = document.get("outputs")
    if requested is None:
        names = tuple(known)
        return names, frozenset(names) if all_binary else frozenset()
    _require(isinstance(requested, list), "'outputs' must be a list of {\"name\": ...} objects")
    names_list: list[str] = []
    binary: set[str] = set()
    for entry in requested:
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str), "each output needs a 'name'")
        name = entry["name"]
        _require(name in known, f"unknown output {name!r}; this model returns {', '.join(known)}")
        _require(name not in names_list, f"output {name!r} is requested twice")
        params = _parameters(entry, f"output {name!r}")
        _refuse_unsupported(params, f"output {name!r}", _UNSUPPORTED_OUTPUT_PARAMETERS)
        as_binary = params.get("binary_data", all_binary)
        _require(isinstance(as_binary, bool), f"output {name!r} parameters.binary_data must be true or false")
        names_list.append(name)
        if as_binary:
            binary.add(name)
    if not names_list:
        names_list = list(known)
    return tuple(names_list), frozenset(binary)


def _datatype(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return name
    raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}")


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    *,
    request_id: str | None = None,
    binary: frozenset[str] = frozenset(),
    parameters: Mapping[str, Any] | None = None,
) -> EncodedResponse:
    """Encode outputs (in the given order); the ones in ``binary`` go after a JSON header as raw bytes."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        datatype = _datatype(array)
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if name in binary:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array.reshape(-1))  # serialised by orjson, no Python floats
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = dict(parameters)
    header = _dumps(document)
    if not chunks:
        return EncodedResponse(header, None)
    return EncodedResponse(header + b"".join(chunks), len(header))


def encode_request(
    tokens: np.ndarray,
    *,
    binary: bool,
    outputs: Sequence[str] = (),
    binary_outputs: bool | None = None,
    request_id: str | None = None,
    datatype: str = "FP32",
) -> tuple[bytes, dict[str, str]]:
    """Client side: body and headers of an infer request for ``tokens [T, d]`` (or ``[B, S, d]``), sent as
    ``datatype`` (FP32, FP16 or BF16; the values are rounded to it).

    Tokens already held in the datatype go as they are: a float16 array as FP16, and a uint16 array of BF16
    patterns as BF16 (from torch: ``t.view(torch.int16).numpy().view(numpy.uint16)``).
    """
    if datatype not in INPUT_DATATYPES:
        raise ValueError(f"datatype must be one of {', '.join(INPUT_DATATYPES)}, got {datatype!r}")
    held = np.asarray(tokens)
    if held.dtype == BF16_BITS and datatype != "BF16":
        raise ValueError("a uint16 array is taken for BF16 patterns: send it with datatype='BF16'")
    storage = INPUT_DATATYPES[datatype]
    if held.dtype == storage and datatype != "FP32":
        array = np.ascontiguousarray(held)  # the datatype's own bytes already
        if not binary:  # JSON carries the values
            array = array.astype(np.float32) if datatype == "FP16" else (array.astype(np.uint32) << 16).view("<f4")
    else:
        values = np.ascontiguousarray(held, dtype="<f4")
        try:
            # JSON numbers are sent as they are and rounded by the server; binary bytes are the datatype's own.
            array = values if not binary else _as_datatype(values, datatype)
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
    tensor: dict[str, Any] = {"name": INPUT_NAME, "shape": list(array.shape), "datatype": datatype}
    want_binary = binary if binary_outputs is None else binary_outputs
    document: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        document["id"] = request_id
    if outputs:
        document["outputs"] = [{"name": name, "parameters": {"binary_data": want_binary}} for name in outputs]
    else:
        document["parameters"] = {"binary_data_output": want_binary}
    if not binary:
        tensor["data"] = array.reshape(-1)
        return _dumps(document), {"Content-Type": "application/json"}
    raw = array.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = _dumps(document)
    return header + raw, {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def decode_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Client side: the response document and its outputs as numpy arrays (JSON or binary)."""
    header = body if header_length is None else body[:header_length]
    document = _loads(header)
    arrays: dict[str, np.ndarray] = {}
    offset = header_length or 0
    for entry in document.get("outputs", []):
        dtype = DATATYPES[entry["datatype"]]
        shape = tuple(entry["shape"])
        size = entry.get("parameters", {}).get("binary_data_size")
        if size is not None:
            arrays[entry["name"]] = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            arrays[entry["name"]] = arrays[entry["name"]].reshape(shape)
            offset += size
        else:
            arrays[entry["name"]] = np.asarray(entry["data"], dtype=dtype).reshape(shape)
    return document, arrays
