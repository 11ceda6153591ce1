"""Run the real operator (``moe-operator run``, a subprocess) against the in-process API sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from moe_operator import sandbox as sandbox_module
from moe_operator.kube import Kube
from moe_operator.sandbox import Call, Running, Sandbox

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "moerouter.yaml"
TEST_AGENT = "kubectl-test/1.0"
ROUTERS = ("moerouter.io", "v1alpha1", "moerouters")

T = TypeVar("T")


@contextlib.asynccontextmanager
async def sandbox_with_client(
    kubeconfig: Path, monkeypatch: Any, *, ready_delay: float
) -> AsyncIterator[tuple[Running, Kube]]:
    """The API sandbox and the operator's own client pointed at it (``KUBECONFIG`` set for the test)."""
    async with sandbox_module.serve(kubeconfig, ready_delay=ready_delay) as running:
        monkeypatch.setenv("KUBECONFIG", str(running.kubeconfig_path))
        kube = Kube.from_environment()
        try:
            yield running, kube
        finally:
            kube.close()


def example_router(name: str = "demo-router") -> dict[str, Any]:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    return body


async def eventually(check: Callable[[], T | None], *, within: float = 15.0, message: str = "") -> T:
    """Poll ``check`` until it returns something truthy; fail with ``message`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for: {message or check}")
        await asyncio.sleep(0.05)


def operator_command() -> list[str]:
    script = Path(sys.executable).with_name("moe-operator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_operator"]


@dataclass
class Cluster:
    """What a test sees: the sandbox state, a kubectl-like HTTP client, and the operator process."""

    running: Running
    session: aiohttp.ClientSession
    process: asyncio.subprocess.Process
    log_path: Path
    liveness_url: str
    metrics_url: str

    @property
    def sandbox(self) -> Sandbox:
        return self.running.sandbox

    def get(self, group: str, version: str, plural: str, name: str, namespace: str = "default") -> Any:
        return self.sandbox.object_of(group, version, plural, namespace, name)

    def router(self, name: str = "demo-router") -> Any:
        return self.get(*ROUTERS, name)

    def condition(self, name: str, type: str) -> dict[str, Any] | None:
        router = self.router(name) or {}
        for condition in (router.get("status") or {}).get("conditions") or []:
            if condition["type"] == type:
                return dict(condition)
        return None

    def operator_writes(self, since: int = 0) -> list[Call]:
        return [call for call in self.sandbox.log[since:] if call.is_write and call.user_agent != TEST_AGENT]

    def operator_calls(self, since: int = 0) -> list[Call]:
        return [call for call in self.sandbox.log[since:] if call.user_agent != TEST_AGENT]

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type, "User-Agent": TEST_AGENT}
        async with self.session.request(method, self.running.url + path, json=body, headers=headers) as response:
            payload = await response.json()
            if response.status >= 400:
                raise AssertionError(f"{method} {path} -> {response.status}: {payload}")
            return payload

    async def apply(self, body: dict[str, Any], path: str) -> Any:
        return await self.request(
            "PATCH", f"{path}/{body['metadata']['name']}?fieldManager=kubectl-test&force=true",
            body, "application/apply-patch+yaml",
        )

    async def apply_router(self, body: dict[str, Any]) -> Any:
        return await self.apply(body, "/apis/moerouter.io/v1alpha1/namespaces/default/moerouters")

    async def patch_router(self, name: str, patch: dict[str, Any]) -> Any:
        return await self.request(
            "PATCH", f"/apis/moerouter.io/v1alpha1/namespaces/default/moerouters/{name}", patch,
            "application/merge-patch+json",
        )

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    def operator_log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _wait_alive(url: str, process: asyncio.subprocess.Process, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"the operator exited with {process.returncode} during startup")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError("the operator's liveness endpoint did not answer within 30 s")


async def start_operator(
    running: Running, log_path: Path, args: tuple[str, ...], *, resync_seconds: float = 1.0
) -> asyncio.subprocess.Process:
    """``moe-operator run ARGS`` against the sandbox, its output in ``log_path``."""
    env = {
        **os.environ,
        "KUBECONFIG": str(running.kubeconfig_path),
        "MOE_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
        "MOE_OPERATOR_RETRY_BASE_SECONDS": "0.5",
        "MOE_OPERATOR_PREDICTIVE_TICK_SECONDS": "1",
    }
    with log_path.open("wb") as log_file:
        return await asyncio.create_subprocess_exec(
            *operator_command(), "run", *args, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


async def stop_operator(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    *,
    resync_seconds: float = 1.0,
    ready_delay: float = 0.2,
    extra_args: tuple[str, ...] = ("--namespace", "default"),
    objects: tuple[tuple[tuple[str, str, str], dict[str, Any]], ...] = (),
    seeds: tuple[tuple[tuple[str, str, str], dict[str, Any]], ...] = (),
) -> AsyncIterator[Cluster]:
    """The sandbox in this event loop and ``moe-operator run`` as a subprocess pointed at it.

    ``objects`` are stored exactly as given (a restored etcd); ``seeds`` are created like new objects.
    """
    async with sandbox_module.serve(tmp_path / "kubeconfig", ready_delay=ready_delay) as running:
        for (group, version, plural), body in objects:
            running.sandbox.restore(group, version, plural, copy.deepcopy(body))
        for (group, version, plural), body in seeds:
            running.sandbox.seed(group, version, plural, copy.deepcopy(body))
        liveness_port, metrics_port = sandbox_module.free_port(), sandbox_module.free_port()
        liveness_url = f"http://127.0.0.1:{liveness_port}/healthz"
        log_path = tmp_path / "operator.log"
        process = await start_operator(
            running, log_path, (*extra_args, "--liveness", liveness_url, "--metrics-port", str(metrics_port)),
            resync_seconds=resync_seconds,
        )
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_alive(liveness_url, process, session)
                yield Cluster(running, session, process, log_path, liveness_url,
                              f"http://127.0.0.1:{metrics_port}/metrics")
        except BaseException:
            sys.stderr.write(f"--- operator log ---\n{log_path.read_text(errors='replace')[-6000:]}\n")
            raise
        finally:
            await stop_operator(process)
