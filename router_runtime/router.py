"""The dynamic-expert router: gate ``Linear(d, E)``, fp32 softmax, a per-token expert count.

``DynamicRouter.route(x)`` maps ``x [T, d]`` (or ``[B, S, d]``, flattened token-major to ``[B*S, d]``) to

* ``indices [T, maxExperts]`` int64, chosen experts by descending selection score, -1 in unused slots,
* ``weights [T, maxExperts]`` float32, 0 in unused slots (renormalised over the selected set if configured),
* ``k [T]`` int64 in ``[minExperts, maxExperts]`` (a capacity factor may drop assignments below it),

plus per-call and cumulative statistics. Every strategy is vectorised: one gate matmul, a softmax,
one ``topk`` with ``maxExperts`` slots, then a per-token mask; no Python loop over tokens.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from router_runtime import kernels
from router_runtime.balancing import SelectionBias, apply_capacity, expert_capacity
from router_runtime.config import RouterConfig
from router_runtime.dtypes import BF16_BITS, TOKEN_DTYPES
from router_runtime.estimators import (
    ComplexityCalibrator,
    entropy_counts,
    top1_uncertainty_score,
    top_p_counts,
    top_p_unneeded,
)
from router_runtime.experts import (
    COMPLEXITY_BIAS,
    COMPLEXITY_WEIGHT,
    EXPERT_W1,
    EXPERT_W2,
    GATE_WEIGHT,
    ExpertFFNs,
    check_tensor,
    load_weights_file,
    seeded_state,
)
from router_runtime.stats import CumulativeStats, RoutingStats

log = logging.getLogger(__name__)

_TINY = torch.finfo(torch.float32).tiny
#: 16-bit tokens are widened to float32 this many bytes at a time before the gate (``_gate_into``).
_WIDEN_BYTES = 4 << 20


@dataclass(frozen=True)
class RoutingResult:
    """What one ``route`` call decided; tensors are token-major, ``T`` = number of tokens."""

    indices: torch.Tensor
    weights: torch.Tensor
    k: torch.Tensor
    selected_mass: torch.Tensor
    stats: RoutingStats
    output: torch.Tensor | None = None


#: From this many experts on, ``torch.softmax``/``log_softmax`` (one fused pass) beat the written-out
#: passes; below it their per-row overhead dominates (E=8: ~76 us against ~35 us for 1024 tokens).
FUSED_SOFTMAX_MIN_EXPERTS = 32


@functools.lru_cache(maxsize=64)
def ones(size: int, device: torch.device) -> torch.Tensor:
    """A shared read-only float32 vector of ones: row sums as one matrix-vector product, no allocation per call
    (on a GPU an allocation and a fill kernel each)."""
    return torch.ones(size, dtype=torch.float32, device=device)


def softmax_fp32(
    logits: torch.Tensor, *, keep_shifted: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Probabilities ``[T, E]`` in fp32, and (``keep_shifted``) shifted logits ``[T, E]`` with normaliser ``[T]``.

    The shifted logits differ from the logits by a per-token constant with
    ``log p = shifted - log(normaliser)``; a normaliser of ``None`` means 1 (``shifted`` are then the
    log-probabilities). Short rows (E=8) are written out (max, subtract, exp, a matrix-vector row sum,
    divide) because ``torch.softmax`` over a short last dim is several times slower on CPU; long rows
    use the fused kernels. With ``keep_shifted=False`` nothing but the probabilities is kept.
    """
    logits = logits if logits.dtype == torch.float32 else logits.to(torch.float32)
    if logits.shape[-1] >= FUSED_SOFTMAX_MIN_EXPERTS:
        if not keep_shifted:
            return torch.softmax(logits, dim=-1), None, None
        log_probs = torch.log_softmax(logits, dim=-1)
        return log_probs.exp(), log_probs, None
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    probs = shifted.exp() if keep_shifted else shifted.exp_()
    normaliser = probs @ ones(probs.shape[-1], probs.device)
    probs.div_(normaliser.unsqueeze(1))
    return probs, (shifted if keep_shifted else None), normaliser


class DynamicRouter(nn.Module):
    """Routes tokens to a per-token number of experts; see the module docstring for the layout.

    ``state`` maps tensor names (see ``router_runtime.experts``) to weights; without it the router reads
    ``config.weights.path`` or, when that is unset, initialises deterministically from the seed.
    Routing mutates only the load-balancing bias, the complexity calibration and the cumulative stats.
    On a CUDA ``config.device`` the gate, the selection and the expert FFNs run on the GPU and every
    ``RoutingResult`` tensor is copied back to the host (one synchronisation per call): the server
    serialises them and the statistics are counted there.
    """

    gate_weight: torch.Tensor
    slots: torch.Tensor

    def __init__(self, config: RouterConfig, state: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        if state is None:
            state = load_weights_file(config.weights.path) if config.weights.path else seeded_state(config)
        d, e, k_max = config.input_dim, config.num_experts, config.max_experts
        self.device = resolve_device(config.device, config.kernel)
        self.on_host = self.device.type == "cpu"
        gate = check_tensor(state, GATE_WEIGHT, (e, d))
        self.probe_bias = 0.0
        self.has_probe = config.strategy == "complexity" and COMPLEXITY_WEIGHT in state
        if self.has_probe:
            probe = check_tensor(state, COMPLEXITY_WEIGHT, (d,))
            if COMPLEXITY_BIAS in state:
                self.probe_bias = float(check_tensor(state, COMPLEXITY_BIAS, ()))
            # One matmul computes the gate logits and the probe score: the activations are read once.
            gate = torch.cat([gate, probe.unsqueeze(0)], dim=0)
        self.register_buffer("gate_weight", gate.to(self.device))
        self.register_buffer("slots", torch.arange(k_max, device=self.device))
        balancing = config.load_balancing
        self.selection_bias = SelectionBias(e, balancing.bias_update_rate) if balancing.enabled else None
        # The bias is updated on the host (E values); a GPU router reads a device copy refreshed after each update.
        self._device_bias: torch.Tensor | None = None
        if self.selection_bias is not None and not self.on_host:
            # Pinned, so refreshing the device copy after each batch is a queued DMA, not a blocking copy.
            self.selection_bias.pin_memory()
            self._device_bias = self.selection_bias.bias.to(self.device)
        self.calibrator = ComplexityCalibrator() if config.strategy == "complexity" else None
        self.experts: ExpertFFNs | None = None
        if config.experts.enabled:
            h = config.experts.hidden_dim
            self.experts = ExpertFFNs(
                check_tensor(state, EXPERT_W1, (e, h, d)),
                check_tensor(state, EXPERT_W2, (e, d, h)),
                config.experts.activation,
            ).to(self.device)
        self.cumulative = CumulativeStats(e, k_max)
        self.fused = use_fused_kernel(config, self.device)
        self._kernel_strategy = kernel_strategy(config, self.has_probe)
        self._no_bias = np.zeros(e, dtype=np.float32)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_workers = 0
        # Plain references for the hot path: every nn.Module buffer/submodule lookup costs ~1 us.
        # object.__setattr__: a second nn.Module attribute would register the submodule twice.
        self._gate = self.gate_weight
        # The host matmul for gates the kernel does not take: oneDNN's where it works (see ``onednn_linear``).
        self._linear = onednn_linear() if self.on_host else None
        # The gate kernel's view of the weights (the buffer itself, so loaded weights show), where it is used.
        self._gate_rows = (
            self.gate_weight.numpy()
            if self.fused and self.gate_weight.numel() * 4 <= kernels.GATE_MAX_WEIGHT_BYTES
            else None
        )
        self._balancer: SelectionBias | None
        self._expert_ffns: ExpertFFNs | None
        object.__setattr__(self, "_balancer", self.selection_bias)
        object.__setattr__(self, "_expert_ffns", self.experts)
        self._pool_lock = threading.Lock()
        if self.fused or not self.on_host:
            # Compile the kernels (or start CUDA) now, seconds once per process, rather than on the first request.
            self.route(torch.zeros(1, d), update_state=False, compute_output=False)
            if self._gate_rows is not None:  # and the BF16 gate kernel (about 5 s to compile, uncached)
                self.route(torch.zeros(1, d, dtype=torch.bfloat16), update_state=False, compute_output=False)
        kernel = "fused" if self.fused else "torch"
        log.info("router %r routes on %s (%s kernel)", config.model_name, self.device, kernel)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host buffer this router reads fastest: pinned memory for a GPU router (its copy to the device is a
        direct DMA instead of a staged one, measured 2x faster), plain memory otherwise."""
        if self.on_host:
            return np.empty(shape, dtype=dtype)
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        return torch.empty(shape, dtype=torch_dtype, pin_memory=True).numpy()

    def _token_rows(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``[T, d]`` or ``[B, S, d]`` floating input as ``[T, d]``, in its own dtype."""
        tensor = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        d = self.config.input_dim
        if tensor.dim() not in (2, 3):
            raise ValueError(f"router input must be [T, d] or [B, S, d], got shape {list(tensor.shape)}")
        if tensor.shape[-1] != d:
            raise ValueError(f"router input has last dimension {tensor.shape[-1]}, the router's inputDim is {d}")
        if not tensor.is_floating_point():
            raise ValueError(f"router input must be a floating point tensor, got {tensor.dtype}")
        return tensor.reshape(-1, d)

    def _gate_into(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Gate logits of host ``tokens [T, d]`` into ``logits [T, L]``.

        With the fused kernels and a gate that stays in cache, the matmul is ``kernels.gate_rows`` (1.2-2.8x
        MKL's sgemm on AMD CPUs, which get its generic code), split across threads like the rest of the
        routing; else a library matmul (``_matmul_into``: oneDNN's, else MKL's). BF16 tokens are widened
        inside the kernel; other 16-bit tokens (or any, with the library matmul) are widened to float32 a few
        megabytes at a time, in a scratch buffer that stays in cache, and gated from there. Either way the
        logits are those of the float32 values; widening the whole tensor first, which writes and rereads
        twice its size, measured 1.4-1.7x slower.
        """
        n, d = tokens.shape
        widen = tokens.dtype != torch.float32
        weights = self._gate_rows
        if weights is None and not widen:
            self._matmul_into(tokens, logits)
            return
        chunk = max(1, _WIDEN_BYTES // (4 * d))
        out = logits.numpy()

        def gate(start: int, stop: int, source: torch.Tensor) -> None:
            if weights is not None:
                kernels.gate_rows(source.numpy(), weights, 0, stop - start, out[start:stop])
            else:
                self._matmul_into(source, logits[start:stop])

        def work(_: int, start: int, stop: int) -> None:
            if not widen:
                gate(start, stop, tokens[start:stop])
                return
            if weights is not None and tokens.dtype == torch.bfloat16:  # widened inside the kernel
                bits = tokens[start:stop].view(torch.int16).numpy().view(np.uint16)
                kernels.gate_rows_bf16(bits, weights, 0, stop - start, out[start:stop])
                return
            scratch = torch.empty((min(chunk, stop - start), d), dtype=torch.float32)
            for first in range(start, stop, chunk):
                last = min(first + chunk, stop)
                rows = scratch[: last - first]
                rows.copy_(tokens[first:last])
                gate(first, last, rows)

        # torch's matmul threads itself; the kernel's rows are split here (it releases the GIL).
        if weights is None:
            ranges = [(0, n)]
        else:
            ranges = self._row_ranges(n, max(1, kernels.GATE_MIN_MACS_PER_THREAD // (d * weights.shape[0])))
        self._run_ranges(ranges, work)

    def _matmul_into(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """``logits = tokens @ gate.T`` on the host with a library matmul: oneDNN's, else torch's (MKL)."""
        if self._linear is None:
            torch.mm(tokens, self._gate.t(), out=logits)
        else:
            logits.copy_(self._linear(tokens if tokens.is_contiguous() else tokens.contiguous(), self._gate))

    def route(
        self, x: torch.Tensor | np.ndarray, *, update_state: bool = True, compute_output: bool = True
    ) -> RoutingResult:
        """Route ``x [T, d] | [B, S, d]`` -> ``RoutingResult`` (indices/weights ``[T, maxExperts]``, k ``[T]``).

        ``update_state=False`` leaves the balancing bias, calibration and cumulative stats untouched.
        """
        # At T ~ 1000 the gate matmul takes ~0.2 ms and each small op after it several microseconds,
        # so this path is written for the fewest ops: in-place updates, dot products for short-row
        # reductions, no full sort, and statistics on the host in numpy.
        # Detached, and every weight is a buffer: no autograd graph without an inference_mode context
        # (whose enter/exit costs ~9 us a call).
        expert_input, logits = self.gate_batch(x, compute_output=compute_output)
        return self._select(expert_input, logits, update_state)

    def gate_batch(
        self, x: torch.Tensor | np.ndarray, *, compute_output: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The first half of ``route``: ``(expert_input, logits [T, L])`` of ``x [T, d] | [B, S, d]``.

        ``expert_input`` is the float32 tokens the expert FFNs will read (on the router's device), or None
        when the router hosts none or ``compute_output`` is False. A caller can look at the logits (and drop
        rows, from both) before ``route_logits`` decides: the server refuses a request whose logits are not
        finite there, so that it never reaches the selection bias or the calibration.
        """
        rows = self._token_rows(x).detach()
        expert_input = None
        if self.on_host:
            if compute_output and self._expert_ffns is not None:
                rows = expert_input = rows.to(torch.float32)
            # 16-bit tokens that only need routing are gated a cache-sized chunk at a time, never widened whole.
            logits = torch.empty((rows.shape[0], self._gate.shape[0]), dtype=torch.float32)
            self._gate_into(rows, logits)
        else:  # 16-bit tokens cross to the device at their own size and are widened there
            tokens = rows.to(self.device, non_blocking=True).to(torch.float32)
            expert_input = tokens if compute_output and self._expert_ffns is not None else None
            logits = F.linear(tokens, self._gate)
        return expert_input, logits

    @property
    def gates_in_place(self) -> bool:
        """Whether ``gate`` can read requests where they lie: on the host, with no expert FFNs (which need the
        tokens of the whole batch together)."""
        return self.on_host and self._expert_ffns is None

    def gate(self, parts: Sequence[np.ndarray]) -> torch.Tensor:
        """Gate logits ``[sum T_i, L]`` of several ``[T_i, d]`` arrays, each read where it lies.

        The server's batch is a list of request bodies: gating each into its rows of one logits buffer
        reads every activation once, where copying them into one batch first read and wrote them once more
        (a tenth of the server's CPU). ``route_logits`` then routes the batch from the logits.
        Parts may be float32, float16 or BF16 bits (``dtypes.BF16_BITS``); a 16-bit part is gated exactly as
        its float32 values (``_gate_into``).
        """
        if not self.gates_in_place:
            raise ValueError("gate() runs on the host without expert FFNs; use route() on the whole batch")
        d = self.config.input_dim
        rows = 0
        for part in parts:
            if part.ndim != 2 or part.shape[1] != d or part.dtype not in TOKEN_DTYPES:
                raise ValueError(
                    f"each part must be a float32, float16 or BF16-bits (uint16) [T, {d}] array, "
                    f"got {part.dtype} {list(part.shape)}"
                )
            rows += part.shape[0]
        logits = torch.empty((rows, self._gate.shape[0]), dtype=torch.float32)
        start = 0
        for part in parts:
            end = start + part.shape[0]
            self._gate_into(token_tensor(part), logits[start:end])
            start = end
        return logits

    def route_logits(
        self, logits: torch.Tensor, *, expert_input: torch.Tensor | None = None, update_state: bool = True
    ) -> RoutingResult:
        """Route a batch from its gate logits (``gate`` or ``gate_batch``): the decisions ``route`` makes on the
        same tokens. The MoE output is computed when ``expert_input`` (from ``gate_batch``) is given."""
        if expert_input is not None and expert_input.shape[0] != logits.shape[0]:
            raise ValueError(f"expert_input has {expert_input.shape[0]} rows, the logits {logits.shape[0]}")
        return self._select(expert_input, logits, update_state)

    def _select(
        self, expert_input: torch.Tensor | None, logits: torch.Tensor, update_state: bool
    ) -> RoutingResult:
        """Everything after the gate; the expert FFNs run on ``expert_input`` when it is given."""
        cfg = self.config
        n = logits.shape[0]
        e, k_max, strategy = cfg.num_experts, cfg.max_experts, cfg.strategy
        if self.fused:
            indices, weights, k, selected_mass, stats = self._select_fused(logits, update_state)
            return self._finish(expert_input, indices, weights, k, selected_mass, stats, update_state)
        needs_shifted = strategy == "entropy" or (strategy == "complexity" and not self.has_probe)
        probs, shifted, normaliser = softmax_fp32(
            logits[:, :e] if self.has_probe else logits, keep_shifted=needs_shifted
        )

        if self.selection_bias is not None:
            bias = self.selection_bias.bias if self._device_bias is None else self._device_bias
            indices = torch.topk(probs + bias, k_max, dim=-1).indices
            top_probs = probs.gather(1, indices)
        else:
            top_probs, indices = torch.topk(probs, k_max, dim=-1)

        k_min = cfg.min_experts
        constant_k: int | None = None
        masked = False
        if strategy == "top_k" or k_min == k_max:
            constant_k = k_max
            k = torch.full((n,), k_max, dtype=torch.int64, device=logits.device)
        elif strategy == "top_p" and k_min == 1 and cfg.load_balancing.capacity_factor is None:
            # The common case in fewer ops: the unneeded slots are masked directly, k counts the rest.
            unneeded = top_p_unneeded(top_probs, cfg.top_p)
            top_probs[:, 1:].masked_fill_(unneeded, 0.0)
            indices[:, 1:].masked_fill_(unneeded, -1)
            k = torch.sub(k_max, unneeded.sum(-1))
            masked = True
        elif strategy == "top_p":
            k = top_p_counts(top_probs, cfg.top_p, k_min, k_max)
        elif strategy == "entropy":
            assert shifted is not None
            k = entropy_counts(probs, shifted, normaliser, k_min, k_max)
        else:
            assert self.calibrator is not None
            if self.has_probe:
                raw = logits[:, e] + self.probe_bias
            else:
                assert shifted is not None
                raw = top1_uncertainty_score(shifted, normaliser)
            k = self.calibrator.counts(raw, k_min, k_max, update=update_state)

        capacity_factor = cfg.load_balancing.capacity_factor
        weights = top_probs
        if capacity_factor is not None and n > 0:
            constant_k = None
            selected = self.slots < k.unsqueeze(1)
            capacity = expert_capacity(capacity_factor, n, float(k.sum()) / n, e)
            indices, weights, selected = apply_capacity(indices, weights, selected, e, capacity)
            k = selected.sum(-1)
            unused = ~selected
            weights.masked_fill_(unused, 0.0)
            indices.masked_fill_(unused, -1)
        elif constant_k is None and not masked:
            # Every slot is used when k is constant: the masking passes only run for dynamic k.
            unused = torch.ge(self.slots, k.unsqueeze(1))
            weights.masked_fill_(unused, 0.0)
            indices.masked_fill_(unused, -1)
        selected_mass = weights @ ones(weights.shape[-1], weights.device)
        if cfg.renormalize:
            # Every row keeps its top expert (probability >= 1/E > 0) unless a capacity drop emptied it.
            divisor = selected_mass if capacity_factor is None else selected_mass.clamp(min=_TINY)
            weights.div_(divisor.unsqueeze(1))
        if not self.on_host:
            return self._finish_from_device(
                expert_input, indices, weights, k, selected_mass, constant_k, update_state
            )
        stats = RoutingStats.from_selection(k, indices, selected_mass, e, constant_k=constant_k)
        return self._finish(expert_input, indices, weights, k, selected_mass, stats, update_state)

    def _finish(
        self,
        expert_input: torch.Tensor | None,
        indices: torch.Tensor,
        weights: torch.Tensor,
        k: torch.Tensor,
        selected_mass: torch.Tensor,
        stats: RoutingStats,
        update_state: bool,
    ) -> RoutingResult:
        self._record(stats, update_state)
        output = self._expert_output(expert_input, indices, weights)
        return RoutingResult(indices, weights, k, selected_mass, stats, output)

    def _expert_output(
        self, expert_input: torch.Tensor | None, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor | None:
        """The MoE layer output when the router hosts experts and the caller asked for it, else None."""
        if self._expert_ffns is None or expert_input is None:
            return None
        return self._expert_ffns(expert_input, indices, weights)

    def _record(self, stats: RoutingStats, update_state: bool) -> None:
        """Fold a routed batch into the balancing bias (and its device copy) and the cumulative statistics."""
        if not update_state:
            return
        if self._balancer is not None:
            self._balancer.update(stats.expert_load)
            if self._device_bias is not None:
                self._device_bias.copy_(self._balancer.bias, non_blocking=True)
        self.cumulative.add(stats)

    def _finish_from_device(
        self,
        expert_input: torch.Tensor | None,
        indices: torch.Tensor,
        weights: torch.Tensor,
        k: torch.Tensor,
        selected_mass: torch.Tensor,
        constant_k: int | None,
        update_state: bool,
    ) -> RoutingResult:
        """The GPU path's end: expert outputs on the device, then every result to the host in one sync."""
        output = self._expert_output(expert_input, indices, weights)
        # Queued copies into pinned host memory, then one wait: four blocking copies would sync four times.
        on_device = (indices, weights, k, selected_mass) + ((output,) if output is not None else ())
        copies = [tensor.to("cpu", non_blocking=True) for tensor in on_device]
        torch.cuda.current_stream(self.device).synchronize()
        indices, weights, k, selected_mass = copies[:4]
        output = copies[4] if output is not None else None
        stats = RoutingStats.from_selection(k, indices, selected_mass, self.config.num_experts, constant_k=constant_k)
        self._record(stats, update_state)
        return RoutingResult(indices, weights, k, selected_mass, stats, output)

    def _select_fused(
        self, logits: torch.Tensor, update_state: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, RoutingStats]:
        """Everything after the gate matmul in the compiled kernels (``router_runtime.kernels``)."""
        cfg = self.config
        lg = logits.numpy()
        n = lg.shape[0]
        e, k_min, k_max = cfg.num_experts, cfg.min_experts, cfg.max_experts
        indices = np.empty((n, k_max), dtype=np.int64)
        weights = np.empty((n, k_max), dtype=np.float32)
        k = np.empty(n, dtype=np.int64)
        mass = np.empty(n, dtype=np.float32)
        bias = self._balancer.bias_view if self._balancer is not None else self._no_bias
        ranges = self._row_ranges(n)
        loads = [np.zeros(e, dtype=np.int64) for _ in ranges]
        k_counts = [np.zeros(k_max + 1, dtype=np.int64) for _ in ranges]
        mass_sums = [np.zeros(1, dtype=np.float64) for _ in ranges]
        strategy, renormalize = self._kernel_strategy, cfg.renormalize
        shifted = np.empty((n, e), dtype=np.float32)
        # exp() may overwrite the shifted logits unless an estimator reads them afterwards.
        keep_shifted = strategy == kernels.ENTROPY
        exps = np.empty_like(shifted) if keep_shifted else shifted

        def softmax_numerators(start: int, stop: int) -> None:
            kernels.shift_rows(lg, start, stop, e, shifted)
            np.exp(shifted[start:stop], out=exps[start:stop])

        if strategy in (kernels.PROBE_SCORE, kernels.UNCERTAINTY_SCORE):
            assert self.calibrator is not None
            raw = np.empty(n, dtype=np.float32)
            probe_bias = np.float32(self.probe_bias)

            moments = [np.zeros(2, dtype=np.float64) for _ in ranges]

            def scores(i: int, start: int, stop: int) -> None:
                softmax_numerators(start, stop)
                kernels.select_scores(
                    lg, exps, shifted, start, stop, e, bias, strategy, k_max, probe_bias,
                    indices, weights, raw, moments[i],
                )  # fmt: skip

            self._run_ranges(ranges, scores)
            if update_state and n:
                total, squares = sum(moments[1:], moments[0])
                mean = float(total) / n
                self.calibrator.merge(n, mean, max(float(squares) / n - mean * mean, 0.0))
            boundaries = self.calibrator.boundaries(k_max - k_min + 1)
            self._run_ranges(
                ranges,
                lambda i, start, stop: kernels.finish_scores(
                    raw, start, stop, boundaries, k_min, k_max, renormalize,
                    indices, weights, k, mass, loads[i], k_counts[i], mass_sums[i],
                ),
            )  # fmt: skip
        else:
            top_p = np.float32(cfg.top_p)

            def select(i: int, start: int, stop: int) -> None:
                softmax_numerators(start, stop)
                kernels.route_rows(
                    exps, shifted, start, stop, e, bias, strategy, k_min, k_max, top_p, renormalize,
                    indices, weights, k, mass, loads[i], k_counts[i], mass_sums[i],
                )  # fmt: skip

            self._run_ranges(ranges, select)
        stats = RoutingStats.from_counts(
            n, sum(loads[1:], loads[0]), sum(k_counts[1:], k_counts[0]), sum(float(m[0]) for m in mass_sums), k_max
        )
        return torch.from_numpy(indices), torch.from_numpy(weights), torch.from_numpy(k), torch.from_numpy(mass), stats

    def _row_ranges(self, n: int, min_rows: int = kernels.PARALLEL_MIN_TOKENS_PER_THREAD) -> list[tuple[int, int]]:
        """One row range per torch thread, each of at least ``min_rows``, else one; the kernels release the GIL."""
        parts = max(1, min(torch.get_num_threads(), n // min_rows))
        step = -(-n // parts) if n else 0
        return [(start, min(n, start + step)) for start in range(0, n, step)] if n else [(0, 0)]

    def _run_ranges(self, ranges: list[tuple[int, int]], work: Callable[[int, int, int], None]) -> None:
        if len(ranges) == 1:
            work(0, *ranges[0])
            return
        pool = self._thread_pool(len(ranges) - 1)
        pending = [pool.submit(work, i, start, stop) for i, (start, stop) in enumerate(ranges[1:], start=1)]
        work(0, *ranges[0])
        for future in pending:
            future.result()

    def _thread_pool(self, workers: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None or self._pool_workers < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-route")
                self._pool_workers = workers
            return self._pool


@functools.cache
def onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """oneDNN's float32 linear layer, where this torch build has it and it computes ``x @ w.T``; else None.

    torch's CPU matmul is MKL's sgemm, which takes its generic code path on AMD CPUs; oneDNN picks its
    AVX-512 kernels there (measured 1.3-1.7x MKL for gates of d=4096, E=64, float32 throughout). The op is
    internal to torch (inductor's CPU fusions call it), so it is checked on a small input first and left
    out on any doubt.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise

        def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return op(x, w, None, "none", [], "")

        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(37, 96, generator=generator), torch.randn(9, 96, generator=generator)
        got = linear(x, w)
        if got.dtype != torch.float32 or not torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-5):
            return None
        return linear
    except (AttributeError, RuntimeError, TypeError):  # not built in, or another signature
        return None


def token_tensor(part: np.ndarray) -> torch.Tensor:
    """A token array (float32, float16 or BF16 bits) as a torch tensor of its real dtype, sharing its memory.

    Widen with torch (``copy_`` into float32): 2-10x faster than numpy's conversion here, float16 in particular.
    """
    if not (part.flags.writeable and part.flags.c_contiguous):
        part = np.array(part)  # torch wraps only writeable arrays; read-only bodies are the small ones
    tensor = torch.from_numpy(part)
    return tensor.view(torch.bfloat16) if part.dtype == BF16_BITS else tensor


def resolve_device(name: str, kernel: str = "auto") -> torch.device:
    """``router.device`` as a torch device: ``auto`` is the first CUDA GPU torch sees, else the CPU (also
    when ``router.kernel`` asks for the CPU-only fused kernel).

    A CUDA device that is not there is a configuration error named here (CPU-only torch build, no GPU
    assigned to the pod, or an index beyond the visible ones), not a crash on the first request.
    """
    if name == "auto":
        on_gpu = kernel != "fused" and torch.cuda.is_available()
        return torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"router.device is {name!r} but torch sees no CUDA device (a CPU-only torch build, or no GPU "
            "assigned to the pod: request nvidia.com/gpu in spec.runtime.resources); use 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ValueError(f"router.device is {name!r} but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def use_fused_kernel(config: RouterConfig, device: torch.device | None = None) -> bool:
    """Whether ``config`` runs the compiled kernels: on the CPU only, and not with a capacity factor
    (a cross-token step)."""
    on_gpu = device is not None and device.type != "cpu"
    if config.kernel == "fused" and on_gpu:
        raise ValueError(f"router.kernel 'fused' runs on the CPU, router.device is {device}; use 'auto' or 'torch'")
    if config.kernel == "torch" or on_gpu or config.load_balancing.capacity_factor is not None:
        return False
    if config.kernel == "fused" and not kernels.AVAILABLE:
        raise ValueError("router.kernel is 'fused' but numba is not installed; install numba or use 'auto'")
    return kernels.AVAILABLE


def kernel_strategy(config: RouterConfig, has_probe: bool) -> int:
    """The kernels' strategy code; a fixed k (top_k, or minExperts = maxExperts) needs no estimator."""
    if config.strategy == "top_k" or config.min_experts == config.max_experts:
        return kernels.TOP_K
    if config.strategy == "top_p":
        return kernels.TOP_P
    if config.strategy == "entropy":
        return kernels.ENTROPY
    return kernels.PROBE_SCORE if has_probe else kernels.UNCERTAINTY_SCORE
