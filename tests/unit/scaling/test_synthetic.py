"""The seeded synthetic traces the benchmark checks the forecasters on: reproducible, and the shape they claim."""

from __future__ import annotations

import numpy as np

from moe_operator.scaling.synthetic import GENERATORS, bursty_daily, flat_noise, regime_shifts, seasonal_trend

DAY_MINUTES = 1440


def test_every_generator_is_reproducible_from_its_seed() -> None:
    for make in GENERATORS.values():
        np.testing.assert_array_equal(make().rates, make().rates)


def test_generators_give_eight_days_of_one_minute_rates_by_default() -> None:
    for make in GENERATORS.values():
        trace = make()
        assert trace.times.size == 8 * DAY_MINUTES and trace.sample_seconds == 60.0
        assert np.all(trace.rates >= 0)


def test_bursty_trace_has_bursts_far_above_its_daily_base() -> None:
    rates = bursty_daily(seed=3).rates
    assert np.quantile(rates, 0.999) > 3 * np.median(rates)


def test_flat_noise_has_a_constant_level() -> None:
    days = flat_noise().rates.reshape(8, DAY_MINUTES).mean(axis=1)
    assert days.max() / days.min() < 1.05


def test_regime_shifts_move_the_level_by_more_than_the_noise() -> None:
    hours = regime_shifts().rates.reshape(-1, 60).mean(axis=1)
    assert hours.max() / hours.min() > 2.0


def test_seasonal_trend_grows_week_on_week_and_sleeps_at_night() -> None:
    rates = seasonal_trend(days=14.0).rates.reshape(14, DAY_MINUTES)
    assert rates[7:].mean() > rates[:7].mean()
    assert rates[:, 2 * 60].mean() < 0.5 * rates[:, 14 * 60].mean()  # 02:00 against 14:00
