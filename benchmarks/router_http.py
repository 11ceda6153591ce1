"""HTTP end to end: throughput and latency of the served router under concurrent clients.

Starts ``python -m router_runtime serve`` (d=768, E=8, top_p, k in [1, 2]) on a free loopback port, then
a load generator in a separate process (raw asyncio HTTP/1.1 keep-alive connections with pre-encoded
requests, so the client costs as little CPU as possible on the shared cores). Each request carries 256
tokens. For the binary tensor extension and for JSON tensors it measures

* saturation: closed loop with N concurrent connections for each N in ``--concurrency``, best req/s;
  the server runs as ``moe-router serve`` does in a pod (httptools, uvloop, OMP_WAIT_POLICY=PASSIVE);
* half of saturation: open loop at 0.5 x the saturated rate (latency counted from the scheduled send
  time, so queueing is not hidden), p50/p99;

and compares the binary saturation throughput with in-process ``DynamicRouter.route`` on 8192-token
batches (the issue's target: >= 40 %, and p99 < 50 ms at half of saturation), and with this machine's
ceiling: the CPU that moving the same bytes over loopback costs (raw TCP, measured) plus the routing at
the in-process rate, i.e. what the cores could serve if HTTP and Python cost nothing. At half of
saturation it also reads the server's own latency histogram from ``/metrics``, to tell the server's
tail from the open-loop generator's scheduling delays on the shared cores. When Debian's ``wrk`` is
installed the binary saturation runs are repeated with ``wrk -t1`` (C, a Lua script posts the body),
a lighter generator than Python. Each run also reports the CPU per request of the server (all its
processes), of its event-loop threads and of the generator. Everything shares the machine's cores,
unpinned, unless ``--server-cpus`` and ``--client-cpus`` pin the server (and the in-process reference) and
the load generators to separate CPUs; ``--device cuda`` routes on the GPU, in the server and the reference.
``--workers`` repeats everything for each number of server processes (``serve --workers``).

    .venv/bin/python benchmarks/router_http.py [--duration 8] [--workers 1 2] [--modes binary json] [--no-wrk]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

TOKENS_PER_REQUEST = 256
MODEL = "moe-router"


def server_config(device: str = "cpu") -> dict[str, Any]:
    return {
        "router": {
            "modelName": MODEL, "inputDim": 768, "numExperts": 8, "minExperts": 1, "maxExperts": 2, "device": device,
        },
        "server": {"batching": {"maxBatchTokens": 8192, "maxDelayMs": 2.0, "maxQueueRequests": 1024}},
    }


def encoded_request(binary: bool, seed: int = 0, datatype: str = "FP32") -> bytes:
    """A complete HTTP/1.1 request (headers and body) for one 256-token infer call."""
    from router_runtime.protocol import encode_request

    tokens = np.random.default_rng(seed).standard_normal((TOKENS_PER_REQUEST, 768), dtype=np.float32)
    body, headers = encode_request(tokens, binary=binary, datatype=datatype)
    lines = [f"POST /v2/models/{MODEL}/infer HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> int:
        """Send ``request``, read the whole response, return its status code."""
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status


async def closed_loop(host: str, port: int, request: bytes, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def client() -> None:
        nonlocal errors
        connection = await Connection.open(host, port)
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            if await connection.exchange(request) == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
        connection.writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summary(latencies, errors, time.perf_counter() - started, concurrency=concurrency)


async def open_loop(host: str, port: int, request: bytes, rate: float, duration: float) -> dict[str, Any]:
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        connection = pool.get_nowait() if not pool.empty() else await Connection.open(host, port)
        status = await connection.exchange(request)
        if status == 200:
            latencies.append(time.perf_counter() - scheduled)
        else:
            errors += 1
        pool.put_nowait(connection)

    for _ in range(8):
        pool.put_nowait(await Connection.open(host, port))
    tasks = []
    started = time.perf_counter()
    interval = 1.0 / rate
    n = int(duration * rate)
    for i in range(n):
        scheduled = started + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.gather(*tasks)
    return summary(latencies, errors, time.perf_counter() - started, rate=rate) | {"latencies_s": latencies}


def summary(latencies: list[float], errors: int, elapsed: float, **extra: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else float("nan")

    return {
        **extra,
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / elapsed,
        "tokens_per_s": len(latencies) * TOKENS_PER_REQUEST / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(ordered) * 1e3 if ordered else float("nan"),
    }


def loadgen(args: argparse.Namespace) -> int:
    """The load generator process: one measurement, printed as a JSON line."""
    request = encoded_request(args.mode == "binary", datatype=args.datatype)
    if args.rate:
        result = asyncio.run(open_loop("127.0.0.1", args.port, request, args.rate, args.duration))
        if not args.raw:
            result.pop("latencies_s")
    else:
        result = asyncio.run(closed_loop("127.0.0.1", args.port, request, args.concurrency, args.duration))
    print(json.dumps(result))
    return 0


def server_processes(pid: int) -> list[int]:
    """``pid`` and its children (the worker processes when the server runs several), from /proc."""
    processes = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    processes.append(int(entry.name))
    return processes


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) of each thread of ``pid`` and its children, by (process, thread), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    result: dict[tuple[int, int], float] = {}
    for process in server_processes(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{process}/task").iterdir():
                with contextlib.suppress(OSError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    result[process, int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return result


def machine_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat: time the hypervisor gave this VM's CPUs to others."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return fields[7], sum(fields)


def measured(server_pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result plus the CPU the server (event-loop threads vs the rest) and the generator spent, and
    the share of the machine's CPU time the hypervisor stole meanwhile (a run with steal is not the server's)."""
    before, children_before = thread_cpu_seconds(server_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    steal_before, total_before = machine_jiffies()
    result = run()
    steal_after, total_after = machine_jiffies()
    after, children_after = thread_cpu_seconds(server_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = {key: after[key] - before.get(key, 0.0) for key in after}
    # The main thread of each serving process (tid == pid) runs its event loop; the supervisor's is idle.
    loop_thread = sum(seconds for (process, tid), seconds in spent.items() if process == tid)
    generator = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    requests = max(int(result["requests"]), 1)
    return result | {
        "server_cpu_ms_per_request": sum(spent.values()) / requests * 1e3,
        "event_loop_cpu_ms_per_request": loop_thread / requests * 1e3,
        "generator_cpu_ms_per_request": generator / requests * 1e3,
        "steal_share": (steal_after - steal_before) / max(total_after - total_before, 1),
    }


Cpus = frozenset[int] | None


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as taskset writes it (``0-1,4``)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def pin_child(cpus: Cpus) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning a child process (and the processes it starts) to ``cpus``; None leaves it free."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def pinned(cpus: Cpus) -> Iterator[None]:
    """Run this thread (and the threads it starts meanwhile) on ``cpus`` only."""
    if not cpus:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


#: Most requests/s one open-loop generator process sends on time: above it (0.3-0.5 ms of Python per request)
#: it falls behind its schedule and sends bursts, which the latency it reports then counts.
OPEN_LOOP_RATE_PER_PROCESS = 400.0


def run_loadgen(
    port: int,
    mode: str,
    duration: float,
    concurrency: int = 0,
    rate: float = 0.0,
    cpus: Cpus = None,
    datatype: str = "FP32",
) -> dict[str, Any]:
    """One measurement by Python generator processes: one closed loop, or an open loop split over enough
    processes that each keeps its schedule (latencies merged before the percentiles are taken)."""
    processes = max(1, math.ceil(rate / OPEN_LOOP_RATE_PER_PROCESS)) if rate else 1
    command = [sys.executable, __file__, "--loadgen", "--port", str(port), "--mode", mode, "--raw"]
    command += ["--datatype", datatype]
    command += ["--duration", str(duration), "--concurrency", str(concurrency), "--rate", str(rate / processes)]
    running = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=pin_child(cpus))
        for _ in range(processes)
    ]
    parts = []
    for process in running:
        output, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"load generator exited with {process.returncode}")
        parts.append(json.loads(output.strip().splitlines()[-1]))
    if not rate:
        return parts[0] | {"generator": "python-asyncio"}
    latencies = [latency for part in parts for latency in part["latencies_s"]]
    elapsed = max(part["requests"] / part["req_per_s"] for part in parts if part["req_per_s"])
    merged = summary(latencies, sum(part["errors"] for part in parts), elapsed, rate=rate)
    return merged | {"generator": f"python-asyncio x{processes}"}


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("MOE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("MOE_BENCH_HEADER_LENGTH")
"""


def run_wrk(
    wrk: str, port: int, duration: float, concurrency: int, cpus: Cpus = None, datatype: str = "FP32"
) -> dict[str, Any]:
    """Closed loop with Debian's ``wrk`` (C, one thread): the binary request, ``concurrency`` connections."""
    from router_runtime.protocol import encode_request

    tokens = np.random.default_rng(0).standard_normal((TOKENS_PER_REQUEST, 768), dtype=np.float32)
    body, headers = encode_request(tokens, binary=True, datatype=datatype)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
        env = os.environ | {
            "MOE_BENCH_BODY": str(Path(tmp) / "body"),
            "MOE_BENCH_HEADER_LENGTH": headers["Inference-Header-Content-Length"],
        }
        command = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency"]
        command += ["-s", str(Path(tmp) / "post.lua"), f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, env=env, preexec_fn=pin_child(cpus)
        ).stdout
    return parse_wrk(output) | {"concurrency": concurrency, "generator": "wrk"}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, errors, req/s and p50/p99 from ``wrk --latency`` output."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def millis(text: str) -> float:
        match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
        return float(match.group(1)) * units[match.group(2)] if match else float("nan")

    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    pct = {m.group(1): millis(m.group(2)) for m in re.finditer(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", output, re.M)}
    return {
        "requests": requests - errors,
        "errors": errors,
        "req_per_s": rate,
        "tokens_per_s": rate * TOKENS_PER_REQUEST,
        "p50_ms": pct.get("50", float("nan")),
        "p99_ms": pct.get("99", float("nan")),
    }


def transfer_serve(args: argparse.Namespace) -> int:
    """The receiving end of ``loopback_transfer``: read each request whole, answer a response-sized reply."""
    request_size, reply = args.transfer[0], b"r" * args.transfer[1]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        connection, _ = listener.accept()
    buffer = memoryview(bytearray(request_size))
    messages, start = 0, time.thread_time()
    with connection:
        while True:
            got = 0
            while got < request_size:
                n = connection.recv_into(buffer[got:], request_size - got)
                if n == 0:
                    print(json.dumps({"messages": messages, "cpu_s": time.thread_time() - start}))
                    return 0
                got += n
            connection.sendall(reply)
            messages += 1


def loopback_transfer(
    request: bytes, reply_size: int, duration: float, server_cpus: Cpus = None, client_cpus: Cpus = None
) -> dict[str, float]:
    """CPU per request of moving the bytes alone: blocking raw TCP over loopback, no HTTP, no Python per byte.

    One client (this thread) and one server process ping-pong the exact request bytes and a reply of the
    response's size; what both sides spend is the kernel's copy and TCP work that any server on this
    machine pays for the same traffic, whatever its HTTP stack.
    """
    command = [sys.executable, __file__, "--transfer", str(len(request)), str(reply_size)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=pin_child(server_cpus))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    reply = bytearray(reply_size)
    sent, start, stop_at = 0, time.thread_time(), time.perf_counter() + duration
    with pinned(client_cpus), socket.create_connection(("127.0.0.1", port)) as connection:
        while time.perf_counter() < stop_at:
            connection.sendall(request)
            view, got = memoryview(reply), 0
            while got < reply_size:
                got += connection.recv_into(view[got:], reply_size - got)
            sent += 1
        client_cpu = time.thread_time() - start
    served = json.loads(server.communicate(timeout=30)[0])
    return {
        "client_cpu_ms": client_cpu / sent * 1e3,
        "server_cpu_ms": served["cpu_s"] / max(served["messages"], 1) * 1e3,
    }


def response_size() -> int:
    """Bytes of a binary 256-token response (outputs as the server encodes them, plus an HTTP head)."""
    from router_runtime.protocol import encode_infer_response

    outputs: dict[str, np.ndarray] = {
        "expert_indices": np.zeros((TOKENS_PER_REQUEST, 2), np.int64),
        "expert_weights": np.zeros((TOKENS_PER_REQUEST, 2), np.float32),
        "num_experts": np.zeros(TOKENS_PER_REQUEST, np.int64),
    }
    parameters = {"mean_k": 1.2345678, "dropped_mass": 0.0123456, "flops_ratio": 0.617283, "batch_tokens": 8192}
    encoded = encode_infer_response(MODEL, "1", outputs, binary=frozenset(outputs), parameters=parameters)
    return len(encoded.body) + 200


def ceiling(
    reference: float,
    threads: int,
    transfer: dict[str, float],
    device: str = "cpu",
    server_cpus: Cpus = None,
    client_cpus: Cpus = None,
) -> dict[str, float]:
    """The most requests/s these cores could serve if HTTP parsing and Python cost nothing.

    Each request still costs the loopback transfer on both ends (measured) and the routing of its tokens
    at the in-process rate (on the CPU: ``threads`` cores busy for ``TOKENS_PER_REQUEST / reference``
    seconds; on a GPU: no CPU, but never more tokens/s than the in-process reference). Unpinned, the load
    generator shares the cores, as in the HTTP runs; pinned, the server's and the generator's CPUs each
    bound it.
    """
    routing_ms = threads * TOKENS_PER_REQUEST / reference * 1e3 if device == "cpu" else 0.0
    if server_cpus and client_cpus:
        req_per_s = min(
            len(server_cpus) / (transfer["server_cpu_ms"] + routing_ms) * 1e3,
            len(client_cpus) / transfer["client_cpu_ms"] * 1e3,
        )
    else:
        per_request_ms = transfer["client_cpu_ms"] + transfer["server_cpu_ms"] + routing_ms
        req_per_s = len(os.sched_getaffinity(0)) / per_request_ms * 1e3
    req_per_s = min(req_per_s, reference / TOKENS_PER_REQUEST)
    return transfer | {
        "routing_cpu_ms": routing_ms,
        "req_per_s": req_per_s,
        "tokens_per_s": req_per_s * TOKENS_PER_REQUEST,
    }


def in_process_tokens_per_s(threads: int, device: str = "cpu", cpus: Cpus = None, datatype: str = "FP32") -> float:
    """``DynamicRouter.route`` on 8192-token host batches of ``datatype`` (a 16-bit batch is widened to float32
    before the gate, as the server does) (on a GPU: host-to-device copy and results back included)."""
    import torch

    from router_runtime.config import RouterConfig
    from router_runtime.router import DynamicRouter

    with pinned(cpus):
        torch.set_num_threads(threads)
        router = DynamicRouter(RouterConfig.model_validate(server_config(device)["router"]))
        # The server's batch buffer: pinned host memory when the router is on a GPU.
        x = torch.from_numpy(router.host_array((8192, 768), np.dtype(np.float32)))
        x.copy_(torch.randn(8192, 768))
        if datatype != "FP32":
            x = x.to(torch.bfloat16 if datatype == "BF16" else torch.float16)
        for _ in range(5):
            router.route(x)
        samples = []
        for _ in range(15):
            start = time.perf_counter()
            for _ in range(5):
                router.route(x)
            samples.append((time.perf_counter() - start) / 5)
    return 8192 / min(samples)


def server_latency_buckets(port: int) -> dict[float, float]:
    """The server's own ``moe_router_request_duration_seconds`` histogram: cumulative count by bucket bound."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    pattern = r'^moe_router_request_duration_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$'
    for match in re.finditer(pattern, text, re.M):
        bound = float(match.group(1))
        buckets[bound] = buckets.get(bound, 0.0) + float(match.group(2))
    return buckets


def served_within(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Share of the requests of a run that the server answered within 10, 25 and 50 ms, by its own clock.

    Separates the server's latency from the load generator's: an open-loop client on the same cores
    counts its own scheduling delays in the latency it reports.
    """
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return {}
    return {f"<={bound * 1e3:g}ms": (after[bound] - before.get(bound, 0.0)) / total
            for bound in (0.01, 0.025, 0.05) if bound in after}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_and_measure(args: argparse.Namespace, workers: int, wrk: str | None) -> list[dict[str, Any]]:
    """Start ``moe-router serve --workers N`` and run every measurement against it."""
    from router_runtime.client import wait_ready
    from router_runtime.config import RuntimeFileConfig

    port = free_port()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "router.yaml"
        config_file.write_text(RuntimeFileConfig.model_validate(server_config(args.device)).to_yaml())
        server = subprocess.Popen(
            [sys.executable, "-m", "router_runtime", "serve", "--config", str(config_file), "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--workers", str(workers)],
            env=os.environ | {"TMPDIR": tmp}, preexec_fn=pin_child(args.server_cpus),
        )  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}", timeout=120)
            if workers > 1:
                # Connections go to whichever worker accepts: wait for all of them (each creates its
                # metrics file just before it starts listening), or the first would get every connection.
                deadline = time.monotonic() + 120
                while len(list(Path(tmp).glob("moe-router-metrics-*/gauge_livesum_*.db"))) < workers:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not all {workers} workers started")
                    time.sleep(0.2)
                time.sleep(1.0)
            client = args.client_cpus
            datatype = args.datatype
            # warm-up: first batches, allocator, caches
            run_loadgen(port, "binary", 1.0, concurrency=16, cpus=client, datatype=datatype)
            pid = server.pid
            for mode in args.modes:
                label = {"mode": mode, "workers": workers}
                saturated = [
                    measured(pid, functools.partial(
                        run_loadgen, port, mode, args.duration, concurrency=c, cpus=client, datatype=datatype))
                    | label | {"phase": "saturation"}
                    for c in args.concurrency
                ]  # fmt: skip
                if mode == "binary" and wrk:
                    saturated += [
                        measured(pid, functools.partial(run_wrk, wrk, port, args.duration, c, client, datatype))
                        | label | {"phase": "saturation"}
                        for c in args.concurrency
                    ]  # fmt: skip
                results += saturated
                best = max(saturated, key=lambda r: r["req_per_s"])
                before = server_latency_buckets(port)
                half_rate = best["req_per_s"] / 2
                half = measured(
                    pid,
                    functools.partial(
                        run_loadgen, port, mode, args.duration, rate=half_rate, cpus=client, datatype=datatype
                    ),
                )
                within = served_within(before, server_latency_buckets(port))
                results.append(half | label | {"phase": "half saturation", "server_within": within})
        finally:
            server.terminate()
            server.wait(timeout=60)
    return results


def bench(args: argparse.Namespace) -> int:
    load = os.getloadavg()[0]
    wrk = None if args.no_wrk else shutil.which("wrk")
    if args.server_cpus and args.client_cpus:
        placement = (
            f"server and in-process reference pinned to CPUs {sorted(args.server_cpus)}, load generators to "
            f"{sorted(args.client_cpus)}"
        )
    else:
        placement = "server, load generator and in-process reference all share them, no pinning"
    print(
        f"machine: {os.cpu_count()} cores ({placement}), load average {load:.2f}; router on {args.device}; "
        f"{TOKENS_PER_REQUEST} tokens/request sent as {args.datatype}; load generators: "
        f"python-asyncio{' and wrk' if wrk else (' (wrk skipped)' if args.no_wrk else ' (wrk not installed)')}"
    )
    before = in_process_tokens_per_s(args.threads, args.device, args.server_cpus, args.datatype)
    results: list[dict[str, Any]] = []
    for workers in args.workers:
        results += serve_and_measure(args, workers, wrk)
    # The faster of two in-process measurements (before and after the load), so the ratio is not flattered.
    reference = max(before, in_process_tokens_per_s(args.threads, args.device, args.server_cpus, args.datatype))
    print(
        f"in-process DynamicRouter.route on {args.device}, T=8192 {args.datatype} tokens, {args.threads} threads: "
        f"{reference / 1e6:.3f} M tokens/s (best)"
    )
    transfer = loopback_transfer(
        encoded_request(True, datatype=args.datatype), response_size(), 3.0, args.server_cpus, args.client_cpus
    )
    bound = ceiling(reference, args.threads, transfer, args.device, args.server_cpus, args.client_cpus)
    print(
        f"ceiling with free HTTP and Python: loopback transfer {bound['client_cpu_ms']:.3f} ms (sender) + "
        f"{bound['server_cpu_ms']:.3f} ms (receiver) of CPU per request, routing {bound['routing_cpu_ms']:.3f} ms "
        f"-> at most {bound['req_per_s']:.0f} req/s = {bound['tokens_per_s'] / 1e6:.3f} M tokens/s "
        f"= {bound['tokens_per_s'] / reference:.1%} of in-process"
    )
    columns = (
        "conc/rate", "req/s", "Mtok/s", "p50 ms", "p99 ms", "errors", "srv ms/r", "loop ms/r", "gen ms/r", "steal %"
    )
    print(f"{'mode':<7} {'proc':>4} {'phase':<16} {'generator':<15}" + " ".join(f"{c:>9}" for c in columns))
    for r in results:
        load_label = f"c={r['concurrency']}" if "concurrency" in r else f"{r['rate']:.0f}/s"
        print(
            f"{r['mode']:<7} {r['workers']:>4} {r['phase']:<16} {r['generator']:<15}{load_label:>9} "
            f"{r['req_per_s']:>9.1f} "
            f"{r['tokens_per_s'] / 1e6:>9.3f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['errors']:>9} "
            f"{r['server_cpu_ms_per_request']:>9.3f} {r['event_loop_cpu_ms_per_request']:>9.3f} "
            f"{r['generator_cpu_ms_per_request']:>9.3f} {100 * r['steal_share']:>9.1f}"
        )
    print(
        "proc: server worker processes; srv/loop/gen ms/r: CPU per request of the whole server (all processes), "
        "of its event-loop threads, of the load generator; steal: CPU time the hypervisor gave to other machines"
    )
    for r in results:
        if r.get("server_within"):
            shares = ", ".join(f"{limit} {share:.2%}" for limit, share in r["server_within"].items())
            print(f"{r['mode']} {r['workers']} worker(s), half saturation, answered (server's own clock): {shares}")
    for workers in args.workers:
        binary = [r for r in results if r["mode"] == "binary" and r["workers"] == workers]
        if binary:
            best_binary = max(binary, key=lambda r: r["tokens_per_s"])
            print(
                f"binary saturation / in-process, {workers} worker(s): {best_binary['tokens_per_s'] / reference:.1%} "
                f"({best_binary['generator']}, {best_binary.get('concurrency')} connections), "
                f"{best_binary['tokens_per_s'] / bound['tokens_per_s']:.1%} of the ceiling"
            )
    if args.json:
        document = {
            "device": args.device,
            "datatype": args.datatype,
            "server_cpus": sorted(args.server_cpus or []),
            "client_cpus": sorted(args.client_cpus or []),
            "in_process_tokens_per_s": reference,
            "ceiling": bound,
            "results": results,
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process reference")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="server processes (moe-router serve --workers)"
    )
    parser.add_argument("--modes", nargs="+", choices=["binary", "json"], default=["binary", "json"])
    parser.add_argument("--no-wrk", action="store_true", help="skip wrk even when it is installed")
    parser.add_argument(
        "--datatype",
        choices=["FP32", "FP16", "BF16"],
        default="FP32",
        help="datatype the hidden states are sent in (and the in-process reference routes); the issue's target is FP32",
    )
    parser.add_argument("--device", default="cpu", help="router.device of the server and the reference (cpu, cuda)")
    parser.add_argument(
        "--server-cpus", type=parse_cpus, help="pin the server and the in-process reference to these CPUs (0-1)"
    )
    parser.add_argument("--client-cpus", type=parse_cpus, help="pin the load generators to these CPUs (2-5)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["binary", "json"], help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transfer", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transfer:
        return transfer_serve(args)
    if args.loadgen:
        args.concurrency = args.concurrency[0]
        return loadgen(args)
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
