"""The fused post-gate routing kernel: softmax, biased top-K, per-token k, masking, weights and statistics.

After the gate matmul every strategy is a short chain of per-row work on ``E`` logits. Written as torch ops
it costs ~20 small kernels of several microseconds each whatever ``T`` is, which at ``T`` ~ 1000 adds up
to a third of the matmul; here two compiled passes over the rows and one vectorised ``np.exp`` do all of
it (numba, no Python per token).

Shapes: ``logits [T, L]`` float32 with ``L = E`` (or ``E + 1`` when the last column is the complexity
probe), ``shifted``/``exps [T, E]`` float32 scratch, ``indices [T, K]`` int64 and ``weights [T, K]``
float32 outputs (``K = maxExperts``), ``k [T]`` int64, ``mass [T]`` float32 (router probability of the
selected experts), ``load [E]`` and ``k_counts [K + 1]`` int64 (this call's assignment and k histograms),
``mass_sum [1]`` float64.

The maths is the torch path's (``router_runtime.router``): fp32 softmax, top-K by probability plus the
selection bias with the unbiased probabilities as weights, top_p over the selection order, entropy as
``round(exp(H))``, complexity as the number of calibrated boundaries the raw score has passed.
Every kernel works on a row range and releases the GIL, so the caller can split large batches across
threads, each with its own histograms.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is an optional speed-up: without it the router runs the same maths as torch ops.
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None  # type: ignore[assignment]

#: Strategy codes of the kernels.
TOP_K, TOP_P, ENTROPY, PROBE_SCORE, UNCERTAINTY_SCORE = 0, 1, 2, 3, 4
#: Below this many tokens per thread, handing rows to another thread costs more than it saves.
PARALLEL_MIN_TOKENS_PER_THREAD = 2048

AVAILABLE = numba is not None


def _jit(fn):  # type: ignore[no-untyped-def]
    """numba.njit (compiled lazily on the first call) when numba is installed, else the plain function."""
    return numba.njit(nogil=True, cache=True)(fn) if numba is not None else fn


def _inline(fn):  # type: ignore[no-untyped-def]
    """A per-row helper, inlined into its caller by numba: a call per row costs as much as the row's work."""
    return numba.njit(nogil=True, inline="always")(fn) if numba is not None else fn


@_jit
def shift_rows(logits, start, stop, e, shifted):  # type: ignore[no-untyped-def]
    """``shifted[t] = logits[t, :e] - max(logits[t, :e])`` for rows ``start:stop``; the caller exps it with numpy.

    The exponential is left to ``np.exp`` over the whole block: numpy's is vectorised (SIMD), a scalar
    ``exp`` per element in the row loop costs twice the rest of the softmax.
    """
    for t in range(start, stop):
        m = logits[t, 0]
        for j in range(1, e):
            m = max(m, logits[t, j])  # branch-free: random logits make an if mispredict
        for j in range(e):
            shifted[t, j] = logits[t, j] - m


@_inline
def _select_row(exps, shifted, t, e, entropy, bias, use_bias, k_max, indices, weights, keys):  # type: ignore[no-untyped-def]
    """Normalise ``exps[t]`` to probabilities in place; top-``k_max`` of probs (+ bias) into row ``t`` of the outputs.

    Returns the normaliser Z and, for the entropy, sum(p * shifted). Rows are addressed by index, not
    sliced: a slice is a new array with reference counting on every row.
    """
    z = np.float32(0.0)
    for j in range(e):
        z += exps[t, j]
    inv = np.float32(1.0) / z
    p_shift = np.float32(0.0)
    for s in range(k_max):
        keys[s] = -np.inf
        indices[t, s] = -1
    for j in range(e):
        p = exps[t, j] * inv
        exps[t, j] = p
        if entropy:
            p_shift += p * shifted[t, j]
        score = p + bias[j] if use_bias else p
        if score > keys[k_max - 1]:
            pos = k_max - 1
            # Strictly greater moves past: of equal scores the lower expert id stays first, as in torch.topk.
            while pos > 0 and keys[pos - 1] < score:
                keys[pos] = keys[pos - 1]
                indices[t, pos] = indices[t, pos - 1]
                pos -= 1
            keys[pos] = score
            indices[t, pos] = j
    for s in range(k_max):
        weights[t, s] = exps[t, indices[t, s]]
    return z, p_shift


@_inline
def _count_row(strategy, weights, t, k_min, k_max, top_p, z, p_shift):  # type: ignore[no-untyped-def]
    """k of one row for top_k, top_p and entropy."""
    if strategy == TOP_K:
        return k_max
    if strategy == TOP_P:
        k = 1
        cumulative = np.float32(0.0)
        for s in range(k_max - 1):
            cumulative += weights[t, s]
            if cumulative < top_p:
                k += 1
            else:
                break
    else:
        # Perplexity exp(H) = Z * exp(-sum p (l - max)); round half to even as torch.round does.
        k = int(np.rint(z * np.exp(-p_shift)))
    if k < k_min:
        k = k_min
    if k > k_max:
        k = k_max
    return k


@_inline
def _finish_row(t, k, k_max, renormalize, indices, weights, load, k_counts):  # type: ignore[no-untyped-def]
    """Mask the slots from ``k`` on, count the assignments, renormalise; returns the selected mass."""
    mass = np.float32(0.0)
    for s in range(k):
        mass += weights[t, s]
        load[indices[t, s]] += 1
    for s in range(k, k_max):
        weights[t, s] = 0.0
        indices[t, s] = -1
    if renormalize and mass > 0.0:
        inv = np.float32(1.0) / mass
        for s in range(k):
            weights[t, s] *= inv
    k_counts[k] += 1
    return mass


@_jit
def route_rows(  # type: ignore[no-untyped-def]
    exps, shifted, start, stop, e, bias, use_bias, strategy, k_min, k_max, top_p, renormalize,
    indices, weights, k, mass, load, k_counts, mass_sum,
):
    """Rows ``start:stop`` for every strategy but complexity, in one pass; adds to the histograms.

    ``exps = exp(shifted)`` (overwritten with the probabilities); ``shifted`` is read only for the entropy.
    """
    keys = np.empty(k_max, dtype=np.float32)
    entropy = strategy == ENTROPY
    total = 0.0
    for t in range(start, stop):
        z, p_shift = _select_row(exps, shifted, t, e, entropy, bias, use_bias, k_max, indices, weights, keys)
        kk = _count_row(strategy, weights, t, k_min, k_max, top_p, z, p_shift)
        k[t] = kk
        selected = _finish_row(t, kk, k_max, renormalize, indices, weights, load, k_counts)
        mass[t] = selected
        total += selected
    mass_sum[0] += total


@_jit
def select_scores(  # type: ignore[no-untyped-def]
    logits, exps, shifted, start, stop, e, bias, use_bias, strategy, k_max, probe_bias, indices, weights, raw
):
    """Complexity, first pass over rows ``start:stop``: probabilities, top-K and the raw score of every row."""
    keys = np.empty(k_max, dtype=np.float32)
    for t in range(start, stop):
        z, _ = _select_row(exps, shifted, t, e, False, bias, use_bias, k_max, indices, weights, keys)
        # The probe column, or the top-1 uncertainty -log max p = log Z (see estimators.top1_uncertainty_score).
        raw[t] = logits[t, e] + probe_bias if strategy == PROBE_SCORE else np.float32(math.log(z))


@_jit
def finish_scores(  # type: ignore[no-untyped-def]
    raw, start, stop, boundaries, k_min, k_max, renormalize, indices, weights, k, mass, load, k_counts, mass_sum
):
    """Complexity, second pass: k = k_min + #boundaries <= raw score, then mask, weights and statistics."""
    total = 0.0
    for t in range(start, stop):
        kk = k_min
        for b in range(boundaries.shape[0]):
            if boundaries[b] <= raw[t]:
                kk += 1
        kk = min(kk, k_max)
        k[t] = kk
        selected = _finish_row(t, kk, k_max, renormalize, indices, weights, load, k_counts)
        mass[t] = selected
        total += selected
    mass_sum[0] += total
