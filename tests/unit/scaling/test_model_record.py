"""Each model's long-run record: what the backtest's span no longer shows still counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_operator.scaling import simulate as simulate_module
from moe_operator.scaling.controller import PredictiveState, _current_choice, forecast_message
from moe_operator.scaling.forecast import (
    BURST_RESERVE,
    LOCAL_TREND,
    REACTIVE,
    RECORD_HALF_LIFE_SECONDS,
    RECORD_KEEP_SCORE,
    Grid,
    ModelChoice,
    ModelRecord,
    backtest_model,
    backtest_span,
    confirmation_lag,
    select_model,
)
from moe_operator.scaling.policy import HPA_TOLERANCE
from moe_operator.scaling.simulate import SimulationConfig, forecast_schedule
from moe_operator.scaling.traces import from_rate_samples

GRID = Grid.of(60.0, 420.0, lead_seconds=300.0)
#: A burst every 5 minutes on a calm level: the burst reserve beats reactive scaling on this span.
BURSTS = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 80)
END = 1_000_000.0
#: Before the first sample of BURSTS, so older than any origin of its backtest span.
BEFORE = END - BURSTS.size * GRID.step_seconds - 60.0


def span_record() -> ModelRecord:
    record = backtest_model(BURSTS, GRID, end_seconds=END).record(BURST_RESERVE)
    assert record is not None
    return record


def older_record(score: float) -> ModelRecord:
    """Evidence from before the span, weighty enough that adding the span leaves the record at ``score``."""
    span = span_record()
    reactive = 100.0 * span.reactive_short
    return ModelRecord(score * (reactive + span.reactive_short) - span.model_short, reactive, BEFORE, BEFORE - 86400.0)


def test_a_record_counts_each_origin_once_and_fades_older_evidence_by_its_half_life() -> None:
    record = ModelRecord().updated(np.array([0.0, 60.0, 120.0]), np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]))
    assert (record.through, record.since) == (120.0, 0.0)
    # Within a few minutes, fading is negligible (a 30-day half-life).
    assert record.model_short == pytest.approx(2.0, rel=1e-4) and record.reactive_short == pytest.approx(3.0, rel=1e-4)
    # 60 and 120 were counted already; only 180 is new.
    again = record.updated(np.array([60.0, 120.0, 180.0]), np.array([5.0, 5.0, 1.0]), np.array([0.0, 0.0, 2.0]))
    assert again.model_short == pytest.approx(3.0, rel=1e-4) and again.reactive_short == pytest.approx(5.0, rel=1e-4)
    assert (again.through, again.since) == (180.0, 0.0)
    # One half-life later the old evidence weighs half.
    later = record.updated(np.array([120.0 + RECORD_HALF_LIFE_SECONDS]), np.zeros(1), np.zeros(1))
    assert later.model_short == pytest.approx(1.0, rel=1e-4) and later.reactive_short == pytest.approx(1.5, rel=1e-4)
    assert record.updated(np.array([60.0]), np.ones(1), np.ones(1)) is record


def test_a_record_where_reactive_missed_nothing_has_no_finite_score() -> None:
    assert math.isinf(ModelRecord(3.0, 0.0).score)
    assert ModelRecord(3.0, 6.0).score == 0.5


def test_the_backtest_returns_the_record_of_every_model_it_scored() -> None:
    choice = backtest_model(BURSTS, GRID, end_seconds=END)
    assert choice.model == BURST_RESERVE
    record = choice.record(BURST_RESERVE)
    assert record is not None
    # The newest origin with a known outcome is one horizon before the end of the history.
    assert record.through == END - GRID.horizon * GRID.step_seconds
    assert record.model_short < record.reactive_short
    # The same history again adds nothing.
    assert backtest_model(BURSTS, GRID, records=choice.records, end_seconds=END).record(BURST_RESERVE) == record
    # Without a clock there is no record.
    assert backtest_model(BURSTS, GRID).records == ()


def test_a_model_worse_than_reactive_over_its_long_record_gets_no_floor() -> None:
    bad = older_record(1.5)
    choice = backtest_model(BURSTS, GRID, records=((BURST_RESERVE, bad),), end_seconds=END)
    assert choice.model == REACTIVE
    kept = choice.record(BURST_RESERVE)
    assert kept is not None and kept.score == pytest.approx(1.5, rel=1e-3)
    good = older_record(0.8)
    assert backtest_model(BURSTS, GRID, records=((BURST_RESERVE, good),), end_seconds=END).model == BURST_RESERVE


def test_the_floor_in_force_is_kept_while_its_record_is_within_the_hpa_tolerance() -> None:
    assert pytest.approx(1.0 + HPA_TOLERANCE) == RECORD_KEEP_SCORE
    within = ((BURST_RESERVE, older_record(1.05)),)
    assert backtest_model(BURSTS, GRID, records=within, end_seconds=END).model == REACTIVE
    kept = backtest_model(BURSTS, GRID, incumbent=BURST_RESERVE, records=within, end_seconds=END)
    assert kept.model == BURST_RESERVE
    beyond = ((BURST_RESERVE, older_record(1.2)),)
    assert backtest_model(BURSTS, GRID, incumbent=BURST_RESERVE, records=beyond, end_seconds=END).model == REACTIVE


def test_evidence_inside_the_span_is_left_to_the_backtest_alone() -> None:
    span = span_record()
    # As bad as it gets, but all of it from origins the span still shows.
    inside = ModelRecord(1e9, 1.0, span.through - 600.0, span.since + 60.0)
    assert backtest_model(BURSTS, GRID, records=((BURST_RESERVE, inside),), end_seconds=END).model == BURST_RESERVE


def test_a_choice_awaiting_confirmation_keeps_the_records() -> None:
    ramp = 10.0 + np.arange(50) * 1.0 + np.random.default_rng(0).normal(0.0, 0.5, 50)
    grid = Grid.of(300.0, 900.0, lead_seconds=600.0)
    choice = select_model(ramp, grid, end_seconds=END)
    assert choice.model == REACTIVE and choice.pending is not None
    assert choice.records and all(isinstance(record, ModelRecord) for _, record in choice.records)


@pytest.mark.parametrize(
    ("samples", "earlier"),
    [(50, "65 min ago (a quarter of the history, while it is under a day)"), (600, "6 h ago"), (288, "6 h ago")],
)
def test_a_pending_model_is_said_to_lack_the_confirming_backtest_it_really_ran(samples: int, earlier: str) -> None:
    grid = Grid.of(300.0, 900.0, lead_seconds=600.0)
    pending = ModelChoice(REACTIVE, 1.0, 0, 0.2, 0.2, 40, pending=LOCAL_TREND)
    lag_seconds = confirmation_lag(samples, grid) * grid.step_seconds
    assert forecast_message(pending, 30.0, 900, 1, confirmation_seconds=lag_seconds) == (
        f"local-trend beat reactive scaling in this backtest but not in the one {earlier}: "
        "no floor until it is confirmed"
    )


def test_the_simulator_carries_each_choice_records_into_the_next_backtest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, tuple[tuple[str, ModelRecord], ...]]] = []
    returned: list[ModelChoice] = []
    real = simulate_module.select_model

    def spy(*args: object, **kwargs: object) -> ModelChoice:
        calls.append((kwargs["end_seconds"], kwargs["records"]))  # type: ignore[arg-type]
        choice = real(*args, **kwargs)  # type: ignore[arg-type]
        returned.append(choice)
        return choice

    monkeypatch.setattr(simulate_module, "select_model", spy)
    rates = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 12 * 24)
    trace = from_rate_samples(np.arange(rates.size, dtype=np.float64) * 60.0, rates)
    forecast_schedule(trace, SimulationConfig(10.0, 300.0, 0.7, 1, 20))
    assert len(calls) > 3
    assert calls[0][1] == ()
    for (end, records), previous in zip(calls[1:], returned, strict=False):
        assert records == previous.records  # each backtest starts from the last one's records
        assert end > 0
    assert [end for end, _ in calls] == sorted(end for end, _ in calls)


def test_the_controller_carries_the_records_from_refit_to_refit_and_restarts_them_on_a_new_spec() -> None:
    state = PredictiveState()
    grid = GRID
    first = _current_choice(state, BURSTS, grid, "auto", 600.0, END)
    record = first.record(BURST_RESERVE)
    assert record is not None and record.through == END - grid.horizon * grid.step_seconds
    # Seven hours later (a refit is due) with seven more hours of history: the same record, extended.
    longer = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], 80 + 84)
    later = _current_choice(state, longer, grid, "auto", 600.0, END + 7 * 3600.0)
    extended = later.record(BURST_RESERVE)
    assert extended is not None and extended.since == record.since
    assert extended.through == END + 7 * 3600.0 - grid.horizon * grid.step_seconds
    # A new horizon is a new comparison: the record starts again.
    other = Grid.of(60.0, 600.0, lead_seconds=300.0)
    fresh = _current_choice(state, longer, other, "auto", 600.0, END + 7 * 3600.0)
    restarted = fresh.record(BURST_RESERVE)
    assert restarted is not None and restarted.since > record.since


def restart_history() -> tuple[Grid, np.ndarray, int]:
    """Sustained, growing bursts (where a floor on the level loses) followed by a backtest span of short
    regular bursts (where it wins): what an operator restarted today reads back from Prometheus."""
    grid = Grid.of(300.0, 900.0, lead_seconds=600.0)
    span = backtest_span(grid)
    older = np.full(800, 10.0) + np.random.default_rng(1).normal(0.0, 1.0, 800)
    for start in range(50, 760, 150):
        older[start : start + 24] = np.linspace(50.0, 2000.0, 24)
    recent = np.tile([10.0, 10.0, 10.0, 10.0, 40.0], (span + 200) // 5)
    return grid, np.concatenate([older, recent]), span


def test_without_records_the_history_beyond_the_span_is_backtested_first() -> None:
    grid, y, span = restart_history()
    older = backtest_model(y[: y.size - span], grid, end_seconds=END - span * grid.step_seconds)
    seed = older.record(BURST_RESERVE)
    assert seed is not None and seed.score > RECORD_KEEP_SCORE
    # The span alone trusts the reserve; with the older evidence read back, it is refused.
    assert backtest_model(y, grid, end_seconds=END).model == BURST_RESERVE
    choice = select_model(y, grid, end_seconds=END)
    assert choice.model == REACTIVE
    record = choice.record(BURST_RESERVE)
    assert record is not None and record.since == seed.since
    assert record == backtest_model(y, grid, records=older.records, end_seconds=END).record(BURST_RESERVE)
    # Records carried from an earlier choice are used as they are (no second reading of the past).
    carried = select_model(y, grid, records=choice.records, end_seconds=END)
    assert carried.record(BURST_RESERVE) == record


def test_a_model_refused_by_its_record_is_named_and_the_status_says_why() -> None:
    choice = backtest_model(BURSTS, GRID, records=((BURST_RESERVE, older_record(1.5)),), end_seconds=END)
    assert (choice.model, choice.refused) == (REACTIVE, BURST_RESERVE)
    message = forecast_message(choice, 0.0, 420, 1)
    assert message.startswith("burst-reserve beat reactive scaling in the last 4 days but not over its long-run record")
    assert "(1.50x reactive's shortfall at equal cost)" in message
    # A floor, or no record to blame: the messages as before.
    trusted = backtest_model(BURSTS, GRID, records=((BURST_RESERVE, older_record(0.8)),), end_seconds=END)
    assert trusted.refused is None and forecast_message(trusted, 40.0, 420, 3).startswith("burst-reserve: peak 40")
    capped = forecast_message(trusted, 44.0, 420, 3, capped=True)
    assert capped.startswith("burst-reserve: peak 44 requests/s (capped at 1.1x the lookback's highest rate) within")
    quiet = backtest_model(np.full(400, 10.0), GRID, end_seconds=END)
    assert quiet.refused is None
    assert forecast_message(quiet, 10.0, 420, 1).startswith("no forecaster beat reactive scaling in the backtest")
