"""When a Deployment's rollout counts as complete: the moment old router ConfigMaps may be pruned."""

from __future__ import annotations

from typing import Any

import pytest

from moe_operator.reconcile import rollout_complete


def deployment(wanted: int, generation: int = 3, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": wanted}, "status": status}


def test_all_replicas_updated_and_available_for_the_latest_generation_is_complete() -> None:
    done = deployment(3, observedGeneration=3, replicas=3, updatedReplicas=3, availableReplicas=3)
    assert rollout_complete(done)


def test_zero_replicas_with_no_pods_left_is_complete() -> None:
    assert rollout_complete(deployment(0, observedGeneration=3))


@pytest.mark.parametrize(
    "status",
    [
        {},  # never observed
        {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3},
        {"observedGeneration": 3, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3},  # an old pod left
        {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 3},
        {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2},  # a new pod crashing
    ],
    ids=["unobserved", "older-generation", "old-pod-left", "not-all-updated", "not-all-available"],
)
def test_a_rollout_with_old_or_unavailable_pods_is_not_complete(status: dict[str, Any]) -> None:
    assert not rollout_complete(deployment(3, **status))


def test_scaling_to_zero_is_not_complete_while_pods_remain() -> None:
    assert not rollout_complete(deployment(0, observedGeneration=3, replicas=1, availableReplicas=1))
