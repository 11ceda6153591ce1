"""Status conditions follow the Deployment's real availability and change only when something changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from moe_operator.api import parse_spec
from moe_operator.status import Problem, desired_status, set_condition, status_patch

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SPEC = parse_spec({})


def deployment(*, desired: int = 2, ready: int = 0, available: int = 0, updated: int | None = None,
               generation: int = 1, observed: int = 1, deadline: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "replicas": desired,
        "readyReplicas": ready,
        "availableReplicas": available,
        "updatedReplicas": desired if updated is None else updated,
    }
    if deadline:
        status["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    return {"metadata": {"generation": generation}, "spec": {"replicas": desired}, "status": status}


def condition(status: dict[str, Any], type: str) -> dict[str, Any]:
    (found,) = [item for item in status["conditions"] if item["type"] == type]
    return found


def compute(dep: dict[str, Any] | None, current: dict[str, Any] | None = None, problem: Problem | None = None,
            now: datetime = NOW) -> dict[str, Any]:
    return desired_status(name="r1", spec=SPEC, generation=3, deployment=dep, current=current or {},
                          problem=problem, now=now)


def test_objects_created_but_no_pod_available_is_not_ready() -> None:
    status = compute(deployment(ready=0, available=0))
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Progressing")["status"] == "True"


def test_ready_when_the_deployment_has_available_replicas() -> None:
    status = compute(deployment(ready=2, available=2))
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Available", 3)
    assert condition(status, "Progressing")["reason"] == "RolloutComplete"
    assert condition(status, "Degraded")["status"] == "False"
    assert (status["replicas"], status["readyReplicas"], status["observedGeneration"]) == (2, 2, 3)


def test_selector_is_the_string_form_for_the_scale_subresource() -> None:
    assert compute(None)["selector"] == (
        "app.kubernetes.io/component=router,app.kubernetes.io/instance=r1,app.kubernetes.io/name=moe-router"
    )


def test_a_rollout_the_deployment_has_not_observed_yet_is_progressing() -> None:
    status = compute(deployment(ready=2, available=2, generation=4, observed=3))
    assert condition(status, "Progressing")["reason"] == "RollingOut"


def test_progress_deadline_exceeded_is_degraded() -> None:
    status = compute(deployment(ready=0, deadline=True))
    assert condition(status, "Degraded")["reason"] == "ProgressDeadlineExceeded"


def test_problem_sets_degraded_with_its_reason_and_message() -> None:
    problem = Problem("SecretNotFound", "Secret ml/keys referenced by spec.runtime.apiKeySecretRef does not exist")
    status = compute(deployment(ready=2, available=2), problem=problem)
    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", problem.reason, problem.message)
    assert condition(status, "Ready")["status"] == "True"  # what runs keeps running


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = compute(deployment(ready=2, available=2))
    later = compute(deployment(ready=1, available=1), current=first, now=NOW + timedelta(minutes=5))
    assert condition(later, "Ready")["lastTransitionTime"] == condition(first, "Ready")["lastTransitionTime"]
    down = compute(deployment(ready=0, available=0), current=later, now=NOW + timedelta(minutes=9))
    assert condition(down, "Ready")["lastTransitionTime"] == "2026-11-22T12:09:00Z"


def test_an_unchanged_observation_needs_no_status_write() -> None:
    first = compute(deployment(ready=2, available=2))
    again = compute(deployment(ready=2, available=2), current=first, now=NOW + timedelta(hours=1))
    assert status_patch(first, again) == {}


def test_status_patch_holds_only_the_changed_keys() -> None:
    first = compute(deployment(ready=1, available=1))
    second = compute(deployment(ready=2, available=2), current=first)
    assert set(status_patch(first, second)) == {"readyReplicas", "conditions"}


def test_other_conditions_and_the_prediction_are_kept() -> None:
    predictive = parse_spec({"autoscaling": {"enabled": True, "predictive": {
        "mode": "ForecastOnly", "prometheus": {"url": "http://p:9090"}, "capacityPerReplica": 10}}})
    current = {"prediction": {"predictedLoad": 12.5},
               "conditions": set_condition([], type="PredictionReady", status="True", reason="Forecasting",
                                           message="", generation=3, now=NOW)}
    status = desired_status(name="r1", spec=predictive, generation=3, deployment=None, current=current,
                            problem=None, now=NOW)
    assert status["prediction"] == {"predictedLoad": 12.5}
    assert condition(status, "PredictionReady")["reason"] == "Forecasting"


def test_condition_reasons_match_the_metav1_condition_pattern() -> None:
    import re

    pattern = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    for dep in (None, deployment(), deployment(ready=2, available=2), deployment(deadline=True), deployment(desired=0)):
        for item in compute(dep)["conditions"]:
            assert pattern.match(item["reason"]), item


def test_a_prediction_left_from_an_earlier_predictive_mode_is_removed_when_mode_is_off() -> None:
    current = {"prediction": {"predictedLoad": 123.0, "recommendedReplicas": 4},
               "conditions": [{"type": "PredictionReady", "status": "True", "reason": "Forecast",
                               "message": "", "lastTransitionTime": "2026-11-22T11:00:00Z"}]}
    status = compute(deployment(ready=2, available=2), current=current)
    assert status_patch(current, status)["prediction"] is None
    assert [c for c in status["conditions"] if c["type"] == "PredictionReady"] == []


def test_a_router_without_a_prediction_gets_no_prediction_key_written() -> None:
    assert "prediction" not in status_patch({}, compute(deployment(ready=2, available=2)))


def test_a_predictive_mode_without_autoscaling_says_the_forecast_does_not_run() -> None:
    spec = parse_spec({"autoscaling": {"enabled": False, "predictive": {
        "mode": "ForecastOnly", "capacityPerReplica": 10, "prometheus": {"url": "http://prometheus:9090"}}}})
    current = {"prediction": {"predictedLoad": 5.0}}
    status = desired_status(name="r1", spec=spec, generation=3, deployment=deployment(), current=current,
                            problem=None, now=NOW)
    ready = condition(status, "PredictionReady")
    assert ready["status"] == "False" and ready["reason"] == "AutoscalingDisabled"
    assert "spec.autoscaling.enabled" in ready["message"]
    assert status_patch(current, status)["prediction"] is None


def test_the_prediction_stays_while_the_forecast_runs() -> None:
    spec = parse_spec({"autoscaling": {"enabled": True, "predictive": {
        "mode": "Active", "capacityPerReplica": 10, "prometheus": {"url": "http://prometheus:9090"}}}})
    current = {"prediction": {"predictedLoad": 5.0, "appliedMinReplicas": 3}}
    status = desired_status(name="r1", spec=spec, generation=3, deployment=deployment(), current=current,
                            problem=None, now=NOW)
    assert status["prediction"] == current["prediction"] and "prediction" not in status_patch(current, status)


def test_a_prediction_key_the_new_prediction_lacks_is_deleted_by_the_merge_patch() -> None:
    current = {"prediction": {"predictedLoad": 150.0, "recommendedReplicas": 6, "appliedMinReplicas": 6,
                              "backtestError": 0.1, "horizonSeconds": 720, "updatedAt": "2026-11-22T11:00:00Z"}}
    desired = {"prediction": {"horizonSeconds": 720, "updatedAt": "2026-11-22T12:00:00Z"}}  # InsufficientHistory
    assert status_patch(current, desired) == {"prediction": {
        "predictedLoad": None, "recommendedReplicas": None, "appliedMinReplicas": None, "backtestError": None,
        "horizonSeconds": 720, "updatedAt": "2026-11-22T12:00:00Z",
    }}
    assert status_patch(desired, desired) == {}


def test_forecast_only_drops_a_floor_left_from_active_mode() -> None:
    spec = parse_spec({"autoscaling": {"enabled": True, "predictive": {
        "mode": "ForecastOnly", "capacityPerReplica": 10, "prometheus": {"url": "http://prometheus:9090"}}}})
    current = {"prediction": {"predictedLoad": 5.0, "appliedMinReplicas": 3}}
    status = desired_status(name="r1", spec=spec, generation=3, deployment=deployment(), current=current,
                            problem=None, now=NOW)
    assert status["prediction"] == {"predictedLoad": 5.0}
    assert status_patch(current, status)["prediction"] == {"predictedLoad": 5.0, "appliedMinReplicas": None}
    assert "prediction" not in status_patch(status, desired_status(
        name="r1", spec=spec, generation=3, deployment=deployment(), current=status, problem=None, now=NOW))
