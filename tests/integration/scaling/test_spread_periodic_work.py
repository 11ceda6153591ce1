"""MoERouters that start together (an operator start) do not re-read their history or refit together.

Each router's phase, fixed by its namespace and name, places its first whole re-read in the second half
of the hour and its refit period between 4.5 and 6 hours. Histories come from the Prometheus stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from moe_operator.api import parse_spec
from moe_operator.scaling.controller import PredictiveState, router_phase, run_tick
from moe_operator.scaling.metrics import ScalingMetrics
from moe_operator.scaling.policy import REFIT_SECONDS, PolicyError, refit_period
from moe_operator.scaling.prometheus import (
    FULL_REFRESH_SECONDS,
    HistoryCache,
    default_query,
    fetch_history,
    spread_first_refresh,
)
from tests.support.prometheus_stand_in import StandIn, prometheus_stand_in

START = datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()
NAMES = [f"r{i:03d}" for i in range(200)]


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    with prometheus_stand_in() as server:
        yield server


def test_a_routers_phase_is_fixed_by_its_namespace_and_name() -> None:
    assert router_phase("default", "r000") == 0.42627911029434457  # the same in every process and release
    assert router_phase("default", "r000") != router_phase("default", "r001")
    assert router_phase("default", "r000") != router_phase("other", "r000")
    assert all(0.0 <= router_phase("default", name) < 1.0 for name in NAMES)


def test_first_whole_rereads_of_routers_started_together_fall_in_every_minute_of_the_second_half_hour() -> None:
    moments = [spread_first_refresh(router_phase("default", name)) for name in NAMES]
    assert all(FULL_REFRESH_SECONDS / 2 <= moment < FULL_REFRESH_SECONDS for moment in moments)
    assert len({int(moment // 60) for moment in moments}) == 30


def test_refits_of_routers_started_together_spread_over_the_last_quarter_of_six_hours() -> None:
    periods = [refit_period(router_phase("default", name)) for name in NAMES]
    assert all(0.75 * REFIT_SECONDS <= period < REFIT_SECONDS for period in periods)
    assert len({int(period // 300) for period in periods}) == 18  # every 5-minute slot of the 90 minutes


def test_a_phase_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"phase must be in \[0, 1\), got 1.0"):
        spread_first_refresh(1.0)
    with pytest.raises(PolicyError, match=r"phase must be in \[0, 1\), got -0.5"):
        refit_period(-0.5)


def test_the_first_whole_reread_comes_at_the_routers_own_moment_then_every_hour(stand_in: StandIn) -> None:
    first_refresh = spread_first_refresh(0.5)  # 45 minutes
    cache, query = HistoryCache(), default_query("r", "ns")
    for offset in (0, first_refresh - 60, first_refresh + 60, first_refresh + FULL_REFRESH_SECONDS,
                   first_refresh + FULL_REFRESH_SECONDS + 120):  # fmt: skip
        fetch_history(cache, stand_in.url, query, end=START + offset, lookback_seconds=86_400, step_seconds=60,
                      timeout_seconds=2, first_refresh_seconds=first_refresh)  # fmt: skip
    whole = [request.points == 1441 for request in stand_in.requests]
    assert whole == [True, False, True, False, True]


async def test_a_router_refits_at_its_own_period(stand_in: StandIn) -> None:
    spec = parse_spec({
        "autoscaling": {
            "enabled": True, "minReplicas": 1, "maxReplicas": 10,
            "predictive": {"mode": "Active", "prometheus": {"url": stand_in.url, "timeoutSeconds": 5},
                           "capacityPerReplica": 5.0, "lookbackSeconds": 86_400},
        },
    })  # fmt: skip
    period = refit_period(router_phase("ns", "r"))
    offsets = (0, math.floor(period) - 60, math.ceil(period) + 60)
    state, fitted_at = PredictiveState(), []
    for offset in offsets:
        await run_tick(spec, name="r", namespace="ns", state=state, now=datetime.fromtimestamp(START + offset, UTC),
                       auth=None, metrics=ScalingMetrics(CollectorRegistry()))  # fmt: skip
        fitted_at.append(state.choice_at)
    assert fitted_at == [START, START, START + offsets[2]]
