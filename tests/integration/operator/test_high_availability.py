"""Two operators peered through kopf (``--peering``/``--priority``): one acts, the other takes over."""

from __future__ import annotations

import pytest

from moe_operator.labels import CONFIG_HASH_ANNOTATION
from tests.integration.operator.harness import (
    cluster,
    eventually,
    example_router,
    start_operator,
    stop_operator,
)

pytestmark = pytest.mark.timeout(120)

PEERING = (("kopf.dev", "v1", "kopfpeerings"), {"metadata": {"name": "moe", "namespace": "default"}})


def config_hash(k8s) -> str | None:
    deployment = k8s.get("apps", "v1", "deployments", "demo-router") or {}
    return ((deployment.get("spec") or {}).get("template", {}).get("metadata", {}).get("annotations") or {}).get(
        CONFIG_HASH_ANNOTATION
    )


async def test_the_standby_pauses_and_takes_over_when_the_leader_stops(tmp_path):
    leader_args = ("--namespace", "default", "--peering", "moe", "--priority", "100")
    async with cluster(tmp_path, extra_args=leader_args, seeds=(PEERING,)) as k8s:
        await eventually(lambda: (k8s.get("kopf.dev", "v1", "kopfpeerings", "moe") or {}).get("status"),
                         within=30, message="the leader announced itself")
        standby_log = tmp_path / "standby.log"
        standby = await start_operator(
            k8s.running, standby_log,
            ("--namespace", "default", "--peering", "moe", "--priority", "50", "--liveness", "", "--metrics-port", "0"),
        )
        try:
            peers = await eventually(
                lambda: [key for key in (k8s.get("kopf.dev", "v1", "kopfpeerings", "moe") or {}).get("status") or {}]
                if len((k8s.get("kopf.dev", "v1", "kopfpeerings", "moe") or {}).get("status") or {}) == 2 else None,
                within=30, message="both operators announced in the peering object",
            )
            assert len(peers) == 2
            await k8s.apply_router(example_router())
            first = await eventually(lambda: config_hash(k8s), message="the leader created the Deployment")
            # kopf starts paused and resumes only when no peer outranks it: the standby stays paused.
            assert "Resuming operations" not in standby_log.read_text(errors="replace")

            k8s.process.terminate()
            await k8s.process.wait()
            await eventually(lambda: "Resuming" in standby_log.read_text(errors="replace"), within=60,
                             message="the standby resumes once the leader is gone")
            await k8s.patch_router("demo-router", {"spec": {"router": {"topP": 0.65}}})
            await eventually(lambda: config_hash(k8s) not in (None, first), within=30,
                             message="the former standby applies the spec change")
        finally:
            await stop_operator(standby)
