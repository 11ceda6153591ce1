"""Delivery docs: every runbook link of the alerts and every doc a chart output points at exists."""

from __future__ import annotations

import re

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


def test_install_docs_use_the_real_chart_path_and_kustomize_targets() -> None:
    install = (DOCS / "install.md").read_text()
    for path in ("charts/moe-router-operator", "config/default", "config/overlays/namespaced",
                 "config/overlays/production", "scripts/e2e-kind.sh"):
        assert path in install
        assert (ROOT / path).exists(), path
