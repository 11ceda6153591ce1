"""MoERouter names: the CRD refuses at admission a name its Service or pod labels could not carry."""

from __future__ import annotations

from typing import Any

import pytest

from moe_operator.crd import custom_resource_definition
from tests.support.crd_validation import validate_custom_object


def router(name: str) -> dict[str, Any]:
    return {"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "metadata": {"name": name}, "spec": {}}


@pytest.mark.parametrize("name", ["r", "chat-router", "r2", "a" * 63])
def test_names_a_service_can_carry_are_accepted(name: str) -> None:
    assert validate_custom_object(router(name), custom_resource_definition()) == []


@pytest.mark.parametrize("name", ["1router", "chat.router", "chat-", "a" * 64, "Chat"])
def test_names_a_service_cannot_carry_are_refused_naming_the_field(name: str) -> None:
    problems = validate_custom_object(router(name), custom_resource_definition())
    assert any("metadata.name must be a DNS-1035 label" in problem for problem in problems), problems
