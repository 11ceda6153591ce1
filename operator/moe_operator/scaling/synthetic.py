"""Seeded synthetic traffic for checking the forecasters away from the files they were developed on.

Each generator returns a ``Trace`` of per-minute request rates (requests/s) and is a pure function of
its arguments (numpy's PCG64 with the given seed). They cover the shapes a real router sees and the
shared traces under-represent:

- ``bursty_daily``: a daily base with Poisson-arriving bursts of heavy-tailed (Pareto) size;
- ``regime_shifts``: a level that jumps by a random factor at random times (deploys, failovers);
- ``flat_noise``: a constant rate with independent noise (nothing to predict);
- ``seasonal_trend``: daily and weekly pattern with a steady growth trend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moe_operator.scaling.traces import Trace, from_rate_samples

DAY = 86400.0
STEP = 60.0
#: Trace start (epoch seconds): a Monday 00:00 UTC, so weekdays are the first five days.
START = 1_700_438_400.0


def _grid(days: float) -> np.ndarray:
    return np.arange(0.0, days * DAY, STEP)


def _daily_shape(t: np.ndarray, night: float = 0.35) -> np.ndarray:
    """1.0 at 14:00, ``night`` at 02:00, smooth in between."""
    phase = 2 * np.pi * ((t % DAY) / DAY - 14.0 / 24.0)
    return night + (1.0 - night) * (1.0 + np.cos(phase)) / 2.0


def bursty_daily(days: float = 8.0, seed: int = 11, base: float = 100.0, bursts_per_day: float = 8.0) -> Trace:
    """A daily base plus bursts: Poisson arrivals, 2-20 min long, size Pareto(1.5) times the base level."""
    rng = np.random.default_rng(seed)
    t = _grid(days)
    level = base * _daily_shape(t)
    rates = level * rng.lognormal(0.0, 0.1, t.size)
    count = rng.poisson(bursts_per_day * days)
    for start, minutes, size in zip(
        rng.uniform(0.0, days * DAY, count), rng.integers(2, 21, count), 0.5 * (rng.pareto(1.5, count) + 1.0),
        strict=True,
    ):
        inside = (t >= start) & (t < start + minutes * 60.0)
        rates[inside] += level[inside] * min(size, 20.0)
    return from_rate_samples(START + t, rates)


def regime_shifts(days: float = 8.0, seed: int = 12, base: float = 100.0, shifts_per_day: float = 2.0) -> Trace:
    """A level that moves by a lognormal(0, 0.5) factor at Poisson times, with 10% noise."""
    rng = np.random.default_rng(seed)
    t = _grid(days)
    times = np.sort(rng.uniform(0.0, days * DAY, rng.poisson(shifts_per_day * days)))
    factors = np.exp(np.cumsum(rng.normal(0.0, 0.5, times.size)))
    level = base * np.concatenate(([1.0], factors))[np.searchsorted(times, t, side="right")]
    return from_rate_samples(START + t, level * rng.lognormal(0.0, 0.1, t.size))


def flat_noise(days: float = 8.0, seed: int = 13, base: float = 100.0) -> Trace:
    """A constant rate with independent lognormal(0, 0.3) noise: nothing a forecast can add."""
    rng = np.random.default_rng(seed)
    t = _grid(days)
    return from_rate_samples(START + t, base * rng.lognormal(0.0, 0.3, t.size))


def seasonal_trend(days: float = 8.0, seed: int = 14, base: float = 100.0, growth: float = 0.3) -> Trace:
    """Daily pattern, weekends at 60%, growing by ``growth`` over the trace, with 5% noise."""
    rng = np.random.default_rng(seed)
    t = _grid(days)
    weekend = ((t // DAY) % 7) >= 5
    level = base * _daily_shape(t, night=0.2) * np.where(weekend, 0.6, 1.0) * (1.0 + growth * t / (days * DAY))
    return from_rate_samples(START + t, level * rng.lognormal(0.0, 0.05, t.size))


GENERATORS: dict[str, Callable[[], Trace]] = {
    "synthetic-bursty-daily": bursty_daily,
    "synthetic-regime-shifts": regime_shifts,
    "synthetic-flat-noise": flat_noise,
    "synthetic-seasonal-trend": seasonal_trend,
}
