"""Forecasters and the backtest on synthetic series whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_operator.scaling.forecast import (
    BURST_RESERVE,
    LOCAL_TREND,
    MIN_FOLDS,
    PEAK_CAP,
    REACTIVE,
    RECENT_PEAK,
    SEASONAL_DAILY,
    SEASONAL_WEEKLY,
    ForecastError,
    Grid,
    ModelChoice,
    Seasonality,
    backtest_model,
    confirmation_lag,
    fill_gaps,
    forecast_peak,
    future_peak,
    history_cap,
    hpa_hold,
    peak_cap,
    pinball_loss,
    point_forecast,
    quantile_factor,
    quantile_origins,
    rolling_max,
    seasonal_min_history,
    select_model,
    student_t_upper,
    trust_t,
    trusted,
    window_max,
)

STEP = 300.0  # 5-minute history keeps the series short
DAY = int(86400 / STEP)
GRID = Grid.of(STEP, 900.0, lead_seconds=600.0)  # horizon 3 samples, capacity ready after 2


def daily(days: float, base: float = 100.0, amplitude: float = 80.0) -> np.ndarray:
    t = np.arange(int(days * DAY))
    # A sharp morning ramp (the shape that makes reactive scaling late), flat nights.
    phase = (t % DAY) / DAY
    return base + amplitude * np.clip(np.sin(2 * np.pi * (phase - 0.25)), 0, None) ** 2


def office_hours(days: float, night: float = 100.0, day: float = 300.0) -> np.ndarray:
    """Traffic that jumps from ``night`` to ``day`` at 08:00 and back at 20:00: only the calendar predicts it."""
    hour = (np.arange(int(days * DAY)) % DAY) * STEP / 3600.0
    return np.where((hour >= 8) & (hour < 20), day, night).astype(float)


def test_fill_gaps_holds_the_last_rate_across_nan_and_inf() -> None:
    assert fill_gaps([np.nan, 2.0, np.nan, np.inf, 5.0]).tolist() == [2.0, 2.0, 2.0, 2.0, 5.0]


def test_fill_gaps_rejects_a_series_without_any_finite_sample() -> None:
    with pytest.raises(ForecastError, match="no finite sample"):
        fill_gaps([np.nan, np.nan])


def test_future_peak_is_the_maximum_of_the_next_horizon_samples() -> None:
    y = np.array([1.0, 5.0, 2.0, 3.0, 9.0])
    assert future_peak(y, np.array([0, 1, 2]), 3).tolist() == [5.0, 5.0, 9.0]


def test_seasonal_model_repeats_a_pure_daily_pattern_exactly() -> None:
    y = daily(5)
    origins = np.arange(4 * DAY, 5 * DAY - GRID.horizon)
    forecast = point_forecast(SEASONAL_DAILY, y, origins, GRID, periods=3)
    np.testing.assert_allclose(forecast, future_peak(y, origins, GRID.horizon), rtol=1e-9)


def test_seasonal_model_scales_the_shape_to_todays_level() -> None:
    y = daily(5)
    y[4 * DAY :] *= 2.0  # today is twice as busy as the previous days
    origin = np.array([4 * DAY + DAY // 2])
    forecast = point_forecast(SEASONAL_DAILY, y, origin, GRID, periods=3)
    assert forecast[0] == pytest.approx(future_peak(y, origin, GRID.horizon)[0], rel=1e-9)


def test_local_trend_extrapolates_a_straight_ramp_to_the_end_of_the_horizon() -> None:
    y = 10.0 + 0.5 * np.arange(200, dtype=float)
    forecast = point_forecast(LOCAL_TREND, y, np.array([150]), GRID)
    # The last known sample is y[149]; the horizon's peak is y[152].
    assert forecast[0] == pytest.approx(y[149 + GRID.horizon], rel=1e-9)


def test_local_trend_of_a_falling_ramp_is_the_current_level() -> None:
    y = 500.0 - 0.5 * np.arange(200, dtype=float)
    assert point_forecast(LOCAL_TREND, y, np.array([150]), GRID)[0] == pytest.approx(y[149], rel=1e-9)


def test_recent_peak_remembers_a_spike_for_one_window_then_forgets_it() -> None:
    y = np.full(300, 10.0)
    y[100] = 90.0
    inside = point_forecast(RECENT_PEAK, y, np.array([101 + GRID.window - 1]), GRID)
    after = point_forecast(RECENT_PEAK, y, np.array([101 + GRID.window]), GRID)
    assert (inside[0], after[0]) == (90.0, 10.0)


def test_step_change_moves_the_local_forecasts_to_the_new_level_within_a_window() -> None:
    y = np.concatenate([np.full(200, 10.0), np.full(200, 40.0)])
    origin = np.array([200 + GRID.window])
    assert point_forecast(LOCAL_TREND, y, origin, GRID)[0] == pytest.approx(40.0)
    assert point_forecast(RECENT_PEAK, y, origin, GRID)[0] == pytest.approx(40.0)


def test_a_model_without_enough_history_for_the_origin_is_refused() -> None:
    with pytest.raises(ForecastError, match="needs"):
        point_forecast(SEASONAL_DAILY, daily(1), np.array([DAY // 2]), GRID, periods=1)


def test_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(ForecastError, match="unknown model 'prophet'"):
        point_forecast("prophet", daily(1), np.array([DAY // 2]), GRID)


def test_pinball_loss_weighs_under_forecasts_by_the_quantile() -> None:
    actual = np.array([10.0])
    assert pinball_loss(actual, np.array([9.0]), 0.9) == pytest.approx(0.9)
    assert pinball_loss(actual, np.array([11.0]), 0.9) == pytest.approx(0.1)


def test_backtest_chooses_the_daily_model_for_traffic_that_jumps_at_the_same_hour_every_day() -> None:
    rng = np.random.default_rng(1)
    y = office_hours(6) * rng.normal(1.0, 0.02, 6 * DAY)
    choice = select_model(y, GRID)
    assert choice.model == SEASONAL_DAILY
    assert choice.uses_floor and choice.error < choice.baseline_error


def test_backtest_uses_no_floor_on_flat_traffic() -> None:
    assert select_model(np.full(3 * DAY, 50.0), GRID).model == REACTIVE


def test_unpredictable_noise_gets_at_most_the_burst_reserve_never_a_shape_model() -> None:
    # On independent noise a steady reserve beats chasing the last sample at equal capacity; a
    # seasonal or trend model that seems to do as well is only fitting the noise.
    rng = np.random.default_rng(7)
    noise = rng.lognormal(3.0, 0.5, 6 * DAY)
    assert select_model(noise, GRID).model in (REACTIVE, BURST_RESERVE)


def test_backtest_tolerates_gaps_in_the_history() -> None:
    y = daily(6)
    y[2 * DAY : 2 * DAY + 20] = np.nan
    y[5 * DAY + 7] = np.nan
    choice = select_model(y, GRID)
    assert choice.model == SEASONAL_DAILY
    assert np.isfinite(forecast_peak(y, GRID, choice)).all()


def test_backtest_refuses_a_history_shorter_than_its_minimum() -> None:
    with pytest.raises(ForecastError, match=f"at least {GRID.min_history}"):
        select_model(np.ones(GRID.min_history - 1), GRID)


def test_seasonality_none_never_chooses_a_seasonal_model() -> None:
    assert select_model(daily(6), GRID, seasonality="none").model not in (SEASONAL_DAILY, "seasonal-weekly")


def test_the_forecast_rises_before_the_morning_jump_arrives() -> None:
    rng = np.random.default_rng(3)
    y = office_hours(6) * rng.normal(1.0, 0.02, 6 * DAY)
    jump = 5 * DAY + int(8 * 3600 / STEP)  # 08:00 on the sixth day
    before = jump - GRID.horizon + 1  # the jump is inside the horizon, not yet in the history
    choice = select_model(y[:before], GRID)
    forecast = forecast_peak(y[:before], GRID, choice)[0]
    assert y[before - 1] < 120.0  # what reactive scaling sees: still night traffic
    assert forecast >= 0.95 * 300.0


def test_a_floor_forecast_is_capped_just_above_the_highest_rate_of_its_history() -> None:
    # A factor fitted on calm origins times a point forecast that holds a spike would ask for
    # 50x anything ever seen; the floor stops at PEAK_CAP x the history's highest rate.
    y = np.full(200, 10.0)
    y[-5] = 1000.0
    choice = ModelChoice(RECENT_PEAK, 50.0, 1, 0.0, 0.0, 100)
    assert forecast_peak(y, GRID, choice)[0] == pytest.approx(PEAK_CAP * 1000.0)
    # With the lookback the controller fetches, only that part of the history counts.
    y[-5], y[10] = 10.0, 1000.0
    choice = ModelChoice(BURST_RESERVE, 3.0, 1, 0.0, 0.0, 100)
    assert forecast_peak(y, GRID, choice)[0] == pytest.approx(30.0)  # uncapped: below 1.1 x 1000
    assert forecast_peak(y, GRID, choice, history_samples=50)[0] == pytest.approx(PEAK_CAP * 10.0)
    assert history_cap(y, np.array([11, 200]), 50).tolist() == pytest.approx([PEAK_CAP * 1000.0, PEAK_CAP * 10.0])


def test_peak_cap_is_the_cap_over_the_whole_history_gaps_filled() -> None:
    assert peak_cap([np.nan, 3.0, np.nan, 8.0, 2.0]) == pytest.approx(PEAK_CAP * 8.0)


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
    st.integers(1, 30),
    st.lists(st.integers(1, 60), max_size=8),
)
def test_window_max_is_the_maximum_of_each_window(values: list[float], width: int, ends: list[int]) -> None:
    y = np.asarray(values)
    at = np.asarray([min(end, y.size) for end in ends], dtype=np.int64)
    expected = [y[max(0, end - width) : end].max() for end in at.tolist()]
    assert window_max(y, at, width).tolist() == expected


def test_history_cap_needs_a_sample_before_the_origin() -> None:
    with pytest.raises(ForecastError, match="at least one sample"):
        history_cap(np.ones(5), np.array([0]))


def test_reactive_choice_forecasts_the_last_rate() -> None:
    choice = ModelChoice(REACTIVE, 1.0, 0, 0.0, 0.0, 0)
    assert forecast_peak([1.0, 2.0, 7.0], GRID, choice)[0] == 7.0


def test_grid_rejects_a_non_positive_step() -> None:
    with pytest.raises(ForecastError, match="step must be a positive"):
        Grid.of(0.0, 600.0)


def test_grid_rounds_the_horizon_up_to_whole_steps() -> None:
    assert Grid.of(60.0, 420.0).horizon == 7
    assert Grid.of(60.0, 421.0).horizon == math.ceil(421 / 60)


def ramp(samples: int) -> np.ndarray:
    return 10.0 + np.arange(samples) * 1.0 + np.random.default_rng(0).normal(0.0, 0.5, samples)


def test_a_model_that_wins_only_on_the_latest_history_waits_for_confirmation() -> None:
    # 50 samples: the trend model wins now, but not without the newest quarter (13 samples fewer).
    assert backtest_model(ramp(50), GRID).model == LOCAL_TREND
    choice = select_model(ramp(50), GRID)
    assert (choice.model, choice.pending) == (REACTIVE, LOCAL_TREND)


def test_a_model_that_also_won_on_the_older_history_gets_its_floor() -> None:
    choice = select_model(ramp(600), GRID)
    assert (choice.model, choice.pending) == (LOCAL_TREND, None)


def test_the_confirming_history_is_six_hours_older_or_a_quarter_shorter_when_young() -> None:
    assert confirmation_lag(600, GRID) == 72  # 6 h of 5-minute samples
    assert confirmation_lag(50, GRID) == 13


def test_an_incumbent_is_kept_where_a_newcomer_would_wait_for_confirmation() -> None:
    choice = select_model(ramp(50), GRID, incumbent=LOCAL_TREND)
    assert (choice.model, choice.pending) == (LOCAL_TREND, None)


def test_burst_reserve_forecasts_the_mean_level_of_the_recent_window() -> None:
    y = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 40)
    origin = np.array([150])
    assert point_forecast(BURST_RESERVE, y, origin, GRID)[0] == pytest.approx(y[150 - GRID.window : 150].mean())


def test_burst_reserve_level_averages_what_exists_while_the_history_is_short() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert point_forecast(BURST_RESERVE, y, np.array([GRID.horizon]), GRID)[0] == pytest.approx(2.0)


def test_burst_reserve_factor_is_the_upper_quantile_of_the_horizon_peak_over_the_level() -> None:
    # A 40 requests/s burst every 5 samples on a base of 10: every 10-sample window averages 16, and a
    # 3-sample horizon holds a burst at 3 of 5 origins, so the 0.9 quantile of peak / level is 40 / 16.
    grid = Grid.of(360.0, 900.0, lead_seconds=600.0)
    assert (grid.window, grid.horizon) == (10, 3)
    y = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 60)
    origins = np.arange(grid.window, y.size - grid.horizon)
    point = point_forecast(BURST_RESERVE, y, origins, grid)
    assert quantile_factor(future_peak(y, origins, grid.horizon), point, 0.9) == pytest.approx(2.5)


def test_burst_reserve_covers_recurring_bursts_that_reactive_scaling_meets_late() -> None:
    grid = Grid.of(360.0, 900.0, lead_seconds=600.0)
    y = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 60)
    choice = ModelChoice(BURST_RESERVE, 2.5, 1, 0.0, 0.0, 0)
    assert forecast_peak(y, grid, choice)[0] == pytest.approx(40.0)  # the burst height, between bursts too


def test_min_history_is_one_horizon_of_level_one_of_outcome_and_ten_outcomes_for_the_quantile() -> None:
    grid = Grid.of(60.0, 420.0, lead_seconds=300.0)
    assert grid.min_history == 7 + 7 + quantile_origins(0.9) == 24
    assert quantile_origins(0.9) == 10 and quantile_origins(0.95) == 20


def test_scorable_history_adds_three_folds_of_outcomes_to_the_first_level() -> None:
    grid = Grid.of(60.0, 420.0, lead_seconds=300.0)
    assert grid.scorable_history == 7 + 7 - 1 + MIN_FOLDS * 7 == 34
    assert Grid.of(60.0, 120.0).scorable_history == Grid.of(60.0, 120.0).min_history  # ten outcomes bind


def test_below_scorable_history_the_backtest_scores_nothing_and_from_it_the_reserve_can_win() -> None:
    grid = Grid.of(60.0, 420.0, lead_seconds=300.0)
    # A burst every 5 minutes on a calm level: the reserve wins as soon as it can be scored at all.
    y = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 40)
    assert backtest_model(y[: grid.scorable_history - 1], grid).model == REACTIVE
    assert backtest_model(y[: grid.scorable_history], grid).model == BURST_RESERVE


def test_a_history_of_exactly_min_history_can_be_backtested() -> None:
    grid = Grid.of(60.0, 420.0, lead_seconds=300.0)
    rng = np.random.default_rng(4)
    choice = select_model(rng.lognormal(1.0, 1.0, grid.min_history), grid)
    assert choice.model in (REACTIVE, BURST_RESERVE)  # only the level model has enough history this early


def test_burst_reserve_forecast_ignores_the_future() -> None:
    y = np.random.default_rng(2).lognormal(2.0, 0.8, 400)
    changed = y.copy()
    changed[250:] = 1e6
    origins = np.arange(GRID.horizon, 251)
    np.testing.assert_array_equal(
        point_forecast(BURST_RESERVE, y, origins, GRID), point_forecast(BURST_RESERVE, changed, origins, GRID)
    )


def test_a_new_shape_model_needs_its_confidence_bound_below_one() -> None:
    assert trusted(LOCAL_TREND, 0.6, 0.9, incumbent=None)
    assert not trusted(LOCAL_TREND, 0.6, 1.3, incumbent=None)


def test_the_burst_fallback_needs_only_to_beat_reactive_on_its_past() -> None:
    assert trusted(BURST_RESERVE, 0.95, 1.8, incumbent=None)
    assert not trusted(BURST_RESERVE, 1.02, 1.8, incumbent=None)


def test_an_incumbent_keeps_its_floor_until_it_is_confidently_worse_than_reactive() -> None:
    assert trusted(LOCAL_TREND, 1.1, 1.5, incumbent=LOCAL_TREND)  # lower bound 0.7: not clearly worse
    assert not trusted(LOCAL_TREND, 1.5, 1.8, incumbent=LOCAL_TREND)  # lower bound 1.2: clearly worse


def test_no_model_is_trusted_where_reactive_scaling_missed_nothing() -> None:
    assert not trusted(BURST_RESERVE, math.inf, math.inf, incumbent=BURST_RESERVE)


def test_the_hpa_baseline_rides_out_rates_within_its_tolerance() -> None:
    rates = np.array([100.0, 105.0, 95.0, 109.0, 91.0])
    assert hpa_hold(rates, hold=1).tolist() == [100.0] * 5


def test_the_hpa_baseline_scales_up_past_its_tolerance_at_once_and_down_through_its_window() -> None:
    rates = np.array([100.0, 120.0, 80.0, 80.0, 80.0])
    assert hpa_hold(rates, hold=3).tolist() == [100.0, 120.0, 120.0, 120.0, 80.0]


def test_without_tolerance_the_hpa_baseline_is_the_rolling_maximum() -> None:
    rates = np.random.default_rng(5).lognormal(3.0, 0.5, 200)
    np.testing.assert_array_equal(hpa_hold(rates, hold=5, tolerance=0.0), rolling_max(rates, 5))


def test_student_t_quantiles_match_the_tables() -> None:
    assert student_t_upper(3, 0.005) == pytest.approx(5.841, abs=2e-3)
    assert student_t_upper(15, 0.01) == pytest.approx(2.602, abs=2e-3)
    assert student_t_upper(1, 0.01) == pytest.approx(31.82, abs=2e-2)


def test_the_trust_bound_widens_with_fewer_folds_and_more_candidates() -> None:
    assert trust_t(16, 5) > trust_t(16, 1)
    assert trust_t(4, 5) > trust_t(16, 5)


@pytest.mark.parametrize(("model", "seasonality"), [(SEASONAL_WEEKLY, "weekly"), (SEASONAL_DAILY, "daily")])
@pytest.mark.parametrize(("step", "horizon"), [(60.0, 420.0), (60.0, 3600.0), (300.0, 420.0)])
def test_a_seasonal_model_is_scored_from_exactly_its_min_history(
    model: str, seasonality: Seasonality, step: float, horizon: float
) -> None:
    grid = Grid.of(step, horizon, lead_seconds=300.0)
    needed = seasonal_min_history(model, grid)
    y = np.random.default_rng(1).gamma(2.0, 5.0, needed)
    scored = [
        model in dict(backtest_model(y[:n], grid, seasonality, end_seconds=0.0).records)
        for n in (needed - 1, needed)
    ]
    assert scored == [False, True]
