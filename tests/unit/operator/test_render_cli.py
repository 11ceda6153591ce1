"""`moe-operator render` prints the live builders' children offline and names what is wrong in bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[3]


def moe_operator(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe_operator", *args], input=stdin, capture_output=True, text=True, check=False
    )


def test_render_example_prints_six_valid_children() -> None:
    result = moe_operator("render", "-f", str(ROOT / "examples" / "moerouter.yaml"))
    assert result.returncode == 0, result.stderr
    children = list(yaml.safe_load_all(result.stdout))
    assert len(children) == 6
    for child in children:
        kubernetes_validate.validate(child, "1.30.0", strict=True)


def test_render_owns_every_child_by_the_moerouter_by_default() -> None:
    result = moe_operator("render", "-f", str(ROOT / "examples" / "moerouter.yaml"))
    assert result.returncode == 0, result.stderr
    for child in yaml.safe_load_all(result.stdout):
        [reference] = child["metadata"]["ownerReferences"]
        assert (reference["kind"], reference["name"], reference["controller"]) == ("MoERouter", "demo-router", True)


def test_render_without_owner_references_prints_the_same_children_unowned() -> None:
    example = str(ROOT / "examples" / "moerouter.yaml")
    owned = list(yaml.safe_load_all(moe_operator("render", "-f", example).stdout))
    result = moe_operator("render", "-f", example, "--no-owner-references")
    assert result.returncode == 0, result.stderr
    unowned = list(yaml.safe_load_all(result.stdout))
    assert "00000000-0000-0000-0000-000000000000" not in result.stdout
    assert [child["metadata"].get("ownerReferences") for child in unowned] == [None] * len(owned)
    for child in owned:
        del child["metadata"]["ownerReferences"]
    assert unowned == owned
    for child in unowned:
        kubernetes_validate.validate(child, "1.30.0", strict=True)


def test_render_reads_stdin_and_uses_the_given_namespace() -> None:
    text = "apiVersion: moerouter.io/v1alpha1\nkind: MoERouter\nmetadata: {name: x}\nspec: {}\n"
    result = moe_operator("render", "-f", "-", "-n", "team-a", stdin=text)
    assert result.returncode == 0, result.stderr
    assert {child["metadata"]["namespace"] for child in yaml.safe_load_all(result.stdout)} == {"team-a"}


def test_render_names_the_invalid_field() -> None:
    text = "apiVersion: moerouter.io/v1alpha1\nkind: MoERouter\nmetadata: {name: x}\nspec: {router: {numExperts: 0}}\n"
    result = moe_operator("render", "-f", "-", stdin=text)
    assert result.returncode == 2
    assert "spec.router.numExperts" in result.stderr
    assert result.stdout == ""


def test_render_rejects_a_file_without_moerouter() -> None:
    result = moe_operator("render", "-f", "-", stdin="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    assert result.returncode == 2
    assert "no MoERouter object found" in result.stderr


def test_crd_subcommand_prints_the_checked_in_crd() -> None:
    result = moe_operator("crd")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "crds" / "moerouter.io_moerouters.yaml").read_text()


def test_help_lists_every_subcommand() -> None:
    result = moe_operator("--help")
    assert result.returncode == 0
    for command in ("run", "render", "crd", "simulate"):
        assert command in result.stdout
