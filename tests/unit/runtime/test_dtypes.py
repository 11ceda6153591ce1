"""BF16 held in numpy: the patterns are torch's (round to nearest even), and NaN/Inf are told apart."""

from __future__ import annotations

import numpy as np
import torch

from router_runtime.dtypes import BF16_BITS, bf16_bits, bf16_non_finite


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)


def test_bf16_patterns_round_like_torch_on_random_and_edge_values() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000, dtype=np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
            # ties (exactly half way between two BF16 values), both parities, and the largest finite
            np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895314e38, 3.4e38], np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-45], np.float32),
        ]
    ).astype(np.float32)
    got = bf16_bits(values)
    assert got.dtype == BF16_BITS
    assert np.array_equal(got, torch_bf16_bits(values))


def test_nan_stays_nan_whatever_its_payload() -> None:
    payloads = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF], np.uint32).view(np.float32)
    bits = bf16_bits(payloads)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(widened).all()


def test_non_finite_patterns_are_found() -> None:
    bits = bf16_bits(np.array([1.0, np.nan, np.inf, -np.inf, -2.5, 3.4e38], np.float32))
    assert bf16_non_finite(bits).tolist() == [False, True, True, True, False, True]  # 3.4e38 rounds to Inf
