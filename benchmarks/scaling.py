"""Predictive vs reactive scaling on every trace in ../shared/traces, at equal replica-hours.

For each trace and pod startup delay (300 s, 600 s): the reactive HPA model swept over target
utilisation 0.5..0.9 in steps of 0.05 (extended down to 0.1 when a predictive run costs more than the whole curve)
gives a cost (replica-hours) / unserved-demand curve; the predictive policy (the same HPA
plus the operator's minReplicas floor) runs at targets 0.5..0.9, and each run's unserved demand is
compared with the reactive curve interpolated at the same replica-hours (log-linear in unserved).
A ratio below 1 means predictive leaves less demand unserved for the same cost.

Capacity per replica is set per trace from the trace alone (its 99th-percentile rate needs
``--peak-replicas`` replicas at 100%), so no constant is tuned to any one file.

Held out: every figure is also computed on the second half of each trace only (both policies warm
up on the first half; nothing is fitted per trace, so this is the part no choice could have seen).
Synthetic: seeded generators (``moe_operator.scaling.synthetic``: bursty, regime shifts, flat noise,
seasonal with trend) run alongside the shared traces unless ``--no-synthetic``.

Limits, to tell a weak model from a trace that leaves little to forecast. ``pre-fl`` (always
printed): the share of the reactive HPA's unserved demand that falls before any floor can be ready
(two horizons of history, the least any learner of the horizon's peak needs, + metric lag +
startup); both policies are identical until then, so no forecaster that learns from the series
itself can bring the ratio below it. ``--limits`` adds the *oracle
escalation* (not causal): the controller's own schedule, raised to the actual peak of the reachable
part of the horizon whenever a burst is visibly under way (last rate >= 1.2x the last hour's mean)
from the minimum history on: more than escalating on a visible burst ("buy capacity while a burst
rises") can add to the floor in force; and the *perfect forecast* (not causal either): the operator's
own floor rule fed at every tick, from the first and without any history, with the actual peak of the
part of the horizon that capacity ordered then can reach. A perfect forecast is not quite the best floor (on
the Azure trace the same scaled by 0.75, or the best constant floor picked per target, did up to 0.1
better at some targets; docs/predictive-scaling.md), but a trace where even it is far from a target
has a target beyond forecasting under that rule.
``--limits`` makes the run about 80% longer.

    .venv/bin/python benchmarks/scaling.py [--traces DIR] [--plot out/scaling-day.png] [--json FILE] [--limits]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moe_operator.scaling.forecast import Grid, forecast_peak, future_peak, select_model
from moe_operator.scaling.policy import METRIC_LAG_SECONDS
from moe_operator.scaling.simulate import (
    POLICIES,
    ForecastSchedule,
    SimulationConfig,
    SimulationResult,
    forecast_schedule,
    plot_results,
    simulate,
    summarize,
    tick_origins,
)
from moe_operator.scaling.synthetic import GENERATORS
from moe_operator.scaling.traces import Trace, TraceError, TraceFormat, read_trace

DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
REACTIVE_TARGETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
#: Lower reactive targets, tried in turn only while a predictive run costs more than the whole curve.
EXTRA_REACTIVE_TARGETS = (0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
PREDICTIVE_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
STARTUP_DELAYS = (300.0, 600.0)
#: Unserved fractions are compared in log space; this keeps a perfect run finite.
UNSERVED_FLOOR = 1e-9
#: Below one part per million of demand on both sides, a ratio compares rounding noise: a tie.
NEGLIGIBLE_UNSERVED = 1e-6
#: Extra unserved demand (as a fraction of all demand) below which "worse" is reported as immaterial.
MATERIAL_EXCESS = 1e-5
#: ``--limits``: a burst counts as visibly under way when the last known rate is this far above the
#: last hour's mean (beyond the HPA's 10% tolerance and the ordinary minute-to-minute noise).
VISIBLE_BURST_RATIO = 1.2


def unserved_ratio(unserved: float, reactive: float | None) -> float | None:
    """Predictive over reactive unserved demand; 1.0 when both are negligible; None off the curve."""
    if reactive is None:
        return None
    if max(unserved, reactive) < NEGLIGIBLE_UNSERVED:
        return 1.0
    return max(unserved, UNSERVED_FLOOR) / max(reactive, UNSERVED_FLOOR)


@dataclass(frozen=True)
class Comparison:
    trace: str
    delay: float
    target: float
    replica_hours: float
    unserved: float
    reactive_unserved: float | None
    reactive_at_same_target: float
    scale_events: int
    reactive_scale_events: int
    #: The same figures over the second half of the trace only.
    heldout_unserved: float
    heldout_reactive_unserved: float | None

    @property
    def ratio(self) -> float | None:
        return unserved_ratio(self.unserved, self.reactive_unserved)

    @property
    def heldout_ratio(self) -> float | None:
        return unserved_ratio(self.heldout_unserved, self.heldout_reactive_unserved)


def trace_format(path: Path) -> TraceFormat:
    header = path.open().readline().strip().lower().split(",")
    return "counts" if header[:2] == ["timestamp", "value"] else "requests"


def reactive_unserved_at(curve: list[tuple[float, float]], replica_hours: float) -> float | None:
    """Reactive unserved demand interpolated at ``replica_hours`` (None outside the swept range)."""
    points = sorted(curve)
    costs = [cost for cost, _ in points]
    if not costs[0] <= replica_hours <= costs[-1]:
        return None
    index = min(int(np.searchsorted(costs, replica_hours, side="right")), len(points) - 1)
    low, high = points[max(index - 1, 0)], points[index]
    if min(low[1], high[1]) < NEGLIGIBLE_UNSERVED:
        # Log-linear towards a run that left (almost) nothing unserved would invent a value near 0.
        return float(np.interp(replica_hours, costs, [unserved for _, unserved in points]))
    logs = [math.log(max(unserved, UNSERVED_FLOOR)) for _, unserved in points]
    return float(math.exp(np.interp(replica_hours, costs, logs)))


def escalation_oracle(trace: Trace, config: SimulationConfig, schedule: ForecastSchedule) -> ForecastSchedule:
    """The controller's schedule, raised to the actual reachable peak wherever a burst is visibly under way.

    Not causal (it reads the future): an upper bound on what escalating on the burst state at the
    origin can add to the floor in force. It escalates from the first tick with the minimum history on, with or
    without a floor from the controller (a new model would need no trust to get there); elsewhere the
    schedule is unchanged.
    """
    grid = config.grid
    y = trace.mean_rates(config.step_seconds)
    origins = tick_origins(schedule.tick_times, config.step_seconds)
    usable = np.flatnonzero((origins >= grid.min_history) & (origins + grid.horizon <= y.size))
    at = origins[usable]
    csum = np.concatenate(([0.0], np.cumsum(y)))
    start = np.maximum(at - grid.window, 0)
    level = (csum[at] - csum[start]) / (at - start)
    visible = y[at - 1] >= VISIBLE_BURST_RATIO * level
    reachable = future_peak(y, at + grid.lead, grid.horizon - grid.lead)
    raised = usable[visible]
    predicted = schedule.predicted_load.copy()
    uses_floor = schedule.uses_floor.copy()
    predicted[raised] = np.maximum(np.where(uses_floor[raised], predicted[raised], 0.0), reachable[visible])
    uses_floor[raised] = True
    return replace(schedule, predicted_load=predicted, uses_floor=uses_floor)


def perfect_forecast_oracle(trace: Trace, config: SimulationConfig, schedule: ForecastSchedule) -> ForecastSchedule:
    """A forecaster that knows the future: at every tick, the actual peak of the reachable part of the horizon.

    Not causal, and it needs no history (it is on from the first tick): the operator's own floor rule
    (``ceil(forecast / (capacity * target))``, held by the stabilisation window) fed with a perfect
    forecast. What is left unserved with it is beyond any forecaster under that rule; ticks whose
    horizon runs past the trace's end keep no floor.
    """
    grid = config.grid
    y = trace.mean_rates(config.step_seconds)
    origins = tick_origins(schedule.tick_times, config.step_seconds)
    # The first tick (t = 0, before any sample has ended) orders capacity too: it needs no history.
    usable = (origins + grid.lead >= 0) & (origins + grid.horizon <= y.size)
    predicted = np.full(origins.size, np.nan)
    predicted[usable] = future_peak(y, origins[usable] + grid.lead, grid.horizon - grid.lead)
    return replace(schedule, predicted_load=predicted, uses_floor=usable)


def pre_floor_share(result: SimulationResult, config: SimulationConfig) -> float:
    """Share of a reactive run's unserved demand before any predictive floor could be ready.

    "Any": the least history a learner of the horizon's peak needs is two horizons (one to measure a
    level, one to see its first outcome), less than the controller's own ``Grid.min_history``.
    """
    first_tick = 2 * config.grid.horizon * config.step_seconds + METRIC_LAG_SECONDS
    gap = np.maximum(result.demand - result.ready * config.capacity_per_replica, 0.0)
    total = float(np.sum(gap))
    if total <= 0:
        return 0.0
    return float(np.sum(gap[result.times < first_tick + config.startup_delay])) / total


def run_trace(
    name: str, trace: Trace, delay: float, peak_replicas: int, limits: bool = False
) -> tuple[list[Comparison], dict[str, object]]:
    capacity = float(np.quantile(trace.rates, 0.99)) / peak_replicas
    base = SimulationConfig(capacity, delay, 0.7, 1, 100 * peak_replicas)
    half = replace(base, evaluate_from=trace.duration / 2)
    started = time.perf_counter()
    schedule = forecast_schedule(trace, base)
    forecast_seconds = time.perf_counter() - started

    def run(target: float, policy: str) -> tuple[SimulationResult, SimulationConfig]:
        config = replace(base, target_utilization=target)
        return simulate(trace, config, policy, schedule), config  # type: ignore[arg-type]

    def curve_point(result: SimulationResult, config: SimulationConfig) -> tuple[float, float, float, float]:
        later = summarize(result.times, result.demand, result.desired, result.ready,
                          replace(config, evaluate_from=half.evaluate_from))
        return (result.summary.replica_hours, result.summary.unserved_fraction, later.replica_hours,
                later.unserved_fraction)

    curve: list[tuple[float, float, float, float]] = []
    reactive_by_target: dict[float, tuple[float, int]] = {}
    pre_floor: list[float] = []
    for target in REACTIVE_TARGETS:
        result, config = run(target, "reactive")
        curve.append(curve_point(result, config))
        reactive_by_target[target] = (result.summary.unserved_fraction, result.summary.scale_events)
        if target in PREDICTIVE_TARGETS:
            pre_floor.append(pre_floor_share(result, config))
    predictive = {target: run(target, "predictive") for target in PREDICTIVE_TARGETS}
    oracles: dict[str, dict[float, SimulationResult]] = {}
    if limits:
        for label, make in (("escalation", escalation_oracle), ("perfect", perfect_forecast_oracle)):
            told = make(trace, base, schedule)
            oracles[label] = {
                target: simulate(trace, replace(base, target_utilization=target), "predictive", told)
                for target in PREDICTIVE_TARGETS
            }
    told_costs = [result.summary.replica_hours for runs in oracles.values() for result in runs.values()]
    most = max([result.summary.replica_hours for result, _ in predictive.values()] + told_costs)
    for target in EXTRA_REACTIVE_TARGETS:
        if max(point[0] for point in curve) >= most:
            break
        curve.append(curve_point(*run(target, "reactive")))
    comparisons = []
    for target, (result, config) in predictive.items():
        point = curve_point(result, config)
        comparisons.append(Comparison(
            name, delay, target, point[0], point[1], reactive_unserved_at([(c, u) for c, u, _, _ in curve], point[0]),
            reactive_by_target[target][0], result.summary.scale_events, reactive_by_target[target][1],
            point[3], reactive_unserved_at([(c, u) for _, _, c, u in curve], point[2]),
        ))
    oracle_ratios = {
        label: [
            unserved_ratio(result.summary.unserved_fraction,
                           reactive_unserved_at([(c, u) for c, u, _, _ in curve], result.summary.replica_hours))
            for result in runs.values()
        ]
        for label, runs in oracles.items()
    }
    floor_ticks = float(np.mean(schedule.uses_floor))
    models = {model: schedule.models.count(model) / len(schedule.models) for model in sorted(set(schedule.models))}
    info: dict[str, object] = {
        "trace": name, "delay": delay, "capacity_per_replica": capacity, "days": trace.duration / 86400,
        "forecast_weighted_abs_error": schedule.weighted_abs_error, "forecast_coverage": schedule.coverage,
        "floor_tick_fraction": floor_ticks, "models": models, "forecast_seconds": forecast_seconds,
        "reactive_curve": curve, "seconds": time.perf_counter() - started,
        "pre_floor_share": float(np.median(pre_floor)),
    }
    if limits:
        info["oracle_escalation_ratios"] = oracle_ratios["escalation"]
        info["oracle_perfect_ratios"] = oracle_ratios["perfect"]
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


def _median_worst(ratios: list[float]) -> str:
    if not ratios:
        return "   n/a    n/a"
    return f"{float(np.median(ratios)):6.2f} {max(ratios):6.2f}"


def print_tables(all_rows: list[Comparison], infos: list[dict[str, object]]) -> None:
    header = (f"{'trace':<28} {'start':>5} {'U':>4} {'rep-h pred':>11} {'unserved pred':>13} "
              f"{'reactive@=rh':>12} {'ratio':>6} {'held-out':>8} {'reactive@U':>10} {'events p/r':>11}")
    print("\nunserved demand at equal replica-hours (ratio = predictive / reactive; < 1 is better;"
          f" 1.00 where both are below {NEGLIGIBLE_UNSERVED:g}); held-out = the same on the second half only")
    print(header)
    print("-" * len(header))
    for row in all_rows:
        ratio = "   n/a" if row.ratio is None else f"{row.ratio:6.2f}"
        heldout = "     n/a" if row.heldout_ratio is None else f"{row.heldout_ratio:8.2f}"
        reactive = "     outside" if row.reactive_unserved is None else f"{row.reactive_unserved:12.3e}"
        print(f"{row.trace[:28]:<28} {row.delay:>5.0f} {row.target:>4.1f} {row.replica_hours:>11.1f} "
              f"{row.unserved:>13.3e} {reactive} {ratio} {heldout} {row.reactive_at_same_target:>10.3e} "
              f"{row.scale_events:>5}/{row.reactive_scale_events:<5}")
    print("\nper trace and startup delay: median and worst ratio over targets (whole trace; second half held out),"
          " scale events at U=0.7 (predictive / reactive), forecast error")
    print(f"{'trace':<28} {'start':>5} {'median':>6} {'worst':>6} {'ho-med':>6} {'ho-wst':>6} {'events':>11} "
          f"{'wAPE':>6} {'cover':>6} {'floor%':>6} {'pre-fl':>6}  models")
    for info in infos:
        rows = [r for r in all_rows if r.trace == info["trace"] and r.delay == info["delay"]]
        whole = _median_worst([r.ratio for r in rows if r.ratio is not None])
        later = _median_worst([r.heldout_ratio for r in rows if r.heldout_ratio is not None])
        middle = next((r for r in rows if r.target == 0.7), rows[0])
        events = f"{middle.scale_events}/{middle.reactive_scale_events}"
        models = ", ".join(f"{m} {share:.0%}" for m, share in info["models"].items())  # type: ignore[attr-defined]
        print(f"{str(info['trace'])[:28]:<28} {info['delay']:>5.0f} {whole} {later} {events:>11} "
              f"{info['forecast_weighted_abs_error']:6.3f} {info['forecast_coverage']:6.3f} "
              f"{info['floor_tick_fraction']:6.1%} {info['pre_floor_share']:6.2f}  {models}")
    if any("oracle_escalation_ratios" in info for info in infos):
        print(f"\nlimits: oracle escalation (the controller's forecast raised to the actual reachable peak whenever the"
              f" last rate is >= {VISIBLE_BURST_RATIO}x the last hour's mean, from the minimum history on; not causal),"
              f" ratio at equal replica-hours for U={', '.join(str(t) for t in PREDICTIVE_TARGETS)}")
        for info in infos:
            ratios = [r for r in info.get("oracle_escalation_ratios", []) if r is not None]  # type: ignore[attr-defined]
            cells = " ".join(f"{r:6.2f}" for r in ratios)
            print(f"{str(info['trace'])[:28]:<28} {info['delay']:>5.0f} {cells}   median {_median_worst(ratios)}")
        print("\nlimits: perfect forecast (the operator's floor rule fed with the actual peak of the reachable part"
              " of the horizon at every tick from the first, no history needed; not causal), ratio at equal"
              f" replica-hours for U={', '.join(str(t) for t in PREDICTIVE_TARGETS)}")
        for info in infos:
            ratios = [r for r in info.get("oracle_perfect_ratios", []) if r is not None]  # type: ignore[attr-defined]
            cells = " ".join(f"{r:6.2f}" for r in ratios)
            print(f"{str(info['trace'])[:28]:<28} {info['delay']:>5.0f} {cells}   median {_median_worst(ratios)}")
    cases: list[tuple[float, float, Comparison, str]] = [
        (r.ratio, r.unserved - (r.reactive_unserved or 0.0), r, "whole") for r in all_rows if r.ratio is not None
    ]
    cases += [(r.heldout_ratio, r.heldout_unserved - (r.heldout_reactive_unserved or 0.0), r, "second half")
              for r in all_rows if r.heldout_ratio is not None]
    synthetic = tuple(GENERATORS)
    shared = [case for case in cases if case[2].trace not in synthetic]
    for label, selected in (
        ("every trace file, delay, target and window", shared),
        ("every synthetic trace, delay, target and window", [case for case in cases if case not in shared]),
        (f"all cases where predictive leaves more than {MATERIAL_EXCESS:g} of demand extra unserved",
         [case for case in cases if case[1] > MATERIAL_EXCESS]),
    ):
        if not selected:
            print(f"\nworst ratio over {label}: none")
            continue
        worst, excess, row, window = max(selected, key=lambda item: item[0])
        verdict = "never worse than reactive" if worst <= 1.0 + 1e-9 else "WORSE than reactive"
        print(f"\nworst ratio over {label}: {worst:.3f} ({row.trace}, {row.delay:.0f}s, U={row.target}, {window}, "
              f"{excess:+.1e} of demand): {verdict}")
    print_outside(all_rows, infos)


def print_outside(all_rows: list[Comparison], infos: list[dict[str, object]]) -> None:
    """The runs no ratio covers: predictive replica-hours beyond every reactive target swept."""
    curves = {(info["trace"], info["delay"]): info["reactive_curve"] for info in infos}
    costlier: list[tuple[float, Comparison]] = []
    cheaper = 0
    for row in all_rows:
        if row.reactive_unserved is not None:
            continue
        costs = [point[0] for point in curves[(row.trace, row.delay)]]  # type: ignore[attr-defined]
        if row.replica_hours > max(costs):
            costlier.append((row.replica_hours / max(costs), row))
        else:
            cheaper += 1
    if not costlier:
        print(f"\nruns outside the reactive curve: {cheaper}, all cheaper than its cheapest target "
              f"(U={max(REACTIVE_TARGETS)})"
              if cheaper else "\nruns outside the reactive curve: none")
        return
    factor, row = max(costlier, key=lambda item: item[0])
    print(f"\nruns costlier than the reactive HPA at every target down to U={min(EXTRA_REACTIVE_TARGETS)}: "
          f"{len(costlier)}, at most {factor:.2f}x its replica-hours ({row.trace}, {row.delay:.0f}s, U={row.target})")


def print_tick_cost(trace: Trace, days: float = 14.0) -> None:
    """What one controller tick costs on ``days`` of 1-minute history: a backtest, then a forecast."""
    history = trace.mean_rates(60.0)[: round(days * 1440)]
    grid = Grid.of(60.0, 420.0, lead_seconds=300.0)
    started = time.perf_counter()
    choice = select_model(history, grid)
    backtest = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        forecast_peak(history, grid, choice)
    forecast = (time.perf_counter() - started) / 100
    print(f"\ntick cost on {history.size} samples ({history.size / 1440:.0f} days of 1-minute history): "
          f"model choice by backtest {backtest * 1000:.0f} ms (every 6 h), forecast {forecast * 1000:.2f} ms "
          f"(every tick); chose {choice.model}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="folder of trace CSVs")
    parser.add_argument("--only", action="append", default=[], help="only traces whose name contains this")
    parser.add_argument("--peak-replicas", type=int, default=20, help="replicas the p99 rate needs at 100%%")
    parser.add_argument("--plot", type=Path, default=Path("out/scaling-day.png"), help="PNG of one day")
    parser.add_argument("--plot-trace", default="nyc_taxi", help="trace (name substring) for the plot")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the seeded synthetic traces")
    parser.add_argument("--limits", action="store_true",
                        help="also run the (non-causal) escalation and perfect-forecast bounds (80%% longer)")
    args = parser.parse_args(argv)

    files = sorted(p for p in args.traces.glob("*.csv") if not args.only or any(o in p.name for o in args.only))
    synthetic = {} if args.no_synthetic else {
        name: make for name, make in GENERATORS.items() if not args.only or any(o in name for o in args.only)
    }
    if not files and not synthetic:
        print(f"no trace CSVs in {args.traces}", file=sys.stderr)
        return 2
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    started = time.perf_counter()
    all_rows: list[Comparison] = []
    infos: list[dict[str, object]] = []
    traces: dict[str, Trace] = {}
    for path in files:
        try:
            traces[path.stem] = read_trace(path, trace_format(path))
        except TraceError as exc:  # one unreadable file costs its own row, not the whole run
            print(f"skipped: {exc}", file=sys.stderr)
    traces.update({name: make() for name, make in synthetic.items()})
    if not traces:
        print(f"no readable trace in {args.traces}", file=sys.stderr)
        return 2
    for name, trace in traces.items():
        for delay in STARTUP_DELAYS:
            rows, info = run_trace(name, trace, delay, args.peak_replicas, args.limits)
            all_rows.extend(rows)
            infos.append(info)
            print(f"  {name} startup {delay:.0f}s: {info['seconds']:.1f}s", file=sys.stderr)
    print_tables(all_rows, infos)
    print_tick_cost(max(traces.values(), key=lambda trace: trace.duration))
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
        payload = {
            "comparisons": [
                row.__dict__ | {"ratio": row.ratio, "heldout_ratio": row.heldout_ratio} for row in all_rows
            ],
            "traces": infos,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
