"""Predictive scaling end to end: a real Prometheus with office-hours traffic, the real operator, the sandbox.

Six days of history (5-minute steps, 2% noise) end now, five minutes before the daily jump from 20 to
200 requests/s. Reactive scaling would hold 2 replicas; the operator must raise the HPA's minReplicas
ahead of the jump, because only the calendar predicts it.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.integration.operator.harness import cluster, eventually, example_router, start_operator, stop_operator
from tests.support.prometheus import SeriesSpec, prometheus_missing, start_prometheus

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.timeout(150),
    pytest.mark.skipif(prometheus_missing() is not None, reason=str(prometheus_missing())),
]

DAY = 86_400.0
STEP = 300.0
LOW, HIGH = 20.0, 200.0
RISE_IN_SECONDS = 300.0  # after "now"; the query end is aligned down to a step, so at most 600 s after it


def office_hours(times: np.ndarray, rise_at: float) -> np.ndarray:
    """LOW requests/s at night, HIGH for the 12 hours after the daily jump, with 2% noise."""
    phase = np.mod(times - rise_at, DAY)
    level = np.where(phase < 12 * 3600.0, HIGH, LOW)
    return level * np.random.default_rng(7).normal(1.0, 0.02, times.size)


def predictive_router(prometheus_url: str) -> dict:
    body = example_router()
    body["spec"]["autoscaling"].update(minReplicas=2, maxReplicas=6)
    body["spec"]["runtime"]["startupSeconds"] = 600
    body["spec"]["autoscaling"]["predictive"] = {
        "mode": "Active",
        "prometheus": {"url": prometheus_url, "timeoutSeconds": 20},
        "capacityPerReplica": 20,
        "targetUtilization": 0.7,
        "horizonSeconds": 900,
        "lookbackSeconds": 6 * 86_400,
        "stepSeconds": int(STEP),
        "intervalSeconds": 10,
        "seasonality": "daily",
    }
    return body


async def test_the_hpa_floor_rises_ahead_of_a_daily_ramp(tmp_path):
    now = time.time()
    times = np.arange(now - 6 * DAY, now, STEP)
    rates = office_hours(times, rise_at=now + RISE_IN_SECONDS)
    assert rates[-1] < 1.1 * LOW  # reactive scaling sees only the night-time load
    labels = {"namespace": "default", "service": "demo-router", "moerouter": "demo-router"}
    with start_prometheus(tmp_path / "prom", [SeriesSpec(labels, times.tolist(), rates.tolist())]) as prometheus:
        async with cluster(tmp_path) as k8s:
            await k8s.apply_router(predictive_router(prometheus.url))
            ready = await eventually(
                lambda: (k8s.condition("demo-router", "PredictionReady") or {}).get("status") == "True"
                and k8s.condition("demo-router", "PredictionReady"),
                within=90, message="PredictionReady=True",
            )
            prediction = k8s.router()["status"]["prediction"]
            assert prediction["predictedLoad"] > 0.9 * HIGH, ready["message"]
            assert prediction["appliedMinReplicas"] == 6  # 200 req/s at 70% of 20 each: 15, capped at max
            hpa = await eventually(
                lambda: (k8s.get("autoscaling", "v2", "horizontalpodautoscalers", "demo-router") or {})
                .get("spec", {}).get("minReplicas", 0) > 2
                and k8s.get("autoscaling", "v2", "horizontalpodautoscalers", "demo-router"),
                message="the HPA's minReplicas is raised",
            )
            assert hpa["spec"]["minReplicas"] == prediction["appliedMinReplicas"]
            deployment = k8s.get("apps", "v1", "deployments", "demo-router")
            assert deployment["spec"]["replicas"] >= hpa["spec"]["minReplicas"]  # the fake HPA controller followed


def hpa_min_replicas(k8s) -> int:
    hpa = k8s.get("autoscaling", "v2", "horizontalpodautoscalers", "demo-router") or {}
    return int(hpa.get("spec", {}).get("minReplicas", 0))


async def test_a_prometheus_outage_holds_the_floor_for_the_grace_period_then_decays_and_recovers(tmp_path):
    now = time.time()
    times = np.arange(now - 6 * DAY, now, STEP)
    rates = office_hours(times, rise_at=now + RISE_IN_SECONDS)
    labels = {"namespace": "default", "service": "demo-router", "moerouter": "demo-router"}
    body = predictive_router("")
    predictive = body["spec"]["autoscaling"]["predictive"]
    predictive.update(gracePeriodSeconds=20, scaleDownStabilizationSeconds=20)
    with start_prometheus(tmp_path / "prom", [SeriesSpec(labels, times.tolist(), rates.tolist())]) as prometheus:
        predictive["prometheus"]["url"] = prometheus.url
        async with cluster(tmp_path) as k8s:
            await k8s.apply_router(body)
            await eventually(lambda: hpa_min_replicas(k8s) == 6, within=90, message="the floor is raised to 6")

            prometheus.stop()
            outage = await eventually(
                lambda: (k8s.condition("demo-router", "PredictionReady") or {}).get("reason")
                == "PrometheusUnavailable" and k8s.condition("demo-router", "PredictionReady"),
                within=60, message="PredictionReady reports PrometheusUnavailable",
            )
            assert outage["status"] == "False"
            assert hpa_min_replicas(k8s) == 6  # the last good floor is kept through the grace period

            seen: list[int] = []

            def decayed() -> bool:
                seen.append(hpa_min_replicas(k8s))
                return seen[-1] == 2

            await eventually(decayed, within=90, message="the floor decays to spec.autoscaling.minReplicas")
            assert seen == sorted(seen, reverse=True), f"the floor flapped while decaying: {seen}"
            assert k8s.process.returncode is None  # the operator did not crash

            prometheus.start()
            await eventually(
                lambda: (k8s.condition("demo-router", "PredictionReady") or {}).get("status") == "True",
                within=90, message="PredictionReady recovers once Prometheus is back",
            )
            await eventually(lambda: hpa_min_replicas(k8s) == 6, within=60, message="the floor is raised again")


async def test_an_operator_restart_with_prometheus_down_keeps_the_floor_for_the_grace_period(tmp_path):
    now = time.time()
    times = np.arange(now - 6 * DAY, now, STEP)
    rates = office_hours(times, rise_at=now + RISE_IN_SECONDS)
    labels = {"namespace": "default", "service": "demo-router", "moerouter": "demo-router"}
    body = predictive_router("")
    body["spec"]["autoscaling"]["predictive"]["gracePeriodSeconds"] = 3600
    with start_prometheus(tmp_path / "prom", [SeriesSpec(labels, times.tolist(), rates.tolist())]) as prometheus:
        body["spec"]["autoscaling"]["predictive"]["prometheus"]["url"] = prometheus.url
        async with cluster(tmp_path) as k8s:
            await k8s.apply_router(body)
            await eventually(lambda: hpa_min_replicas(k8s) == 6, within=90, message="the floor is raised to 6")

            await stop_operator(k8s.process)
            prometheus.stop()
            args = ("--namespace", "default", "--liveness", "", "--metrics-port", "0")  # no fixed ports to collide on
            restarted = await start_operator(k8s.running, tmp_path / "restarted.log", args)
            try:
                outage = await eventually(
                    lambda: (k8s.condition("demo-router", "PredictionReady") or {}).get("reason")
                    == "PrometheusUnavailable" and k8s.condition("demo-router", "PredictionReady"),
                    within=60, message="the restarted operator reports PrometheusUnavailable",
                )
                assert "keeping minReplicas 6 from the last good forecast" in outage["message"], outage["message"]
                seen = []
                for _ in range(10):  # a few more ticks (intervalSeconds 10) of the new process
                    seen.append(hpa_min_replicas(k8s))
                    await asyncio.sleep(1.5)
                assert set(seen) == {6}, f"the floor fell within the grace period: {seen}"
            finally:
                await stop_operator(restarted)
