"""The scaling policy: a model of the Kubernetes HPA v2 and the predictive minReplicas floor.

Pure: no I/O, no clocks (times are seconds passed in). The live controller and the simulator use the
same functions, so what ``moe-operator simulate`` measures is what the operator does.

HPA model (``HpaModel``), following ``pkg/controller/podautoscaler`` with the default behaviour: a
per-pod request-rate metric with an ``AverageValue`` target of ``capacity * targetUtilization``,
tolerance 0.1, pods that are not ready yet report no metric (counted as 0 on scale-up and as at
target on scale-down), scale-up stabilisation 0 s limited to max(100%, 4 pods) per 15 s, scale-down
stabilisation 300 s at 100% per 15 s, and ``currentReplicas < minReplicas`` jumps to minReplicas at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

HPA_SYNC_SECONDS = 15.0
HPA_TOLERANCE = 0.1
HPA_SCALE_DOWN_STABILIZATION_SECONDS = 300.0
HPA_SCALE_UP_PERCENT = 100.0
HPA_SCALE_UP_PODS = 4
#: Delay between the load and what the metric pipeline shows the HPA (scrape + rate window).
METRIC_LAG_SECONDS = 30.0
#: Extra horizon beyond the pod startup time when the spec leaves the horizon unset.
HORIZON_MARGIN_SECONDS = 120
#: How often the forecaster is re-chosen by backtest (the choice moves slowly; the forecast every tick).
REFIT_SECONDS = 6 * 3600.0
#: ... and sooner while the history is young: whenever it has grown by this factor since the last
#: backtest, so a model learnt from minutes of history is re-learnt as the minutes add up.
REFIT_GROWTH = 1.25
#: Floor levels above minReplicas step by at least this ratio (the HPA's own tolerance): a smaller
#: change is one the HPA's metric would ignore, so it would only add a scale event.
FLOOR_STEP_RATIO = 1.0 + HPA_TOLERANCE


class PolicyError(ValueError):
    """Parameters the policy cannot work with; the message names the parameter."""


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def refit_due(age_seconds: float, fitted_samples: int, samples: int, period_seconds: float = REFIT_SECONDS) -> bool:
    """Whether the cached model choice must be re-made by backtest: ``period_seconds`` after the last one
    (``refit_period`` for a live router), or sooner while the history grows (see ``REFIT_GROWTH``)."""
    return not 0 <= age_seconds < period_seconds or samples >= REFIT_GROWTH * fitted_samples


def refit_period(phase: float) -> float:
    """The refit period of a router with ``phase`` in [0, 1): between 3/4 of ``REFIT_SECONDS`` and all of it,
    so routers whose first backtests ran in the same minute (an operator start) do not refit together."""
    if not 0.0 <= phase < 1.0:
        raise PolicyError(f"a router's phase must be in [0, 1), got {phase}")
    return REFIT_SECONDS * (0.75 + phase / 4.0)


@lru_cache(maxsize=4096)
def floor_level(replicas: int, min_replicas: int) -> int:
    """The smallest floor level >= ``replicas``: levels grow from ``min_replicas`` by ``FLOOR_STEP_RATIO``.

    Each level is the previous one times the ratio, rounded up, and at least one more, so the floor
    moves in steps the HPA's tolerance would not absorb (1 2 3 ... 10 11 13 15 17 19 21 24 27 ...).
    """
    level = max(1, min_replicas)
    while level < replicas:
        level = max(level + 1, math.ceil(level * FLOOR_STEP_RATIO - 1e-9))
    return level


def recommended_replicas(
    predicted_load: float, capacity_per_replica: float, target_utilization: float, min_replicas: int,
    max_replicas: int,
) -> int:
    """``ceil(predicted_load / (capacity * target))`` clamped to [min_replicas, max_replicas]."""
    if not capacity_per_replica > 0:
        raise PolicyError(f"capacityPerReplica must be > 0, got {capacity_per_replica}")
    if not 0 < target_utilization <= 1:
        raise PolicyError(f"targetUtilization must be in (0, 1], got {target_utilization}")
    if min_replicas > max_replicas:
        raise PolicyError(f"minReplicas {min_replicas} is above maxReplicas {max_replicas}")
    if not math.isfinite(predicted_load) or predicted_load <= 0:
        return min_replicas
    # The small epsilon keeps an exact multiple (10.0 / 1.0) from rounding up through float noise.
    needed = math.ceil(predicted_load / (capacity_per_replica * target_utilization) - 1e-9)
    return clamp(needed, min_replicas, max_replicas)


def floor_recommendation(
    predicted_load: float, uses_floor: bool, capacity_per_replica: float, target_utilization: float,
    min_replicas: int, max_replicas: int,
) -> int:
    """The minReplicas a forecast asks for; minReplicas itself when the backtest chose no floor."""
    if not uses_floor:
        return clamp(min_replicas, min_replicas, max_replicas)
    return recommended_replicas(predicted_load, capacity_per_replica, target_utilization, min_replicas, max_replicas)


@dataclass
class HpaModel:
    """One HorizontalPodAutoscaler: its spec bounds and the recommendations it remembers."""

    capacity_per_replica: float
    target_utilization: float
    max_replicas: int
    scale_down_stabilization_seconds: float = HPA_SCALE_DOWN_STABILIZATION_SECONDS
    #: The window's recommendations that can still be its maximum (time, replicas), decreasing.
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)

    def metric_replicas(self, load: float, current: int, ready: int) -> int:
        """The replica count the metric asks for (``replica_calculator`` for a pods metric)."""
        target = self.capacity_per_replica * self.target_utilization
        if ready <= 0:
            # No pod reports a metric: the HPA cannot compute a ratio and keeps the current count.
            return current
        usage_ratio = load / ready / target
        missing = current - ready
        if missing <= 0:
            if abs(1.0 - usage_ratio) <= HPA_TOLERANCE:
                return current
            return math.ceil(usage_ratio * ready - 1e-9)
        # Pods without a metric count as idle when scaling up and as at target when scaling down.
        new_ratio = load / current / target if usage_ratio > 1.0 else (load / target + missing) / current
        if (
            abs(1.0 - new_ratio) <= HPA_TOLERANCE
            or (usage_ratio < 1.0 < new_ratio)
            or (usage_ratio > 1.0 > new_ratio)
        ):
            return current
        return math.ceil(new_ratio * current - 1e-9)

    def desired(self, now: float, load: float, current: int, ready: int, min_replicas: int) -> int:
        """The HPA's new ``replicas`` at a sync, given the lagged load and its minReplicas floor."""
        min_replicas = min(min_replicas, self.max_replicas)
        if current > self.max_replicas:
            return self.max_replicas
        if current < min_replicas:
            return min_replicas
        proposal = self.metric_replicas(load, current, ready)
        cutoff = now - self.scale_down_stabilization_seconds
        window = self.recommendations
        while window and window[0][0] <= cutoff:
            window.popleft()
        down = max(proposal, window[0][1]) if window else proposal
        # Kept decreasing front to back: an older recommendation not above a newer one can never be
        # the window's maximum again, so the maximum is always at the front (O(1) per sync).
        while window and window[-1][1] <= proposal:
            window.pop()
        window.append((now, proposal))
        # Scale-up stabilisation window is 0 s: the up-recommendation is the proposal itself.
        stabilized = clamp(current, proposal, down)
        if stabilized > current:
            limit = max(
                math.floor(current * (1 + HPA_SCALE_UP_PERCENT / 100.0)), current + HPA_SCALE_UP_PODS
            )
            return min(stabilized, limit, self.max_replicas)
        if stabilized < current:
            return max(stabilized, min_replicas)
        return stabilized


@dataclass
class FloorMemory:
    """What the predictive floor remembers between ticks (mutable, one per MoERouter)."""

    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    last_good: int | None = None
    last_good_at: float | None = None
    applied: int | None = None


@dataclass(frozen=True)
class FloorSettings:
    min_replicas: int
    max_replicas: int
    stabilization_seconds: float
    grace_period_seconds: float
    #: How long the floor takes to decay from the last good value to minReplicas after the grace.
    decay_seconds: float

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise PolicyError(f"minReplicas {self.min_replicas} is above maxReplicas {self.max_replicas}")
        if min(self.stabilization_seconds, self.grace_period_seconds, self.decay_seconds) < 0:
            raise PolicyError("stabilization, grace and decay periods must be >= 0 seconds")


def restored_floor(applied: int, applied_at: float, now: float, settings: FloorSettings) -> FloorMemory:
    """The memory of a floor applied before this process started (read back from the MoERouter's status).

    As if the good forecast at ``applied_at`` had asked for ``applied``: failing forecasts keep it until
    the grace period after that time is over and then decay it; good ones hold it in the stabilisation
    window until ``applied_at + stabilization_seconds``. A floor older than the grace period and the
    decay together has nothing left to hold: the memory is empty, as it would be by now anyway.
    """
    memory = FloorMemory()
    applied_at = min(applied_at, now)  # a clock ahead of ours must not stretch the grace period
    if now - applied_at >= settings.grace_period_seconds + settings.decay_seconds:
        return memory
    held = clamp(applied, settings.min_replicas, settings.max_replicas)
    memory.recommendations.append((applied_at, held))
    memory.last_good = memory.applied = held
    memory.last_good_at = applied_at
    return memory


def floor_on_success(memory: FloorMemory, now: float, recommendation: int, settings: FloorSettings) -> int:
    """The minReplicas to hold after a good forecast: raise at once, lower only through the window.

    The floor is the highest recommendation of the last ``stabilization_seconds``, so it follows a
    falling forecast gradually and a forecast that dips for one tick does not flap the HPA; it is
    rounded up to a ``floor_level``, so a forecast drifting by a replica or two moves it rarely.
    """
    recommendation = clamp(recommendation, settings.min_replicas, settings.max_replicas)
    cutoff = now - settings.stabilization_seconds
    while memory.recommendations and memory.recommendations[0][0] <= cutoff:
        memory.recommendations.popleft()
    memory.recommendations.append((now, recommendation))
    highest = max(rec for _, rec in memory.recommendations)
    applied = clamp(floor_level(highest, settings.min_replicas), settings.min_replicas, settings.max_replicas)
    previous = memory.applied
    if (
        previous is not None
        and settings.min_replicas < applied < previous
        and floor_level(applied + 1, settings.min_replicas) >= previous
    ):
        # Hysteresis: a fall of a single level is held (a forecast wavering at a level's edge would
        # otherwise move the floor on every crossing); two levels, or back to minReplicas, go through.
        applied = previous
    memory.last_good = applied
    memory.last_good_at = now
    memory.applied = applied
    return applied


def floor_on_failure(memory: FloorMemory, now: float, settings: FloorSettings) -> int:
    """The minReplicas to hold when no forecast is possible: the last good one, then a linear decay.

    Kept for ``grace_period_seconds`` after the last good forecast, then lowered linearly to
    minReplicas over ``decay_seconds``; never above maxReplicas, never below minReplicas.
    """
    if memory.last_good is None or memory.last_good_at is None:
        applied = settings.min_replicas
    else:
        held = clamp(memory.last_good, settings.min_replicas, settings.max_replicas)
        past_grace = now - memory.last_good_at - settings.grace_period_seconds
        if past_grace <= 0:
            applied = held
        elif past_grace >= settings.decay_seconds:
            applied = settings.min_replicas
        else:
            remaining = 1.0 - past_grace / settings.decay_seconds
            applied = settings.min_replicas + math.ceil((held - settings.min_replicas) * remaining - 1e-9)
    # A failed tick must not let the window raise the floor again once the failure is over.
    memory.recommendations.clear()
    memory.recommendations.append((now, applied))
    memory.applied = applied
    return applied


def default_horizon_seconds(horizon_seconds: int | None, startup_seconds: int) -> int:
    """``spec.horizonSeconds``, or the pod startup time plus a margin when unset."""
    return horizon_seconds if horizon_seconds is not None else startup_seconds + HORIZON_MARGIN_SECONDS
