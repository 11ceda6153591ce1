"""Run the real app on uvicorn (as ``moe-router serve`` configures it) in a background thread on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

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
