"""The predictive controller against a real Prometheus holding a real trace's history.

Prometheus (Debian's package) runs on a free loopback port; its TSDB is backfilled by promtool from
the NYC taxi trace (30-minute counts, strong daily pattern) as the runtime's request counter. The
tests drive ``run_tick`` with ``now`` moving through the history, as the kopf timer would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from moe_operator.api import MoERouterSpec, parse_spec
from moe_operator.scaling.controller import PredictiveState, TickResult, run_tick
from moe_operator.scaling.metrics import ScalingMetrics
from moe_operator.scaling.prometheus import (
    FULL_REFRESH_SECONDS,
    HistoryCache,
    RangeResult,
    default_query,
    fetch_history,
    fetch_range,
)
from moe_operator.scaling.traces import Trace, read_trace
from tests.support.prometheus import PrometheusServer, SeriesSpec, prometheus_missing, start_prometheus

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(prometheus_missing() is not None, reason=prometheus_missing() or ""),
]

TRACE = Path(__file__).resolve().parents[4] / "shared" / "traces" / "nyc_taxi.csv"
NAMESPACE = "demo"
ROUTER = "taxi"
FRESH = "fresh"
YOUNG = "young"
#: The segment replayed: a week of history, then the Thursday morning ramp (05:00-09:00 UTC in the file).
SEGMENT_START = datetime(2014, 7, 10, tzinfo=UTC).timestamp()
RAMP_DAY = datetime(2014, 7, 17, tzinfo=UTC).timestamp()
SEGMENT_END = RAMP_DAY + 12 * 3600
CAPACITY = 1.0
TARGET = 0.7
STARTUP = 300


class History:
    """The trace segment moved to end an hour ago (so the retention never drops it)."""

    def __init__(self, trace: Trace) -> None:
        keep = (trace.start + trace.times >= SEGMENT_START) & (trace.start + trace.times < SEGMENT_END)
        self.shift = math.floor((time.time() - 3600 - SEGMENT_END) / 86400) * 86400
        self.times = trace.start + trace.times[keep] + self.shift
        self.rates = trace.rates[keep]

    def at(self, original: float) -> float:
        """Epoch seconds now of a moment of the original trace."""
        return original + self.shift

    def rate(self, moment: float) -> float:
        index = int(np.searchsorted(self.times, moment, side="right")) - 1
        return float(self.rates[max(index, 0)])


@pytest.fixture(scope="module")
def history() -> History:
    if not TRACE.exists():
        pytest.skip(f"trace {TRACE} is not available")
    return History(read_trace(TRACE, "counts"))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, history: History) -> Iterator[PrometheusServer]:
    labels = {"namespace": NAMESPACE, "service": ROUTER, "moerouter": ROUTER, "pod": f"{ROUTER}-0"}
    fresh_end = history.times[-1]
    fresh_times = np.arange(fresh_end - 1200, fresh_end, 60.0)
    young_times = np.arange(fresh_end - 1800, fresh_end, 60.0)
    series = [
        SeriesSpec(labels, history.times, history.rates),
        SeriesSpec({"namespace": NAMESPACE, "service": FRESH, "moerouter": FRESH, "pod": f"{FRESH}-0"}, fresh_times,
                   np.full(fresh_times.size, 3.0)),
        SeriesSpec({"namespace": NAMESPACE, "service": YOUNG, "moerouter": YOUNG, "pod": f"{YOUNG}-0"}, young_times,
                   np.random.default_rng(0).lognormal(1.0, 0.5, young_times.size)),
    ]
    with start_prometheus(tmp_path_factory.mktemp("prometheus"), series) as server:
        yield server


def spec_for(url: str, **predictive: object) -> MoERouterSpec:
    return parse_spec({
        "runtime": {"startupSeconds": STARTUP},
        "autoscaling": {
            "enabled": True, "minReplicas": 1, "maxReplicas": 40,
            "predictive": {
                "mode": "Active", "prometheus": {"url": url, "timeoutSeconds": 5},
                "capacityPerReplica": CAPACITY, "targetUtilization": TARGET, "lookbackSeconds": 6 * 86400,
                "stepSeconds": 60, "gracePeriodSeconds": 600, "scaleDownStabilizationSeconds": 600,
                **predictive,
            },
        },
    })


def needed(rate: float) -> int:
    return max(1, math.ceil(rate / (CAPACITY * TARGET) - 1e-9))


async def tick(spec: MoERouterSpec, state: PredictiveState, moment: float, name: str = ROUTER,
               metrics: ScalingMetrics | None = None) -> TickResult:
    return await run_tick(
        spec, name=name, namespace=NAMESPACE, state=state, now=datetime.fromtimestamp(moment, tz=UTC), auth=None,
        metrics=metrics or ScalingMetrics(CollectorRegistry()),
    )


async def test_min_replicas_rises_ahead_of_the_morning_ramp(prometheus: PrometheusServer, history: History) -> None:
    spec = spec_for(prometheus.url)
    state = PredictiveState()
    moments = [history.at(RAMP_DAY + h * 3600) for h in np.arange(4.0, 9.5, 1 / 6)]
    results = [await tick(spec, state, moment) for moment in moments]
    assert {(r.condition_status, r.condition_reason) for r in results} == {("True", "Forecasting")}
    assert results[-1].prediction is not None and results[-1].prediction.model not in (None, "reactive"), [
        r.condition_message for r in results[::8]
    ]
    floors = [r.min_replicas or 0 for r in results]
    # What the pods started now will face when ready, and what reactive scaling sees now.
    ahead = [needed(history.rate(m + STARTUP)) for m in moments]
    now_needed = [needed(history.rate(m - 30)) for m in moments]
    covered = np.mean([f >= a for f, a in zip(floors, ahead, strict=True)])
    assert covered >= 0.8, list(zip(floors, ahead, strict=True))
    leading = [f > n for f, n in zip(floors, now_needed, strict=True)]
    assert sum(leading) >= len(leading) // 3  # the floor is above today's need, not just following it
    assert floors[-1] > floors[0]


async def test_outage_keeps_the_floor_for_the_grace_period_then_decays_and_recovers(
    prometheus: PrometheusServer, history: History
) -> None:
    spec = spec_for(prometheus.url)
    state = PredictiveState()
    metrics = ScalingMetrics(CollectorRegistry())
    start = history.at(RAMP_DAY + 9 * 3600)
    good = await tick(spec, state, start, metrics=metrics)
    assert good.condition_reason == "Forecasting" and good.min_replicas is not None and good.min_replicas > 4
    prometheus.stop()
    try:
        during = [await tick(spec, state, start + dt, metrics=metrics) for dt in (60, 600, 900, 1300)]
    finally:
        prometheus.start()
    assert {r.condition_reason for r in during} == {"PrometheusUnavailable"}
    assert {r.condition_status for r in during} == {"False"}
    floors = [r.min_replicas for r in during]
    assert floors[0] == floors[1] == good.min_replicas  # grace period: the last good floor holds
    assert floors[2] is not None and 1 < floors[2] < good.min_replicas  # decaying
    assert floors[3] == 1  # back to autoscaling.minReplicas
    assert "grace period over" in during[-1].condition_message
    failures = metrics.query_failures.labels(NAMESPACE, ROUTER, "PrometheusUnavailable")._value.get()
    assert failures == 4
    recovered = await tick(spec, state, start + 1360, metrics=metrics)
    assert (recovered.condition_status, recovered.condition_reason) == ("True", "Forecasting")
    assert state.consecutive_failures == 0


async def test_a_router_with_twenty_minutes_of_history_reports_insufficient_history(
    prometheus: PrometheusServer, history: History
) -> None:
    result = await tick(spec_for(prometheus.url), PredictiveState(), history.times[-1], name=FRESH)
    assert (result.condition_status, result.condition_reason) == ("False", "InsufficientHistory")
    assert result.min_replicas == 1
    # Horizon 420 s = 7 steps: a level over 7 min, 7 min until its first outcome, then 3 folds of 7
    # outcomes before the backtest can score a model.
    assert "forecasting starts after 34 min" in result.condition_message


async def test_a_router_with_thirty_minutes_of_history_is_backtested_but_still_reports_insufficient_history(
    prometheus: PrometheusServer, history: History
) -> None:
    state = PredictiveState()
    result = await tick(spec_for(prometheus.url), state, history.times[-1], name=YOUNG)
    assert state.choice is not None and state.choice.model == "reactive"  # ran, as the simulator's schedule does
    assert (result.condition_status, result.condition_reason) == ("False", "InsufficientHistory")
    assert result.min_replicas == 1
    assert "30 min of history; forecasting starts after 34 min" in result.condition_message


async def test_a_query_of_only_nan_reports_no_data(prometheus: PrometheusServer, history: History) -> None:
    spec = spec_for(prometheus.url, prometheus={"url": prometheus.url, "query": "vector(0) / 0"})
    result = await tick(spec, PredictiveState(), history.times[-1])
    assert result.condition_reason == "QueryReturnedNoData"
    assert result.min_replicas == 1


async def test_a_query_matching_nothing_reports_no_data(prometheus: PrometheusServer, history: History) -> None:
    spec = spec_for(prometheus.url, prometheus={"url": prometheus.url, "query": "rate(no_such_metric[2m])"})
    result = await tick(spec, PredictiveState(), history.times[-1])
    assert result.condition_reason == "QueryReturnedNoData"
    assert "empty result" in result.condition_message


async def test_invalid_promql_reports_the_refusal(prometheus: PrometheusServer, history: History) -> None:
    spec = spec_for(prometheus.url, prometheus={"url": prometheus.url, "query": "sum(rate("})
    result = await tick(spec, PredictiveState(), history.times[-1])
    assert result.condition_reason == "QueryFailed"
    assert "400" in result.condition_message


async def test_forecast_only_mode_reports_without_holding_a_floor(
    prometheus: PrometheusServer, history: History
) -> None:
    metrics = ScalingMetrics(CollectorRegistry())
    spec = spec_for(prometheus.url, mode="ForecastOnly")
    result = await tick(spec, PredictiveState(), history.at(RAMP_DAY + 7 * 3600), metrics=metrics)
    assert result.condition_reason == "Forecasting"
    assert result.min_replicas is None
    assert result.prediction is not None and result.prediction.recommended_replicas is not None
    assert result.prediction.applied_min_replicas is None
    assert metrics.predicted_load.labels(NAMESPACE, ROUTER)._value.get() == pytest.approx(
        result.prediction.predicted_load, rel=1e-5
    )


def test_the_default_eight_day_lookback_is_fetched_despite_the_11000_points_limit(
    prometheus: PrometheusServer, history: History
) -> None:
    # 691,200 s at 60 s is 11,521 points: one query_range is refused ("exceeded maximum resolution").
    end = history.times[-1]
    grid = fetch_range(prometheus.url, default_query(ROUTER, NAMESPACE), end=end, lookback_seconds=691_200,
                       step_seconds=60, timeout_seconds=10)  # fmt: skip
    assert grid.values.size == 11_521 and grid.series == 1
    inside = grid.start + 60 * np.arange(grid.values.size) >= history.times[0] + 600
    assert np.isfinite(grid.values[inside]).mean() > 0.99


def test_ticks_read_only_the_newest_minutes_and_see_what_a_whole_read_sees(
    prometheus: PrometheusServer, history: History
) -> None:
    windows: list[float] = []

    def spy(*args: object, **kwargs: object) -> RangeResult:
        windows.append(float(kwargs["lookback_seconds"]))  # type: ignore[arg-type]
        return fetch_range(*args, **kwargs)  # type: ignore[arg-type]

    cache, query = HistoryCache(), default_query(ROUTER, NAMESPACE)
    first = history.times[-1] - 3 * 3600
    read = {"lookback_seconds": 86_400, "step_seconds": 60, "timeout_seconds": 10, "fetch": spy}
    fetch_history(cache, prometheus.url, query, end=first, **read)  # type: ignore[arg-type]
    later = fetch_history(cache, prometheus.url, query, end=first + 300, **read)  # type: ignore[arg-type]
    assert windows == [86_400, 900]  # 5 new steps and the last 10 again
    whole = fetch_range(prometheus.url, query, end=first + 300, lookback_seconds=86_400, step_seconds=60,
                        timeout_seconds=10)  # fmt: skip
    assert later.start == whole.start
    np.testing.assert_allclose(later.values, whole.values, equal_nan=True)
    fetch_history(cache, prometheus.url, query, end=first + FULL_REFRESH_SECONDS + 60, **read)  # type: ignore[arg-type]
    fetch_history(cache, prometheus.url, "2 * " + query, end=first + FULL_REFRESH_SECONDS + 120, **read)  # type: ignore[arg-type]
    assert windows[2:] == [86_400, 86_400]  # the hourly whole read, and a changed query
