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
#: Up to this many slots the top-K selection keeps its slots in scalars (see ``_select_row_registers``).
REGISTER_SLOTS = 8


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
def _row_sum(exps, t, e):  # type: ignore[no-untyped-def]
    """Z = sum_e exps[t, e]."""
    z = np.float32(0.0)
    for j in range(e):
        z += exps[t, j]
    return z


@_inline
def _weighted_shift(exps, shifted, t, e, entropy):  # type: ignore[no-untyped-def]
    """sum_e exp_e * shifted_e of row ``t`` for the entropy (0 otherwise), in its own loop: inside the
    selection loop the branch alone makes that loop three times slower."""
    total = np.float32(0.0)
    if entropy:
        for j in range(e):
            total += exps[t, j] * shifted[t, j]
    return total


@_inline
def _select_row_registers(exps, shifted, t, e, entropy, bias, k_max, indices, weights):  # type: ignore[no-untyped-def]
    """``_select_row_slots`` for ``k_max <= 8`` with the top slots in scalars, not a scratch array.

    A scratch array may alias the inputs, so the compiler keeps every slot in memory: several times
    slower. The slots below ``k_max`` are exactly the top ``k_max`` (an element enters only if it beats
    slot ``k_max - 1``, ``threshold``, re-read only after an insertion); slots beyond may hold stale
    values and are never read. Written out slot by slot (numba has no fixed-size register arrays).
    """
    z = _row_sum(exps, t, e)
    threshold = np.float32(-np.inf)
    k0 = np.float32(-np.inf)
    s0 = -1
    k1 = np.float32(-np.inf)
    s1 = -1
    k2 = np.float32(-np.inf)
    s2 = -1
    k3 = np.float32(-np.inf)
    s3 = -1
    k4 = np.float32(-np.inf)
    s4 = -1
    k5 = np.float32(-np.inf)
    s5 = -1
    k6 = np.float32(-np.inf)
    s6 = -1
    k7 = np.float32(-np.inf)
    s7 = -1
    for j in range(e):
        # The bias is all zeros without balancing: one branch-free form (a branch here halves the speed).
        score = exps[t, j] + bias[j] * z
        # Strictly greater moves past: of equal scores the lower expert id stays first, as in torch.topk.
        if score > threshold:
            if score > k0:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = k4
                s5 = s4
                k4 = k3
                s4 = s3
                k3 = k2
                s3 = s2
                k2 = k1
                s2 = s1
                k1 = k0
                s1 = s0
                k0 = score
                s0 = j
            elif score > k1:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = k4
                s5 = s4
                k4 = k3
                s4 = s3
                k3 = k2
                s3 = s2
                k2 = k1
                s2 = s1
                k1 = score
                s1 = j
            elif score > k2:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = k4
                s5 = s4
                k4 = k3
                s4 = s3
                k3 = k2
                s3 = s2
                k2 = score
                s2 = j
            elif score > k3:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = k4
                s5 = s4
                k4 = k3
                s4 = s3
                k3 = score
                s3 = j
            elif score > k4:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = k4
                s5 = s4
                k4 = score
                s4 = j
            elif score > k5:
                k7 = k6
                s7 = s6
                k6 = k5
                s6 = s5
                k5 = score
                s5 = j
            elif score > k6:
                k7 = k6
                s7 = s6
                k6 = score
                s6 = j
            else:
                k7 = score
                s7 = j
            threshold = (
                k0 if k_max == 1 else k1 if k_max == 2 else k2 if k_max == 3 else k3 if k_max == 4
                else k4 if k_max == 5 else k5 if k_max == 6 else k6 if k_max == 7 else k7
            )
    inv = np.float32(1.0) / z
    indices[t, 0] = s0
    weights[t, 0] = exps[t, s0] * inv
    if k_max > 1:
        indices[t, 1] = s1
        weights[t, 1] = exps[t, s1] * inv
    if k_max > 2:
        indices[t, 2] = s2
        weights[t, 2] = exps[t, s2] * inv
    if k_max > 3:
        indices[t, 3] = s3
        weights[t, 3] = exps[t, s3] * inv
    if k_max > 4:
        indices[t, 4] = s4
        weights[t, 4] = exps[t, s4] * inv
    if k_max > 5:
        indices[t, 5] = s5
        weights[t, 5] = exps[t, s5] * inv
    if k_max > 6:
        indices[t, 6] = s6
        weights[t, 6] = exps[t, s6] * inv
    if k_max > 7:
        indices[t, 7] = s7
        weights[t, 7] = exps[t, s7] * inv
    return z, _weighted_shift(exps, shifted, t, e, entropy) * inv


@_inline
def _select_row_slots(exps, shifted, t, e, entropy, bias, k_max, indices, weights, keys, slots):  # type: ignore[no-untyped-def]
    """Top-``k_max`` of the probabilities ``exps[t] / Z`` (+ bias) into row ``t`` of ``indices``/``weights``.

    Ranks ``exp + bias * Z`` (the score times Z: the same order) so only the chosen ``k_max`` values are
    ever divided by Z. Returns Z and, for the entropy, sum(p * shifted). Rows are addressed by index, not
    sliced: a slice is a new array with reference counting on every row.
    """
    z = _row_sum(exps, t, e)
    for s in range(k_max):
        keys[s] = -np.inf
        slots[s] = -1
    last = k_max - 1
    for j in range(e):
        score = exps[t, j] + bias[j] * z
        if score > keys[last]:
            pos = last
            # Strictly greater moves past: of equal scores the lower expert id stays first, as in torch.topk.
            while pos > 0 and keys[pos - 1] < score:
                keys[pos] = keys[pos - 1]
                slots[pos] = slots[pos - 1]
                pos -= 1
            keys[pos] = score
            slots[pos] = j
    inv = np.float32(1.0) / z
    for s in range(k_max):
        chosen = slots[s]
        indices[t, s] = chosen
        weights[t, s] = exps[t, chosen] * inv
    return z, _weighted_shift(exps, shifted, t, e, entropy) * inv


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
    exps, shifted, start, stop, e, bias, strategy, k_min, k_max, top_p, renormalize,
    indices, weights, k, mass, load, k_counts, mass_sum,
):
    """Rows ``start:stop`` for every strategy but complexity, in one pass; adds to the histograms.

    ``exps = exp(shifted)``; ``shifted`` is read only for the entropy.
    """
    keys = np.empty(k_max, dtype=np.float32)
    slots = np.empty(k_max, dtype=np.int64)
    entropy = strategy == ENTROPY
    total = 0.0
    # Two loops rather than a per-row choice of the selection: the branch inside stops the compiler
    # from keeping the register slots in registers.
    if k_max <= REGISTER_SLOTS:
        for t in range(start, stop):
            z, p_shift = _select_row_registers(exps, shifted, t, e, entropy, bias, k_max, indices, weights)
            kk = _count_row(strategy, weights, t, k_min, k_max, top_p, z, p_shift)
            k[t] = kk
            selected = _finish_row(t, kk, k_max, renormalize, indices, weights, load, k_counts)
            mass[t] = selected
            total += selected
    else:
        for t in range(start, stop):
            z, p_shift = _select_row_slots(exps, shifted, t, e, entropy, bias, k_max, indices, weights, keys, slots)
            kk = _count_row(strategy, weights, t, k_min, k_max, top_p, z, p_shift)
            k[t] = kk
            selected = _finish_row(t, kk, k_max, renormalize, indices, weights, load, k_counts)
            mass[t] = selected
            total += selected
    mass_sum[0] += total


@_jit
def select_scores(  # type: ignore[no-untyped-def]
    logits, exps, shifted, start, stop, e, bias, strategy, k_max, probe_bias, indices, weights, raw, moments
):
    """Complexity, first pass over rows ``start:stop``: probabilities, top-K and the raw score of every row.

    Adds the scores' sum and sum of squares to ``moments [2]`` (float64) for the calibration update.
    """
    keys = np.empty(k_max, dtype=np.float32)
    slots = np.empty(k_max, dtype=np.int64)
    for t in range(start, stop):
        if k_max <= REGISTER_SLOTS:
            z, _ = _select_row_registers(exps, shifted, t, e, False, bias, k_max, indices, weights)
        else:
            z, _ = _select_row_slots(exps, shifted, t, e, False, bias, k_max, indices, weights, keys, slots)
        # The probe column, or the top-1 uncertainty -log max p = log Z (see estimators.top1_uncertainty_score).
        raw[t] = logits[t, e] + probe_bias if strategy == PROBE_SCORE else np.float32(math.log(z))
        moments[0] += raw[t]
        moments[1] += np.float64(raw[t]) * raw[t]


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
