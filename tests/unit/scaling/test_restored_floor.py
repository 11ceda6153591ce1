"""An operator restart (or HA failover) goes on from the floor its status records, not from minReplicas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from moe_operator.api import parse_spec
from moe_operator.scaling.controller import restored_state
from moe_operator.scaling.policy import FloorSettings, floor_on_failure, floor_on_success, restored_floor

SETTINGS = FloorSettings(
    min_replicas=2, max_replicas=20, stabilization_seconds=600, grace_period_seconds=3600, decay_seconds=600
)
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_failing_forecasts_keep_a_restored_floor_through_the_grace_period_then_decay_it() -> None:
    applied_at = 1000.0
    memory = restored_floor(6, applied_at, applied_at + 60, SETTINGS)
    assert floor_on_failure(memory, applied_at + 60, SETTINGS) == 6
    assert floor_on_failure(memory, applied_at + 3600, SETTINGS) == 6
    assert floor_on_failure(memory, applied_at + 3600 + 300, SETTINGS) == 4  # half way down the decay
    assert floor_on_failure(memory, applied_at + 3600 + 600, SETTINGS) == 2


def test_a_good_forecast_lowers_a_restored_floor_only_through_the_stabilisation_window() -> None:
    applied_at = 1000.0
    memory = restored_floor(6, applied_at, applied_at + 60, SETTINGS)
    assert floor_on_success(memory, applied_at + 60, 2, SETTINGS) == 6
    assert floor_on_success(memory, applied_at + 599, 2, SETTINGS) == 6
    assert floor_on_success(memory, applied_at + 601, 2, SETTINGS) == 2


def test_a_floor_older_than_the_grace_period_and_the_decay_holds_nothing() -> None:
    applied_at = 1000.0
    late = applied_at + SETTINGS.grace_period_seconds + SETTINGS.decay_seconds
    memory = restored_floor(6, applied_at, late, SETTINGS)
    assert memory.last_good is None and not memory.recommendations
    assert floor_on_failure(memory, late, SETTINGS) == 2
    # ... and one restored part way through the decay goes on decaying from there.
    memory = restored_floor(6, applied_at, late - 300, SETTINGS)
    assert floor_on_failure(memory, late - 300, SETTINGS) == 4


def test_a_restored_floor_is_clamped_to_the_current_bounds() -> None:
    assert restored_floor(30, 0.0, 10.0, SETTINGS).last_good == 20
    assert restored_floor(1, 0.0, 10.0, SETTINGS).last_good == 2


def test_a_timestamp_ahead_of_this_clock_does_not_stretch_the_grace_period() -> None:
    memory = restored_floor(6, 5000.0, 1000.0, SETTINGS)
    assert memory.last_good_at == 1000.0


def spec(mode: str = "Active", enabled: bool = True) -> Any:
    return parse_spec({"autoscaling": {"enabled": enabled, "minReplicas": 2, "maxReplicas": 10, "predictive": {
        "mode": mode, "prometheus": {"url": "http://prometheus:9090"}, "capacityPerReplica": 10,
        "gracePeriodSeconds": 3600, "scaleDownStabilizationSeconds": 600,
    }}})


PREDICTION = {
    "predictedLoad": 150.0, "horizonSeconds": 720, "recommendedReplicas": 6, "appliedMinReplicas": 6,
    "model": "seasonal_daily", "backtestError": 0.12, "updatedAt": "2026-11-22T11:59:00Z",
}


def test_the_state_of_a_restarted_operator_holds_the_floor_in_the_status_from_updated_at() -> None:
    state = restored_state(spec(), PREDICTION, NOW)
    assert state.floor.last_good == state.floor.applied == 6
    assert state.floor.last_good_at == (NOW - timedelta(minutes=1)).timestamp()
    assert list(state.floor.recommendations) == [((NOW - timedelta(minutes=1)).timestamp(), 6)]
    # A failing tick reports the last prediction, not an empty one.
    assert state.last_prediction is not None and state.last_prediction.predicted_load == 150.0


def test_only_active_mode_restores_a_floor() -> None:
    for other in (spec("ForecastOnly"), spec("Active", enabled=False)):
        state = restored_state(other, PREDICTION, NOW)
        assert state.floor.last_good is None and not state.floor.recommendations


def test_a_status_without_a_readable_prediction_restores_nothing() -> None:
    assert restored_state(spec(), None, NOW).last_prediction is None
    unknown = restored_state(spec(), {**PREDICTION, "futureField": 1}, NOW)  # a newer operator's key is ignored
    assert unknown.floor.last_good == 6
    undated = restored_state(spec(), {**PREDICTION, "updatedAt": "yesterday"}, NOW)
    assert undated.floor.last_good is None  # its age is unknown: nothing to hold
    assert restored_state(spec(), {**PREDICTION, "appliedMinReplicas": "six"}, NOW).floor.last_good is None
