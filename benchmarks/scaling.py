"""Predictive vs reactive scaling on every trace in ../shared/traces, at equal replica-hours.

For each trace and pod startup delay (300 s, 600 s): the reactive HPA model swept over target
utilisation 0.5..0.9 in steps of 0.05 (extended down to 0.1 when a predictive run costs more than the whole curve)
gives a cost (replica-hours) / unserved-demand curve; the predictive policy (the same HPA
plus the operator's minReplicas floor) runs at targets 0.5..0.9, and each run's unserved demand is
compared with the reactive curve interpolated at the same replica-hours (log-linear in unserved).
A ratio below 1 means predictive leaves less demand unserved for the same cost.

Capacity per replica is set per trace from the trace alone (its 99th-percentile rate needs
``--peak-replicas`` replicas at 100%), so no constant is tuned to any one file.

    .venv/bin/python benchmarks/scaling.py [--traces DIR] [--plot out/scaling-day.png] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_operator.scaling.simulate import (
    POLICIES,
    SimulationConfig,
    SimulationResult,
    forecast_schedule,
    plot_results,
    simulate,
)
from moe_operator.scaling.traces import Trace, TraceFormat, read_trace

DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
REACTIVE_TARGETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
#: Lower reactive targets, tried in turn only while a predictive run costs more than the whole curve.
EXTRA_REACTIVE_TARGETS = (0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
PREDICTIVE_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
STARTUP_DELAYS = (300.0, 600.0)
#: Unserved fractions are compared in log space; this keeps a perfect run finite.
UNSERVED_FLOOR = 1e-9


@dataclass(frozen=True)
class Comparison:
    trace: str
    delay: float
    target: float
    replica_hours: float
    unserved: float
    reactive_unserved: float | None
    reactive_at_same_target: float

    @property
    def ratio(self) -> float | None:
        if self.reactive_unserved is None:
            return None
        return max(self.unserved, UNSERVED_FLOOR) / max(self.reactive_unserved, UNSERVED_FLOOR)


def trace_format(path: Path) -> TraceFormat:
    header = path.open().readline().strip().lower().split(",")
    return "counts" if header[:2] == ["timestamp", "value"] else "requests"


def reactive_unserved_at(curve: list[tuple[float, float]], replica_hours: float) -> float | None:
    """Reactive unserved demand interpolated at ``replica_hours`` (None outside the swept range)."""
    points = sorted(curve)
    costs = [cost for cost, _ in points]
    if not costs[0] <= replica_hours <= costs[-1]:
        return None
    logs = [math.log(max(unserved, UNSERVED_FLOOR)) for _, unserved in points]
    return float(math.exp(np.interp(replica_hours, costs, logs)))


def run_trace(name: str, trace: Trace, delay: float, peak_replicas: int) -> tuple[list[Comparison], dict[str, object]]:
    capacity = float(np.quantile(trace.rates, 0.99)) / peak_replicas
    base = SimulationConfig(capacity, delay, 0.7, 1, 100 * peak_replicas)
    started = time.perf_counter()
    schedule = forecast_schedule(trace, base)
    forecast_seconds = time.perf_counter() - started
    curve: list[tuple[float, float]] = []
    reactive_by_target: dict[float, float] = {}
    for target in REACTIVE_TARGETS:
        config = SimulationConfig(capacity, delay, target, 1, 100 * peak_replicas)
        summary = simulate(trace, config, "reactive").summary
        curve.append((summary.replica_hours, summary.unserved_fraction))
        reactive_by_target[target] = summary.unserved_fraction
    predictive = {
        target: simulate(trace, SimulationConfig(capacity, delay, target, 1, 100 * peak_replicas), "predictive",
                         schedule).summary
        for target in PREDICTIVE_TARGETS
    }
    most = max(summary.replica_hours for summary in predictive.values())
    for target in EXTRA_REACTIVE_TARGETS:
        if max(cost for cost, _ in curve) >= most:
            break
        summary = simulate(trace, SimulationConfig(capacity, delay, target, 1, 100 * peak_replicas), "reactive").summary
        curve.append((summary.replica_hours, summary.unserved_fraction))
    comparisons = [
        Comparison(
            name, delay, target, summary.replica_hours, summary.unserved_fraction,
            reactive_unserved_at(curve, summary.replica_hours), reactive_by_target[target],
        )
        for target, summary in predictive.items()
    ]
    floor_ticks = float(np.mean(schedule.uses_floor))
    models = {model: schedule.models.count(model) / len(schedule.models) for model in sorted(set(schedule.models))}
    info: dict[str, object] = {
        "trace": name, "delay": delay, "capacity_per_replica": capacity, "days": trace.duration / 86400,
        "forecast_weighted_abs_error": schedule.weighted_abs_error, "forecast_coverage": schedule.coverage,
        "floor_tick_fraction": floor_ticks, "models": models, "forecast_seconds": forecast_seconds,
        "reactive_curve": curve, "seconds": time.perf_counter() - started,
    }
    return comparisons, info


def json_safe(value: object) -> object:
    """NaN (no forecast was ever made on a trace) becomes null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def plot_day(predictive: SimulationResult) -> float:
    """Start (s) of the day plotted: the first day from the fifteenth on whose floor is raised most of the day.

    The plot is there to show the mechanism; the table above covers every day.
    """
    day = 86400.0
    days = int(predictive.times[-1] // day)
    for d in range(min(14, max(days - 1, 0)), days):
        inside = (predictive.times >= d * day) & (predictive.times < (d + 1) * day)
        if np.mean(predictive.floor[inside] > predictive.floor.min()) >= 0.75:
            return d * day
    return float(min(14, max(days - 1, 0))) * day


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="folder of trace CSVs")
    parser.add_argument("--only", action="append", default=[], help="only traces whose name contains this")
    parser.add_argument("--peak-replicas", type=int, default=20, help="replicas the p99 rate needs at 100%%")
    parser.add_argument("--plot", type=Path, default=Path("out/scaling-day.png"), help="PNG of one day")
    parser.add_argument("--plot-trace", default="nyc_taxi", help="trace (name substring) for the plot")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args(argv)

    files = sorted(p for p in args.traces.glob("*.csv") if not args.only or any(o in p.name for o in args.only))
    if not files:
        print(f"no trace CSVs in {args.traces}", file=sys.stderr)
        return 2
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    started = time.perf_counter()
    all_rows: list[Comparison] = []
    infos: list[dict[str, object]] = []
    traces: dict[str, Trace] = {}
    for path in files:
        trace = read_trace(path, trace_format(path))
        traces[path.stem] = trace
        for delay in STARTUP_DELAYS:
            rows, info = run_trace(path.stem, trace, delay, args.peak_replicas)
            all_rows.extend(rows)
            infos.append(info)
            print(f"  {path.stem} startup {delay:.0f}s: {info['seconds']:.1f}s", file=sys.stderr)

    header = (f"{'trace':<32} {'start':>5} {'U':>4} {'rep-h pred':>11} {'unserved pred':>13} "
              f"{'reactive@=rh':>12} {'ratio':>6} {'reactive@U':>10}")
    print("\nunserved demand at equal replica-hours (ratio = predictive / reactive; < 1 is better)")
    print(header)
    print("-" * len(header))
    for row in all_rows:
        ratio = "  n/a" if row.ratio is None else f"{row.ratio:6.2f}"
        reactive = "  outside" if row.reactive_unserved is None else f"{row.reactive_unserved:12.3e}"
        print(f"{row.trace:<32} {row.delay:>5.0f} {row.target:>4.1f} {row.replica_hours:>11.1f} "
              f"{row.unserved:>13.3e} {reactive:>12} {ratio} {row.reactive_at_same_target:>10.3e}")
    print("\nper trace and startup delay: median and worst ratio over targets in the reactive range; forecast error")
    print(f"{'trace':<32} {'start':>5} {'median':>7} {'worst':>6} {'wAPE':>6} {'cover':>6} {'floor%':>6}  models")
    for info in infos:
        ratios = [r.ratio for r in all_rows if r.trace == info["trace"] and r.delay == info["delay"] and r.ratio]
        median = f"{float(np.median(ratios)):7.2f}" if ratios else "    n/a"
        worst = f"{max(ratios):6.2f}" if ratios else "   n/a"
        models = ", ".join(f"{m} {share:.0%}" for m, share in info["models"].items())  # type: ignore[attr-defined]
        print(f"{info['trace']:<32} {info['delay']:>5.0f} {median} {worst} "
              f"{info['forecast_weighted_abs_error']:6.3f} {info['forecast_coverage']:6.3f} "
              f"{info['floor_tick_fraction']:6.1%}  {models}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")

    plot_name = next((name for name in traces if args.plot_trace in name), next(iter(traces)))
    trace = traces[plot_name]
    config = SimulationConfig(
        float(np.quantile(trace.rates, 0.99)) / args.peak_replicas, STARTUP_DELAYS[-1], 0.7, 1,
        100 * args.peak_replicas,
    )
    results: dict[str, SimulationResult] = {
        policy: simulate(trace, config, policy) for policy in POLICIES
    }
    start = plot_day(results["predictive"])
    plot_results(results, args.plot, start, start + 86400.0,
                 title=f"{plot_name}: day {start / 86400:.0f}, startup {STARTUP_DELAYS[-1]:.0f}s, target 0.7")
    print(f"plot: {args.plot}")
    if args.json:
        payload = {"comparisons": [row.__dict__ | {"ratio": row.ratio} for row in all_rows], "traces": infos}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
