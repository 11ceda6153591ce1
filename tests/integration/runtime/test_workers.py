"""``moe-router serve --workers 2``: two processes on one port, pod-wide metrics, one graceful SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_runtime.client import route
from tests.integration.runtime.conftest import small_config
from tests.integration.runtime.serving import serve_process

REQUESTS, TOKENS = 24, 6


class Pod:
    def __init__(self, url: str, process: subprocess.Popen[bytes], tmpdir: Path) -> None:
        self.url, self.process, self.tmpdir = url, process, tmpdir


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("workers")
    wire = small_config().model_dump(by_alias=True, mode="json")
    wire["server"]["batching"]["maxDelayMs"] = 300.0  # long enough to catch a request in flight
    wire["server"]["shutdownGraceSeconds"] = 10.0
    with serve_process(wire, tmp, "--workers", "2", env={"TMPDIR": str(tmp)}, ready_timeout=90) as (url, process):
        yield Pod(url, process, tmp)

def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from a fresh connection (any worker may answer)."""
    text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
    return {
        sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_supervisor_runs_two_worker_processes(pod: Pod) -> None:
    spawned = [pid for pid in children(pod.process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(spawned) == 2


def test_metrics_show_the_totals_of_every_worker(pod: Pod) -> None:
    x = np.random.default_rng(0).standard_normal((TOKENS, 16), dtype=np.float32)
    with ThreadPoolExecutor(8) as pool:  # fresh connections, spread over both workers by the kernel
        results = list(pool.map(lambda _: route(pod.url, "tiny", x), range(REQUESTS)))
    assert all(result.k.shape == (TOKENS,) for result in results)
    for _ in range(4):  # whichever worker answers the scrape shows the same pod-wide totals
        samples = scrape(pod.url)
        assert samples["moe_router_requests_total{code=200}"] == REQUESTS
        assert samples["moe_router_tokens_total"] == REQUESTS * TOKENS
        assert samples["moe_router_experts_per_token_count"] == REQUESTS * TOKENS
        assert abs(sum(v for k, v in samples.items() if k.startswith("moe_router_expert_utilization")) - 1) < 1e-9
        assert samples["moe_router_inflight_requests"] == 0


def test_sigterm_drains_every_worker_and_exits_0(pod: Pod) -> None:
    x = np.ones((4, 16), np.float32)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(route, pod.url, "tiny", x)
        deadline = time.monotonic() + 10
        while scrape(pod.url)["moe_router_inflight_requests"] < 1:
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.01)
        pod.process.send_signal(signal.SIGTERM)
        assert pending.result(timeout=15).k.shape == (4,)
    assert pod.process.wait(timeout=20) == 0
    assert not list(pod.tmpdir.glob("moe-router-metrics-*"))  # the shared metrics files are removed
