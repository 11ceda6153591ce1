"""The kind e2e script and the hosted-CI workflow (their real run needs Docker, which is absent here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.unit.delivery.support import ROOT

SCRIPT = ROOT / "scripts" / "e2e-kind.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "e2e.yaml"


BASH = shutil.which("bash") or "/bin/bash"


def run_script(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_script_is_valid_bash_and_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False, timeout=30).returncode == 0


def test_script_rejects_an_unknown_command() -> None:
    result = run_script("deploy", path=os.environ["PATH"])
    assert result.returncode == 64
    assert "usage:" in result.stderr


def test_script_names_the_missing_tool_instead_of_failing_halfway(tmp_path: Path) -> None:
    # A PATH with the basic utilities the script uses, but without docker and kind.
    for tool in ("sed", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        (tmp_path / tool).symlink_to(found)
    result = run_script("up", path=str(tmp_path))
    assert result.returncode == 2
    assert "missing: docker" in result.stderr


def test_workflow_runs_the_script_on_kind_and_always_deletes_the_cluster() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["kind"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert "scripts/e2e-kind.sh" in runs
    cleanup = next(step for step in steps if step.get("run") == "scripts/e2e-kind.sh down")
    assert cleanup["if"] == "always()"
    assert any(step.get("uses", "").startswith("helm/kind-action@") for step in steps)
    assert workflow["permissions"] == {"contents": "read"}
