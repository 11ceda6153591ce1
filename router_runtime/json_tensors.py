"""Large JSON inference requests with the tensor's numbers read straight into numpy (pysimdjson).

A 256 x 768 tensor is 196,608 JSON numbers. The general decoder (orjson) makes a Python float of each and
numpy then reads them back: about 16 ms of CPU per request on the development VM. simdjson parses the
document and hands the flat ``data`` array over as one buffer of doubles: about 5 ms. Only the plain case
takes this path: one object without duplicate keys whose first input has a flat array of numbers as
``data``. Everything else (malformed or non-UTF-8 JSON, NaN literals, nested or mixed data, duplicate keys,
numbers beyond float32) returns None, and the general decoder answers it exactly as before. Pure: bytes in,
Python objects and arrays out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # an optional speed-up: without it every JSON request takes the general decoder
    import simdjson
except ImportError:  # pragma: no cover - exercised only where pysimdjson is not installed
    simdjson = None  # type: ignore[assignment]

AVAILABLE = simdjson is not None
#: Below this many bytes the general decoder is as fast.
MIN_BYTES = 64 * 1024


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _unique_keys(obj: Any) -> list[str] | None:
    """The object's keys, or None when one repeats (simdjson's lookup takes the first, orjson the last)."""
    keys = list(obj.keys())
    return keys if len(set(keys)) == len(keys) else None


def decode_document(body: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The request document, its first input's ``data`` as a float32 array; None where the general decoder
    must decide (see the module docstring)."""
    if simdjson is None or len(body) < MIN_BYTES:
        return None
    try:
        # A parser per call: a parser cannot be reused while its results live, and calls may overlap in threads.
        root = simdjson.Parser().parse(body)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    try:
        return _split(root)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    finally:
        del root


def _split(root: Any) -> dict[str, Any] | None:
    if not isinstance(root, simdjson.Object) or (keys := _unique_keys(root)) is None or "inputs" not in keys:
        return None
    inputs = root["inputs"]
    if not isinstance(inputs, simdjson.Array) or len(inputs) == 0 or not isinstance(inputs[0], simdjson.Object):
        return None
    first = inputs[0]
    tensor_keys = _unique_keys(first)
    if tensor_keys is None or "data" not in tensor_keys:
        return None
    data = first["data"]
    if not isinstance(data, simdjson.Array):
        return None
    values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    if values.shape[0] != len(data):  # nested arrays are flattened: let the general decoder check their shape
        return None
    with np.errstate(over="ignore"):
        tokens = values.astype(np.float32)
    if not np.isfinite(tokens).all():  # beyond float32: the general decoder names the value and the range
        return None
    tensor = {key: _plain(first[key]) for key in tensor_keys if key != "data"} | {"data": tokens}
    document = {key: _plain(root[key]) for key in keys if key != "inputs"}
    document["inputs"] = [tensor, *(_plain(entry) for entry in list(inputs)[1:])]
    return document
