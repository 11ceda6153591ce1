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

``gate_rows`` computes the gate logits themselves, for gates small enough to stay in a core's cache: the
CPU wheels' MKL sgemm runs its generic code on AMD CPUs, at 40-50 % of what this loop reaches there.
"""

from __future__ import annotations

import functools
import logging
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
#: The gate kernel (``gate_rows``) is used for gate weights up to this size, which stay in a core's cache;
#: beyond it MKL's blocked sgemm reads them better (measured: tie at d=4096, E=64, 1 MB).
GATE_MAX_WEIGHT_BYTES = 256 * 1024
#: Below this many multiply-adds per thread, splitting the gate across threads costs more than it saves.
GATE_MIN_MACS_PER_THREAD = 8_000_000
#: Up to this many slots the top-K selection keeps its slots in scalars (see ``_select_row_registers``).
REGISTER_SLOTS = 8
#: Below every packed key (see ``_select_row_registers``): the slots' starting value.
_MIN_KEY = -(1 << 62)


def _cached_njit(fn, **options):  # type: ignore[no-untyped-def]
    """``numba.njit(cache=True)``; without a writable cache directory numba refuses that at decoration time, so
    then the kernel is compiled without one (at each start) rather than the import failing."""
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available for file ..."
        if "no locator available" not in str(exc):
            raise
        _warn_uncached()
        return numba.njit(**options)(fn)


@functools.cache  # once per process, not once per kernel
def _warn_uncached() -> None:
    logging.getLogger(__name__).warning(
        "numba has no writable cache directory (NUMBA_CACHE_DIR unset or unwritable, and neither the package "
        "directory nor $HOME/.cache writable): the routing kernels are compiled again at each start, which adds "
        "seconds to it; set NUMBA_CACHE_DIR to a writable directory (e.g. /tmp/numba-cache) to keep them"
    )


def _jit(fn):  # type: ignore[no-untyped-def]
    """numba.njit (compiled lazily on the first call) when numba is installed, else the plain function."""
    return _cached_njit(fn, nogil=True) if numba is not None else fn


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
def _select_row_registers(exps, shifted, t, e, entropy, bias, k_max, indices, weights, scores, score_bits):  # type: ignore[no-untyped-def]
    """``_select_row_slots`` for ``k_max <= 8``, branch-free: a sorting network over packed int64 keys.

    Each expert's score (``exp + bias * Z``) is packed with its id into one int64 whose order is the
    score's order, ties broken towards the lower id as torch.topk does: the float's bits made
    order-preserving as a signed int, shifted left 16, or-ed with ``65535 - id``. The top slots then
    update with ``k_q = max(k_q, min(k_{q-1}, key))``: no data-dependent branch (on fresh data the
    insertion's branches mispredict on every other expert, which cost 2-7x at E=8). ``scores`` is a
    float32 ``[E]`` scratch and ``score_bits`` its int32 view.
    """
    z = _row_sum(exps, t, e)
    for j in range(e):
        scores[j] = exps[t, j] + bias[j] * z
    k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = np.int64(_MIN_KEY)
    for j in range(e):
        bits = np.int64(score_bits[j])
        key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 16) | (65535 - j)
        # Old values on the right: each slot takes the larger of itself and what the slot above gives up.
        if k_max > 7:
            k7 = max(k7, min(k6, key))
        if k_max > 6:
            k6 = max(k6, min(k5, key))
        if k_max > 5:
            k5 = max(k5, min(k4, key))
        if k_max > 4:
            k4 = max(k4, min(k3, key))
        if k_max > 3:
            k3 = max(k3, min(k2, key))
        if k_max > 2:
            k2 = max(k2, min(k1, key))
        if k_max > 1:
            k1 = max(k1, min(k0, key))
        k0 = max(k0, key)
    inv = np.float32(1.0) / z
    for s in range(k_max):
        slot = k0 if s == 0 else k1 if s == 1 else k2 if s == 2 else k3 if s == 3 else k4 if s == 4 else k5 if s == 5 else k6 if s == 6 else k7  # noqa: E501
        chosen = 65535 - (slot & 0xFFFF)
        indices[t, s] = chosen
        weights[t, s] = exps[t, chosen] * inv
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
    """k of one row for top_k, top_p and entropy; no data-dependent branch (they mispredict on fresh rows)."""
    if strategy == TOP_K:
        return k_max
    if strategy == TOP_P:
        # The cumulative mass only grows, so counting the prefixes still below top_p needs no early exit.
        k = np.int64(1)
        cumulative = np.float32(0.0)
        for s in range(k_max - 1):
            cumulative += weights[t, s]
            k += np.int64(cumulative < top_p)
    else:
        # Perplexity exp(H) = Z * exp(-sum p (l - max)); round half to even as torch.round does.
        k = np.int64(np.rint(z * np.exp(-p_shift)))
    return min(max(k, k_min), k_max)


@_inline
def _finish_row(t, k, k_max, renormalize, indices, weights, load, k_counts):  # type: ignore[no-untyped-def]
    """Mask the slots from ``k`` on, count the assignments, renormalise; returns the selected mass.

    Every slot is visited with a select, not a loop bounded by ``k``: a row-dependent trip count is a
    mispredicted branch per row.
    """
    mass = np.float32(0.0)
    for s in range(k_max):
        used = s < k
        weight = weights[t, s] if used else np.float32(0.0)
        mass += weight
        weights[t, s] = weight
        expert = indices[t, s]
        load[expert] += np.int64(used)
        indices[t, s] = expert if used else -1
    if renormalize and mass > 0.0:
        inv = np.float32(1.0) / mass
        for s in range(k_max):
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
    scores = np.empty(e, dtype=np.float32)
    score_bits = scores.view(np.int32)
    entropy = strategy == ENTROPY
    total = 0.0
    # Two loops rather than a per-row choice of the selection: the branch inside stops the compiler
    # from keeping the register slots in registers.
    if k_max <= REGISTER_SLOTS:
        for t in range(start, stop):
            z, p_shift = _select_row_registers(
                exps, shifted, t, e, entropy, bias, k_max, indices, weights, scores, score_bits
            )
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
    scores = np.empty(e, dtype=np.float32)
    score_bits = scores.view(np.int32)
    for t in range(start, stop):
        if k_max <= REGISTER_SLOTS:
            z, _ = _select_row_registers(exps, shifted, t, e, False, bias, k_max, indices, weights, scores, score_bits)
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
            kk += np.int64(boundaries[b] <= raw[t])  # a sum, not an if: no mispredicted branch
        kk = min(kk, k_max)
        k[t] = kk
        selected = _finish_row(t, kk, k_max, renormalize, indices, weights, load, k_counts)
        mass[t] = selected
        total += selected
    mass_sum[0] += total


def _jit_reassociating(fn):  # type: ignore[no-untyped-def]
    """``_jit`` that may reorder a sum (so reductions vectorise) and fuse multiply-adds; NaN and Inf keep
    their IEEE meaning (no ``nnan``/``ninf``): the server finds bad tokens through their logits."""
    if numba is None:
        return fn
    return _cached_njit(fn, nogil=True, fastmath={"reassoc", "contract"})


def _inline_reassociating(fn):  # type: ignore[no-untyped-def]
    """``_inline`` with ``_jit_reassociating``'s floating-point freedom."""
    if numba is None:
        return fn
    return numba.njit(nogil=True, inline="always", fastmath={"reassoc", "contract"})(fn)


@_inline_reassociating
def _gate_block(x, t, w, out, r):  # type: ignore[no-untyped-def]
    """``out[r:r+4] = x[t:t+4] @ w.T``: four tokens, two outputs at a time (an odd last output alone)."""
    d = x.shape[1]
    n_out = w.shape[0]
    o = 0
    while o + 2 <= n_out:
        a00 = np.float32(0.0)
        a01 = np.float32(0.0)
        a10 = np.float32(0.0)
        a11 = np.float32(0.0)
        a20 = np.float32(0.0)
        a21 = np.float32(0.0)
        a30 = np.float32(0.0)
        a31 = np.float32(0.0)
        for j in range(d):
            w0 = w[o, j]
            w1 = w[o + 1, j]
            x0 = x[t, j]
            x1 = x[t + 1, j]
            x2 = x[t + 2, j]
            x3 = x[t + 3, j]
            a00 += x0 * w0
            a01 += x0 * w1
            a10 += x1 * w0
            a11 += x1 * w1
            a20 += x2 * w0
            a21 += x2 * w1
            a30 += x3 * w0
            a31 += x3 * w1
        out[r, o] = a00
        out[r, o + 1] = a01
        out[r + 1, o] = a10
        out[r + 1, o + 1] = a11
        out[r + 2, o] = a20
        out[r + 2, o + 1] = a21
        out[r + 3, o] = a30
        out[r + 3, o + 1] = a31
        o += 2
    if o < n_out:  # the complexity probe's row
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for j in range(d):
            wo = w[o, j]
            a0 += x[t, j] * wo
            a1 += x[t + 1, j] * wo
            a2 += x[t + 2, j] * wo
            a3 += x[t + 3, j] * wo
        out[r, o] = a0
        out[r + 1, o] = a1
        out[r + 2, o] = a2
        out[r + 3, o] = a3


@_jit_reassociating
def gate_rows(x, w, start, stop, out):  # type: ignore[no-untyped-def]
    """``out[t] = w @ x[t]`` for rows ``start:stop``: the gate logits of ``x [T, d]`` with ``w [L, d]``.

    torch's CPU wheels compute this with MKL's sgemm, which runs its generic code path on AMD CPUs
    (measured: 120 us for 256 tokens, d=768, L=8, in cache, against 45 us here). Four tokens and two
    outputs at a time: each loaded weight serves four tokens and each token two outputs, and the eight
    sums vectorise along ``d``. The last rows go through the same block, zero-padded, so a token's logits
    are the same bits wherever it sits in a batch; rows are independent, so a batch may be split across
    threads.
    """
    t = start
    while t + 4 <= stop:
        _gate_block(x, t, w, out, t)
        t += 4
    if t < stop:
        padded = np.zeros((4, x.shape[1]), dtype=np.float32)
        padded[: stop - t] = x[t:stop]
        block = np.empty((4, w.shape[0]), dtype=np.float32)
        _gate_block(padded, 0, w, block, 0)
        out[t:stop] = block[: stop - t]


@_jit_reassociating
def gate_rows_bf16(x, w, start, stop, out):  # type: ignore[no-untyped-def]
    """``gate_rows`` of BF16 tokens held as their 16-bit patterns (``x [T, d]`` uint16): the same bits as
    widening them to float32 first, without writing and rereading a float32 copy (measured 65 against
    85 us for 256 tokens, d=768). Four rows at a time are widened into a buffer that stays in L1."""
    d = x.shape[1]
    scratch = np.zeros((4, d), dtype=np.uint32)
    widened = scratch.view(np.float32)
    block = np.empty((4, w.shape[0]), dtype=np.float32)
    t = start
    while t < stop:
        rows = min(4, stop - t)
        for i in range(rows):
            for j in range(d):
                scratch[i, j] = np.uint32(x[t + i, j]) << 16  # a BF16 pattern is the float32's upper half
        for i in range(rows, 4):  # zero padding, as in ``gate_rows``
            for j in range(d):
                scratch[i, j] = 0
        # One call site: each inlined copy of the block costs seconds of compilation.
        _gate_block(widened, 0, w, block, 0)
        for i in range(rows):
            for o in range(w.shape[0]):
                out[t + i, o] = block[i, o]
        t += 4
