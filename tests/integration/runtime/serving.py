"""Run the real app on a free port: in a background thread (``running_server``) or as the ``moe-router serve``
process (``serve_process``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from moe_operator.sandbox import free_port
from router_runtime.client import wait_ready
from router_runtime.config import RuntimeFileConfig
from router_runtime.router import DynamicRouter
from router_runtime.server import create_app, uvicorn_config


@contextmanager
def running_server(
    config: RuntimeFileConfig, api_key: str | None = None, router: DynamicRouter | None = None
) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(config, api_key=api_key, router=router)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def serve_process(
    wire: dict[str, Any],
    directory: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60,
    replace_env: bool = False,
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m router_runtime serve`` with the config ``wire`` (camelCase) written to ``directory``.

    ``env`` is added to this process's environment, or replaces it with ``replace_env``. Yields its URL once
    ready and the process; kills it on exit if the test left it running.
    """
    config_file = directory / "router.yaml"
    config_file.write_text(RuntimeFileConfig.model_validate(wire).to_yaml())
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "router_runtime", "serve", "--config", str(config_file), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", *args],
        env=(dict(env or {}) if replace_env else os.environ | {"MOE_ROUTER_API_KEY": ""} | dict(env or {})),
        cwd=cwd,
        preexec_fn=preexec_fn,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=ready_timeout)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
