"""The predictive tick's state across restarts and mode changes, against the API sandbox (no kopf).

A fresh ``memo`` is what a restarted operator (or the peer taking over in HA) starts from: the floor
it goes on holding comes from the MoERouter's ``status.prediction``. Ticks run at chosen times, so
grace periods and stabilisation windows are crossed without waiting for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from moe_operator.kube import MOEROUTERS, Kube
from moe_operator.reconcile import predictive_tick, reconcile
from moe_operator.sandbox import Running
from moe_operator.status import rfc3339
from tests.integration.operator.harness import eventually, example_router, sandbox_with_client
from tests.support.prometheus import PrometheusServer, SeriesSpec, prometheus_missing, start_prometheus

pytestmark = pytest.mark.timeout(120)

DOWN = "http://127.0.0.1:9"  # nothing listens: every query fails with PrometheusUnavailable
STEP = 300.0


@pytest.fixture
async def sandbox(tmp_path, monkeypatch) -> AsyncIterator[tuple[Running, Kube]]:
    async with sandbox_with_client(tmp_path / "kubeconfig", monkeypatch, ready_delay=0.05) as pair:
        yield pair


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[tuple[PrometheusServer, float]]:
    """20 requests/s (2 replicas' worth) for two days for router "steady", for 30 minutes for "young"."""
    if prometheus_missing() is not None:
        pytest.skip(str(prometheus_missing()))
    end = time.time()
    series = []
    for name, span in (("steady", 2 * 86_400.0), ("young", 1800.0)):
        times = np.arange(end - span, end, STEP)
        rates = 20.0 * np.random.default_rng(3).normal(1.0, 0.02, times.size)
        labels = {"namespace": "default", "service": name, "moerouter": name}
        series.append(SeriesSpec(labels, times.tolist(), rates.tolist()))
    with start_prometheus(tmp_path_factory.mktemp("prom"), series) as server:
        yield server, end


def predictive_spec(url: str, mode: str = "Active", **settings: Any) -> dict[str, Any]:
    return {
        "mode": mode,
        "prometheus": {"url": url, "timeoutSeconds": 5},
        "capacityPerReplica": 20,
        "targetUtilization": 0.7,
        "horizonSeconds": 900,
        "lookbackSeconds": 2 * 86_400,
        "stepSeconds": int(STEP),
        "intervalSeconds": 10,
        "gracePeriodSeconds": 3600,
        "scaleDownStabilizationSeconds": 600,
        **settings,
    }


def floor_prediction(applied: int, updated_at: datetime) -> dict[str, Any]:
    """What the previous operator process wrote while it held ``applied``."""
    return {
        "predictedLoad": 100.0, "horizonSeconds": 900, "recommendedReplicas": applied,
        "appliedMinReplicas": applied, "model": "seasonal_daily", "backtestError": 0.1,
        "updatedAt": rfc3339(updated_at),
    }


async def stored(kube: Kube, name: str) -> dict[str, Any]:
    body = await kube.get(MOEROUTERS, "default", name)
    assert body is not None
    return body


async def router(kube: Kube, name: str, predictive: dict[str, Any], prediction: dict[str, Any] | None) -> Any:
    """A MoERouter whose status records ``prediction`` and whose children were reconciled from it."""
    body = example_router(name)
    body["spec"]["autoscaling"]["predictive"] = predictive
    await kube.apply(MOEROUTERS, body)
    if prediction is not None:
        await kube.patch_status(MOEROUTERS, "default", name, {"prediction": prediction})
    await reconcile(kube, await stored(kube, name), trigger="test")
    return await stored(kube, name)


async def switch_mode(kube: Kube, name: str, mode: str) -> None:
    """The user edits ``spec.autoscaling.predictive.mode``; the operator reconciles the edit."""
    body = await stored(kube, name)
    body["spec"]["autoscaling"]["predictive"]["mode"] = mode
    await kube.apply(MOEROUTERS, {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec")})
    await reconcile(kube, await stored(kube, name), trigger="test")


async def tick(kube: Kube, name: str, memo: dict[str, Any], now: datetime) -> Any:
    await predictive_tick(kube, await stored(kube, name), memo, now=now)
    return await stored(kube, name)


def hpa_min_replicas(running: Running, name: str) -> int:
    hpa = running.sandbox.object_of("autoscaling", "v2", "horizontalpodautoscalers", "default", name)
    assert hpa is not None
    return int(hpa["spec"]["minReplicas"])


def prediction_ready(body: Any) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == "PredictionReady")


async def test_a_restarted_operator_keeps_the_floor_through_the_grace_period_while_prometheus_is_down(sandbox):
    running, kube = sandbox
    now = datetime.now(tz=UTC)
    await router(kube, "r", predictive_spec(DOWN), floor_prediction(6, now - timedelta(minutes=1)))
    assert hpa_min_replicas(running, "r") == 6

    body = await tick(kube, "r", {}, now)  # a new process: nothing in its memo
    assert hpa_min_replicas(running, "r") == 6
    ready = prediction_ready(body)
    assert ready["reason"] == "PrometheusUnavailable"
    assert "keeping minReplicas 6 from the last good forecast until" in ready["message"], ready["message"]
    # The last forecast stays on show: a failing tick reports it, with the floor it holds.
    assert body["status"]["prediction"]["predictedLoad"] == 100.0
    assert body["status"]["prediction"]["appliedMinReplicas"] == 6


async def test_a_restart_during_the_decay_goes_on_decaying_and_an_older_floor_is_not_held(sandbox):
    running, kube = sandbox
    now = datetime.now(tz=UTC)
    # Half way through the 600 s decay that follows the 3600 s grace period.
    await router(kube, "half", predictive_spec(DOWN), floor_prediction(6, now - timedelta(seconds=3900)))
    body = await tick(kube, "half", {}, now)
    assert hpa_min_replicas(running, "half") == 4
    assert "grace period over: minReplicas decaying, now 4" in prediction_ready(body)["message"]
    # Older than the grace period and the decay together: the decay is over, nothing is held.
    await router(kube, "old", predictive_spec(DOWN), floor_prediction(6, now - timedelta(seconds=4200)))
    await tick(kube, "old", {}, now)
    assert hpa_min_replicas(running, "old") == 2


@pytest.mark.prometheus
async def test_after_a_restart_a_lower_forecast_lowers_the_floor_only_through_the_stabilisation_window(
    sandbox, prometheus
):
    running, kube = sandbox
    server, end = prometheus
    now = datetime.fromtimestamp(end, tz=UTC)
    await router(kube, "steady", predictive_spec(server.url), floor_prediction(6, now - timedelta(seconds=60)))
    memo: dict[str, Any] = {}
    body = await tick(kube, "steady", memo, now)
    assert prediction_ready(body)["status"] == "True", prediction_ready(body)["message"]
    assert body["status"]["prediction"]["recommendedReplicas"] == 2  # 20 requests/s at 70% of 20 each
    assert hpa_min_replicas(running, "steady") == 6  # held: the window still has the floor of 60 s ago
    await tick(kube, "steady", memo, now + timedelta(seconds=500))
    assert hpa_min_replicas(running, "steady") == 6
    await tick(kube, "steady", memo, now + timedelta(seconds=541))  # the window (600 s) passed the old floor
    assert hpa_min_replicas(running, "steady") == 2


@pytest.mark.prometheus
async def test_forecast_only_removes_the_floor_left_from_active_mode_and_then_writes_nothing(sandbox, prometheus):
    running, kube = sandbox
    server, end = prometheus
    now = datetime.fromtimestamp(end, tz=UTC)
    await router(kube, "steady", predictive_spec(server.url), floor_prediction(6, now - timedelta(seconds=60)))
    await switch_mode(kube, "steady", "ForecastOnly")
    assert hpa_min_replicas(running, "steady") == 2
    memo: dict[str, Any] = {}
    body = await tick(kube, "steady", memo, now)
    assert prediction_ready(body)["reason"] == "Forecasting"
    assert "appliedMinReplicas" not in body["status"]["prediction"], body["status"]["prediction"]
    mark = len(running.sandbox.log)
    await tick(kube, "steady", memo, now + timedelta(seconds=10))  # the same forecast: nothing to write
    assert [call for call in running.sandbox.log[mark:] if call.is_write] == []

    # Back to Active: until its first tick the HPA keeps spec.autoscaling.minReplicas, not a stale floor.
    await switch_mode(kube, "steady", "Active")
    assert hpa_min_replicas(running, "steady") == 2


@pytest.mark.prometheus
async def test_a_tick_with_too_little_history_removes_the_older_forecast_from_the_status(sandbox, prometheus):
    _, kube = sandbox
    server, end = prometheus
    now = datetime.fromtimestamp(end, tz=UTC)
    await router(kube, "young", predictive_spec(server.url), floor_prediction(2, now - timedelta(hours=2)))
    body = await tick(kube, "young", {}, now)
    assert prediction_ready(body)["reason"] == "InsufficientHistory"
    prediction = body["status"]["prediction"]
    assert set(prediction) == {"horizonSeconds", "appliedMinReplicas", "updatedAt"}, prediction


def gauge(name: str, router_name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": "default", "moerouter": router_name})


async def test_the_forecast_gauges_go_when_the_forecast_stops_and_the_floor_gauge_outside_active_mode(sandbox):
    from moe_operator.scaling.metrics import scaling_metrics

    _, kube = sandbox
    metrics = scaling_metrics()
    for name in ("to-forecast-only", "to-off", "to-disabled"):
        metrics.backtest_error.labels("default", name).set(0.7)
        metrics.applied_min_replicas.labels("default", name).set(6)
        metrics.query_failures.labels("default", name, "PrometheusUnavailable").inc()
    await router(kube, "to-forecast-only", predictive_spec(DOWN, "ForecastOnly"), None)
    assert gauge("moe_operator_applied_min_replicas", "to-forecast-only") is None
    assert gauge("moe_operator_backtest_error", "to-forecast-only") == 0.7  # the forecast still runs
    await router(kube, "to-off", {"mode": "Off"}, None)
    assert gauge("moe_operator_backtest_error", "to-off") is None  # MoEOperatorForecastInaccurate stops
    assert gauge("moe_operator_applied_min_replicas", "to-off") is None
    assert REGISTRY.get_sample_value("moe_operator_prometheus_query_failures_total", {
        "namespace": "default", "moerouter": "to-off", "reason": "PrometheusUnavailable"}) is None
    disabled = example_router("to-disabled")
    disabled["spec"]["autoscaling"] = {"enabled": False, "predictive": predictive_spec(DOWN)}
    await kube.apply(MOEROUTERS, disabled)
    await reconcile(kube, await stored(kube, "to-disabled"), trigger="test")
    assert gauge("moe_operator_backtest_error", "to-disabled") is None


async def test_a_missing_prometheus_credentials_secret_counts_as_a_failed_query(sandbox):
    _, kube = sandbox
    predictive = predictive_spec(DOWN)
    predictive["prometheus"]["bearerTokenSecretRef"] = {"name": "prom-token", "key": "token"}
    await router(kube, "no-secret", predictive, None)
    labels = {"namespace": "default", "moerouter": "no-secret", "reason": "SecretNotFound"}
    before = REGISTRY.get_sample_value("moe_operator_prometheus_query_failures_total", labels) or 0.0
    now = datetime.now(tz=UTC)
    body = await tick(kube, "no-secret", {}, now)
    assert prediction_ready(body)["reason"] == "SecretNotFound"
    await tick(kube, "no-secret", {}, now + timedelta(seconds=10))
    # Every tick counts: rate() stays above 0 while the Secret is missing, so MoEOperatorPredictionsFailing fires.
    assert REGISTRY.get_sample_value("moe_operator_prometheus_query_failures_total", labels) == before + 2


async def test_a_missing_credentials_secret_holds_the_floor_for_the_grace_period_then_decays(sandbox):
    # Like any failed query: the last good floor is kept for gracePeriodSeconds, then lowered, never held forever.
    running, kube = sandbox
    predictive = predictive_spec(DOWN)
    predictive["prometheus"]["bearerTokenSecretRef"] = {"name": "prom-token", "key": "token"}
    now = datetime.now(tz=UTC)
    await router(kube, "lost-secret", predictive, floor_prediction(6, now - timedelta(minutes=1)))
    memo: dict[str, Any] = {}
    body = await tick(kube, "lost-secret", memo, now)
    assert hpa_min_replicas(running, "lost-secret") == 6
    ready = prediction_ready(body)
    assert ready["reason"] == "SecretNotFound" and "prom-token" in ready["message"]
    assert "keeping minReplicas 6 from the last good forecast until" in ready["message"]
    exported = {"namespace": "default", "moerouter": "lost-secret", "condition": "PredictionReady"}
    assert REGISTRY.get_sample_value("moe_operator_router_condition", exported | {"reason": "SecretNotFound"}) == 0.0
    await tick(kube, "lost-secret", memo, now + timedelta(seconds=3600 + 300))  # grace over, half the decay
    assert 2 < hpa_min_replicas(running, "lost-secret") < 6
    body = await tick(kube, "lost-secret", memo, now + timedelta(seconds=3600 + 700))
    assert hpa_min_replicas(running, "lost-secret") == 2
    assert "grace period over" in prediction_ready(body)["message"]


@pytest.mark.prometheus
@pytest.mark.parametrize("handler", ["create", "resync"])
async def test_a_handler_that_waited_for_the_lock_keeps_what_the_tick_before_it_wrote(sandbox, prometheus, handler):
    # kopf hands a handler the body of the event that started it; a predictive tick can write the floor
    # and PredictionReady while the handler waits for the router's lock. Reconciling that older body
    # put the spec's minReplicas back on the HPA and dropped the condition until the next resync.
    import kopf

    from moe_operator import handlers

    running, kube = sandbox
    server, _ = prometheus  # the handler's tick runs at the real time: the data ends just before it
    stale = await router(kube, "steady", predictive_spec(server.url, capacityPerReplica=5), None)
    assert hpa_min_replicas(running, "steady") == 2
    memo = kopf.Memo()
    memo.kube = kube
    # kopf's decorators type the handlers as its callbacks (every kwarg kopf passes); called as kopf would.
    predictive: Any = handlers.predictive
    reconcile_router: Any = handlers.reconcile_router
    resync: Any = handlers.resync
    await predictive(body=stale, memo=memo, namespace="default", name="steady")
    assert hpa_min_replicas(running, "steady") == 6  # 20 requests/s at 70% of 5 each
    if handler == "create":
        await reconcile_router(body=stale, memo=memo, retry=0, reason="create", namespace="default", name="steady")
    else:
        memo[handlers.DRIFT_SPREAD_DONE] = True  # its first run waits for its place in the period: not here
        await resync(body=stale, memo=memo, namespace="default", name="steady")
    assert hpa_min_replicas(running, "steady") == 6
    assert prediction_ready(await stored(kube, "steady"))["reason"] == "Forecasting"


@pytest.mark.prometheus
async def test_a_tick_that_only_moves_the_load_writes_the_status_at_most_every_ten_minutes(sandbox, prometheus):
    running, kube = sandbox
    server, end = prometheus
    now = datetime.fromtimestamp(end, tz=UTC)
    await router(kube, "steady", predictive_spec(server.url), None)
    memo: dict[str, Any] = {}
    start = now - timedelta(seconds=600)
    first = await tick(kube, "steady", memo, start)
    mark = len(running.sandbox.log)
    # One more 5-minute sample of noisy load: the forecast moves, the floor and the model do not.
    second = await tick(kube, "steady", memo, start + timedelta(seconds=300))
    assert second["status"]["prediction"] == first["status"]["prediction"]
    assert [call for call in running.sandbox.log[mark:] if call.is_write] == []
    third = await tick(kube, "steady", memo, start + timedelta(seconds=600))
    assert third["status"]["prediction"]["updatedAt"] != first["status"]["prediction"]["updatedAt"]
    assert third["status"]["prediction"]["predictedLoad"] != first["status"]["prediction"]["predictedLoad"]


async def test_a_spec_edit_does_not_wait_for_the_prometheus_query_of_a_tick(sandbox):
    # The predictive timer takes the router's lock only to write what its query found: a reconcile of the
    # same router (a spec edit) goes through while the query hangs.
    import kopf

    from moe_operator import handlers
    from tests.support.prometheus_stand_in import prometheus_stand_in

    _, kube = sandbox
    with prometheus_stand_in() as stand_in:
        stand_in.mode = "hang"
        body = await router(kube, "r", predictive_spec(stand_in.url), None)
        memo = kopf.Memo()
        memo.kube = kube
        predictive: Any = handlers.predictive
        reconcile_router: Any = handlers.reconcile_router
        ticking = asyncio.create_task(predictive(body=body, memo=memo, namespace="default", name="r"))
        await eventually(lambda: stand_in.requests, message="the tick's query sent", within=10)
        started = time.monotonic()
        await reconcile_router(body=body, memo=kopf.Memo(kube=kube), retry=0, reason="update",
                               namespace="default", name="r")  # fmt: skip
        assert time.monotonic() - started < 2.0 and not ticking.done()
        stand_in.release.set()
        await ticking
    assert prediction_ready(await stored(kube, "r"))["reason"] == "PrometheusUnavailable"


@pytest.mark.prometheus
@pytest.mark.parametrize("edit", ["ForecastOnly", "Off"])
async def test_a_forecast_for_a_spec_edited_while_its_query_ran_is_dropped(sandbox, prometheus, monkeypatch, edit):
    # kopf gives a timer a live body that every watch event replaces in place: what the forecast was made
    # for has to be kept at its start, or the old Active floor goes on the HPA after the edit's reconcile.
    import threading

    import kopf

    from moe_operator import handlers
    from moe_operator.scaling import prometheus as adapter

    running, kube = sandbox
    server, _ = prometheus
    sent, answer = threading.Event(), threading.Event()
    real_fetch = adapter.fetch_range

    def held_fetch(*args: Any, **kwargs: Any) -> Any:  # the real query, answered once the edit is made
        sent.set()
        answer.wait(10)
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(adapter, "fetch_range", held_fetch)
    await router(kube, "steady", predictive_spec(server.url, capacityPerReplica=5), None)
    live = kopf.Body(await stored(kube, "steady"))  # type: ignore[arg-type]  # kopf's RawBody is a TypedDict
    memo = kopf.Memo()
    memo.kube = kube
    predictive: Any = handlers.predictive
    ticking = asyncio.create_task(predictive(body=live, memo=memo, namespace="default", name="steady"))
    await eventually(lambda: sent.is_set(), message="the tick's query sent", within=10)
    await switch_mode(kube, "steady", edit)
    live._replace_with(await stored(kube, "steady"))  # what kopf does with the edit's watch event
    answer.set()
    await ticking
    assert hpa_min_replicas(running, "steady") == 2  # the Active forecast would have asked for 6
    labels = {"namespace": "default", "moerouter": "steady"}
    assert REGISTRY.get_sample_value("moe_operator_applied_min_replicas", labels) is None


@pytest.mark.prometheus
async def test_while_a_floor_is_held_the_status_is_refreshed_every_quarter_of_the_grace_period_or_window(
    sandbox, prometheus
):
    # A restarted operator counts the grace period and the window from updatedAt: with a floor held, the
    # status may lag the last good forecast by a quarter of the shorter of the two (600 s here), not 10 min.
    running, kube = sandbox
    server, end = prometheus
    start = datetime.fromtimestamp(end, tz=UTC) - timedelta(seconds=600)
    await router(kube, "steady", predictive_spec(server.url, capacityPerReplica=5), None)
    memo: dict[str, Any] = {}
    first = await tick(kube, "steady", memo, start)
    assert hpa_min_replicas(running, "steady") == 6
    later = await tick(kube, "steady", memo, start + timedelta(seconds=300))  # one more sample: the load moved
    assert later["status"]["prediction"]["updatedAt"] != first["status"]["prediction"]["updatedAt"]


async def test_a_prediction_problem_whose_message_changed_is_written_at_once_and_warned_once(sandbox):
    # Two Prometheus Secrets missing; the user creates the first: the condition names the second at once.
    running, kube = sandbox
    spec = predictive_spec(DOWN)
    spec["prometheus"]["bearerTokenSecretRef"] = {"name": "prom-token", "key": "token"}
    spec["prometheus"]["tls"] = {"caSecretRef": {"name": "prom-ca", "key": "ca.crt"}}
    await router(kube, "r", spec, None)
    now = datetime.now(tz=UTC)
    memo: dict[str, Any] = {}
    await predictive_tick(kube, await stored(kube, "r"), memo, now=now)
    assert "prom-token" in prediction_ready(await stored(kube, "r"))["message"]
    running.sandbox.seed("", "v1", "secrets", {"metadata": {"name": "prom-token", "namespace": "default"},
                                               "stringData": {"token": "t"}})  # fmt: skip
    outcome = await predictive_tick(kube, await stored(kube, "r"), memo, now=now + timedelta(seconds=60))
    assert outcome.new_problem and "prom-ca" in prediction_ready(await stored(kube, "r"))["message"]
    again = await predictive_tick(kube, await stored(kube, "r"), memo, now=now + timedelta(seconds=120))
    assert not again.new_problem  # no second Warning event for the same problem


async def test_the_first_drift_resync_waits_for_its_place_but_not_for_a_deletion(sandbox, monkeypatch):
    # kopf does not cancel a running timer when its object is deleted; the spread waits on ``stopped``.
    import kopf
    from kopf._core.intents.stoppers import DaemonStopper, DaemonStoppingReason

    from moe_operator import handlers

    _, kube = sandbox
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600.0)  # a place up to an hour into the period
    body = await router(kube, "r", predictive_spec(DOWN, mode="Off"), None)
    stopper = DaemonStopper()
    memo = kopf.Memo()
    memo.kube = kube
    resync: Any = handlers.resync
    waiting = asyncio.create_task(
        resync(body=body, memo=memo, namespace="default", name="r", stopped=stopper.async_waiter)
    )
    await asyncio.sleep(0.2)
    assert not waiting.done()
    stopper.set(DaemonStoppingReason.RESOURCE_DELETED)
    await asyncio.wait_for(waiting, 2.0)
