"""A slow, hanging or trickling Prometheus delays only Prometheus queries, never the operator's API calls.

Prometheus is the stand-in of ``tests.support.prometheus_stand_in`` (a real Prometheus cannot be made
slow); the Kubernetes API is the kmock sandbox, called through the operator's own ``Kube`` client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from moe_operator.api import MoERouterSpec, parse_spec
from moe_operator.children import CONFIG_MAP
from moe_operator.scaling.controller import PredictiveState, TickResult, run_tick
from moe_operator.scaling.metrics import ScalingMetrics
from moe_operator.scaling.prometheus import UNAVAILABLE
from tests.integration.operator.harness import sandbox_with_client
from tests.support.prometheus_stand_in import StandIn, prometheus_stand_in

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
#: More routers than any default executor has threads (min(32, cpu + 4)): the old shared pool starved.
ROUTERS = 40


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    with prometheus_stand_in() as server:
        yield server


def spec_for(url: str, *, timeout: float, **predictive: Any) -> MoERouterSpec:
    return parse_spec({
        "autoscaling": {
            "enabled": True, "minReplicas": 2, "maxReplicas": 10,
            "predictive": {"mode": "Active", "prometheus": {"url": url, "timeoutSeconds": timeout},
                           "capacityPerReplica": 5.0, **predictive},
        },
    })


async def tick(spec: MoERouterSpec, state: PredictiveState, name: str = "r", now: datetime = NOW) -> TickResult:
    return await run_tick(spec, name=name, namespace="ns", state=state, now=now, auth=None,
                          metrics=ScalingMetrics(CollectorRegistry()))  # fmt: skip


async def ended(fetch: Future[Any] | None) -> None:
    assert fetch is not None
    await asyncio.wait([asyncio.wrap_future(fetch)], timeout=10)
    assert fetch.done()


async def test_api_calls_answer_at_once_while_many_routers_wait_on_a_hanging_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in: StandIn
) -> None:
    stand_in.mode = "hang"
    spec = spec_for(stand_in.url, timeout=2, lookbackSeconds=3600)
    async with sandbox_with_client(tmp_path / "kubeconfig", monkeypatch, ready_delay=0.1) as (running, kube):
        running.sandbox.seed(CONFIG_MAP.group, CONFIG_MAP.version, CONFIG_MAP.plural, {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "namespace": "ns"}, "data": {},
        })  # fmt: skip
        ticks = asyncio.gather(*(tick(spec, PredictiveState(), name=f"r{i}") for i in range(ROUTERS)))
        slowest = 0.0
        for _ in range(3):
            await asyncio.sleep(1.0)
            started = time.monotonic()
            assert await kube.get(CONFIG_MAP, "ns", "child") is not None
            slowest = max(slowest, time.monotonic() - started)
        results = await ticks
    assert slowest < 1.0
    assert {result.condition_reason for result in results} == {UNAVAILABLE}


async def test_a_router_whose_given_up_query_still_runs_sends_no_other_until_it_ends(stand_in: StandIn) -> None:
    stand_in.mode = "trickle"
    spec, state = spec_for(stand_in.url, timeout=1, lookbackSeconds=3600), PredictiveState()
    given_up = await tick(spec, state)
    assert given_up.condition_message.startswith("no answer from Prometheus within 1 s")
    started = time.monotonic()
    skipped = await tick(spec, state)
    assert time.monotonic() - started < 1.0
    assert skipped.condition_reason == UNAVAILABLE
    assert "is still running: no other is sent until it ends" in skipped.condition_message
    assert len(stand_in.requests) == 1
    stand_in.mode = "answer"
    stand_in.release.set()
    await ended(state.fetch)
    again = await tick(spec, state)
    assert len(stand_in.requests) == 2
    assert again.condition_reason != UNAVAILABLE


async def test_a_query_given_up_on_leaves_the_cached_history_as_it_was(stand_in: StandIn) -> None:
    spec, state = spec_for(stand_in.url, timeout=1, lookbackSeconds=3600), PredictiveState()
    await tick(spec, state)
    cache, cached = state.history, state.history.result
    assert cached is not None
    stand_in.mode = "trickle"
    given_up = await tick(spec, state, now=NOW.replace(minute=5))
    assert given_up.condition_reason == UNAVAILABLE
    stand_in.release.set()
    await ended(state.fetch)
    assert stand_in.answered == 2  # the answer did arrive, after the tick stopped waiting for it
    assert state.history is cache and cache.result is cached


async def test_each_window_of_the_default_lookback_may_take_nearly_the_whole_timeout(stand_in: StandIn) -> None:
    # The default 8 days at 60 s is 11,521 points: two windows, each answered 2 s inside the 10 s timeout.
    stand_in.delay = 8.0
    result = await tick(spec_for(stand_in.url, timeout=10), PredictiveState())
    assert [request.points for request in stand_in.requests] == [11_000, 521]
    assert result.condition_reason != UNAVAILABLE, result.condition_message
