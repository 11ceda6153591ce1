"""kubectl itself works against the sandbox (discovery, server-side apply, short names, /scale, delete)."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from moe_operator.sandbox import serve
from tests.integration.operator.harness import REPO

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


async def kubectl(kubeconfig: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "kubectl", *args, env={**os.environ, "KUBECONFIG": kubeconfig},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def test_kubectl_applies_reads_scales_and_deletes_a_moerouter(tmp_path):
    async with serve(tmp_path / "kubeconfig") as running:
        config = str(running.kubeconfig_path)
        await kubectl(config, "apply", "--server-side", "-f", str(REPO / "crds" / "moerouter.io_moerouters.yaml"))
        await kubectl(config, "apply", "--server-side", "-f", str(REPO / "examples" / "moerouter.yaml"))
        assert (await kubectl(config, "get", "moer", "-o", "name")).split() == ["moerouter.moerouter.io/demo-router"]
        await kubectl(config, "scale", "moer/demo-router", "--replicas=3")
        router = running.sandbox.object_of("moerouter.io", "v1alpha1", "moerouters", "default", "demo-router")
        assert router is not None and router["spec"]["replicas"] == 3
        await kubectl(config, "delete", "moer", "demo-router")
        assert running.sandbox.object_of("moerouter.io", "v1alpha1", "moerouters", "default", "demo-router") is None
