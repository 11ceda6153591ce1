"""``moe-operator crd``: plain YAML out, and a clear message when the output cannot be written."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from moe_operator import crd


def test_the_crd_yaml_has_no_anchors_or_aliases() -> None:
    text = crd.crd_yaml()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == crd.custom_resource_definition()


def test_an_unwritable_output_is_a_message_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing" / "crd.yaml"
    assert crd.run(argparse.Namespace(output=str(target))) == 1
    assert f"moe-operator crd: cannot write {target}" in capsys.readouterr().err
