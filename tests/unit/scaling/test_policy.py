"""The HPA v2 model and the predictive floor: clamping, stabilisation, grace, decay, no flapping."""

from __future__ import annotations

import itertools
import math

import pytest

from moe_operator.scaling.policy import (
    FloorMemory,
    FloorSettings,
    HpaModel,
    PolicyError,
    default_horizon_seconds,
    floor_level,
    floor_on_failure,
    floor_on_success,
    floor_recommendation,
    recommended_replicas,
    refit_due,
)

SETTINGS = FloorSettings(
    min_replicas=2, max_replicas=20, stabilization_seconds=600, grace_period_seconds=600, decay_seconds=600
)


def test_recommendation_is_the_ceiling_of_load_over_target_capacity() -> None:
    assert recommended_replicas(101.0, 10.0, 0.5, 1, 100) == 21


def test_recommendation_does_not_round_an_exact_multiple_up() -> None:
    assert recommended_replicas(70.0, 10.0, 0.7, 1, 100) == 10


def test_recommendation_is_clamped_to_min_and_max() -> None:
    assert recommended_replicas(1.0, 10.0, 0.7, 3, 10) == 3
    assert recommended_replicas(1e9, 10.0, 0.7, 3, 10) == 10


def test_recommendation_for_nan_or_zero_load_is_min_replicas() -> None:
    assert recommended_replicas(math.nan, 10.0, 0.7, 4, 10) == 4
    assert recommended_replicas(0.0, 10.0, 0.7, 4, 10) == 4


def test_recommendation_rejects_a_zero_capacity() -> None:
    with pytest.raises(PolicyError, match="capacityPerReplica"):
        recommended_replicas(10.0, 0.0, 0.7, 1, 10)


def test_no_floor_choice_recommends_min_replicas_whatever_the_forecast() -> None:
    assert floor_recommendation(1e6, False, 10.0, 0.7, 2, 20) == 2


def test_floor_rises_at_once() -> None:
    memory = FloorMemory()
    floor_on_success(memory, 0, 3, SETTINGS)
    assert floor_on_success(memory, 60, 11, SETTINGS) == 11


def test_floor_lowers_only_after_the_stabilisation_window() -> None:
    memory = FloorMemory()
    floor_on_success(memory, 0, 11, SETTINGS)
    held = [floor_on_success(memory, t, 4, SETTINGS) for t in range(60, 600, 60)]
    assert held == [11] * len(held)
    assert floor_on_success(memory, 600, 4, SETTINGS) == 4


def test_floor_steps_down_gradually_through_a_falling_forecast() -> None:
    memory = FloorMemory()
    applied = [floor_on_success(memory, t * 60, 11 - t // 2, SETTINGS) for t in range(18)]
    # The highest of the last 10 minutes (a lag), lowered two levels at a time (hysteresis): 11 9 7.
    assert applied == [11] * 13 + [9, 9, 9, 9, 7]


def test_alternating_forecasts_do_not_flap_the_floor() -> None:
    memory = FloorMemory()
    applied = {floor_on_success(memory, t * 60, 10 if t % 2 else 5, SETTINGS) for t in range(1, 30)}
    assert applied == {10}


def test_floor_levels_step_by_one_then_by_the_hpa_tolerance() -> None:
    levels = sorted({floor_level(n, 1) for n in range(1, 31)})
    assert levels == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 21, 24, 27, 30]


def test_floor_levels_start_at_min_replicas() -> None:
    assert [floor_level(n, 12) for n in (1, 12, 13, 14, 15)] == [12, 12, 14, 14, 16]


def test_floor_rounds_a_recommendation_between_levels_up() -> None:
    assert floor_on_success(FloorMemory(), 0, 12, SETTINGS) == 13


def test_a_forecast_drifting_by_one_replica_moves_the_floor_less_often() -> None:
    memory = FloorMemory()
    drift = [14, 15, 16, 15, 16, 17, 18, 17, 18, 19]
    applied = [floor_on_success(memory, t * 900, rec, SETTINGS) for t, rec in enumerate(drift)]
    changes = sum(a != b for a, b in itertools.pairwise(applied))
    assert changes < sum(a != b for a, b in itertools.pairwise(drift)) // 2
    assert all(a >= r for a, r in zip(applied, drift, strict=True))  # rounding never lowers the floor


def test_refit_is_due_after_six_hours_or_when_the_history_grew_by_a_quarter() -> None:
    assert not refit_due(3600.0, 1000, 1000)
    assert refit_due(6 * 3600.0, 1000, 1000)
    assert refit_due(60.0, 40, 50)
    assert not refit_due(60.0, 40, 49)


def test_a_fall_of_one_floor_level_is_held_and_a_fall_of_two_goes_through() -> None:
    settings = FloorSettings(2, 40, 0, 600, 600)  # no window: only the hysteresis holds the floor
    memory = FloorMemory()
    assert [floor_on_success(memory, t, rec, settings) for t, rec in enumerate([17, 15, 17, 13, 2])] == [
        17, 17, 17, 13, 2
    ]


def test_floor_never_exceeds_max_replicas() -> None:
    memory = FloorMemory()
    assert floor_on_success(memory, 0, 500, SETTINGS) == SETTINGS.max_replicas


def test_failure_keeps_the_last_good_floor_through_the_grace_period() -> None:
    memory = FloorMemory()
    floor_on_success(memory, 0, 13, SETTINGS)
    assert [floor_on_failure(memory, t, SETTINGS) for t in (60, 300, 600)] == [13, 13, 13]


def test_failure_after_the_grace_period_decays_linearly_to_min_replicas() -> None:
    memory = FloorMemory()
    floor_on_success(memory, 0, 13, SETTINGS)
    decay = [floor_on_failure(memory, t, SETTINGS) for t in (900, 1050, 1200, 5000)]
    # 13 -> 2 over 600 s after the 600 s grace: half way at 900 s is 2 + ceil(5.5) = 8.
    assert decay == [8, 5, 2, 2]


def test_failure_without_any_good_forecast_holds_min_replicas() -> None:
    assert floor_on_failure(FloorMemory(), 100, SETTINGS) == SETTINGS.min_replicas


def test_recovery_after_a_failure_starts_from_the_held_floor_not_a_jump() -> None:
    memory = FloorMemory()
    floor_on_success(memory, 0, 13, SETTINGS)
    floor_on_failure(memory, 300, SETTINGS)
    assert floor_on_success(memory, 360, 3, SETTINGS) == 13


def test_floor_settings_reject_min_above_max() -> None:
    with pytest.raises(PolicyError, match="minReplicas 5 is above maxReplicas 4"):
        FloorSettings(5, 4, 0, 0, 0)


def test_default_horizon_is_startup_plus_margin() -> None:
    assert default_horizon_seconds(None, 300) == 420
    assert default_horizon_seconds(900, 300) == 900


def hpa(max_replicas: int = 100) -> HpaModel:
    return HpaModel(capacity_per_replica=10.0, target_utilization=0.5, max_replicas=max_replicas)


def test_hpa_ignores_changes_within_the_tolerance() -> None:
    # 10 ready pods at target 5 requests/s each: 54 requests/s is an 8% excess.
    assert hpa().desired(0, 54.0, 10, 10, 1) == 10


def test_hpa_scale_up_is_limited_to_double_or_four_pods_per_sync() -> None:
    assert hpa().desired(0, 500.0, 10, 10, 1) == 20
    assert hpa().desired(0, 500.0, 1, 1, 1) == 5


def test_hpa_never_exceeds_max_replicas() -> None:
    assert hpa(max_replicas=12).desired(0, 500.0, 10, 10, 1) == 12


def test_hpa_jumps_to_a_raised_min_replicas_unthrottled() -> None:
    assert hpa().desired(0, 10.0, 2, 2, 40) == 40


def test_hpa_scale_down_waits_for_the_stabilisation_window() -> None:
    model = hpa()
    model.desired(0, 100.0, 20, 20, 1)
    assert model.desired(150, 10.0, 20, 20, 1) == 20
    assert model.desired(300, 10.0, 20, 20, 1) == 2


def test_hpa_counts_starting_pods_as_idle_when_scaling_up() -> None:
    # 10 ready at 2x target, 10 more starting: the ratio over all 20 is 1.0, so no further scale-up.
    assert hpa().desired(0, 100.0, 20, 10, 1) == 20


def test_hpa_without_any_ready_pod_keeps_the_current_count() -> None:
    assert hpa().desired(0, 1000.0, 6, 0, 1) == 6
