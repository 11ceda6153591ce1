"""schemathesis against the served OpenAPI document: no generated request may get a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.runtime.conftest import API_KEY, small_config
from tests.integration.runtime.serving import running_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_schema() -> Iterator[tuple[str, schemathesis.BaseSchema]]:
    with running_server(small_config(), api_key=API_KEY) as (url, _app):
        yield url, schemathesis.openapi.from_url(url + "/openapi.json")


def served_model(case: schemathesis.Case) -> schemathesis.Case:
    """Aim at the served model: a random model name only ever reaches the 404 branch."""
    if case.path_parameters and "model_name" in case.path_parameters:
        case.path_parameters["model_name"] = "tiny"
    return case


def operations(schema: schemathesis.BaseSchema, mode: GenerationMode) -> st.SearchStrategy:
    strategies = []
    for result in schema.get_all_operations():
        strategy = result.ok().as_strategy(generation_mode=mode)  # type: ignore[union-attr]
        strategies += [strategy, strategy.map(served_model)]
    return st.one_of(strategies)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("authenticated", [True, False])
def test_generated_requests_never_get_a_server_error(
    fuzzed_schema: tuple[str, schemathesis.BaseSchema], mode: GenerationMode, authenticated: bool
) -> None:
    url, schema = fuzzed_schema
    headers = {"Authorization": f"Bearer {API_KEY}"} if authenticated else {}

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operations(schema, mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)

    check()
