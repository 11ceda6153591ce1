"""moe-router: serve the runtime, or route random tokens through one and print the statistics."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from router_runtime.config import CONFIG_PATH_ENV, RuntimeFileConfig


def _load_config(path: str | None) -> RuntimeFileConfig:
    chosen = path or os.environ.get(CONFIG_PATH_ENV) or None
    return RuntimeFileConfig.load(chosen)


def _serve(args: argparse.Namespace) -> int:
    # Idle OpenMP workers must sleep, not spin: between small batches spinning threads starve the event
    # loop (measured: 3x less server CPU per request). Read once when torch loads, so set it first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from router_runtime.process import (
        NUMBA_CACHE_DIR_ENV,
        cgroup_cpu_limit,
        cgroup_memory_limit,
        private_kernel_cache_dir,
        resolve_api_key,
        resolve_workers,
        threads_per_worker,
        usable_cpus,
    )

    # Before numba loads (with the router, here or in the spawned workers): its default cache places are
    # read-only in a hardened install, and without one every start compiles the kernels again.
    if not os.environ.get(NUMBA_CACHE_DIR_ENV):
        cache_dir = private_kernel_cache_dir()
        if cache_dir is not None:
            os.environ[NUMBA_CACHE_DIR_ENV] = cache_dir
    from router_runtime.workers import serve_workers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _load_config(args.config)
        api_key = resolve_api_key()
    except (OSError, ValueError) as exc:
        print(f"moe-router serve: {exc}", file=sys.stderr)
        return 2
    if args.config is None and not os.environ.get(CONFIG_PATH_ENV):
        logging.getLogger("router_runtime").info("no config file given: serving the embedded defaults")
    cpu_limit, cpu_count = cgroup_cpu_limit(), usable_cpus()
    setting = args.workers if args.workers is not None else config.server.workers
    workers = resolve_workers(setting, cpu_limit, cpu_count)
    config = _with_inflight_budget(config, workers, cgroup_memory_limit())
    if workers > 1:
        # The supervisor never imports torch: each spawned worker sets its own thread count first.
        threads = threads_per_worker(workers, cpu_limit, cpu_count)
        try:
            return serve_workers(config, workers, threads, api_key, args.host, args.port, args.log_level)
        except OSError as exc:  # the port is taken or the address is not ours
            print(f"moe-router serve: cannot listen: {exc}", file=sys.stderr)
            return 1
    from router_runtime.server import StartupError, serve

    try:
        return serve(config, api_key=api_key, host=args.host, port=args.port, log_level=args.log_level)
    except StartupError as exc:
        print(f"moe-router serve: {exc}", file=sys.stderr)
        return 1


def _with_inflight_budget(config: RuntimeFileConfig, workers: int, limit: int | None) -> RuntimeFileConfig:
    """``config`` with ``server.maxInflightBytes`` derived from the memory ``limit`` (bytes) when it is not set."""
    from router_runtime.process import WORKER_BASE_BYTES, inflight_byte_budget, largest_request_bytes

    server = config.server
    if server.max_inflight_bytes is not None:
        return config
    largest = largest_request_bytes(server.max_body_bytes, server.max_request_tokens, config.router.input_dim)
    budget = inflight_byte_budget(limit, workers, largest)
    if limit is None or budget is None:
        return config
    log = logging.getLogger("router_runtime")
    mib = 1024 * 1024
    log.info(
        "memory limit %d MiB, %d workers: each holds at most %d MiB of request bodies at once",
        limit // mib, workers, budget // mib,
    )  # fmt: skip
    if limit // workers < WORKER_BASE_BYTES + largest:
        log.warning(
            "memory limit %d MiB leaves %d MiB to each of %d workers, less than a warm worker (~%d MiB) plus one "
            "request of the largest size (%d MiB): raise the limit, or lower server.workers or maxRequestTokens",
            limit // mib, limit // workers // mib, workers, WORKER_BASE_BYTES // mib, largest // mib,
        )  # fmt: skip
    return config.model_copy(update={"server": server.model_copy(update={"max_inflight_bytes": budget})})


def _route(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np

    from router_runtime.client import RouterClientError, model_metadata, route
    from router_runtime.process import resolve_api_key

    api_key = args.api_key or resolve_api_key()
    try:
        metadata = model_metadata(args.url, args.model, api_key=api_key)
        input_dim = int(metadata["inputs"][0]["shape"][-1])
        num_experts = int(metadata.get("parameters", {}).get("num_experts", 0)) or None
        tokens = np.random.default_rng(args.seed).standard_normal((args.tokens, input_dim), dtype=np.float32)
        response = route(args.url, args.model, tokens, binary=not args.json, api_key=api_key, datatype=args.datatype)
    except RouterClientError as exc:
        print(f"moe-router route: {exc}", file=sys.stderr)
        return 1
    except (OSError, httpx.TransportError) as exc:
        print(f"moe-router route: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(response.summary(num_experts), indent=2))
    return 0


def _token_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--tokens must be at least 1, got {value}")
    return value


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers must be an integer, got {text!r}") from None
    if not 0 <= value <= 256:
        raise argparse.ArgumentTypeError(f"--workers must be between 0 (the CPU limit) and 256, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-router", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the router over the Open Inference Protocol v2")
    serve.add_argument("--config", help=f"router.yaml (default: ${CONFIG_PATH_ENV}, else embedded defaults)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="override server.workers: server processes on the port (0 = the CPU limit)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)
    send = commands.add_parser("route", help="route random tokens through a server and print statistics")
    send.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (default: %(default)s)")
    send.add_argument("--model", default="moe-router", help="model name (default: %(default)s)")
    send.add_argument("--tokens", type=_token_count, default=256, help="tokens to send (default: %(default)s)")
    send.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default: %(default)s)")
    send.add_argument("--json", action="store_true", help="send JSON tensors instead of the binary extension")
    send.add_argument(
        "--datatype",
        default="FP32",
        choices=["FP32", "FP16", "BF16"],
        help="datatype the tokens are sent as; 16 bits halve the bytes (default: %(default)s)",
    )
    send.add_argument("--api-key", help="API key (default: $MOE_ROUTER_API_KEY or $MOE_ROUTER_API_KEY_FILE)")
    send.set_defaults(handler=_route)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
