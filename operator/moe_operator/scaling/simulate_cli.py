"""``moe-operator simulate``: replay a traffic trace through the reactive HPA or the predictive policy.

    moe-operator simulate --trace FILE [--trace-format rate|counts|requests] [--bin-seconds B] \\
        --capacity-per-replica C --startup-delay S --target-utilization U --min-replicas A \\
        --max-replicas B --policy reactive|predictive [--horizon H] [--seasonality auto|daily|weekly|none] \\
        [--step S] [--interval S] [--lookback S] [--schedule-out FILE.csv] [--plot FILE.png] [--json]

``FILE`` is ``timestamp,value`` with value in requests/s; ``--trace-format counts`` reads a
count-per-step file (NAB) and ``--trace-format requests`` a per-request log (Azure) directly.
Both policies always run: ``--policy`` picks the row printed first and the schedule ``--schedule-out``
writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from moe_operator.api import PredictiveSpec

_DEFAULTS = PredictiveSpec()


def _checked(parse: Callable[[str], float], accept: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type that parses a number and rejects values outside ``rule`` with a message."""

    def convert(text: str) -> float:
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    convert.__name__ = "integer" if parse is int else "number"  # argparse: "invalid number value: 'x'"
    return convert


_positive_float = _checked(float, lambda value: value > 0, "> 0")
_non_negative_float = _checked(float, lambda value: value >= 0, ">= 0")
_utilization = _checked(float, lambda value: 0 < value <= 1, "in (0, 1]")
_replicas = _checked(int, lambda value: value >= 1, ">= 1")


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric that does not exist (no forecast ever made) is null."""
    return value if math.isfinite(value) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="CSV timestamp,value (requests/s from each timestamp)")
    parser.add_argument("--trace-format", choices=("rate", "counts", "requests"), default="rate",
                        help="rate (default); counts: count per step (NAB); requests: one row per request")
    parser.add_argument("--bin-seconds", type=_positive_float, default=60.0,
                        help="bin width when reading a per-request log (default 60)")
    parser.add_argument("--capacity-per-replica", type=_positive_float, required=True,
                        help="requests/s one replica serves at 100%% utilisation")
    parser.add_argument("--startup-delay", type=_non_negative_float, required=True,
                        help="seconds from pod creation to ready")
    parser.add_argument("--target-utilization", type=_utilization, required=True, help="HPA target, (0, 1]")
    parser.add_argument("--min-replicas", type=_replicas, required=True)
    parser.add_argument("--max-replicas", type=_replicas, required=True)
    parser.add_argument("--policy", choices=("reactive", "predictive"), required=True)
    parser.add_argument("--horizon", type=_positive_float, default=None,
                        help="forecast horizon in seconds (default: startup delay + 120)")
    parser.add_argument("--seasonality", choices=("auto", "daily", "weekly", "none"), default=_DEFAULTS.seasonality)
    parser.add_argument("--step", type=_positive_float, default=float(_DEFAULTS.step_seconds),
                        help="history resolution in seconds (the Prometheus query step)")
    parser.add_argument("--interval", type=_positive_float, default=float(_DEFAULTS.interval_seconds),
                        help="seconds between forecasts")
    parser.add_argument("--lookback", type=_positive_float, default=float(_DEFAULTS.lookback_seconds),
                        help="seconds of history each forecast sees")
    parser.add_argument("--schedule-out", help="write t_seconds,desired_replicas here (one row per 15 s)")
    parser.add_argument("--plot", help="PNG of demand, ready capacity and replicas for both policies")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(usage_error=parser.error)  # rules across arguments are refused like argparse's own


def _conflict(args: argparse.Namespace) -> str | None:
    """What two arguments together get wrong, naming both flags."""
    if args.min_replicas > args.max_replicas:
        return f"--min-replicas ({args.min_replicas}) must be <= --max-replicas ({args.max_replicas})"
    if args.horizon is not None and args.horizon <= args.startup_delay:
        return (
            f"--horizon ({args.horizon:g}) must be > --startup-delay ({args.startup_delay:g}): pods added for a "
            "nearer forecast are not ready before the demand arrives"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from moe_operator.scaling.policy import PolicyError
    from moe_operator.scaling.simulate import (
        SimulationConfig,
        forecast_schedule,
        plot_results,
        simulate,
        weekly_history_warning,
        write_schedule_csv,
    )
    from moe_operator.scaling.traces import TraceError, read_trace

    conflict = _conflict(args)
    if conflict is not None:
        args.usage_error(conflict)
    try:
        trace = read_trace(args.trace, args.trace_format, args.bin_seconds)
        config = SimulationConfig(
            capacity_per_replica=args.capacity_per_replica, startup_delay=args.startup_delay,
            target_utilization=args.target_utilization, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, step_seconds=args.step, interval_seconds=args.interval,
            lookback_seconds=args.lookback, horizon_seconds=args.horizon, seasonality=args.seasonality,
        )
    except (TraceError, PolicyError) as exc:
        print(f"moe-operator simulate: {exc}", file=sys.stderr)
        return 2
    if args.seasonality == "weekly" and (warning := weekly_history_warning(trace, config)) is not None:
        print(f"moe-operator simulate: warning: --seasonality weekly: {warning}", file=sys.stderr)
    schedule = forecast_schedule(trace, config)
    results = {policy: simulate(trace, config, policy, schedule) for policy in ("reactive", "predictive")}
    chosen = results[args.policy]
    if args.schedule_out:
        write_schedule_csv(chosen, args.schedule_out)
    if args.plot:
        plot_results(results, args.plot, title=f"{args.trace}: startup {args.startup_delay:g}s")
    order = [args.policy] + [p for p in results if p != args.policy]
    if args.json:
        payload = {
            "policy": args.policy,
            "results": {name: results[name].summary.as_dict() for name in order},
            "forecast": {
                "weighted_abs_error": _finite_or_none(schedule.weighted_abs_error),
                "coverage": _finite_or_none(schedule.coverage),
                "models": sorted(set(schedule.models)),
            },
        }
        print(json.dumps(payload, indent=2, allow_nan=False))
        return 0
    print(f"{'policy':<11} {'unserved':>9} {'under-time':>10} {'over-prov':>9} {'replica-h':>10} {'events':>7}")
    for name in order:
        s = results[name].summary
        print(f"{name:<11} {s.unserved_fraction:>9.4%} {s.underprovisioned_time_fraction:>10.2%} "
              f"{s.overprovisioning:>9.2%} {s.replica_hours:>10.1f} {s.scale_events:>7d}")
    return 0
