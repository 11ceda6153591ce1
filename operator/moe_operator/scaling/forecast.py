"""Forecasters of the peak request rate over a horizon, and the rolling-origin backtest that picks one.

Pure numpy: no I/O, no clocks. A series is a 1-D array ``y`` of request rates on a regular grid of
``step`` seconds; ``y[i]`` is the mean rate over step ``i``. Every function is vectorised over
*origins*: origin ``o`` means exactly ``y[:o]`` is known, and the quantity forecast is the peak of the
next ``h`` samples, ``max(y[o:o + h])``. The live controller calls them with the single origin
``len(y)``; the simulator calls the same functions with many origins at once.

Models (each a point forecast of that peak, then scaled to an upper quantile by its own backtest):

- ``seasonal-daily`` / ``seasonal-weekly``: the peak of the same horizon one, two, ... periods ago,
  rescaled by how today's recent level compares with the level then; median over the periods.
- ``local-trend``: least-squares line through the recent window, extrapolated over the horizon.
- ``recent-peak``: the peak of the recent window (for bursty traffic that repeats its bursts).
- ``burst-reserve``: the mean level of the recent window; its backtest factor is then the upper
  quantile of ``max(y[o:o + h]) / level(o)`` learned from the series' own past, so capacity stays at
  the height of the bursts that recur at this level instead of being released after each one. It
  needs the least history (see ``Grid.min_history``), so it is the model that can start first.

Each model's upper quantile comes from its own backtest (the factor that makes it cover the actual
peak at ``quantile`` of the origins: the pinball-loss optimum among its rescalings, so
under-forecasting costs ``quantile / (1 - quantile)`` times over-forecasting). The choice is per
series: the model whose floor leaves the least demand uncovered *at equal average capacity* with
reactive scaling (which could equally buy that capacity with a lower target), cross-validated, with
a confidence bound (shape models) or a better score on its own past against the HPA as it runs,
tolerance included (the burst reserve, the one pre-specified fallback), confirmed on older history,
and kept while it is not confidently worse (hysteresis: a floor switched on and off by noise costs
more than either). Beyond the backtest's span, each model's long-run record (``ModelRecord``) must not
say it is worse than reactive either: rare large bursts leave the span, not the record. A series where
no model does better gets no forecast floor (``REACTIVE``): the forecaster knows when not to trust
itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt

from moe_operator.scaling.policy import HPA_TOLERANCE

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Seasonality = Literal["auto", "daily", "weekly", "none"]

DAY_SECONDS = 86400
WEEK_SECONDS = 7 * DAY_SECONDS

#: The chosen "model" when no forecaster beats the reactive baseline: no floor at all.
REACTIVE = "reactive"
SEASONAL_DAILY = "seasonal-daily"
SEASONAL_WEEKLY = "seasonal-weekly"
LOCAL_TREND = "local-trend"
RECENT_PEAK = "recent-peak"
BURST_RESERVE = "burst-reserve"
MODELS = (SEASONAL_DAILY, SEASONAL_WEEKLY, LOCAL_TREND, RECENT_PEAK, BURST_RESERVE)

#: Upper quantile forecast and the asymmetry of the loss (under-forecasting costs 9x over-forecasting).
DEFAULT_QUANTILE = 0.9
#: Periods a seasonal model looks back over (median of these); more smooths anomalies, fewer adapt faster.
MAX_SEASONAL_PERIODS = {SEASONAL_DAILY: 3, SEASONAL_WEEKLY: 2}
#: A seasonal level ratio outside [1/x, x] is a regime change the seasonal shape says nothing about.
MAX_LEVEL_RATIO = 3.0
#: The recent window (level, trend, peak) spans at least this long, and at least two horizons.
RECENT_WINDOW_SECONDS = 3600
#: Backtest origins: every step of this much recent history (consecutive, so holds can be replayed),
#: cut into folds for cross-validation: at most this many, each at least one horizon long (a fold
#: shorter than a horizon shares its outcomes with the next one), and at least MIN_FOLDS.
BACKTEST_SPAN_SECONDS = 4 * DAY_SECONDS
BACKTEST_FOLDS = 4
MIN_FOLDS = 3
#: Trust must persist: a model gets a floor only if it also passes on the history of this long ago,
#: or, while the history is young, on the history without its newest quarter.
CONFIRMATION_SECONDS = 6 * 3600
CONFIRMATION_SHARE = 0.25
#: How long the HPA keeps its highest recommendation (scale-down stabilisation) and the floor its own.
REACTIVE_HOLD_SECONDS = 300.0
FLOOR_HOLD_SECONDS = 600.0
#: Fewest backtest origins that make a choice among the shape models meaningful.
MIN_BACKTEST_ORIGINS = 30
#: A model is trusted only when the one-sided upper confidence bound of its pooled fold score (Student t
#: over the folds, Bonferroni-corrected for the number of models compared) is below 1: better than
#: reactive scaling, and not just the luckiest of several noisy candidates.
TRUST_CONFIDENCE = 0.9
BURST_FALLBACK = BURST_RESERVE
INCUMBENT_RULE = "lower"
#: Each model's record over every origin it was ever backtested on (``ModelRecord``) weighs evidence by
#: age with this half-life: far longer than the backtest span, so bursts that come once a week or two
#: stay in view. (14 days, 30 days and no fading gave the same benchmark figures.)
RECORD_HALF_LIFE_SECONDS = 30 * DAY_SECONDS
#: A model whose floor is in force loses it by its record only when that record is worse than reactive
#: by more than the HPA's own tolerance; a new model needs a record better than reactive.
RECORD_KEEP_SCORE = 1.0 + HPA_TOLERANCE
#: No floor forecast exceeds the highest rate of the history it is made from by more than the HPA's
#: tolerance. A quantile factor fitted on calm origins multiplies a point forecast that holds a spike
#: (a recent peak, a seasonal echo of one) into a floor far above anything ever seen (measured: 20x
#: the trace's highest rate, for hours); growth beyond the cap is the reactive HPA's, as is any
#: surprise above the floor. A guard on the forecast only: the backtest judges each model uncapped
#: (capped there too, a floor looks cheaper than it runs, and gets trusted where it loses).
PEAK_CAP = 1.0 + HPA_TOLERANCE


@lru_cache(maxsize=256)
def student_t_upper(dof: int, tail: float) -> float:
    """The ``x`` with ``P(T > x) = tail`` for Student's t with ``dof`` degrees of freedom (numerical)."""
    if dof < 1 or not 0 < tail < 0.5:
        raise ForecastError(f"need dof >= 1 and a tail in (0, 0.5), got {dof}, {tail}")
    # Integrate the density on u = atan(x) in (0, pi/2), where it is smooth and bounded.
    u = np.linspace(0.0, math.pi / 2, 200001)[:-1]
    x = np.tan(u)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_c - (dof + 1) / 2 * np.log1p(x * x / dof)) / np.cos(u) ** 2
    above = 0.5 - np.concatenate(([0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(u))))
    return float(x[min(int(np.searchsorted(-above, -tail)), x.size - 1)])


def trust_t(folds: int, candidates: int, confidence: float | None = None) -> float:
    """The t multiplier of the trust bound for ``folds`` folds and ``candidates`` models compared."""
    level = TRUST_CONFIDENCE if confidence is None else confidence
    return student_t_upper(folds - 1, (1.0 - level) / max(1, candidates))


def quantile_origins(quantile: float = DEFAULT_QUANTILE) -> int:
    """Outcomes needed before an empirical ``quantile`` is more than the largest one seen: 1 / (1 - q)."""
    return math.ceil(1.0 / (1.0 - quantile) - 1e-9)


class ForecastError(ValueError):
    """Input a forecaster cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class Grid:
    """Sizes (in samples) derived from the step and the horizon."""

    step_seconds: float
    horizon: int
    window: int
    #: Samples until capacity asked for now is ready (the pod startup): what a decision can still change.
    lead: int = 0

    @classmethod
    def of(cls, step_seconds: float, horizon_seconds: float, lead_seconds: float = 0.0) -> Grid:
        if not step_seconds > 0 or not math.isfinite(step_seconds):
            raise ForecastError(f"step must be a positive number of seconds, got {step_seconds!r}")
        if not horizon_seconds > 0 or not math.isfinite(horizon_seconds):
            raise ForecastError(f"horizon must be a positive number of seconds, got {horizon_seconds!r}")
        horizon = max(1, math.ceil(horizon_seconds / step_seconds))
        window = max(2 * horizon, math.ceil(RECENT_WINDOW_SECONDS / step_seconds), 2)
        lead = min(horizon - 1, max(0, math.floor(lead_seconds / step_seconds)))
        return cls(step_seconds=float(step_seconds), horizon=horizon, window=window, lead=lead)

    def period(self, model: str) -> int:
        seconds = DAY_SECONDS if model == SEASONAL_DAILY else WEEK_SECONDS
        return max(1, round(seconds / self.step_seconds))

    @property
    def min_history(self) -> int:
        """Samples needed before any model can be backtested: those of ``burst-reserve``, the first to start.

        Its level needs one horizon of history, its first outcome one more horizon, and an empirical
        upper quantile of the horizon's peak needs ``quantile_origins()`` outcomes (10 at q = 0.9;
        with fewer, the "quantile" is only the largest peak seen so far).
        """
        return earliest_origin(BURST_RESERVE, self) + self.horizon + quantile_origins()

    @property
    def scorable_history(self) -> int:
        """Samples before the backtest can score its first model, ``burst-reserve``.

        Its origins (from the first with a level to the last with a known outcome) must also fill
        ``MIN_FOLDS`` cross-validation folds of one horizon. From ``min_history`` until then every
        backtest answers ``REACTIVE`` because nothing could be scored yet, not because nothing won; it
        still runs, so the refit schedule (``policy.refit_due``) counts from ``min_history``.
        """
        origins = max(quantile_origins(), MIN_FOLDS * self.horizon)
        return max(self.min_history, earliest_origin(BURST_RESERVE, self) + self.horizon - 1 + origins)

    @property
    def min_shape_history(self) -> int:
        """Samples needed before the shape models (trend, recent peak) can be backtested."""
        return self.window + self.horizon + MIN_BACKTEST_ORIGINS


@dataclass(frozen=True)
class ModelRecord:
    """A model's long-run record: its shortfalls over every origin it was ever backtested on.

    A backtest sees ``BACKTEST_SPAN_SECONDS`` of history. On heavy-tailed traffic the bursts that decide
    the comparison (sustained ones at tens of times the level, where the HPA's proportional headroom
    serves more than a floor does) come every week or two: a span without one makes a floor look
    better than it is, and the floor then spends, every day, capacity that a lower HPA target would
    have put into exactly such a burst. Each origin's cross-validated shortfall is added once, when a
    backtest first scores it, with the shortfall of reactive scaling at equal cost beside it; older
    evidence fades with ``RECORD_HALF_LIFE_SECONDS``. Pure data: the caller keeps it between backtests.
    """

    model_short: float = 0.0
    reactive_short: float = 0.0
    #: Time (seconds, the caller's clock) of the newest origin counted.
    through: float = -math.inf
    #: Time of the oldest origin counted: evidence older than the current span exists once this is
    #: before the span's first origin.
    since: float = math.inf

    @property
    def score(self) -> float:
        return self.model_short / self.reactive_short if self.reactive_short > 0 else math.inf

    def updated(self, times: FloatArray, model_gap: FloatArray, reactive_gap: FloatArray) -> ModelRecord:
        """The record with the origins newer than ``through`` added, weighed by age at the newest."""
        if times.size == 0:
            return self
        newest = float(times[-1])
        new = times > self.through
        if not np.any(new):
            return self
        weights = np.exp2(-(newest - times[new]) / RECORD_HALF_LIFE_SECONDS)
        fade = math.exp2(-(newest - self.through) / RECORD_HALF_LIFE_SECONDS) if math.isfinite(self.through) else 1.0
        return ModelRecord(
            self.model_short * fade + float(np.dot(weights, model_gap[new])),
            self.reactive_short * fade + float(np.dot(weights, reactive_gap[new])),
            newest,
            min(self.since, float(times[new][0])),
        )


@dataclass(frozen=True)
class ModelChoice:
    """The outcome of a backtest: which model, its quantile scale, its periods and its error."""

    model: str
    factor: float
    periods: int
    error: float
    baseline_error: float
    origins: int
    #: A model that passed the backtest now but not on the older history (``confirmation_lag``).
    pending: str | None = None
    #: Each scored model's long-run record, by name (the caller passes them to the next backtest).
    records: tuple[tuple[str, ModelRecord], ...] = ()
    #: With no floor: a model the backtest's span trusted but its long-run record refused.
    refused: str | None = None

    def record(self, model: str) -> ModelRecord | None:
        return dict(self.records).get(model)

    @property
    def uses_floor(self) -> bool:
        return self.model != REACTIVE


def fill_gaps(values: Sequence[float] | FloatArray) -> FloatArray:
    """Forward-fill NaN and infinite samples (a gap holds the last rate); leading gaps take the first value.

    Negative rates (counter resets seen through ``rate`` never give them, but a user query might) are
    clipped to zero. Raises ForecastError when no sample is finite.
    """
    y = np.asarray(values, dtype=np.float64).copy()
    if y.ndim != 1:
        raise ForecastError(f"a series must be one-dimensional, got shape {y.shape}")
    finite = np.isfinite(y)
    if not finite.any():
        raise ForecastError("the series has no finite sample")
    index = np.where(finite, np.arange(y.size), 0)
    np.maximum.accumulate(index, out=index)
    first = int(np.argmax(finite))
    index[:first] = first
    return np.clip(y[index], 0.0, None)


def _gather(y: FloatArray, starts: IntArray, width: int) -> FloatArray:
    """Rows ``y[s:s + width]`` for each start (only the samples a forecast reads, never the whole series)."""
    return np.asarray(y[starts[:, None] + np.arange(width)], dtype=np.float64)


def _window_mean(csum: FloatArray, ends: IntArray, width: int) -> FloatArray:
    """Mean of ``y[e - width:e]`` from the running sum ``csum = [0, cumsum(y)]``."""
    return np.asarray((csum[ends] - csum[ends - width]) / width, dtype=np.float64)


def future_peak(y: FloatArray, origins: IntArray, horizon: int) -> FloatArray:
    """``max(y[o:o + horizon])`` for each origin: what actually happened (origins need o + horizon <= len)."""
    return np.asarray(_gather(y, origins, horizon).max(axis=1), dtype=np.float64)


def _seasonal(y: FloatArray, origins: IntArray, grid: Grid, period: int, periods: int) -> FloatArray:
    csum = np.concatenate(([0.0], np.cumsum(y)))
    level_now = _window_mean(csum, origins, grid.window)
    estimates = []
    for k in range(1, periods + 1):
        past = origins - k * period
        level_then = _window_mean(csum, past, grid.window)
        ratio = np.where(level_then > 0, level_now / np.maximum(level_then, 1e-12), 1.0)
        ratio = np.clip(ratio, 1.0 / MAX_LEVEL_RATIO, MAX_LEVEL_RATIO)
        estimates.append(future_peak(y, past, grid.horizon) * ratio)
    return np.asarray(np.median(np.stack(estimates), axis=0), dtype=np.float64)


def _local_trend(y: FloatArray, origins: IntArray, grid: Grid) -> FloatArray:
    width = grid.window
    rows = _gather(y, origins - width, width)
    x = np.arange(width, dtype=np.float64) - (width - 1) / 2.0
    slope = rows @ x / float(x @ x)
    last = rows.mean(axis=1) + slope * (width - 1) / 2.0
    end = last + slope * grid.horizon
    return np.asarray(np.clip(np.maximum(last, end), 0.0, None), dtype=np.float64)


def _recent_peak(y: FloatArray, origins: IntArray, grid: Grid) -> FloatArray:
    return np.asarray(_gather(y, origins - grid.window, grid.window).max(axis=1), dtype=np.float64)


def _recent_level(y: FloatArray, origins: IntArray, grid: Grid) -> FloatArray:
    """Mean of the last ``grid.window`` samples (all of them while the history is shorter)."""
    csum = np.concatenate(([0.0], np.cumsum(y)))
    starts = np.maximum(origins - grid.window, 0)
    return np.asarray((csum[origins] - csum[starts]) / (origins - starts), dtype=np.float64)


def persistence(y: FloatArray, origins: IntArray) -> FloatArray:
    """The last known rate: what a reactive autoscaler acts on."""
    return np.asarray(y[origins - 1], dtype=np.float64)


def point_forecast(model: str, y: FloatArray, origins: IntArray, grid: Grid, periods: int = 1) -> FloatArray:
    """Point forecast of ``max(y[o:o + horizon])`` from ``y[:o]`` for each origin (gap-free ``y``)."""
    origins = np.asarray(origins, dtype=np.int64)
    if origins.size and int(origins.min()) < earliest_origin(model, grid, periods):
        raise ForecastError(f"{model} needs {earliest_origin(model, grid, periods)} samples of history")
    if model in (SEASONAL_DAILY, SEASONAL_WEEKLY):
        return _seasonal(y, origins, grid, grid.period(model), periods)
    if model == LOCAL_TREND:
        return _local_trend(y, origins, grid)
    if model == RECENT_PEAK:
        return _recent_peak(y, origins, grid)
    if model == BURST_RESERVE:
        return _recent_level(y, origins, grid)
    raise ForecastError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def earliest_origin(model: str, grid: Grid, periods: int = 1) -> int:
    """The first origin at which ``model`` has all the history it reads."""
    if model in (SEASONAL_DAILY, SEASONAL_WEEKLY):
        return periods * grid.period(model) + grid.window
    if model == BURST_RESERVE:
        # A level averaged over less than one horizon is one burst, not a level.
        return grid.horizon
    return grid.window


def pinball_loss(actual: FloatArray, forecast: FloatArray, quantile: float) -> float:
    """Mean quantile (pinball) loss: under-forecasts weigh ``quantile``, over-forecasts ``1 - quantile``."""
    diff = actual - forecast
    return float(np.mean(np.maximum(quantile * diff, (quantile - 1.0) * diff)))


def quantile_factor(actual: FloatArray, point: FloatArray, quantile: float) -> float:
    """The multiplier that makes ``factor * point`` cover ``actual`` with probability ``quantile``."""
    usable = point > 0
    if not usable.any():
        return 1.0
    return float(np.quantile(actual[usable] / point[usable], quantile))


def candidate_models(seasonality: Seasonality) -> tuple[str, ...]:
    if seasonality == "daily":
        return (SEASONAL_DAILY, LOCAL_TREND, RECENT_PEAK, BURST_RESERVE)
    if seasonality == "weekly":
        return (SEASONAL_WEEKLY, LOCAL_TREND, RECENT_PEAK, BURST_RESERVE)
    if seasonality == "none":
        return (LOCAL_TREND, RECENT_PEAK, BURST_RESERVE)
    return MODELS


def backtest_span(grid: Grid) -> int:
    """Samples of history a backtest replays (``BACKTEST_SPAN_SECONDS``)."""
    return math.ceil(BACKTEST_SPAN_SECONDS / grid.step_seconds)


def backtest_origins(n: int, grid: Grid, earliest: int) -> IntArray:
    """Rolling origins over the recent part of ``n`` samples whose outcome is known."""
    last = n - grid.horizon
    first = max(earliest, last - backtest_span(grid))
    if last < first:
        return np.zeros(0, dtype=np.int64)
    return np.arange(first, last + 1, dtype=np.int64)


def rolling_max(values: FloatArray, width: int) -> FloatArray:
    """``max(values[i - width + 1 : i + 1])`` for each i (shorter at the start)."""
    if width <= 1 or values.size == 0:
        return values.copy()
    padded = np.concatenate((np.full(width - 1, -np.inf), values))
    return np.asarray(np.lib.stride_tricks.sliding_window_view(padded, width).max(axis=1), dtype=np.float64)


def window_max(y: FloatArray, ends: IntArray, width: int) -> FloatArray:
    """``max(y[max(0, e - width):e])`` for each end ``e >= 1``, in O(len(y)) when the ends span at most ``width``.

    Every window then shares ``y[b:lo]`` (``b`` the latest start, ``lo`` the earliest end) and adds a
    suffix of ``y[a:b]`` on the left and a prefix of ``y[lo:hi]`` on the right: two cumulative maxima
    instead of one maximum per window. Ends further apart than ``width`` fall back to ``rolling_max``.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if ends.size == 0:
        return np.empty(0, dtype=np.float64)
    lo, hi = int(ends.min()), int(ends.max())
    if hi - lo > width:
        return np.asarray(rolling_max(y[:hi], width)[ends - 1], dtype=np.float64)
    starts = np.maximum(ends - width, 0)
    a, b = int(starts.min()), int(starts.max())  # b <= lo
    suffix = np.append(np.maximum.accumulate(y[a:b][::-1])[::-1], -np.inf)  # suffix[i] = max(y[a + i:b])
    prefix = np.concatenate(([-np.inf], np.maximum.accumulate(y[lo:hi])))  # prefix[j] = max(y[lo:lo + j])
    middle = float(y[b:lo].max()) if lo > b else -np.inf
    return np.asarray(np.maximum(np.maximum(suffix[starts - a], prefix[ends - lo]), middle), dtype=np.float64)


def history_cap(y: FloatArray, origins: IntArray, samples: int | None = None) -> FloatArray:
    """``PEAK_CAP`` times the highest rate known at each origin (of the last ``samples``, else all of ``y[:o]``)."""
    at = np.asarray(origins, dtype=np.int64)
    if at.size and int(at.min()) < 1:
        raise ForecastError("a forecast needs at least one sample of history")
    highest = np.maximum.accumulate(y)[at - 1] if samples is None else window_max(y, at, samples)
    return np.asarray(PEAK_CAP * highest, dtype=np.float64)


def peak_cap(values: Sequence[float] | FloatArray) -> float:
    """The most a floor forecast made from ``values`` may be: ``PEAK_CAP`` times their highest rate."""
    return float(PEAK_CAP * np.max(fill_gaps(values)))


def select_model(
    values: Sequence[float] | FloatArray,
    grid: Grid,
    seasonality: Seasonality = "auto",
    quantile: float = DEFAULT_QUANTILE,
    reactive_hold_seconds: float = REACTIVE_HOLD_SECONDS,
    floor_hold_seconds: float = FLOOR_HOLD_SECONDS,
    incumbent: str | None = None,
    records: tuple[tuple[str, ModelRecord], ...] = (),
    end_seconds: float | None = None,
) -> ModelChoice:
    """Pick the forecaster for this series (``backtest_model``), confirmed on older history.

    A model that wins now must also win on the history as it stood ``CONFIRMATION_SECONDS`` ago (the
    backtest the controller ran then; while the history is under a day, without its newest quarter
    instead: ``confirmation_lag``); otherwise the choice is ``REACTIVE`` with the model
    ``pending``. Evidence that appears in one window and not the next is most often luck.

    ``incumbent`` is the model the previous choice gave a floor (if any): trust is hysteretic. A new
    model needs the confidence bound below 1; the incumbent keeps its trust while its score stays
    below 1, so a floor is not switched off and on by the noise of the bound (a floor that comes and
    goes with the last few days' luck is on after the bursts it would have caught, off before the next).

    ``records`` and ``end_seconds``: see ``backtest_model``. Without records (the first choice, or the
    first after an operator restart) a history longer than the backtest span has its older part
    backtested first, so the records start with the evidence the span no longer shows.
    """
    y = fill_gaps(values)
    older = y.size - backtest_span(grid)
    if not records and end_seconds is not None and older >= grid.min_history:
        records = backtest_model(
            y[:older], grid, seasonality, quantile, reactive_hold_seconds, floor_hold_seconds,
            end_seconds=end_seconds - (y.size - older) * grid.step_seconds,
        ).records
    choice = backtest_model(
        y, grid, seasonality, quantile, reactive_hold_seconds, floor_hold_seconds, incumbent=incumbent,
        records=records, end_seconds=end_seconds,
    )
    if not choice.uses_floor or choice.model == incumbent:
        return choice
    earlier = y[: y.size - confirmation_lag(y.size, grid)]
    confirmed = earlier.size >= grid.min_history and backtest_model(
        earlier, grid, seasonality, quantile, reactive_hold_seconds, floor_hold_seconds
    ).uses_floor
    if confirmed:
        return choice
    return ModelChoice(
        REACTIVE, 1.0, 0, choice.baseline_error, choice.baseline_error, choice.origins, choice.model, choice.records
    )


def incumbent_model(previous: ModelChoice | None) -> str | None:
    """The model whose floor is in force (for ``select_model``'s hysteresis), if any."""
    return previous.model if previous is not None and previous.uses_floor else None


def confirmation_lag(samples: int, grid: Grid) -> int:
    """How many of the newest samples the confirming backtest leaves out."""
    return min(math.ceil(CONFIRMATION_SECONDS / grid.step_seconds), math.ceil(CONFIRMATION_SHARE * samples))


def min_origins(model: str, quantile: float = DEFAULT_QUANTILE) -> int:
    """Backtest origins a model needs: the level model only its quantile's, the shape models more."""
    return quantile_origins(quantile) if model == BURST_RESERVE else MIN_BACKTEST_ORIGINS


def backtest_model(
    values: Sequence[float] | FloatArray,
    grid: Grid,
    seasonality: Seasonality = "auto",
    quantile: float = DEFAULT_QUANTILE,
    reactive_hold_seconds: float = REACTIVE_HOLD_SECONDS,
    floor_hold_seconds: float = FLOOR_HOLD_SECONDS,
    incumbent: str | None = None,
    records: tuple[tuple[str, ModelRecord], ...] = (),
    end_seconds: float | None = None,
) -> ModelChoice:
    """Pick the forecaster for this series by rolling-origin backtest (see the module docstring).

    Every origin of the recent span is replayed as the controller would run it: reactive scaling
    holds the highest rate of the last ``reactive_hold_seconds`` (the HPA's scale-down window), the
    floor holds the highest quantile forecast of the last ``floor_hold_seconds`` (the controller's
    stabilisation window), and what is provided is the larger of the two. A model's score is the
    demand it leaves uncovered divided by what reactive scaling leaves uncovered when it spends the
    same capacity on average (a lower HPA target), so a model wins only by putting capacity where the
    peaks come, never by buying more of it. The burst reserve, trusted without a confidence bound, is
    scored against the HPA with its tolerance (``hpa_hold``), the baseline it really competes with.
    Shortfalls are cross-validated over up to ``BACKTEST_FOLDS`` folds; among the models ``trusted``
    admits (a shape model must also be confidently better than the burst reserve when that is
    trusted), the lowest score wins; otherwise ``REACTIVE``. Raises ForecastError when the series is
    shorter than ``grid.min_history``.

    With ``end_seconds`` (the time at which ``values`` ends, on a clock the caller keeps consistent
    from call to call) each scored model's per-origin shortfalls are added to its record in
    ``records`` (``ModelRecord``; the updated records come back in the choice). Once a record holds
    evidence older than this backtest's span, the model is trusted only while its record is better
    than reactive too (the model whose floor is in force: not worse than reactive by more than the
    HPA's tolerance, ``RECORD_KEEP_SCORE``).
    """
    if not 0.5 <= quantile < 1.0:
        raise ForecastError(f"quantile must be in [0.5, 1), got {quantile}")
    y = fill_gaps(values)
    if y.size < grid.min_history:
        raise ForecastError(
            f"{y.size} samples of history; at least {grid.min_history} are needed for a backtest"
        )
    reactive_hold = max(1, round(reactive_hold_seconds / grid.step_seconds))
    floor_hold = max(1, round(floor_hold_seconds / grid.step_seconds))
    candidates = candidate_models(seasonality)
    # One origin set for every model, so their losses are comparable; most models need more history.
    base_origins = backtest_origins(y.size, grid, min(earliest_origin(m, grid) for m in candidates))
    actual = future_peak(y, base_origins, grid.horizon)
    # Scored on the part of the horizon that capacity asked for at the origin can still serve.
    ready_peak = future_peak(y, base_origins + grid.lead, grid.horizon - grid.lead)
    reactive = rolling_max(persistence(y, base_origins), reactive_hold)
    # The burst reserve, trusted on its point score alone, is judged against the HPA as it really
    # holds capacity (within its tolerance); see ``hpa_hold``.
    reactive_hpa = hpa_hold(persistence(y, base_origins), reactive_hold)
    scale = max(float(np.mean(actual)), 1e-12)
    baseline_factor = quantile_factor(actual, reactive, quantile)
    baseline_error = pinball_loss(actual, baseline_factor * reactive, quantile) / scale
    best = ModelChoice(REACTIVE, 1.0, 0, baseline_error, baseline_error, base_origins.size)
    best_score = math.inf
    known = dict(records)
    refused: str | None = None
    # The fallback first: a shape model is worth its extra assumptions only when it is confidently
    # better than the fallback too (its upper bound below the fallback's score).
    fallback_score = math.inf
    for model in sorted(candidates, key=lambda name: name != BURST_FALLBACK):
        periods = _periods_available(model, grid, y.size)
        if periods == 0:
            continue
        keep = base_origins >= earliest_origin(model, grid, periods)
        origins = base_origins[keep]
        if origins.size < min_origins(model, quantile):
            continue
        folds = min(BACKTEST_FOLDS, origins.size // grid.horizon)
        if folds < MIN_FOLDS:
            continue
        point = point_forecast(model, y, origins, grid, periods)
        baseline = reactive_hpa if model == BURST_FALLBACK else reactive
        model_gap, reactive_gap = cross_validated_gaps(
            point, actual[keep], ready_peak[keep], baseline[keep], quantile, floor_hold, folds
        )
        model_short, reactive_short = fold_sums(model_gap, folds), fold_sums(reactive_gap, folds)
        score, upper = score_with_bound(model_short, reactive_short, trust_t(folds, len(candidates)))
        record_refuses = False
        if end_seconds is not None:
            times = end_seconds - (y.size - origins).astype(np.float64) * grid.step_seconds
            record = (known.get(model) or ModelRecord()).updated(times, model_gap, reactive_gap)
            known[model] = record
            # The record extends the backtest with what its span no longer shows (rare large bursts);
            # within the span the rules below decide alone.
            limit = RECORD_KEEP_SCORE if model == incumbent else 1.0
            record_refuses = record.since < times[0] and not record.score < limit
        if not trusted(model, score, upper, incumbent):
            continue
        if record_refuses:
            refused = refused or model
            continue
        if model == BURST_FALLBACK:
            fallback_score = score
        elif not (upper < fallback_score or (model == incumbent and score < fallback_score)):
            continue
        if score < best_score:
            best_score = score
            factor = quantile_factor(actual[keep], point, quantile)
            provided = np.maximum(rolling_max(factor * point, floor_hold), reactive[keep])
            error = pinball_loss(actual[keep], provided, quantile) / scale
            reference = pinball_loss(actual[keep], baseline_factor * reactive[keep], quantile) / scale
            best = ModelChoice(model, factor, periods, error, reference, int(origins.size))
    return replace(best, records=tuple(sorted(known.items())), refused=None if best.uses_floor else refused)


def hpa_hold(rates: FloatArray, hold: int, tolerance: float = HPA_TOLERANCE) -> FloatArray:
    """Capacity (in requests/s at target) the HPA holds at each step, tolerance included.

    Like ``rolling_max`` (the highest rate of the last ``hold`` steps, the scale-down window), but a
    rate within ``tolerance`` of the capacity held is no reason to scale: the HPA keeps what it has.
    Noise inside the tolerance band is therefore ridden out, not chased, as in the cluster.
    """
    out = np.empty(rates.size, dtype=np.float64)
    window: deque[tuple[int, float]] = deque()  # decreasing (step, proposal): the front is the maximum
    current = 0.0
    for i, rate in enumerate(rates.tolist()):
        proposal = current if current > 0 and abs(rate / current - 1.0) <= tolerance else rate
        while window and window[0][0] <= i - hold:
            window.popleft()
        while window and window[-1][1] <= proposal:
            window.pop()
        window.append((i, proposal))
        current = proposal if proposal >= current else min(current, window[0][1])
        out[i] = current
    return out


def trusted(model: str, score: float, upper: float, incumbent: str | None) -> bool:
    """Whether a model's backtest earns (or keeps) it a floor; ``score`` < 1 is better than reactive.

    - Any model whose upper confidence bound is below 1 (confidently better than reactive).
    - ``burst-reserve`` whenever it beats reactive at all: it is the one pre-specified fallback (no
      best-of-several selection to correct for), and a level-proportional reserve is only a re-shaped
      headroom, so its downside is that of a slightly different HPA target.
    - The incumbent (the model whose floor is in force) until it is confidently worse than reactive
      (its lower bound above 1): a floor switched off and on by noise in the evidence costs more
      than either (capacity bought part-time is bought at the wrong times).
    """
    if not math.isfinite(score):
        return False  # reactive scaling missed nothing: there is nothing for a floor to win
    if upper < 1.0:
        return True
    if model == BURST_FALLBACK and score < 1.0:
        return True
    if model == incumbent:
        lower = 2.0 * score - upper if math.isfinite(upper) else -math.inf
        return lower <= 1.0 if INCUMBENT_RULE == "lower" else score < 1.0
    return False


def cross_validated_gaps(
    point: FloatArray, actual: FloatArray, ready_peak: FloatArray, reactive: FloatArray, quantile: float,
    floor_hold: int, folds: int = BACKTEST_FOLDS,
) -> tuple[FloatArray, FloatArray]:
    """Per origin: demand the floor leaves uncovered, and what reactive scaling spending as much leaves.

    The origins are cut into consecutive folds; each fold is scored with the quantile factor fitted
    on the other folds, so the result says how the model does on data its calibration has not seen.
    """
    bounds = np.linspace(0, point.size, folds + 1).astype(np.int64)
    provided = np.empty(point.size, dtype=np.float64)
    for k in range(folds):
        part = slice(int(bounds[k]), int(bounds[k + 1]))
        rest = np.ones(point.size, dtype=bool)
        rest[part] = False
        factor = quantile_factor(actual[rest], point[rest], quantile)
        provided[part] = np.maximum(rolling_max(factor * point[part], floor_hold), reactive[part])
    # Reactive scaling spends the same capacity over the whole span (one lower HPA target, as a user
    # would buy it), not fold by fold: a floor that is costly in quiet folds pays for it here.
    equal_cost = float(np.sum(provided)) / max(float(np.sum(reactive)), 1e-12) * reactive
    return np.maximum(ready_peak - provided, 0.0), np.maximum(ready_peak - equal_cost, 0.0)


def fold_sums(gaps: FloatArray, folds: int) -> FloatArray:
    """Per-origin shortfalls summed over ``folds`` consecutive folds (``cross_validated_gaps``' cut)."""
    bounds = np.linspace(0, gaps.size, folds + 1).astype(np.int64)
    return np.add.reduceat(gaps, bounds[:-1]) if gaps.size else np.zeros(folds)


def cross_validated_shortfalls(
    point: FloatArray, actual: FloatArray, ready_peak: FloatArray, reactive: FloatArray, quantile: float,
    floor_hold: int, folds: int = BACKTEST_FOLDS,
) -> tuple[FloatArray, FloatArray]:
    """Per fold: demand the floor leaves uncovered, and what reactive scaling spending as much leaves."""
    model_gap, reactive_gap = cross_validated_gaps(point, actual, ready_peak, reactive, quantile, floor_hold, folds)
    return fold_sums(model_gap, folds), fold_sums(reactive_gap, folds)


def score_with_bound(model_short: FloatArray, reactive_short: FloatArray, t_quantile: float) -> tuple[float, float]:
    """The pooled score (model shortfall over reactive's) and an upper confidence bound on it.

    The score is a ratio of totals, so folds weigh by how much reactive scaling missed in them (a quiet
    fold says little either way, a fold with the morning ramp a lot). Its standard error is the ratio
    estimator's (delta method over the folds): each fold contributes its shortfall residual
    ``model - score * reactive`` in demand, so a quiet fold with a tiny denominator cannot blow up the
    bound the way a per-fold ratio would.
    """
    total = float(np.sum(reactive_short))
    if total <= 0:
        return math.inf, math.inf
    folds = model_short.size
    score = float(np.sum(model_short)) / total
    if folds < 2:
        return score, math.inf
    residuals = model_short - score * reactive_short
    variance = folds / (folds - 1) * float(np.sum(residuals * residuals)) / (total * total)
    return score, score + t_quantile * math.sqrt(variance)


def seasonal_min_history(model: str, grid: Grid) -> int:
    """Samples of history before the seasonal ``model`` can be backtested at all.

    One period and a window before its first origin (``earliest_origin``), one horizon of outcome,
    and origins enough for ``_periods_available`` and ``MIN_FOLDS`` folds of one horizon each.
    """
    return earliest_origin(model, grid) + grid.horizon + max(MIN_BACKTEST_ORIGINS, MIN_FOLDS * grid.horizon - 1)


def _periods_available(model: str, grid: Grid, n: int) -> int:
    if model not in (SEASONAL_DAILY, SEASONAL_WEEKLY):
        return 1
    period = grid.period(model)
    usable = n - grid.window - grid.horizon - MIN_BACKTEST_ORIGINS
    return max(0, min(MAX_SEASONAL_PERIODS[model], usable // period))


def forecast_peak(
    values: Sequence[float] | FloatArray, grid: Grid, choice: ModelChoice, origins: IntArray | None = None,
    history_samples: int | None = None,
) -> FloatArray:
    """Upper-quantile forecast of the peak rate over the horizon at each origin (default: the end).

    With the ``REACTIVE`` choice the forecast is the last known rate (no floor above what reactive
    scaling gives). A floor forecast is capped at ``PEAK_CAP`` times the highest rate of the history
    (of the last ``history_samples`` before each origin when given: the lookback the controller fetches).
    """
    y = fill_gaps(values)
    at = np.asarray([y.size] if origins is None else origins, dtype=np.int64)
    if not choice.uses_floor:
        return persistence(y, at)
    forecast = choice.factor * point_forecast(choice.model, y, at, grid, choice.periods)
    return np.asarray(np.minimum(forecast, history_cap(y, at, history_samples)), dtype=np.float64)
