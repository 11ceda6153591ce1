"""The Prometheus adapter and the controller's fault handling, without a Prometheus server.

Faults come from real sockets: a closed port (down), a listener that never answers (slow) and a
minimal HTTP server answering 503 (a failing proxy in front of Prometheus).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from moe_operator.api import MoERouterSpec, parse_spec
from moe_operator.scaling.controller import PredictiveState, run_tick
from moe_operator.scaling.metrics import ScalingMetrics
from moe_operator.scaling.prometheus import (
    NO_DATA,
    UNAVAILABLE,
    PrometheusAuth,
    PrometheusQueryError,
    RangeResult,
    default_query,
    fetch_range,
    merge_range,
    query_windows,
    to_grid,
)
from tests.support.prometheus import free_port

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def spec_for(url: str, mode: str = "Active", timeout: float = 2.0) -> MoERouterSpec:
    return parse_spec({
        "autoscaling": {
            "enabled": True, "minReplicas": 2, "maxReplicas": 10,
            "predictive": {"mode": mode, "prometheus": {"url": url, "timeoutSeconds": timeout},
                           "capacityPerReplica": 5.0},
        },
    })


def test_default_query_sums_the_request_rate_of_one_routers_pods_by_their_moerouter_label() -> None:
    assert default_query("r1", "ns") == 'sum(rate(moe_router_requests_total{namespace="ns",moerouter="r1"}[2m]))'


def test_a_long_range_is_cut_into_windows_prometheus_accepts() -> None:
    windows = query_windows(0.0, 691_200.0, 60.0, max_points=11_000)
    assert windows == [(0.0, 659_940.0), (660_000.0, 691_200.0)]
    assert query_windows(0.0, 600.0, 60.0) == [(0.0, 600.0)]


def test_merging_keeps_the_old_grid_where_only_it_has_samples_and_the_new_one_elsewhere() -> None:
    old = RangeResult(0.0, 60.0, np.array([1.0, 2.0, np.nan, 4.0, 5.0]), 1)
    new = RangeResult(180.0, 60.0, np.array([40.0, 50.0, 60.0, 70.0]), 2)
    merged = merge_range(old, new, start=60.0)
    assert merged.start == 60.0 and merged.series == 2
    np.testing.assert_array_equal(merged.values, [2.0, np.nan, 40.0, 50.0, 60.0, 70.0])


def test_merging_after_a_gap_leaves_the_missing_steps_nan() -> None:
    old = RangeResult(0.0, 60.0, np.array([1.0, 2.0]), 1)
    new = RangeResult(240.0, 60.0, np.array([5.0]), 1)
    np.testing.assert_array_equal(merge_range(old, new, start=0.0).values, [1.0, 2.0, np.nan, np.nan, 5.0])


def test_default_query_escapes_quotes_in_names() -> None:
    assert 'namespace="a\\"b"' in default_query("r", 'a"b')


def test_to_grid_sums_series_and_marks_missing_and_nan_samples() -> None:
    result = [
        {"metric": {"pod": "a"}, "values": [[0, "1"], [60, "2"], [180, "NaN"]]},
        {"metric": {"pod": "b"}, "values": [[0, "3"], [120, "+Inf"]]},
    ]
    grid = to_grid(result, 0.0, 180.0, 60.0)
    assert grid.series == 2
    np.testing.assert_array_equal(grid.values, [4.0, 2.0, np.nan, np.nan])


def test_to_grid_of_an_empty_result_is_no_data() -> None:
    with pytest.raises(PrometheusQueryError) as error:
        to_grid([], 0.0, 60.0, 60.0)
    assert error.value.reason == NO_DATA


def test_auth_repr_hides_secrets() -> None:
    text = repr(PrometheusAuth(bearer_token="s3cret", username="u", password="pw"))
    assert "s3cret" not in text and "pw" not in text


def test_a_closed_port_is_prometheus_unavailable() -> None:
    with pytest.raises(PrometheusQueryError) as error:
        fetch_range(f"http://127.0.0.1:{free_port()}", "up", end=1e9, lookback_seconds=3600, step_seconds=60,
                    timeout_seconds=2)
    assert error.value.reason == UNAVAILABLE


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """Accepts connections and never answers: a Prometheus that hangs."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


class _Unavailable(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"upstream connect error"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def failing_proxy() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_tick_with_predictive_off_reports_off_and_holds_nothing() -> None:
    spec = parse_spec({"autoscaling": {"enabled": True}})
    result = await run_tick(spec, name="r", namespace="ns", state=PredictiveState(), now=NOW, auth=None,
                            metrics=ScalingMetrics(CollectorRegistry()))
    assert (result.condition_reason, result.min_replicas, result.prediction) == ("PredictionOff", None, None)


async def test_tick_with_prometheus_down_returns_unavailable_and_min_replicas() -> None:
    metrics = ScalingMetrics(CollectorRegistry())
    state = PredictiveState()
    result = await run_tick(spec_for(f"http://127.0.0.1:{free_port()}"), name="r", namespace="ns", state=state,
                            now=NOW, auth=None, metrics=metrics)
    assert (result.condition_status, result.condition_reason) == ("False", "PrometheusUnavailable")
    assert result.min_replicas == 2
    assert state.consecutive_failures == 1
    assert metrics.query_failures.labels("ns", "r", "PrometheusUnavailable")._value.get() == 1


async def test_tick_with_a_hanging_prometheus_gives_up_after_the_timeout(silent_listener: str) -> None:
    started = time.monotonic()
    result = await run_tick(spec_for(silent_listener, timeout=1.0), name="r", namespace="ns",
                            state=PredictiveState(), now=NOW, auth=None, metrics=ScalingMetrics(CollectorRegistry()))
    assert result.condition_reason == "PrometheusUnavailable"
    assert time.monotonic() - started < 5.0


async def test_tick_behind_a_failing_proxy_is_unavailable_not_a_crash(failing_proxy: str) -> None:
    result = await run_tick(spec_for(failing_proxy), name="r", namespace="ns", state=PredictiveState(), now=NOW,
                            auth=None, metrics=ScalingMetrics(CollectorRegistry()))
    assert result.condition_reason == "PrometheusUnavailable"
    assert "503" in result.condition_message


async def test_forecast_only_tick_never_returns_a_min_replicas() -> None:
    result = await run_tick(spec_for(f"http://127.0.0.1:{free_port()}", mode="ForecastOnly"), name="r",
                            namespace="ns", state=PredictiveState(), now=NOW, auth=None,
                            metrics=ScalingMetrics(CollectorRegistry()))
    assert result.min_replicas is None
