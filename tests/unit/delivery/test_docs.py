"""Delivery docs: runbook links and doc links resolve, and the commands the docs show are the right ones."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from itertools import pairwise

import yaml

from tests.unit.delivery.support import ROOT

DOCS = ROOT / "docs"
RUNBOOK = "https://github.com/moe-router-operator/moe-router-operator/blob/main/"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub generates for the headings of a Markdown document."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_runbook_points_at_an_existing_section() -> None:
    groups = yaml.safe_load((ROOT / "monitoring" / "rules" / "moe-router.rules.yaml").read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK), rule["alert"]
        path, _, anchor = url.removeprefix(RUNBOOK).partition("#")
        assert anchor in github_anchors((ROOT / path).read_text()), f"{rule['alert']}: {url}"


def test_docs_link_only_to_existing_local_files() -> None:
    for document in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).is_file(), f"{document.name} -> {target}"


def test_docs_link_only_to_existing_sections() -> None:
    links = [
        (document, target, anchor)
        for document in [ROOT / "README.md", *DOCS.glob("*.md")]
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]*)\)", document.read_text())
    ]
    assert links
    for document, target, anchor in links:
        linked = document.parent / target if target else document
        assert anchor in github_anchors(linked.read_text()), f"{document.name} -> {target}#{anchor}"


def test_install_docs_use_the_real_chart_path_and_kustomize_targets() -> None:
    install = (DOCS / "install.md").read_text()
    for path in ("charts/moe-router-operator", "config/default", "config/overlays/namespaced",
                 "config/overlays/production", "scripts/e2e-kind.sh"):
        assert path in install
        assert (ROOT / path).exists(), path


#: Every user-facing text that shows commands: the README, docs/, the chart's README and NOTES, the examples.
COMMAND_TEXTS = sorted(
    {
        ROOT / "README.md",
        *DOCS.glob("*.md"),
        ROOT / "charts" / "moe-router-operator" / "README.md",
        ROOT / "charts" / "moe-router-operator" / "templates" / "NOTES.txt",
        *(ROOT / "examples").glob("*.yaml"),
    }
)


def commands(program: str) -> list[tuple[str, str]]:
    """(file name, command) for every shell command starting with ``program``, continuation lines joined."""
    found = []
    for path in COMMAND_TEXTS:
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            text = line.strip().lstrip("#").strip()
            if not text.startswith(program + " "):
                continue
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip().lstrip("#").strip()
            found.append((path.name, text.split("  #")[0].strip()))
    return found


def test_every_helm_upgrade_shown_keeps_the_values_already_set() -> None:
    upgrades = commands("helm upgrade")
    assert len(upgrades) >= 5
    for name, command in upgrades:
        assert "--reuse-values" in command or "--reset-then-reuse-values" in command, f"{name}: {command}"


def test_every_helm_command_shown_uses_the_one_release_name() -> None:
    releases = {
        (name, command.split()[2])
        for verb in ("install", "upgrade", "uninstall", "rollback")
        for name, command in commands(f"helm {verb}")
    }
    assert releases
    assert {release for _, release in releases} <= {"moe", "{{"}, releases


def test_every_server_side_crd_apply_shown_forces_conflicts() -> None:
    crd_applies = [(name, command) for name, command in commands("kubectl apply") if "crds/" in command]
    assert len(crd_applies) >= 3
    for name, command in crd_applies:
        assert "--server-side" in command and "--force-conflicts" in command, f"{name}: {command}"


def test_readme_names_only_condition_reasons_the_operator_sets() -> None:
    sources = "".join(path.read_text() for path in (ROOT / "operator" / "moe_operator").rglob("*.py"))
    literals = set(re.findall(r'"([A-Z][A-Za-z]+)"', sources))
    table = re.findall(r"^\| `(?:Ready|Progressing|Degraded|PredictionReady)` \|.*\| (.+) \|$",
                       (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    reasons = {reason for cell in table for reason in re.findall(r"`(\w+)`", cell)}
    assert len(table) == 4 and len(reasons) >= 12
    assert reasons - literals == set()


def test_readme_simulator_command_reads_the_nab_trace_as_counts_per_step() -> None:
    from moe_operator.scaling import simulate_cli

    [(_, command)] = [found for found in commands("moe-operator simulate") if found[0] == "README.md"]
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser)
    args = parser.parse_args(shlex.split(command)[2:])
    assert args.trace.endswith("/traces/nyc_taxi.csv")
    assert args.trace_format == "counts"


def test_rendered_manifests_written_for_git_leave_out_owner_references() -> None:
    from moe_operator import render

    written = [(name, command) for name, command in commands("moe-operator render") if ">" in command]
    assert written
    parser = argparse.ArgumentParser()
    render.add_arguments(parser)
    for name, command in written:
        args = parser.parse_args(shlex.split(command.partition(">")[0])[2:])
        assert args.owner_references is False, f"{name}: {command}"
        assert (ROOT / args.filename).is_file(), f"{name}: {command}"


def test_gitops_doc_names_every_field_manager_and_the_finalizer() -> None:
    from moe_operator.labels import FIELD_MANAGER, FINALIZER, HANDOVER_FIELD_MANAGER

    gitops = (DOCS / "gitops.md").read_text()
    for name in (FIELD_MANAGER, HANDOVER_FIELD_MANAGER, "kopf", FINALIZER):
        assert f"`{name}`" in gitops, name


def test_gitops_doc_shows_every_annotation_the_crd_carries() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "moerouter.io_moerouters.yaml").read_text())
    gitops = (DOCS / "gitops.md").read_text()
    for key, value in (crd["metadata"].get("annotations") or {}).items():
        assert f"{key}: {value}" in gitops, key


def test_every_finalizer_removal_shown_removes_the_finalizers_of_a_moerouter() -> None:
    from moe_operator.labels import FINALIZER

    patches = [(name, command) for name, command in commands("kubectl patch moer") if "finalizers" in command]
    assert {name for name, _ in patches} >= {"gitops.md", "install.md"}
    for name, command in patches:
        (patch,) = [json.loads(arg) for previous, arg in pairwise(shlex.split(command)) if previous == "-p"]
        assert patch == [{"op": "remove", "path": "/metadata/finalizers"}], f"{name}: {command}"
    assert FINALIZER in (DOCS / "gitops.md").read_text()
