"""The predictive timer's work for one MoERouter: fetch, forecast, recommend, hold the floor.

``run_tick`` never raises for Prometheus faults or bad data: it returns the ``PredictionReady``
condition to report and, in Active mode, the HPA minReplicas to hold (the last good floor during the
grace period, then a decay to ``autoscaling.minReplicas``). The handler writes the status and
patches the HPA; this module does no Kubernetes I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import ValidationError

from moe_operator.api import MoERouterSpec, PredictionStatus
from moe_operator.phase import router_phase
from moe_operator.scaling.forecast import (
    BACKTEST_SPAN_SECONDS,
    CONFIRMATION_SECONDS,
    PEAK_CAP,
    ForecastError,
    Grid,
    ModelChoice,
    Seasonality,
    confirmation_lag,
    forecast_peak,
    incumbent_model,
    peak_cap,
    select_model,
)
from moe_operator.scaling.metrics import ScalingMetrics, scaling_metrics, server_label
from moe_operator.scaling.policy import (
    REFIT_SECONDS,
    FloorMemory,
    FloorSettings,
    default_horizon_seconds,
    floor_on_failure,
    floor_on_success,
    floor_recommendation,
    refit_due,
    refit_period,
    restored_floor,
)
from moe_operator.scaling.prometheus import (
    NO_DATA,
    UNAVAILABLE,
    HistoryCache,
    PrometheusAuth,
    PrometheusQueryError,
    RangeResult,
    default_query,
    fetch_history,
    fetch_time_limit,
    spread_first_refresh,
)

logger = logging.getLogger(__name__)

FORECASTING = "Forecasting"
INSUFFICIENT_HISTORY = "InsufficientHistory"
FORECAST_FAILED = "ForecastFailed"
PREDICTION_OFF = "PredictionOff"
#: History whose newest sample is older than this many steps (and at least 5 min) is stale.
STALE_STEPS = 5
STALE_MIN_SECONDS = 300.0
#: Extra seconds the awaiting side allows beyond the HTTP timeouts of a fetch before giving up on it.
FETCH_GUARD_SECONDS = 5.0
#: Threads for Prometheus queries, none shared with the Kubernetes client: a slow or hanging Prometheus
#: delays other MoERouters' queries, never a reconcile.
PROMETHEUS_WORKERS = 8
PROMETHEUS_POOL = ThreadPoolExecutor(max_workers=PROMETHEUS_WORKERS, thread_name_prefix="prometheus")


@dataclass
class PredictiveState:
    """Per-MoERouter memory between ticks (create one per MoERouter; default-constructible)."""

    floor: FloorMemory = field(default_factory=FloorMemory)
    choice: ModelChoice | None = None
    choice_at: float | None = None
    #: History samples the cached choice was made on (a young history is re-fitted as it grows).
    choice_samples: int = 0
    #: The settings the cached choice was made for; a spec change forces a new backtest.
    choice_key: tuple[float, int, str, float] | None = None
    consecutive_failures: int = 0
    last_prediction: PredictionStatus | None = None
    #: The history fetched so far: a tick reads only the newest minutes of it from Prometheus.
    history: HistoryCache = field(default_factory=HistoryCache)
    #: The last fetch handed to the Prometheus pool, and when (monotonic clock). One still running at the
    #: next tick was given up on (its answer is dropped): no other is sent for this MoERouter until it ends.
    fetch: Future[RangeResult] | None = None
    fetch_sent_at: float = 0.0


def restored_state(spec: MoERouterSpec, prediction: Mapping[str, Any] | None, now: datetime) -> PredictiveState:
    """The first state of a MoERouter this process has not ticked yet (operator restart, HA failover).

    From the ``status.prediction`` the previous process wrote: the last prediction (what a failing tick
    reports) and, in Active mode, the floor in force since ``updatedAt`` (``policy.restored_floor``), so
    a restart neither skips the grace period nor the stabilisation window. Anything unreadable is left out.
    """
    state = PredictiveState()
    if not prediction:
        return state
    fields = {name for field_info in PredictionStatus.model_fields.values() if (name := field_info.alias)}
    try:
        state.last_prediction = PredictionStatus.model_validate(
            {key: value for key, value in prediction.items() if key in fields}
        )
    except ValidationError:
        return state
    applied = state.last_prediction.applied_min_replicas
    updated_at = _parse_rfc3339(state.last_prediction.updated_at)
    active = spec.autoscaling.enabled and spec.autoscaling.predictive.mode == "Active"
    if active and applied is not None and updated_at is not None:
        state.floor = restored_floor(applied, updated_at, now.timestamp(), _floor_settings(spec))
    return state


def _parse_rfc3339(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class TickResult:
    prediction: PredictionStatus | None
    condition_status: str
    condition_reason: str
    condition_message: str
    min_replicas: int | None


async def _fetch(
    state: PredictiveState, url: str, query: str, guard_seconds: float, executor: Executor, **read: Any
) -> RangeResult:
    """``fetch_history`` in ``executor``, given up on after ``guard_seconds`` (raises TimeoutError then).

    The thread reads into a copy of the cached history, which becomes the cache only when the answer comes
    in time: a query given up on writes nothing a tick can see.
    """
    fresh = dataclasses.replace(state.history)
    state.fetch = executor.submit(fetch_history, fresh, url, query, **read)
    state.fetch_sent_at = time.monotonic()
    async with asyncio.timeout(guard_seconds):
        result = await asyncio.wrap_future(state.fetch)
    state.history = fresh
    return result


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _floor_settings(spec: MoERouterSpec) -> FloorSettings:
    auto = spec.autoscaling
    pred = auto.predictive
    return FloorSettings(
        min_replicas=auto.min_replicas,
        max_replicas=auto.max_replicas,
        stabilization_seconds=pred.scale_down_stabilization_seconds,
        grace_period_seconds=pred.grace_period_seconds,
        # The decay after the grace period is as gradual as a scale-down through the window.
        decay_seconds=max(pred.scale_down_stabilization_seconds, pred.interval_seconds),
    )


def usable_history(result: RangeResult, now: float) -> np.ndarray:
    """The fetched samples from the first real one on (NaN marks gaps); raises on stale data."""
    finite = np.flatnonzero(np.isfinite(result.values))
    newest = result.start + float(finite[-1]) * result.step
    stale_after = max(STALE_STEPS * result.step, STALE_MIN_SECONDS)
    if now - newest > stale_after:
        raise PrometheusQueryError(
            NO_DATA, f"the newest sample is {now - newest:.0f} s old (more than {stale_after:.0f} s): stale data"
        )
    return np.asarray(result.values[int(finite[0]) :], dtype=np.float64)


async def run_tick(
    spec: MoERouterSpec, *, name: str, namespace: str, state: PredictiveState, now: datetime,
    auth: PrometheusAuth | None, metrics: ScalingMetrics | None = None, refused: tuple[str, str] | None = None,
    executor: Executor = PROMETHEUS_POOL,
) -> TickResult:
    """One tick of the predictive controller (see the module docstring).

    ``refused`` is ``(reason, message)`` when no query can be made (a credentials Secret is missing): the tick
    fails like a query that failed, with the same grace period and decay of the floor. The query runs in
    ``executor``; the tick waits for it as long as its HTTP timeouts allow (``fetch_time_limit``) plus
    ``FETCH_GUARD_SECONDS``, and while a query it gave up on still runs, the next ticks fail at once.
    """
    metrics = metrics or scaling_metrics()
    pred = spec.autoscaling.predictive
    if pred.mode == "Off" or pred.prometheus is None or pred.capacity_per_replica is None:
        return TickResult(None, "False", PREDICTION_OFF, "autoscaling.predictive.mode is Off", None)
    active = pred.mode == "Active" and spec.autoscaling.enabled
    moment = now.timestamp()
    settings = _floor_settings(spec)
    horizon = default_horizon_seconds(pred.horizon_seconds, spec.runtime.startup_seconds)
    grid = Grid.of(pred.step_seconds, horizon, lead_seconds=spec.runtime.startup_seconds)
    query = pred.prometheus.query or default_query(name, namespace)
    labels = (namespace, name)
    if not active:
        metrics.forget_floor(*labels)  # no floor is held: none is exported (e.g. after Active -> ForecastOnly)

    if refused is not None:
        return _failure(state, moment, *refused, active, settings, metrics, labels)
    if state.fetch is not None and not state.fetch.done():
        message = (
            f"the query this MoERouter sent to Prometheus {time.monotonic() - state.fetch_sent_at:.0f} s ago is "
            "still running: no other is sent until it ends"
        )
        return _failure(state, moment, UNAVAILABLE, message, active, settings, metrics, labels)
    timeout = pred.prometheus.timeout_seconds
    guard = fetch_time_limit(pred.lookback_seconds, pred.step_seconds, timeout) + FETCH_GUARD_SECONDS
    phase = router_phase(namespace, name)
    started = time.perf_counter()
    try:
        result = await _fetch(
            state, pred.prometheus.url, query, guard, executor, end=moment, lookback_seconds=pred.lookback_seconds,
            step_seconds=pred.step_seconds, timeout_seconds=timeout, auth=auth,
            first_refresh_seconds=spread_first_refresh(phase),
        )
        metrics.query_seconds.labels(server_label(pred.prometheus.url)).observe(time.perf_counter() - started)
        history = usable_history(result, moment)
    except PrometheusQueryError as exc:
        return _failure(state, moment, exc.reason, exc.message, active, settings, metrics, labels)
    except TimeoutError:
        if state.fetch is not None and state.fetch.cancel():  # still queued: it will never run
            message = (
                f"the query waited {guard:g} s for one of the {PROMETHEUS_WORKERS} Prometheus query threads, "
                "all busy with other MoERouters' queries"
            )
        else:
            message = f"no answer from Prometheus within {timeout:g} s"
        return _failure(state, moment, UNAVAILABLE, message, active, settings, metrics, labels)
    except Exception as exc:  # a fault of the client library must never stop the timer
        logger.exception("Prometheus query for %s/%s failed unexpectedly", namespace, name)
        message = f"unexpected error querying Prometheus: {type(exc).__name__}: {exc}"
        return _failure(state, moment, UNAVAILABLE, message, active, settings, metrics, labels)

    state.consecutive_failures = 0
    if history.size < grid.min_history:
        applied = floor_on_success(state.floor, moment, settings.min_replicas, settings)
        prediction = PredictionStatus(
            horizon_seconds=horizon, model=None, updated_at=_rfc3339(moment),
            applied_min_replicas=applied if active else None,
        )
        state.last_prediction = prediction
        message = _too_young(history.size, grid, pred.step_seconds)
        return TickResult(prediction, "False", INSUFFICIENT_HISTORY, message, applied if active else None)

    try:
        choice = _current_choice(
            state, history, grid, pred.seasonality, settings.stabilization_seconds, moment, refit_period(phase)
        )
        predicted = float(forecast_peak(history, grid, choice)[0])
    except ForecastError as exc:
        return _failure(state, moment, FORECAST_FAILED, str(exc), active, settings, metrics, labels)

    recommendation = floor_recommendation(
        predicted, choice.uses_floor, pred.capacity_per_replica, pred.target_utilization,
        settings.min_replicas, settings.max_replicas,
    )
    applied = floor_on_success(state.floor, moment, recommendation, settings)
    prediction = PredictionStatus(
        predicted_load=round(predicted, 6), horizon_seconds=horizon, recommended_replicas=recommendation,
        applied_min_replicas=applied if active else None, model=choice.model,
        backtest_error=round(choice.error, 6), updated_at=_rfc3339(moment),
    )
    state.last_prediction = prediction
    metrics.predicted_load.labels(*labels).set(predicted)
    metrics.recommended_replicas.labels(*labels).set(recommendation)
    metrics.backtest_error.labels(*labels).set(choice.error)
    if active:
        metrics.applied_min_replicas.labels(*labels).set(applied)
    capped = choice.uses_floor and predicted >= peak_cap(history)
    # As the choice's own backtest confirmed it: on the history it was made from.
    confirmation_seconds = confirmation_lag(state.choice_samples, grid) * grid.step_seconds
    message = forecast_message(choice, predicted, horizon, recommendation, capped, confirmation_seconds)
    if pred.mode == "Active" and not active:
        message += "; autoscaling.enabled is false, so there is no HPA to hold the floor on"
    if not choice.uses_floor and history.size < grid.scorable_history:
        # The backtest ran (it sets the refit schedule) but could score no model yet.
        message = _too_young(history.size, grid, pred.step_seconds)
        return TickResult(prediction, "False", INSUFFICIENT_HISTORY, message, applied if active else None)
    return TickResult(prediction, "True", FORECASTING, message, applied if active else None)


def forecast_message(
    choice: ModelChoice,
    predicted: float,
    horizon: int,
    recommendation: int,
    capped: bool = False,
    confirmation_seconds: float = CONFIRMATION_SECONDS,
) -> str:
    """The ``PredictionReady`` message of a tick that forecast: the floor, or why there is none.

    ``confirmation_seconds``: how much of the newest history the confirming backtest left out
    (``forecast.confirmation_lag``).
    """
    if choice.uses_floor:
        cap = f" (capped at {PEAK_CAP:g}x the lookback's highest rate)" if capped else ""
        return (
            f"{choice.model}: peak {predicted:.4g} requests/s{cap} within {horizon} s -> {recommendation} replicas "
            f"(backtest error {choice.error:.3f}, reactive {choice.baseline_error:.3f})"
        )
    if choice.pending is not None:
        if confirmation_seconds >= CONFIRMATION_SECONDS:
            earlier = f"{CONFIRMATION_SECONDS // 3600} h ago"
        else:
            earlier = f"{confirmation_seconds / 60:.0f} min ago (a quarter of the history, while it is under a day)"
        return (
            f"{choice.pending} beat reactive scaling in this backtest but not in the one {earlier}: "
            "no floor until it is confirmed"
        )
    refused = choice.record(choice.refused) if choice.refused is not None else None
    if refused is not None:
        return (
            f"{choice.refused} beat reactive scaling in the last {BACKTEST_SPAN_SECONDS // 86400:.0f} days but not "
            f"over its long-run record ({refused.score:.2f}x reactive's shortfall at equal cost): "
            "no floor above minReplicas"
        )
    return (
        f"no forecaster beat reactive scaling in the backtest (error {choice.error:.3f}): "
        "no floor above minReplicas"
    )


def _too_young(samples: int, grid: Grid, step_seconds: float) -> str:
    have, need = samples * step_seconds / 60.0, grid.scorable_history * step_seconds / 60.0
    return f"{have:.0f} min of history; forecasting starts after {need:.0f} min (no floor until then)"


def _current_choice(
    state: PredictiveState, history: np.ndarray, grid: Grid, seasonality: Seasonality, hold: float, now: float,
    period_seconds: float = REFIT_SECONDS,
) -> ModelChoice:
    key = (grid.step_seconds, grid.horizon, seasonality, hold)
    fresh = (
        state.choice is not None
        and state.choice_key == key
        and state.choice_at is not None
        and not refit_due(now - state.choice_at, state.choice_samples, history.size, period_seconds)
    )
    if fresh and state.choice is not None:
        return state.choice
    previous = state.choice if state.choice_key == key else None
    # The floor in force and each model's long-run record go on from choice to choice; the history ends now.
    choice = select_model(
        history, grid, seasonality, floor_hold_seconds=hold, incumbent=incumbent_model(previous),
        records=previous.records if previous is not None else (), end_seconds=now,
    )
    state.choice, state.choice_at, state.choice_key = choice, now, key
    state.choice_samples = history.size
    return choice


def _failure(
    state: PredictiveState, now: float, reason: str, message: str, active: bool,
    settings: FloorSettings, metrics: ScalingMetrics, labels: tuple[str, str],
) -> TickResult:
    state.consecutive_failures += 1
    metrics.query_failures.labels(*labels, reason).inc()
    applied = floor_on_failure(state.floor, now, settings)
    if active:
        metrics.applied_min_replicas.labels(*labels).set(applied)
    if state.floor.last_good_at is None:
        holding = f"minReplicas stays at {applied}"
    else:
        grace_end = state.floor.last_good_at + settings.grace_period_seconds
        if now <= grace_end:
            holding = f"keeping minReplicas {applied} from the last good forecast until {_rfc3339(grace_end)}"
        elif applied > settings.min_replicas:
            holding = f"grace period over: minReplicas decaying, now {applied}"
        else:
            holding = f"grace period over: minReplicas back to {applied}"
    prediction = None
    if state.last_prediction is not None:
        prediction = state.last_prediction.model_copy(
            update={"applied_min_replicas": applied if active else None}
        )
        state.last_prediction = prediction
    failures = f"{state.consecutive_failures} failed tick{'s' if state.consecutive_failures != 1 else ''}"
    status_message = f"{message}; {holding} ({failures})"
    return TickResult(prediction, "False", reason, status_message, applied if active else None)


def horizon_of(spec: MoERouterSpec) -> int:
    """The forecast horizon in force for a spec (for the handler's printer columns and docs)."""
    pred = spec.autoscaling.predictive
    return default_horizon_seconds(pred.horizon_seconds, spec.runtime.startup_seconds)


__all__ = [
    "PredictiveState", "TickResult", "horizon_of", "restored_state", "router_phase", "run_tick", "usable_history"
]
