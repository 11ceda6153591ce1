"""Trace replay: the HPA model alone (``reactive``) or with the predictive floor (``predictive``).

The same policy code as the live controller (``policy`` and ``forecast``); only the data source
differs. Time steps at the HPA sync period (15 s) from the trace start; the demand holds each trace
sample's rate until the next sample. **Causality:** every decision at time ``t`` sees demand only up
to ``t - METRIC_LAG_SECONDS``: the HPA reads the rate at that instant, and the forecaster reads the
mean rate of each ``step_seconds`` bin that ended by then (what a Prometheus range query returns).
The first sample is the state the system starts in: the initial replicas serve it, all ready.

Pure apart from the CSV/PNG writers at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from moe_operator.api import PredictiveSpec
from moe_operator.scaling.forecast import (
    DEFAULT_QUANTILE,
    SEASONAL_WEEKLY,
    WEEK_SECONDS,
    ForecastError,
    Grid,
    ModelChoice,
    Seasonality,
    candidate_models,
    fill_gaps,
    forecast_peak,
    future_peak,
    incumbent_model,
    seasonal_min_history,
    select_model,
)
from moe_operator.scaling.policy import (
    HPA_SYNC_SECONDS,
    METRIC_LAG_SECONDS,
    FloorMemory,
    FloorSettings,
    HpaModel,
    PolicyError,
    default_horizon_seconds,
    floor_on_success,
    floor_recommendation,
    recommended_replicas,
    refit_due,
)
from moe_operator.scaling.traces import Trace

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Policy = Literal["reactive", "predictive"]
POLICIES: tuple[Policy, ...] = ("reactive", "predictive")

_SPEC_DEFAULTS = PredictiveSpec()


@dataclass(frozen=True)
class SimulationConfig:
    """One replay. Predictive settings default to ``PredictiveSpec``'s defaults."""

    capacity_per_replica: float
    startup_delay: float
    target_utilization: float
    min_replicas: int
    max_replicas: int
    step_seconds: float = _SPEC_DEFAULTS.step_seconds
    interval_seconds: float = _SPEC_DEFAULTS.interval_seconds
    lookback_seconds: float = _SPEC_DEFAULTS.lookback_seconds
    horizon_seconds: float | None = None
    seasonality: Seasonality = _SPEC_DEFAULTS.seasonality
    stabilization_seconds: float = _SPEC_DEFAULTS.scale_down_stabilization_seconds
    quantile: float = DEFAULT_QUANTILE
    #: Metrics cover ``t >= evaluate_from`` seconds (both policies alike); earlier steps only warm up.
    evaluate_from: float = 0.0

    def __post_init__(self) -> None:
        if not self.capacity_per_replica > 0:
            raise PolicyError(f"capacity per replica must be > 0, got {self.capacity_per_replica}")
        if not 0 < self.target_utilization <= 1:
            raise PolicyError(f"target utilization must be in (0, 1], got {self.target_utilization}")
        if self.startup_delay < 0:
            raise PolicyError(f"startup delay must be >= 0 seconds, got {self.startup_delay}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise PolicyError(
                f"need 1 <= min replicas ({self.min_replicas}) <= max replicas ({self.max_replicas})"
            )
        if self.interval_seconds < HPA_SYNC_SECONDS or self.step_seconds <= 0:
            raise PolicyError("interval must be >= 15 s and step > 0 s")

    @property
    def horizon(self) -> float:
        if self.horizon_seconds is not None:
            return self.horizon_seconds
        return default_horizon_seconds(None, math.ceil(self.startup_delay))

    @property
    def lookback_samples(self) -> int:
        return max(1, round(self.lookback_seconds / self.step_seconds))

    @property
    def grid(self) -> Grid:
        return Grid.of(self.step_seconds, self.horizon, lead_seconds=self.startup_delay)


@dataclass(frozen=True)
class ForecastSchedule:
    """What the predictive controller computed at each tick (a function of the demand history only)."""

    tick_times: FloatArray
    predicted_load: FloatArray
    uses_floor: npt.NDArray[np.bool_]
    models: tuple[str, ...]
    #: Forecast error over ticks with a floor: weighted absolute error of the quantile forecast of the
    #: peak, and the fraction of ticks whose actual peak it covered.
    weighted_abs_error: float
    coverage: float

    def recommendations(self, config: SimulationConfig) -> IntArray:
        return np.asarray(
            [
                floor_recommendation(
                    float(load), bool(floor), config.capacity_per_replica, config.target_utilization,
                    config.min_replicas, config.max_replicas,
                )
                for load, floor in zip(self.predicted_load, self.uses_floor, strict=True)
            ],
            dtype=np.int64,
        )


@dataclass(frozen=True)
class SimulationSummary:
    unserved_fraction: float
    underprovisioned_time_fraction: float
    overprovisioning: float
    replica_hours: float
    scale_events: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "unserved_fraction": self.unserved_fraction,
            "underprovisioned_time_fraction": self.underprovisioned_time_fraction,
            "overprovisioning": self.overprovisioning,
            "replica_hours": self.replica_hours,
            "scale_events": self.scale_events,
        }


@dataclass(frozen=True)
class SimulationResult:
    policy: Policy
    times: FloatArray
    demand: FloatArray
    desired: IntArray
    ready: IntArray
    floor: IntArray
    summary: SimulationSummary
    capacity_per_replica: float
    models: tuple[str, ...] = field(default=())


def tick_origins(tick_times: FloatArray, step_seconds: float) -> IntArray:
    """How many whole history bins have ended by ``t - METRIC_LAG_SECONDS`` at each tick."""
    return np.floor((tick_times - METRIC_LAG_SECONDS) / step_seconds + 1e-9).astype(np.int64)


def history_samples(origins: IntArray, config: SimulationConfig) -> IntArray:
    """Samples of history the forecast at each origin sees: everything so far, up to the lookback."""
    return np.minimum(np.maximum(origins, 0), config.lookback_samples)


def most_history_samples(trace: Trace, config: SimulationConfig) -> int:
    """The most history any forecast of the replay sees: its last tick's, up to the lookback."""
    last_tick = np.arange(0.0, trace.duration, config.interval_seconds)[-1:]
    return int(history_samples(tick_origins(last_tick, config.step_seconds), config).max(initial=0))


def weekly_history_warning(trace: Trace, config: SimulationConfig) -> str | None:
    """Why seasonality ``weekly`` cannot pick the weekly model anywhere in this replay, if it cannot."""
    grid = config.grid
    needed = seasonal_min_history(SEASONAL_WEEKLY, grid) * grid.step_seconds
    seen = most_history_samples(trace, config) * grid.step_seconds
    if seen >= needed:
        return None
    fallback = ", ".join(model for model in candidate_models("weekly") if model != SEASONAL_WEEKLY)
    return (
        f"the weekly model needs {needed / 3600:.1f} h of history (a week plus "
        f"{(needed - WEEK_SECONDS) / 3600:.1f} h for its window, horizon and backtest) and this replay's "
        f"forecasts see at most {seen / 3600:.1f} h (the trace, up to the lookback); they choose among "
        f"{fallback} or stay reactive"
    )


def forecast_schedule(trace: Trace, config: SimulationConfig) -> ForecastSchedule:
    """Run the predictive controller's forecast at every tick of the replay, causally.

    The model is re-chosen by backtest on the lookback window whenever ``refit_due`` says so, as the
    live controller does; between refits the chosen model forecasts each tick from the history it had.
    """
    grid = config.grid
    history = trace.mean_rates(config.step_seconds)
    ticks = np.arange(0.0, trace.duration, config.interval_seconds)
    origins = tick_origins(ticks, config.step_seconds)
    lookback = config.lookback_samples
    predicted = np.full(ticks.size, np.nan)
    uses_floor = np.zeros(ticks.size, dtype=bool)
    samples = history_samples(origins, config)
    # Like the controller: the first backtest as soon as the history suffices, then when refit_due.
    sufficient = np.flatnonzero(origins >= grid.min_history)
    first_fit = int(sufficient[0]) if sufficient.size else ticks.size
    models = ["insufficient-history"] * first_fit
    block_start = first_fit
    choice: ModelChoice | None = None
    while block_start < ticks.size:
        block = slice(block_start, _next_refit(ticks, samples, block_start))
        block_start = block.stop
        first = int(origins[block.start])
        choice = _choose(history[max(0, first - lookback) : first], grid, config, choice, first * config.step_seconds)
        block_origins = origins[block]
        # As the controller reports it: below ``scorable_history`` no model could be scored yet.
        models.extend(
            "insufficient-history" if choice is None or (not choice.uses_floor and origin < grid.scorable_history)
            else choice.model
            for origin in block_origins.tolist()
        )
        if choice is None:
            continue
        low = max(0, int(block_origins.min()) - lookback)
        window = history[low : int(block_origins.max())]
        predicted[block] = forecast_peak(window, grid, choice, block_origins - low, lookback)
        uses_floor[block] = choice.uses_floor
    error, coverage = _forecast_quality(history, origins, predicted, uses_floor, grid)
    return ForecastSchedule(ticks, predicted, uses_floor, tuple(models), error, coverage)


def _next_refit(ticks: FloatArray, samples: IntArray, fitted: int) -> int:
    """The first tick after ``fitted`` at which ``refit_due`` asks for a new backtest (or the end)."""
    for k in range(fitted + 1, ticks.size):
        if refit_due(float(ticks[k] - ticks[fitted]), int(samples[fitted]), int(samples[k])):
            return k
    return int(ticks.size)


def _choose(
    window: FloatArray, grid: Grid, config: SimulationConfig, previous: ModelChoice | None, end_seconds: float
) -> ModelChoice | None:
    if window.size < grid.min_history or not np.isfinite(window).any():
        return None
    try:
        return select_model(
            window, grid, config.seasonality, config.quantile, floor_hold_seconds=config.stabilization_seconds,
            incumbent=incumbent_model(previous), records=previous.records if previous is not None else (),
            end_seconds=end_seconds,
        )
    except ForecastError:
        return None


def _forecast_quality(
    history: FloatArray, origins: IntArray, predicted: FloatArray, uses_floor: npt.NDArray[np.bool_], grid: Grid
) -> tuple[float, float]:
    scored = uses_floor & (origins + grid.horizon <= history.size) & np.isfinite(predicted)
    if not scored.any():
        return math.nan, math.nan
    actual = future_peak(fill_gaps(history), origins[scored], grid.horizon)
    forecast = predicted[scored]
    error = float(np.sum(np.abs(forecast - actual)) / max(float(np.sum(actual)), 1e-12))
    return error, float(np.mean(actual <= forecast))


def simulate(
    trace: Trace, config: SimulationConfig, policy: Policy, schedule: ForecastSchedule | None = None
) -> SimulationResult:
    """Replay ``trace`` through the HPA model, with the predictive floor when ``policy`` says so.

    ``schedule`` lets a caller reuse the forecasts across HPA settings (they depend on the history,
    the step and the horizon only); it is computed here when absent.
    """
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; expected reactive or predictive")
    times = np.arange(0.0, trace.duration, HPA_SYNC_SECONDS)
    demand = trace.rate_at(times)
    lagged_at = times - METRIC_LAG_SECONDS
    observed = np.where(lagged_at >= 0, trace.rate_at(np.maximum(lagged_at, 0.0)), np.nan)
    floors = np.full(times.size, config.min_replicas, dtype=np.int64)
    models: tuple[str, ...] = ()
    if policy == "predictive":
        schedule = schedule if schedule is not None else forecast_schedule(trace, config)
        floors = _floors(times, schedule, config)
        models = schedule.models
    hpa = HpaModel(config.capacity_per_replica, config.target_utilization, config.max_replicas)
    initial = recommended_replicas(
        float(trace.rates[0]), config.capacity_per_replica, config.target_utilization,
        config.min_replicas, config.max_replicas,
    )
    created: list[float] = [-math.inf] * initial
    ready_count = initial
    desired = np.empty(times.size, dtype=np.int64)
    ready = np.empty(times.size, dtype=np.int64)
    delay = config.startup_delay
    for i, t in enumerate(times.tolist()):
        current = len(created)
        while ready_count < current and created[ready_count] + delay <= t:
            ready_count += 1
        load = observed[i]
        floor = int(floors[i])
        if math.isnan(load):
            target = max(current, min(floor, config.max_replicas))
        else:
            target = hpa.desired(t, float(load), current, ready_count, floor)
        if target > current:
            created.extend([t] * (target - current))
        elif target < current:
            # The ReplicaSet removes pods that are not ready first, then the newest.
            del created[target:]
            ready_count = min(ready_count, target)
        while ready_count < len(created) and created[ready_count] + delay <= t:
            ready_count += 1
        desired[i] = len(created)
        ready[i] = ready_count
    summary = summarize(times, demand, desired, ready, config)
    return SimulationResult(policy, times, demand, desired, ready, floors, summary, config.capacity_per_replica, models)


def _floors(times: FloatArray, schedule: ForecastSchedule, config: SimulationConfig) -> IntArray:
    """The minReplicas the controller holds at each HPA sync (the last tick's, stabilised)."""
    settings = FloorSettings(
        config.min_replicas, config.max_replicas, config.stabilization_seconds, 0.0, config.stabilization_seconds
    )
    memory = FloorMemory()
    recommendations = schedule.recommendations(config)
    applied = np.empty(schedule.tick_times.size, dtype=np.int64)
    for k, (t, rec) in enumerate(zip(schedule.tick_times.tolist(), recommendations.tolist(), strict=True)):
        applied[k] = floor_on_success(memory, t, int(rec), settings)
    index = np.searchsorted(schedule.tick_times, times, side="right") - 1
    return np.asarray(applied[np.clip(index, 0, None)], dtype=np.int64)


def summarize(
    times: FloatArray, demand: FloatArray, desired: IntArray, ready: IntArray, config: SimulationConfig
) -> SimulationSummary:
    keep = times >= config.evaluate_from
    d = demand[keep]
    capacity = ready[keep] * config.capacity_per_replica
    total = max(float(np.sum(d)), 1e-12)
    changes = np.count_nonzero(np.diff(desired[keep])) if keep.sum() > 1 else 0
    return SimulationSummary(
        unserved_fraction=float(np.sum(np.maximum(d - capacity, 0.0)) / total),
        underprovisioned_time_fraction=float(np.mean(d > capacity + 1e-9)) if d.size else 0.0,
        overprovisioning=float(np.sum(np.maximum(capacity - d, 0.0)) / total),
        replica_hours=float(np.sum(desired[keep]) * HPA_SYNC_SECONDS / 3600.0),
        scale_events=int(changes),
    )


def write_schedule_csv(result: SimulationResult, path: str | Path) -> None:
    """``t_seconds,desired_replicas``: one row per 15 s step from the trace start."""
    rows = ["t_seconds,desired_replicas"]
    rows.extend(f"{t:g},{n}" for t, n in zip(result.times.tolist(), result.desired.tolist(), strict=True))
    Path(path).write_text("\n".join(rows) + "\n")


def plot_results(
    results: Mapping[str, SimulationResult], path: str | Path, start: float = 0.0, end: float | None = None,
    title: str = "",
) -> None:
    """Demand, ready capacity and replicas of each policy over ``[start, end)`` seconds, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    first = next(iter(results.values()))
    keep = (first.times >= start) & (first.times < (end if end is not None else math.inf))
    hours = first.times[keep] / 3600.0
    top.plot(hours, first.demand[keep], color="black", linewidth=1.0, label="demand (requests/s)")
    for name, result in results.items():
        top.step(hours, result.ready[keep] * result.capacity_per_replica, where="post", label=f"{name} ready capacity")
        bottom.step(hours, result.desired[keep], where="post", label=f"{name} replicas")
        if result.policy == "predictive":
            bottom.step(hours, result.floor[keep], where="post", linestyle=":", label=f"{name} minReplicas floor")
    top.set_ylabel("requests/s")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("hours since trace start")
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    if title:
        top.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
