"""Each MoERouter's status conditions as a metric, so alerts can see what ``kubectl describe`` shows.

``moe_operator_router_condition{namespace, moerouter, condition, reason}`` is 1 while the condition is True
and 0 while it is False, with its current reason: one series per router and condition (the previous
reason's series is removed when the reason changes). ``MoERouterDegraded`` alerts on
``condition="Degraded"`` (a stuck rollout, an invalid spec, a missing Secret, a refused child).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge


class ConditionMetrics:
    """The gauge and the reason each series carries now (to remove it when the reason changes)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.gauge = Gauge(
            "moe_operator_router_condition",
            "1 while the MoERouter's status condition is True, 0 while False, labelled with its current reason.",
            ("namespace", "moerouter", "condition", "reason"),
            registry=registry,
        )
        self._reasons: dict[tuple[str, str, str], str] = {}

    def export(self, namespace: str, name: str, conditions: Iterable[Mapping[str, Any]]) -> None:
        """Set the series of the conditions in ``conditions`` (a status's list); others are left as they are."""
        for condition in conditions:
            kind, status = str(condition.get("type", "")), condition.get("status")
            if not kind or status not in ("True", "False"):
                continue
            reason = str(condition.get("reason") or "")
            key = (namespace, name, kind)
            previous = self._reasons.get(key)
            if previous is not None and previous != reason:
                with contextlib.suppress(KeyError):
                    self.gauge.remove(namespace, name, kind, previous)
            self._reasons[key] = reason
            self.gauge.labels(namespace, name, kind, reason).set(1.0 if status == "True" else 0.0)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of one MoERouter (it was deleted)."""
        for key in [key for key in self._reasons if key[:2] == (namespace, name)]:
            with contextlib.suppress(KeyError):
                self.gauge.remove(*key, self._reasons[key])
            del self._reasons[key]


_metrics: ConditionMetrics | None = None


def condition_metrics() -> ConditionMetrics:
    """The process's collector on the default registry (the operator's ``/metrics``)."""
    global _metrics
    if _metrics is None:
        _metrics = ConditionMetrics()
    return _metrics
