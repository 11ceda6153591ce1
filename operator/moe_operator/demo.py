"""``make demo``: the whole product end to end on one machine, in a local sandbox, in a few minutes.

1. a sandbox Kubernetes API (the in-process emulator, NOT a cluster) and the real operator against it;
2. ``examples/moerouter.yaml`` applied; the children and the MoERouter status printed as tables;
3. the router runtime started with the ConfigMap the operator generated; one request routed;
4. the scaling simulator on a traffic trace, reactive HPA vs predictive, with a plot in ``out/``.
Everything it starts is stopped again, and its temporary files are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from moe_operator.api import GROUP, PLURAL, VERSION
from moe_operator.children import (
    CHILD_RESOURCES,
    CONFIG_MAP,
    DEPLOYMENT,
    ChildResource,
    child_name,
    mounted_config_maps,
)
from moe_operator.kube import Kube, Resource
from moe_operator.labels import CONFIG_HASH_ANNOTATION
from moe_operator.sandbox import SandboxThread, free_port
from router_runtime.config import CONFIG_FILE_NAME

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "moerouter.yaml"
SHARED_TRACE = ROOT.parent / "shared" / "traces" / "nyc_taxi.csv"
OUT = ROOT / "out"
MOEROUTERS = Resource(GROUP, VERSION, PLURAL)
T = TypeVar("T")


def banner(text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {text}{plain}", flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90.0, interval: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def resource_of(child: ChildResource) -> Resource:
    return Resource(child.group, child.version, child.plural)


def child_summary(obj: dict[str, Any]) -> str:
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind == "ConfigMap":
        return f"{CONFIG_FILE_NAME}: {len(obj['data'][CONFIG_FILE_NAME])} bytes"
    if kind == "Deployment":
        template = spec["template"]
        status = obj.get("status") or {}
        return (
            f"image {template['spec']['containers'][0]['image']}, ready "
            f"{status.get('readyReplicas', 0)}/{status.get('replicas', 0)}, config-hash "
            f"{template['metadata']['annotations'][CONFIG_HASH_ANNOTATION]}"
        )
    if kind == "Service":
        return ", ".join(f"{port['name']}:{port['port']}" for port in spec["ports"])
    if kind == "HorizontalPodAutoscaler":
        return f"min {spec['minReplicas']}, max {spec['maxReplicas']}"
    if kind == "NetworkPolicy":
        return f"{len(spec['ingress'])} ingress rules, everything else denied"
    if kind == "PodDisruptionBudget":
        return f"maxUnavailable {spec['maxUnavailable']}"
    return ""


@contextlib.contextmanager
def process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def show_operator(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    def get(resource: Resource, object_name: str) -> dict[str, Any] | None:
        return asyncio.run(kube.get(resource, namespace, object_name))

    def ready_router() -> dict[str, Any] | None:
        router = get(MOEROUTERS, name)
        conditions = ((router or {}).get("status") or {}).get("conditions") or []
        ready = any(item["type"] == "Ready" and item["status"] == "True" for item in conditions)
        return router if ready else None

    router = wait_for("the MoERouter to become Ready", ready_router)
    fixed_names = [
        obj
        for child in CHILD_RESOURCES
        if child != CONFIG_MAP
        for obj in [get(resource_of(child), child_name(child, name))]
        if obj is not None
    ]
    deployment = next(obj for obj in fixed_names if obj["kind"] == DEPLOYMENT.kind)
    # The ConfigMap's name carries its content's hash: the one the pods mount is the current one.
    mounted = [get(resource_of(CONFIG_MAP), config_map) for config_map in sorted(mounted_config_maps(deployment))]
    children = [obj for obj in mounted if obj is not None] + fixed_names
    banner(f"Children of MoERouter {namespace}/{name} (owned by it, labelled managed-by=moe-router-operator)")
    print(table(["KIND", "NAME", "DETAILS"], [[o["kind"], o["metadata"]["name"], child_summary(o)] for o in children]))
    status = router["status"]
    banner(f"MoERouter {namespace}/{name} status")
    print(
        f"observedGeneration {status.get('observedGeneration')}  replicas {status.get('replicas')}  "
        f"readyReplicas {status.get('readyReplicas')}  selector {status.get('selector')}"
    )
    print(
        table(
            ["CONDITION", "STATUS", "REASON", "MESSAGE"],
            [[c["type"], c["status"], c["reason"], c.get("message", "")] for c in status["conditions"]],
        )
    )
    config_map = next(obj for obj in children if obj["kind"] == "ConfigMap")
    return config_map


def route_once(config_yaml: str, workdir: Path) -> None:
    from router_runtime.client import model_metadata, route, wait_ready

    config_path = workdir / CONFIG_FILE_NAME
    config_path.write_text(config_yaml)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    banner(f"Router runtime: moe-router serve --config <the operator's ConfigMap> --port {port}")
    command = [sys.executable, "-m", "router_runtime", "serve", "--config", str(config_path), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    with process(command, workdir / "runtime.log"):
        wait_ready(url, timeout=90)
        model = str(yaml.safe_load(config_yaml)["router"]["modelName"])
        metadata = model_metadata(url, model)
        input_dim = int(metadata["inputs"][0]["shape"][-1])
        tokens = np.random.default_rng(0).standard_normal((256, input_dim), dtype=np.float32)
        started = time.perf_counter()
        response = route(url, model, tokens, binary=True)
        elapsed_ms = (time.perf_counter() - started) * 1000
        num_experts = int(metadata.get("parameters", {}).get("num_experts", 0)) or None
        summary = response.summary(num_experts)
        print(f"POST /v2/models/{model}/infer  256 tokens x {input_dim}  (binary tensors)  {elapsed_ms:.1f} ms")
        print(
            table(
                ["TOKENS", "MEAN K", "K HISTOGRAM", "EXPERT LOAD", "LOAD CV"],
                [[summary["tokens"], f"{summary['mean_k']:.2f}", summary["k_histogram"], summary["expert_load"],
                  f"{summary['load_cv']:.3f}"]],
            )
        )
        if summary["server"]:
            print("server statistics:", json.dumps(summary["server"]))


def simulate(workdir: Path) -> None:
    OUT.mkdir(exist_ok=True)
    trace, trace_format = SHARED_TRACE, "counts"
    if not trace.exists():
        trace_format = "rate"
        trace = workdir / "synthetic-daily.csv"
        # Ten days of office hours: 2 requests/s at night, a steep morning ramp to 14, 5% noise, 5-min steps.
        seconds = np.arange(0, 10 * 86400, 300)
        hour = (seconds % 86400) / 3600
        office = 1 / (1 + np.exp(-8 * (hour - 8))) / (1 + np.exp(-8 * (20 - hour)))
        rate = (2 + 12 * office) * np.random.default_rng(1).normal(1.0, 0.05, seconds.size)
        rows = "".join(f"{int(t)},{r:.3f}\n" for t, r in zip(seconds, rate, strict=True))
        trace.write_text("timestamp,value\n" + rows)
    plot = OUT / "demo-simulation.png"
    banner(f"Scaling simulator on {trace.name}: reactive HPA vs predictive floor (startup delay 300 s)")
    args = [sys.executable, "-m", "moe_operator", "simulate", "--trace", str(trace), "--trace-format", trace_format,
            "--capacity-per-replica", "0.5", "--startup-delay", "300", "--target-utilization", "0.7",
            "--min-replicas", "2", "--max-replicas", "80", "--policy", "predictive", "--plot", str(plot)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        raise RuntimeError(f"simulate failed: {result.stderr.strip()}")
    print(f"plot written to {plot.relative_to(ROOT)}")


def main() -> int:
    started = time.monotonic()
    example = yaml.safe_load(EXAMPLE.read_text())
    name, namespace = example["metadata"]["name"], example["metadata"].get("namespace", "default")
    with tempfile.TemporaryDirectory(prefix="moe-demo-") as temporary:
        workdir = Path(temporary)
        kubeconfig = workdir / "kubeconfig"
        banner("SANDBOX: a local Kubernetes API emulator on 127.0.0.1 (kmock), not a real cluster")
        with SandboxThread(kubeconfig, ready_delay=1.0) as sandbox:
            print(f"API server {sandbox.url}; fake deployment controller marks pods ready after 1 s")
            env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
            operator = [sys.executable, "-m", "moe_operator", "run", "--standalone", "--namespace", namespace,
                        "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--metrics-port", "0"]
            with process(operator, workdir / "operator.log", env) as operator_process:
                print(f"operator: {' '.join(operator[1:])} (pid {operator_process.pid})")
                os.environ["KUBECONFIG"] = str(kubeconfig)
                kube = Kube.from_environment()
                try:
                    banner(f"kubectl apply -f {EXAMPLE.relative_to(ROOT)}")
                    asyncio.run(kube.apply(MOEROUTERS, example))
                    config_map = show_operator(kube, namespace, name)
                finally:
                    kube.close()
                    os.environ.pop("KUBECONFIG", None)
                if operator_process.poll() is not None:
                    print((workdir / "operator.log").read_text()[-4000:])
                    raise RuntimeError("the operator exited early")
        route_once(config_map["data"][CONFIG_FILE_NAME], workdir)
        simulate(workdir)
    elapsed = time.monotonic() - started
    banner(f"Done in {elapsed:.0f} s; sandbox, operator and runtime stopped, temporary files removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
