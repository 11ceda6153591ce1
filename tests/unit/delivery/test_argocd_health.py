"""The Argo CD health check (gitops/argocd/health.lua), run in Lua 5.1 as Argo CD (gopher-lua) runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.delivery.support import ROOT

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (dev extra) provides the Lua runtime")

ARGOCD = ROOT / "gitops" / "argocd"
CASES = yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]


def lua_value(runtime: Any, value: Any) -> Any:
    """Python data to Lua tables, the way Argo CD hands `obj` to the script."""
    if isinstance(value, dict):
        return runtime.table_from({key: lua_value(runtime, item) for key, item in value.items()})
    if isinstance(value, list):
        return runtime.table_from([lua_value(runtime, item) for item in value])
    return value


def health_of(resource: dict[str, Any]) -> dict[str, str]:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = lua_value(runtime, resource)
    result = runtime.execute((ARGOCD / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("case", CASES, ids=lambda case: Path(case["inputPath"]).stem)
def test_health_check_matches_the_expected_status_and_message(case: dict[str, Any]) -> None:
    resource = yaml.safe_load((ARGOCD / case["inputPath"]).read_text())
    assert health_of(resource) == case["healthStatus"]


def test_cases_cover_every_argo_cd_status_the_script_returns() -> None:
    statuses = {case["healthStatus"]["status"] for case in CASES}
    assert statuses == {"Healthy", "Progressing", "Degraded"}


def test_degraded_wins_over_ready() -> None:
    conditions = [
        {"type": "Ready", "status": "True", "reason": "Available", "message": "2/2 replicas ready"},
        {"type": "Degraded", "status": "True", "reason": "SecretMissing", "message": "secret api-key not found"},
    ]
    resource = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": conditions}}
    assert health_of(resource) == {"status": "Degraded", "message": "secret api-key not found"}


def test_condition_reason_is_the_message_when_the_message_is_empty() -> None:
    conditions = [{"type": "Progressing", "status": "True", "reason": "Creating", "message": ""}]
    resource = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": conditions}}
    assert health_of(resource) == {"status": "Progressing", "message": "Creating"}
