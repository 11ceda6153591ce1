"""Operator scale benchmark: N MoERouters created at once against the local API sandbox.

Runs the real ``moe-operator run`` as a subprocess against ``moe_operator.sandbox`` and reports, per N:
create-to-children latency of single objects (p50/p95), time until every object is reconciled
(six children and ``Ready=True`` for the current generation), write requests per object, write
requests during no-op resyncs (with proof that the resyncs ran) and the operator's peak RSS.

    python benchmarks/operator_scale.py [--sizes 50 200] [--resync 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from moe_operator import sandbox as sandbox_module
from moe_operator.children import CHILD_RESOURCES, CONFIG_MAP, child_name, mounted_config_maps
from moe_operator.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
AGENT = "benchmark/1.0"
ROUTERS_PATH = "/apis/moerouter.io/v1alpha1/namespaces/default/moerouters"
#: The children every example MoERouter gets (the monitoring kinds are off in the example).
CORE_CHILDREN = tuple(resource for resource in CHILD_RESOURCES if resource.group != "monitoring.coreos.com")


def router(name: str) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "moerouter.yaml").read_text())
    body["metadata"]["name"] = name
    return body


def has_children(sandbox: Sandbox, name: str) -> bool:
    named = all(
        sandbox.object_of(child.group, child.version, child.plural, "default", child_name(child, name)) is not None
        for child in CORE_CHILDREN
        if child != CONFIG_MAP
    )
    deployment = sandbox.object_of("apps", "v1", "deployments", "default", name)
    # The ConfigMap's name carries its content's hash: the one the Deployment mounts.
    return named and deployment is not None and all(
        sandbox.object_of("", "v1", "configmaps", "default", config_map) is not None
        for config_map in mounted_config_maps(deployment)
    )


def reconciled(sandbox: Sandbox, name: str) -> bool:
    body = sandbox.object_of("moerouter.io", "v1alpha1", "moerouters", "default", name)
    if body is None or not has_children(sandbox, name):
        return False
    status = body.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c["type"] == "Ready" and c["status"] == "True"]
    return bool(ready) and status.get("observedGeneration") == body["metadata"]["generation"]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_until(check: Any, within: float) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > within:
            raise TimeoutError(f"not reached within {within} s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def measure(count: int, resync: float, singles: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with sandbox_module.serve(Path(tmp) / "kubeconfig", ready_delay=0.2) as running:
            sandbox = running.sandbox
            env = {**os.environ, "KUBECONFIG": str(running.kubeconfig_path),
                   "MOE_OPERATOR_RESYNC_SECONDS": str(resync)}
            liveness = f"http://127.0.0.1:{sandbox_module.free_port()}/healthz"
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "moe_operator", "run", "--namespace", "default",
                "--liveness", liveness, "--metrics-port", "0",
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                async with aiohttp.ClientSession(headers={"User-Agent": AGENT}) as session:
                    await _alive(session, liveness)

                    async def create(name: str) -> None:
                        url = f"{running.url}{ROUTERS_PATH}"
                        async with session.post(url, json=router(name)) as response:
                            assert response.status == 201, await response.text()

                    latencies = []
                    for index in range(singles):
                        name = f"single-{index}"
                        started = time.perf_counter()
                        await create(name)
                        await wait_until(lambda n=name: has_children(sandbox, n), 30)
                        latencies.append(time.perf_counter() - started)
                    await wait_until(lambda: all(reconciled(sandbox, f"single-{i}") for i in range(singles)), 30)
                    await asyncio.sleep(1.0)

                    mark = len(sandbox.log)
                    names = [f"bulk-{index}" for index in range(count)]
                    started = time.perf_counter()
                    await asyncio.gather(*(create(name) for name in names))
                    await wait_until(lambda: all(has_children(sandbox, n) for n in names), 300)
                    all_children_at = time.perf_counter() - started
                    await wait_until(lambda: all(reconciled(sandbox, n) for n in names), 300)
                    reconciled_s = time.perf_counter() - started
                    await asyncio.sleep(2.0)  # stragglers: status refreshes after the last Deployment event
                    bulk_calls = [c for c in sandbox.log[mark:] if c.user_agent != AGENT]
                    bulk_writes = [c for c in bulk_calls if c.is_write]

                    quiet_mark = len(sandbox.log)
                    await asyncio.sleep(resync * 2.5)
                    quiet = [c for c in sandbox.log[quiet_mark:] if c.user_agent != AGENT]
                    resync_reads = sum(1 for c in quiet if c.verb == "get" and c.resource == "deployments")
                    rss = peak_rss_mib(process.pid)
            finally:
                process.terminate()
                await process.wait()
    by_kind: dict[str, int] = {}
    for call in bulk_writes:
        key = f"{call.verb} {call.resource}"
        by_kind[key] = by_kind.get(key, 0) + 1
    return {
        "objects": count,
        "single_create_to_children_p50_s": round(statistics.median(latencies), 3),
        "single_create_to_children_max_s": round(max(latencies), 3),
        "bulk_all_children_s": round(all_children_at, 2),
        "bulk_all_ready_reconciled_s": round(reconciled_s, 2),
        "writes_per_object": round(len(bulk_writes) / count, 2),
        "writes_by_kind": dict(sorted(by_kind.items())),
        "noop_resync_window_s": resync * 2.5,
        "noop_resync_deployment_reads": resync_reads,
        "noop_resync_writes": sum(1 for c in quiet if c.is_write),
        "noop_resync_writes_by_kind": sorted({f"{c.verb} {c.resource}" for c in quiet if c.is_write}),
        "operator_peak_rss_mib": round(rss, 1),
    }


async def _alive(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the operator did not become alive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--resync", type=float, default=10.0, help="drift timer period in the operator (s)")
    parser.add_argument("--singles", type=int, default=10, help="single objects timed one by one first")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python={platform.python_version()} {platform.platform()}")
    for count in args.sizes:
        result = asyncio.run(measure(count, args.resync, args.singles))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
