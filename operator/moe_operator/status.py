"""Pure status logic: conditions (metav1.Condition shape) from the observed Deployment and problems.

``Ready`` follows the Deployment's real availability, not "objects were created".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from moe_operator.api import MoERouterSpec
from moe_operator.labels import selector_string

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
PREDICTION_READY = "PredictionReady"


@dataclass(frozen=True)
class Problem:
    """Why a MoERouter is Degraded: a CamelCase reason and a message naming what to fix."""

    reason: str
    message: str


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    *,
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions with one type set; lastTransitionTime moves only when the status changes."""
    previous = next((condition for condition in conditions if condition.get("type") == type), None)
    transition = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime")
        else rfc3339(now)
    )
    updated: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        updated["observedGeneration"] = generation
    others = [condition for condition in conditions if condition.get("type") != type]
    return [*others, updated] if previous is None else [
        updated if condition.get("type") == type else condition for condition in conditions
    ]


def _deployment_condition(deployment: Mapping[str, Any], type: str) -> Mapping[str, Any] | None:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type:
            return condition
    return None


@dataclass(frozen=True)
class _Rollout:
    desired: int
    replicas: int
    ready: int
    available: int
    updated: int
    observed_current: bool
    deadline_exceeded: bool

    @classmethod
    def of(cls, deployment: Mapping[str, Any]) -> _Rollout:
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        progressing = _deployment_condition(deployment, "Progressing")
        generation = (deployment.get("metadata") or {}).get("generation")
        observed = status.get("observedGeneration")
        return cls(
            desired=int(spec.get("replicas", 1)),
            replicas=int(status.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0),
            available=int(status.get("availableReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            observed_current=generation is None or (observed is not None and observed >= generation),
            deadline_exceeded=progressing is not None
            and progressing.get("reason") == "ProgressDeadlineExceeded",
        )

    @property
    def complete(self) -> bool:
        return (
            self.observed_current
            and self.updated >= self.desired
            and self.replicas == self.desired
            and self.available >= self.desired
        )


def _ready_condition(rollout: _Rollout | None, problem: Problem | None) -> tuple[str, str, str]:
    if rollout is None:
        if problem is not None:
            return "False", problem.reason, problem.message
        return "False", "DeploymentMissing", "the runtime Deployment does not exist yet"
    if rollout.desired == 0:
        return "False", "ScaledToZero", "the runtime is scaled to zero replicas"
    if rollout.available >= 1 and rollout.ready >= 1:
        return "True", "Available", f"{rollout.ready}/{rollout.desired} replicas ready"
    return "False", "NoReplicasAvailable", f"0/{rollout.desired} replicas available"


def _progressing_condition(rollout: _Rollout | None) -> tuple[str, str, str]:
    if rollout is None:
        return "True", "Creating", "creating the runtime Deployment"
    if rollout.deadline_exceeded:
        return "False", "ProgressDeadlineExceeded", "the runtime rollout exceeded its progress deadline"
    if rollout.complete:
        return "False", "RolloutComplete", f"{rollout.updated} updated replicas available"
    return (
        "True",
        "RollingOut",
        f"{rollout.updated}/{rollout.desired} updated, {rollout.available} available",
    )


def _degraded_condition(rollout: _Rollout | None, problem: Problem | None) -> tuple[str, str, str]:
    if problem is not None:
        return "True", problem.reason, problem.message
    if rollout is not None and rollout.deadline_exceeded:
        return "True", "ProgressDeadlineExceeded", "the runtime pods do not become available; check their events"
    return "False", "ReconcileSucceeded", "all children match the spec"


def desired_status(
    *,
    name: str,
    spec: MoERouterSpec | None,
    generation: int | None,
    deployment: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    problem: Problem | None,
    now: datetime,
) -> dict[str, Any]:
    """The whole status (wire form) from what was observed; other conditions and prediction are kept.

    While no forecast runs (predictive mode Off, or autoscaling disabled) ``prediction`` is set to None
    (removed by the merge patch) so no stale prediction stays in the status and the printer column; in
    ForecastOnly mode its ``appliedMinReplicas`` is removed (no floor is held).
    """
    rollout = _Rollout.of(deployment) if deployment is not None else None
    conditions = [dict(condition) for condition in current.get("conditions") or []]
    forecasting = spec is None or (spec.autoscaling.enabled and spec.autoscaling.predictive.mode != "Off")
    if spec is not None and spec.autoscaling.predictive.mode == "Off":
        conditions = [condition for condition in conditions if condition.get("type") != PREDICTION_READY]
    elif not forecasting:
        conditions = set_condition(
            conditions,
            type=PREDICTION_READY,
            status="False",
            reason="AutoscalingDisabled",
            message="spec.autoscaling.predictive.mode is set but spec.autoscaling.enabled is false: "
            "the forecast runs only alongside the HPA",
            generation=generation,
            now=now,
        )
    for condition_type, (condition_status, reason, message) in (
        (READY, _ready_condition(rollout, problem)),
        (PROGRESSING, _progressing_condition(rollout)),
        (DEGRADED, _degraded_condition(rollout, problem)),
    ):
        conditions = set_condition(
            conditions,
            type=condition_type,
            status=condition_status,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )
    status: dict[str, Any] = {
        **{key: value for key, value in current.items() if key not in ("conditions",)},
        "selector": selector_string(name),
        "replicas": rollout.replicas if rollout else 0,
        "readyReplicas": rollout.ready if rollout else 0,
        "conditions": conditions,
    }
    if not forecasting and "prediction" in current:
        status["prediction"] = None  # a merge patch removes it: nothing keeps it current any more
    elif spec is not None and spec.autoscaling.predictive.mode != "Active" and current.get("prediction"):
        # ForecastOnly holds no floor: a floor left from Active mode would read as applied (and be applied
        # again by a switch back to Active before the first forecast).
        status["prediction"] = {
            key: value for key, value in current["prediction"].items() if key != "appliedMinReplicas"
        }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of the keys whose values differ; ``{}`` means no write is needed.

    After the patch the status reads ``desired``: a mapping that replaces a mapping (``prediction``)
    names each key it no longer has with None, since a JSON merge patch leaves the keys it omits in place.
    """
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        previous = current.get(key)
        if previous != value:
            patch[key] = _replacing(previous, value) if isinstance(previous, Mapping) else value
    return patch


def _replacing(current: Mapping[str, Any], desired: Any) -> Any:
    """``desired`` as a merge patch over ``current``: the keys only ``current`` has are set to None."""
    if not isinstance(desired, Mapping):
        return desired
    patch: dict[str, Any] = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        previous = current.get(key)
        patch[key] = _replacing(previous, value) if isinstance(previous, Mapping) else value
    return patch
