"""Routing quality at equal budget: sparse MoE output vs the dense softmax mixture of all experts.

No training: seeded expert FFNs and a seeded gate whose scale is tuned so that the router's mean top-1
probability matches a realistic sharpness (0.5 for E=8, 0.3 for E=64, in the range Mixtral-style routers
show). For each strategy the benchmark reports mean k, dropped probability mass and the relative
reconstruction error ||y_sparse - y_dense|| / ||y_dense||, and compares it with

* static top-k at the *same mean k*: for a fractional mean k, a random mix of tokens at floor(k) and
  ceil(k) experts, whose squared error interpolates linearly;
* top_p tuned (bisection on topP) to the same mean k.

Two error metrics: ``global`` = ||Y_sparse - Y_dense||_F / ||Y_dense||_F over all tokens (large-output
tokens dominate) and ``token`` = mean over tokens of ||y_sparse - y_dense|| / ||y_dense|| (every token
counts the same).

Two input scenarios: ``varied-norm`` (per-token hidden-state norms log-normal, sigma 0.5) and
``rms-normed`` (every token has the same norm, as after an RMSNorm). Load balancing is off so the
figures isolate the choice of k. Run:

    .venv/bin/python benchmarks/router_quality.py [--tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from router_runtime.config import RouterConfig
from router_runtime.experts import EXPERT_W1, EXPERT_W2, GATE_WEIGHT, seeded_state
from router_runtime.router import DynamicRouter
from router_runtime.stats import relative_error


@dataclass(frozen=True)
class Setting:
    name: str
    d: int
    experts: int
    hidden: int
    top1_target: float
    k_limit: int
    norm_sigma: float
    #: > 0: tokens lean towards one expert's gate direction by a log-normal amount, then are RMS-normed.
    cluster_sigma: float = 0.0


SETTINGS = (
    Setting("E=8 clustered", 768, 8, 128, 0.5, 4, 0.0, 0.5),
    Setting("E=8 rms-normed", 768, 8, 128, 0.5, 4, 0.0),
    Setting("E=8 varied-norm", 768, 8, 128, 0.5, 4, 0.5),
    Setting("E=64 clustered", 512, 64, 64, 0.3, 8, 0.0, 0.5),
    Setting("E=64 rms-normed", 512, 64, 64, 0.3, 8, 0.0),
    Setting("E=64 varied-norm", 512, 64, 64, 0.3, 8, 0.5),
)
RANGES = {4: (2, 3, 4), 8: (2, 4, 8)}


def make_tokens(setting: Setting, tokens: int, seed: int, gate: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[T, d]``: RMS-normed, then scaled per token by a log-normal (``norm_sigma``).

    ``clustered``: each token is noise plus a pull of log-normal strength towards one expert's gate
    direction before the norm, as hidden states cluster around what the router learned: some tokens are
    clear-cut (a sharp router distribution), others ambiguous (a flat one), at the same norm.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, setting.d, generator=generator)
    if setting.cluster_sigma > 0:
        directions = gate / gate.norm(dim=-1, keepdim=True) * math.sqrt(setting.d)
        owner = torch.randint(0, gate.shape[0], (tokens,), generator=generator)
        pull = torch.exp(torch.randn(tokens, 1, generator=generator) * setting.cluster_sigma) * 0.1
        x = x + pull * directions[owner]
    x = x / x.norm(dim=-1, keepdim=True) * math.sqrt(setting.d)
    scale = torch.exp(torch.randn(tokens, 1, generator=generator) * setting.norm_sigma)
    return x * scale


def tuned_gate(base: torch.Tensor, x: torch.Tensor, top1_target: float) -> torch.Tensor:
    """Scale the gate so the mean top-1 probability over ``x`` hits ``top1_target`` (bisection)."""
    logits = x @ base.t()
    low, high = 1e-3, 100.0
    for _ in range(60):
        mid = math.sqrt(low * high)
        top1 = torch.softmax(logits * mid, -1).max(-1).values.mean().item()
        low, high = (mid, high) if top1 < top1_target else (low, mid)
    return base * math.sqrt(low * high)


@dataclass(frozen=True)
class Point:
    mean_k: float
    global_error: float
    token_error: float
    dropped: float


class Bench:
    def __init__(self, setting: Setting, tokens: int, seed: int) -> None:
        self.setting = setting
        base = RouterConfig.model_validate(
            {
                "inputDim": setting.d,
                "numExperts": setting.experts,
                "maxExperts": setting.k_limit,
                "experts": {"enabled": True, "hiddenDim": setting.hidden},
                "weights": {"seed": seed},
            }
        )
        self.state = seeded_state(base)
        self.x = make_tokens(setting, tokens, seed, self.state[GATE_WEIGHT])
        self.state[GATE_WEIGHT] = tuned_gate(self.state[GATE_WEIGHT], self.x, setting.top1_target)
        dense_router = self.router("top_k", setting.experts, setting.experts)
        probs = torch.softmax(self.x @ self.state[GATE_WEIGHT].t(), -1)
        assert dense_router.experts is not None
        top1 = probs.max(-1).values
        self.top1 = top1.mean().item()
        self.top1_spread = (top1.quantile(0.1).item(), top1.quantile(0.9).item())
        self.dense = dense_router.experts.dense(self.x, probs)

    def router(self, strategy: str, k_min: int, k_max: int, top_p: float = 0.9) -> DynamicRouter:
        config = RouterConfig.model_validate(
            {
                "inputDim": self.setting.d,
                "numExperts": self.setting.experts,
                "minExperts": k_min,
                "maxExperts": k_max,
                "strategy": strategy,
                "topP": top_p,
                "loadBalancing": {"enabled": False},
                "experts": {"enabled": True, "hiddenDim": self.setting.hidden},
            }
        )
        state = {name: self.state[name] for name in (GATE_WEIGHT, EXPERT_W1, EXPERT_W2)}
        return DynamicRouter(config, state)

    def measure(self, strategy: str, k_min: int, k_max: int, top_p: float = 0.9) -> Point:
        result = self.router(strategy, k_min, k_max, top_p).route(self.x)
        assert result.output is not None
        token_error = (result.output - self.dense).norm(dim=-1) / self.dense.norm(dim=-1).clamp(min=1e-12)
        return Point(
            result.stats.mean_k,
            relative_error(result.output, self.dense),
            float(token_error.mean()),
            result.stats.dropped_mass,
        )

    def top_p_at(self, mean_k: float) -> tuple[float, Point]:
        """top_p (k in [1, k_limit]) tuned to ``mean_k`` by bisection on p: (p, its point)."""
        low, high = 1e-4, 1.0
        best = (high, self.measure("top_p", 1, self.setting.k_limit, high))
        for _ in range(14):
            mid = (low + high) / 2
            point = self.measure("top_p", 1, self.setting.k_limit, mid)
            if abs(point.mean_k - mean_k) < abs(best[1].mean_k - mean_k):
                best = (mid, point)
            low, high = (mid, high) if point.mean_k < mean_k else (low, mid)
        return best


def interpolate_static(static: dict[int, Point], mean_k: float) -> Point:
    """Static top-k at a fractional mean k: a random floor/ceil token mix (squared errors interpolate)."""
    low = max(1, min(math.floor(mean_k), max(static)))
    high = min(low + 1, max(static))
    share = 0.0 if high == low else mean_k - low

    def mix(a: float, b: float) -> float:
        return math.sqrt((1 - share) * a**2 + share * b**2)

    lo, hi = static[low], static[high]
    return Point(
        mean_k,
        mix(lo.global_error, hi.global_error),
        (1 - share) * lo.token_error + share * hi.token_error,
        (1 - share) * lo.dropped + share * hi.dropped,
    )


def run(tokens: int, seed: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    header = f"  {'strategy':<10} {'config':<16} {'mean k':>6} {'global err':>10} {'token err':>9} {'dropped':>7}"
    for setting in SETTINGS:
        bench = Bench(setting, tokens, seed)
        low, high = bench.top1_spread
        print(
            f"\n== {setting.name}: d={setting.d} E={setting.experts} T={tokens}, "
            f"top-1 probability mean {bench.top1:.3f} (10th-90th percentile {low:.2f}-{high:.2f})"
        )
        print(header + "   vs static top-k at the same mean k (global / token)")
        static = {k: bench.measure("top_k", k, k) for k in range(1, setting.k_limit + 1)}
        for k, point in static.items():
            rows.append(record(setting, "top_k", f"k={k}", point, point))
        for k_max in RANGES[setting.k_limit]:
            for strategy in ("entropy", "complexity"):
                point = bench.measure(strategy, 1, k_max)
                reference = interpolate_static(static, point.mean_k)
                rows.append(record(setting, strategy, f"k in [1,{k_max}]", point, reference))
                p, p_point = bench.top_p_at(point.mean_k)
                reference = interpolate_static(static, p_point.mean_k)
                rows.append(record(setting, "top_p", f"p={p:.3f} k<={setting.k_limit}", p_point, reference))
        for row in rows:
            if row["setting"] == setting.name:
                print(format_row(row))
    return rows


def record(setting: Setting, strategy: str, label: str, point: Point, static: Point) -> dict[str, object]:
    return {
        "setting": setting.name,
        "strategy": strategy,
        "config": label,
        "mean_k": point.mean_k,
        "global_error": point.global_error,
        "token_error": point.token_error,
        "dropped_mass": point.dropped,
        "static_global_error": static.global_error,
        "static_token_error": static.token_error,
    }


def format_row(row: dict[str, Any]) -> str:
    text = (
        f"  {row['strategy']:<10} {row['config']:<16} {row['mean_k']:>6.3f} {row['global_error']:>10.4f} "
        f"{row['token_error']:>9.4f} {row['dropped_mass']:>7.4f}"
    )
    if row["strategy"] == "top_k":
        return text
    ratios = (row["global_error"] / row["static_global_error"], row["token_error"] / row["static_token_error"])
    verdicts = "/".join(("better" if r < 0.995 else "WORSE" if r > 1.005 else "same") for r in ratios)
    return text + f"   {ratios[0]:.3f}x / {ratios[1]:.3f}x  {verdicts}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    rows = run(args.tokens, args.seed)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
