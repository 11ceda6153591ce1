"""The 16-bit datatypes hidden states arrive in, held in numpy (which has no bfloat16). Pure numpy, no I/O.

Models keep hidden states in BF16 or FP16; a client may send them so, half the bytes of FP32. A BF16 value is
the upper half of the float32 of the same value, so its 16-bit pattern is held as ``uint16`` (``BF16_BITS``)
until the router widens it to float32 for the gate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: How a BF16 tensor is held: its raw little-endian 16-bit patterns.
BF16_BITS: np.dtype[Any] = np.dtype("<u2")
#: The token arrays the router takes: float32, float16, and BF16 patterns.
TOKEN_DTYPES: frozenset[np.dtype[Any]] = frozenset({np.dtype("<f4"), np.dtype("<f2"), BF16_BITS})


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """The BF16 patterns (``BF16_BITS``) of float32 ``values``, rounded to nearest even as hardware does; NaN
    stays NaN and values beyond BF16's largest finite value (about 3.39e38) become Inf."""
    bits = np.ascontiguousarray(values, dtype="<f4").view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(BF16_BITS)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0  # a NaN's payload may sit in the low half only; rounding could make it Inf
    return rounded


def bf16_non_finite(bits: np.ndarray) -> np.ndarray:
    """Where BF16 patterns are NaN or Inf (all 8 exponent bits set)."""
    return (bits & 0x7F80) == 0x7F80
