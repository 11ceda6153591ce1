"""In-process routing throughput: every strategy vs a plain static top-2 gate on the same input.

Matrix: (d, E) in {(768, 8), (4096, 64)} x T in {1024, 8192}, torch on 2 threads (``--threads``).
The baseline is the textbook static gate (Mixtral style): ``F.linear``, ``torch.softmax`` in fp32,
``torch.topk(k)``, renormalise, with k = 2 (the issue's top-2 baseline) and, for E=64, also k = 8.
Strategies run the full ``DynamicRouter.route`` with the default config (selection-bias load
balancing on, renormalised weights, per-call and cumulative statistics), minExperts=1 and
maxExperts equal to the baseline's k, so both select from the same number of slots, and the post-gate
kernel of ``--kernel`` (auto: the fused numba kernel when installed; torch: the chain of torch ops). Each figure is
the best of repeated timed loops (``timeit`` practice: on a shared machine the minimum is the least
disturbed estimate), with the baseline and the strategies taking turns; the median is printed too.

    .venv/bin/python benchmarks/router_throughput.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from router_runtime import kernels
from router_runtime.config import RouterConfig
from router_runtime.router import DynamicRouter

STRATEGIES = ("top_k", "top_p", "entropy", "complexity")
SHAPES = ((768, 8, 2), (4096, 64, 2), (4096, 64, 8))
TOKENS = (1024, 8192)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


DTYPES = {"FP32": torch.float32, "BF16": torch.bfloat16, "FP16": torch.float16}


def static_gate(x: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain static top-k gate the issue compares against (k=2: the top-2 baseline); 16-bit input is gated
    in its own dtype, as a BF16/FP16 model's gate layer does, and the softmax runs in fp32."""
    probs = torch.softmax(F.linear(x, weight.to(x.dtype)).float(), dim=-1)
    values, indices = torch.topk(probs, k, dim=-1)
    return values / values.sum(-1, keepdim=True), indices


def static_gate_on_device(
    x: torch.Tensor, weight: torch.Tensor, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline under the served contract on a GPU: host activations in, decisions back on the host."""
    values, indices = static_gate(x.to(device, non_blocking=True), weight, k)
    return values.cpu(), indices.cpu()


def time_interleaved(
    candidates: dict[str, Callable[[], object]], min_seconds: float, repeats: int
) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per call of each candidate.

    The candidates take turns, one timed loop of at least ``min_seconds`` each per round, so a slow
    phase of the shared machine hits all of them rather than whichever ran at that moment.
    """
    loops: dict[str, int] = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            for _ in range(3):
                fn()
            start = time.perf_counter()
            fn()
            loops[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                for _ in range(loops[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: (min(values), statistics.median(values)) for name, values in samples.items()}


def run(
    threads: int, min_seconds: float, repeats: int, kernel: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[dict[str, object]]:
    torch.set_num_threads(threads)
    rows: list[dict[str, object]] = []
    for d, e, k_max in SHAPES:
        for t in TOKENS:
            x = torch.randn(t, d, generator=torch.Generator().manual_seed(0))
            configs = {
                s: RouterConfig.model_validate(
                    {
                        "inputDim": d,
                        "numExperts": e,
                        "minExperts": 1,
                        "maxExperts": k_max,
                        "strategy": s,
                        "topP": 0.9,
                        "kernel": kernel,
                        "device": device,
                    }
                )
                for s in STRATEGIES
            }
            routers = {s: DynamicRouter(c) for s, c in configs.items()}
            # On a GPU the activations sit in pinned host memory, as in the server's batch buffer.
            x = torch.from_numpy(routers["top_k"].host_array(tuple(x.shape), np.dtype(np.float32))).copy_(x)
            x = x.to(dtype)  # the routers widen 16-bit tokens to float32 before the gate
            baseline = f"static top-{k_max} gate (baseline)"
            gate = routers["top_k"].gate_weight
            candidates: dict[str, Callable[[], object]] = {
                baseline: functools.partial(static_gate, x, gate, k_max)
                if device == "cpu"
                else functools.partial(static_gate_on_device, x, gate, k_max, gate.device)
            }
            candidates |= {s: functools.partial(r.route, x) for s, r in routers.items()}
            timings = time_interleaved(candidates, min_seconds, repeats)
            base = timings[baseline][0]
            rows.append(row(d, e, t, baseline, k_max, timings[baseline], base, float(k_max)))
            for strategy, router in routers.items():
                mean_k = router.route(x, update_state=False).stats.mean_k
                rows.append(row(d, e, t, strategy, k_max, timings[strategy], base, mean_k))
    return rows


def row(
    d: int, e: int, t: int, name: str, k_max: int, timing: tuple[float, float], base: float, mean_k: float
) -> dict[str, object]:
    seconds, median = timing
    return {
        "d": d,
        "E": e,
        "T": t,
        "router": name,
        "maxExperts": k_max,
        "mean_k": mean_k,
        "ms_per_call": seconds * 1e3,
        "median_ms_per_call": median * 1e3,
        "mtokens_per_s": t / seconds / 1e6,
        "vs_baseline": base / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="shorter timing loops (noisier)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--kernel", choices=("auto", "fused", "torch"), default="auto", help="the routers' post-gate implementation"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="router.device (cpu, cuda): on a GPU the activations start on the host and the decisions come back "
        "to it, for the routers and the baseline alike (the served path)",
    )
    parser.add_argument(
        "--datatype",
        choices=tuple(DTYPES),
        default="FP32",
        help="dtype of the tokens (the issue's figures are FP32; models hand over BF16 or FP16 hidden states)",
    )
    args = parser.parse_args()
    min_seconds, repeats = (0.03, 5) if args.quick else (0.06, 21)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}, load average before {os.getloadavg()[0]:.2f}"
    )
    fused = args.device == "cpu" and (args.kernel == "fused" or (args.kernel == "auto" and kernels.AVAILABLE))
    print(f"router kernel: {f'fused (numba {kernels.numba.__version__})' if fused else 'torch ops'} on {args.device}")
    if args.device != "cpu":
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
    print(f"tokens: {args.datatype}")
    rows = run(args.threads, min_seconds, repeats, args.kernel, args.device, DTYPES[args.datatype])
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on the machine skew the figures)")
    columns = f"{'kmax':>4} {'mean k':>6} {'best ms':>8} {'med ms':>8} {'Mtok/s':>7} {'vs base':>7}"
    print(f"{'d':>5} {'E':>3} {'T':>5}  {'router':<30} {columns}")
    for r in rows:
        mean_k = f"{r['mean_k']:.2f}"
        print(
            f"{r['d']:>5} {r['E']:>3} {r['T']:>5}  {r['router']:<30} {r['maxExperts']:>4} {mean_k:>6} "
            f"{r['ms_per_call']:>8.3f} {r['median_ms_per_call']:>8.3f} {r['mtokens_per_s']:>7.3f} "
            f"{r['vs_baseline']:>6.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
