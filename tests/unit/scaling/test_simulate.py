"""Trace replay: known answers, causality, and the outputs of ``moe-operator simulate``."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_operator.cli import main
from moe_operator.scaling import forecast
from moe_operator.scaling.forecast import BURST_RESERVE, MODELS, PEAK_CAP, SEASONAL_WEEKLY, seasonal_min_history
from moe_operator.scaling.policy import PolicyError
from moe_operator.scaling.simulate import (
    POLICIES,
    SimulationConfig,
    forecast_schedule,
    simulate,
    tick_origins,
    weekly_history_warning,
    write_schedule_csv,
)
from moe_operator.scaling.synthetic import bursty_daily
from moe_operator.scaling.traces import Trace, format_rate_csv, from_rate_samples

DAY = 86400.0


def step_trace() -> Trace:
    """10 requests/s for an hour, then 40 requests/s for an hour (one sample a minute)."""
    times = np.arange(0.0, 7200.0, 60.0)
    return from_rate_samples(times, np.where(times < 3600, 10.0, 40.0))


def office_trace(days: int = 7, step: float = 600.0) -> Trace:
    """Night 20 requests/s, 08:00-20:00 100 requests/s, with a little deterministic noise."""
    times = np.arange(0.0, days * DAY, step)
    hours = (times % DAY) / 3600.0
    rng = np.random.default_rng(5)
    rates = np.where((hours >= 8) & (hours < 20), 100.0, 20.0) * rng.normal(1.0, 0.03, times.size)
    return from_rate_samples(times + 1.7e9, rates)


def test_a_step_up_leaves_exactly_the_startup_gap_unserved() -> None:
    config = SimulationConfig(capacity_per_replica=1.0, startup_delay=300, target_utilization=0.5,
                              min_replicas=1, max_replicas=1000)
    result = simulate(step_trace(), config, "reactive")
    unserved = np.maximum(result.demand - result.ready * config.capacity_per_replica, 0).sum() * 15
    # 20 pods serve 10/s at 50%; at 3600 s demand is 40/s. The HPA sees it at 3630 s (30 s lag) and
    # asks for 40 pods, ready 300 s later: 20 requests/s unserved for 330 s.
    assert unserved == pytest.approx(20 * 330)
    assert result.ready[result.times >= 3930].min() >= 40


def test_constant_demand_holds_a_constant_replica_count() -> None:
    trace = from_rate_samples([0.0, 3600.0], [35.0, 35.0])
    config = SimulationConfig(10.0, 300, 0.7, 1, 50)
    result = simulate(trace, config, "reactive")
    assert set(result.desired.tolist()) == {5}
    assert result.summary.unserved_fraction == 0.0
    assert result.summary.scale_events == 0


def test_replicas_never_exceed_max_replicas() -> None:
    config = SimulationConfig(1.0, 300, 0.5, 1, 30)
    for policy in POLICIES:
        assert simulate(step_trace(), config, policy).desired.max() <= 30


def test_replica_hours_count_starting_pods() -> None:
    trace = from_rate_samples([0.0, 1800.0], [35.0, 35.0])
    result = simulate(trace, SimulationConfig(10.0, 300, 0.7, 1, 50), "reactive")
    assert result.summary.replica_hours == pytest.approx(5 * 3600 / 3600)


@pytest.mark.parametrize("policy", ["reactive", "predictive"])
def test_decisions_never_use_demand_later_than_thirty_seconds_before_them(policy: str) -> None:
    trace = office_trace()
    config = SimulationConfig(5.0, 300, 0.7, 1, 100)
    cut = int(np.searchsorted(trace.times, 6 * DAY + 7 * 3600))  # 07:00 on day 7, before the jump
    changed = trace.with_future_replaced(cut, np.full(trace.times.size - cut, 500.0))
    before = simulate(trace, config, policy)  # type: ignore[arg-type]
    after = simulate(changed, config, policy)  # type: ignore[arg-type]
    decided_before = before.times < trace.times[cut] + 30.0
    np.testing.assert_array_equal(before.desired[decided_before], after.desired[decided_before])
    np.testing.assert_array_equal(before.floor[decided_before], after.floor[decided_before])
    # ... and the change is seen right after: the comparison is not vacuous.
    assert not np.array_equal(before.desired, after.desired)


def test_predictive_floor_rises_before_the_daily_jump() -> None:
    trace = office_trace()
    config = SimulationConfig(5.0, 300, 0.7, 1, 100)
    result = simulate(trace, config, "predictive")
    jump = 6 * DAY + 8 * 3600
    just_before = (result.times >= jump - 300) & (result.times < jump)
    # 100 requests/s at target 0.7 of 5/s per pod needs 29 pods; night traffic needs 6.
    assert result.floor[just_before].max() >= 25
    reactive = simulate(trace, config, "reactive")
    window = (result.times >= jump) & (result.times < jump + 900)
    assert result.ready[window].mean() > reactive.ready[window].mean()


def test_forecast_schedule_reports_insufficient_history_until_a_model_can_be_scored() -> None:
    config = SimulationConfig(5.0, 300, 0.7, 1, 100)
    schedule = forecast_schedule(office_trace(days=1), config)
    origins = tick_origins(schedule.tick_times, config.step_seconds)
    young = origins < config.grid.scorable_history
    assert young.any() and (origins[young] >= config.grid.min_history).any()  # backtested, yet unscorable
    assert {schedule.models[i] for i in np.flatnonzero(young)} == {"insufficient-history"}
    assert not schedule.uses_floor[young].any()
    assert "insufficient-history" not in {schedule.models[i] for i in np.flatnonzero(~young)}


def test_schedule_csv_has_one_row_per_fifteen_seconds(tmp_path: Path) -> None:
    result = simulate(step_trace(), SimulationConfig(1.0, 300, 0.5, 1, 100), "reactive")
    path = tmp_path / "schedule.csv"
    write_schedule_csv(result, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "t_seconds,desired_replicas"
    assert lines[1] == "0,20"
    assert len(lines) == 1 + len(result.times) == 1 + 7200 // 15


def test_config_rejects_min_above_max() -> None:
    with pytest.raises(PolicyError, match=r"min replicas \(5\) <= max replicas \(4\)"):
        SimulationConfig(1.0, 300, 0.5, 5, 4)


def write_rate_csv(path: Path, trace: Trace) -> Path:
    path.write_text(format_rate_csv(trace))
    return path


def test_simulate_cli_prints_json_metrics_for_both_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path = write_rate_csv(tmp_path / "trace.csv", step_trace())
    schedule = tmp_path / "out.csv"
    code = main([
        "simulate", "--trace", str(trace_path), "--capacity-per-replica", "1", "--startup-delay", "300",
        "--target-utilization", "0.5", "--min-replicas", "1", "--max-replicas", "100", "--policy", "reactive",
        "--schedule-out", str(schedule), "--json",
    ])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["policy"] == "reactive"
    assert set(payload["results"]) == {"reactive", "predictive"}
    assert payload["results"]["reactive"]["unserved_fraction"] == pytest.approx(20 * 330 / (10 * 3600 + 40 * 3600))
    assert "insufficient-history" in payload["forecast"]["models"]
    assert set(payload["forecast"]["models"]) <= {"insufficient-history", "reactive", *MODELS}
    assert schedule.read_text().splitlines()[1] == "0,20"


def test_simulate_cli_draws_a_plot(tmp_path: Path) -> None:
    trace_path = write_rate_csv(tmp_path / "trace.csv", step_trace())
    plot = tmp_path / "plot.png"
    code = main([
        "simulate", "--trace", str(trace_path), "--capacity-per-replica", "1", "--startup-delay", "300",
        "--target-utilization", "0.5", "--min-replicas", "1", "--max-replicas", "100", "--policy", "predictive",
        "--plot", str(plot),
    ])
    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_reports_a_missing_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([
        "simulate", "--trace", str(tmp_path / "none.csv"), "--capacity-per-replica", "1", "--startup-delay", "300",
        "--target-utilization", "0.5", "--min-replicas", "1", "--max-replicas", "100", "--policy", "reactive",
    ])
    assert code == 2
    assert "none.csv: cannot read" in capsys.readouterr().err


def test_simulate_cli_rejects_a_target_above_one(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([
            "simulate", "--trace", "x.csv", "--capacity-per-replica", "1", "--startup-delay", "300",
            "--target-utilization", "1.5", "--min-replicas", "1", "--max-replicas", "100", "--policy", "reactive",
        ])
    assert exit_info.value.code == 2


SIMULATE = [
    "simulate", "--capacity-per-replica", "1", "--startup-delay", "300", "--target-utilization", "0.5",
    "--policy", "predictive",
]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-replicas", "10", "--max-replicas", "5"], "--min-replicas (10) must be <= --max-replicas (5)"),
        (["--horizon", "10"], "--horizon (10) must be > --startup-delay (300)"),
        (["--horizon", "300"], "--horizon (300) must be > --startup-delay (300)"),
    ],
)
def test_simulate_cli_refuses_arguments_that_conflict_naming_both_flags(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path = write_rate_csv(tmp_path / "trace.csv", step_trace())
    bounds = [] if "--min-replicas" in flags else ["--min-replicas", "1", "--max-replicas", "100"]
    with pytest.raises(SystemExit) as exit_info:
        main([*SIMULATE, "--trace", str(trace_path), *bounds, *flags])
    assert exit_info.value.code == 2
    assert f"moe-operator simulate: error: {message}" in capsys.readouterr().err


def test_simulate_cli_warns_when_the_trace_is_too_short_for_the_weekly_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path = write_rate_csv(tmp_path / "trace.csv", step_trace())
    code = main([*SIMULATE, "--trace", str(trace_path), "--min-replicas", "1", "--max-replicas", "100",
                 "--seasonality", "weekly"])
    assert code == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(
        "moe-operator simulate: warning: --seasonality weekly: the weekly model needs 169.6 h of history "
        "(a week plus 1.6 h for its window, horizon and backtest) and this replay's forecasts see at most 2.0 h"
    )


def test_the_weekly_warning_goes_once_the_replay_holds_what_the_model_needs() -> None:
    config = SimulationConfig(1.0, 300, 0.5, 1, 100, seasonality="weekly")
    needed = seasonal_min_history(SEASONAL_WEEKLY, config.grid) * config.step_seconds
    # The last tick's forecast sees the trace up to one metric lag and one whole step before its end.
    times = np.arange(0.0, needed + 2 * config.step_seconds, config.step_seconds)
    assert weekly_history_warning(from_rate_samples(times, np.ones(times.size)), config) is None
    short = from_rate_samples(times[:-2], np.ones(times.size - 2))
    assert "the weekly model needs" in (weekly_history_warning(short, config) or "")
    long_trace_short_lookback = replace(config, lookback_seconds=7 * DAY)
    assert weekly_history_warning(from_rate_samples(times, np.ones(times.size)), long_trace_short_lookback)


def test_burst_reserve_decisions_never_use_demand_later_than_thirty_seconds_before_them() -> None:
    trace = bursty_daily(days=3.0)
    config = SimulationConfig(float(np.quantile(trace.rates, 0.99)) / 20, 300, 0.7, 1, 400)
    before = simulate(trace, config, "predictive")
    assert BURST_RESERVE in before.models  # the model under test is the one deciding
    cut = int(np.searchsorted(trace.times, 2 * DAY + 5 * 3600))
    changed = trace.with_future_replaced(cut, np.full(trace.times.size - cut, 5000.0))
    after = simulate(changed, config, "predictive")
    decided_before = before.times < trace.times[cut] + 30.0
    np.testing.assert_array_equal(before.desired[decided_before], after.desired[decided_before])
    np.testing.assert_array_equal(before.floor[decided_before], after.floor[decided_before])
    assert not np.array_equal(before.floor, after.floor)



def spiky_trace(days: float = 8.0, step: float = 300.0) -> Trace:
    """About 10 requests/s, and in 8% of the 5-minute samples a spike of 200-1000 requests/s."""
    rng = np.random.default_rng(1)
    samples = int(days * DAY / step)
    rates = 10.0 * rng.lognormal(0.0, 0.2, samples)
    spikes = rng.random(samples) < 0.08
    rates[spikes] = rng.uniform(200.0, 1000.0, int(spikes.sum()))
    return from_rate_samples(np.arange(samples, dtype=np.float64) * step, rates)


def highest_known(trace: Trace, config: SimulationConfig, origins: np.ndarray) -> np.ndarray:
    """The highest rate of the lookback before each origin: what the controller's history holds."""
    history = trace.mean_rates(config.step_seconds)
    lookback = round(config.lookback_seconds / config.step_seconds)
    return np.array([history[max(0, o - lookback) : o].max() for o in origins.tolist()])


def test_the_floor_never_plans_for_more_than_the_cap_above_anything_in_its_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A quantile factor fitted on calm origins times a point forecast that holds a spike: uncapped,
    # the forecast is several times the highest rate the trace ever had.
    trace, config = spiky_trace(), SimulationConfig(100.0, 600.0, 0.7, 1, 10_000)
    origins = tick_origins(np.arange(0.0, trace.duration, config.interval_seconds), config.step_seconds)
    schedule = forecast_schedule(trace, config)
    floors = schedule.uses_floor & np.isfinite(schedule.predicted_load)
    assert floors.mean() > 0.5
    highest = highest_known(trace, config, origins[floors])
    assert np.all(schedule.predicted_load[floors] <= PEAK_CAP * highest * (1 + 1e-12))
    monkeypatch.setattr(forecast, "PEAK_CAP", math.inf)
    uncapped = forecast_schedule(trace, config)
    assert np.nanmax(uncapped.predicted_load[floors] / highest) > 2.0
