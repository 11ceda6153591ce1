"""The CRD is generated from the models, checked in unchanged, and accepts exactly the valid objects."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from moe_operator.api import MoERouterSpec, parse_spec
from moe_operator.crd import crd_yaml, custom_resource_definition
from tests.support.crd_validation import validate_custom_object

ROOT = Path(__file__).resolve().parents[3]
CHECKED_IN = ROOT / "crds" / "moerouter.io_moerouters.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def moerouters(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "MoERouter"]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return custom_resource_definition()


def test_checked_in_crd_equals_generated_output() -> None:
    assert CHECKED_IN.read_text() == crd_yaml(), "crds/ is stale: run `make crd`"


def test_crd_is_a_valid_apiextensions_v1_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_crd_declares_names_subresources_and_printer_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "moerouter.io",
        "MoERouter",
        "moerouters",
    )
    assert spec["names"]["shortNames"] == ["moer"]
    version = spec["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert [column["name"] for column in version["additionalPrinterColumns"]] == [
        "Ready",
        "Replicas",
        "Predicted",
        "Recommended",
        "Age",
    ]


def walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in walk(schema["properties"]["spec"]):
        if "type" in node or "properties" in node or "items" in node:
            assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), node
            assert "type" in node, node
            assert node.get("additionalProperties") is not False, node


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_examples_are_accepted_by_the_crd_schema(path: Path, crd: dict[str, Any]) -> None:
    routers = moerouters(path)
    assert routers
    for router in routers:
        assert validate_custom_object(router, crd) == []
        parse_spec(router["spec"])


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"router": {"minExperts": 3, "maxExperts": 2}}, "minExperts must be <= router.maxExperts"),
        ({"router": {"numExperts": 4, "maxExperts": 6}}, "maxExperts must be <= router.numExperts"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}, "minReplicas must be <= autoscaling.maxReplicas"),
        ({"autoscaling": {"predictive": {"mode": "Active"}}}, "prometheus is required unless mode is Off"),
        (
            {"runtime": {"startupSeconds": 300}, "autoscaling": {"predictive": {"horizonSeconds": 300}}},
            "horizonSeconds must be > runtime.startupSeconds",
        ),
    ],
)
def test_cross_field_rules_reject_in_cel_and_in_the_models(
    patch: dict[str, Any], expected: str, crd: dict[str, Any]
) -> None:
    router = {"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "metadata": {"name": "r"}, "spec": patch}
    problems = validate_custom_object(router, crd)
    assert any(expected in problem for problem in problems), problems
    with pytest.raises(ValueError, match=expected.split(" must")[0].split(" is")[0]):
        parse_spec(patch)


def router_with(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "metadata": {"name": "r"}, "spec": spec}


@pytest.mark.parametrize(
    ("runtime", "horizon", "startup"),
    [({}, 15, 300), ({}, 300, 300), ({"startupSeconds": 600}, 420, 600), ({"startupSeconds": 60}, 60, 60)],
)
def test_a_horizon_not_beyond_the_pod_startup_is_refused_naming_both_fields_and_values(
    runtime: dict[str, Any], horizon: int, startup: int, crd: dict[str, Any]
) -> None:
    spec = {"runtime": runtime, "autoscaling": {"predictive": {"horizonSeconds": horizon}}}
    assert any("horizonSeconds must be > runtime.startupSeconds" in problem
               for problem in validate_custom_object(router_with(spec), crd))
    with pytest.raises(
        ValueError,
        match=rf"autoscaling\.predictive\.horizonSeconds \({horizon}\) must be > runtime\.startupSeconds \({startup}\)",
    ):
        parse_spec(spec)


@pytest.mark.parametrize(("runtime", "horizon"), [({}, 301), ({"startupSeconds": 60}, 61), ({}, None)])
def test_a_horizon_beyond_the_pod_startup_or_left_to_its_default_is_accepted(
    runtime: dict[str, Any], horizon: int | None, crd: dict[str, Any]
) -> None:
    predictive = {} if horizon is None else {"horizonSeconds": horizon}
    spec = {"runtime": runtime, "autoscaling": {"predictive": predictive}}
    assert validate_custom_object(router_with(spec), crd) == []
    assert parse_spec(spec).autoscaling.predictive.horizon_seconds == horizon


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"router": {"strategy": "random"}}, "strategy"),
        ({"router": {"numExperts": 0}}, "numExperts"),
        ({"replicas": -1}, "replicas"),
        ({"router": {"topP": 0}}, "topP"),
        ({"runtime": {"imagePullPolicy": "Sometimes"}}, "imagePullPolicy"),
        ({"autoscaling": {"predictive": {"targetUtilization": 1.5}}}, "targetUtilization"),
        ({"routerr": {}}, "routerr"),
    ],
)
def test_schema_rejects_bad_fields_and_names_them(spec: dict[str, Any], field: str, crd: dict[str, Any]) -> None:
    router = {"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "metadata": {"name": "r"}, "spec": spec}
    problems = validate_custom_object(router, crd)
    assert any(field in problem for problem in problems), problems


def test_api_server_defaults_equal_the_model_defaults(crd: dict[str, Any]) -> None:
    from tests.support.crd_validation import apply_defaults, crd_schema

    defaulted = apply_defaults({"spec": {}}, crd_schema(crd, "v1alpha1"))
    assert parse_spec(defaulted["spec"]) == MoERouterSpec()
    assert defaulted["spec"]["router"]["strategy"] == MoERouterSpec().router.strategy


def test_the_runtime_image_is_not_stored_by_defaulting_so_it_follows_the_operators_release(
    crd: dict[str, Any],
) -> None:
    # A CRD default is written into every object on create: the image would stay pinned across upgrades.
    from tests.support.crd_validation import apply_defaults, crd_schema

    defaulted = apply_defaults({"spec": {}}, crd_schema(crd, "v1alpha1"))
    assert "image" not in defaulted["spec"]["runtime"]


def test_gitops_tools_are_told_not_to_delete_or_prune_the_crd(crd: dict[str, Any]) -> None:
    annotations = crd["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/sync-options"] == "Delete=false,Prune=false"
    assert annotations["kustomize.toolkit.fluxcd.io/prune"] == "disabled"


def test_defaulted_empty_spec_is_accepted(crd: dict[str, Any]) -> None:
    router = {"apiVersion": "moerouter.io/v1alpha1", "kind": "MoERouter", "metadata": {"name": "r"}}
    assert validate_custom_object(copy.deepcopy(router), crd) == []


def test_configuration_reference_is_up_to_date() -> None:
    from moe_operator.reference import reference_markdown

    expected = reference_markdown()
    assert (ROOT / "docs" / "configuration.md").read_text() == expected, (
        "docs/configuration.md is stale: run `python -m moe_operator.reference > docs/configuration.md`"
    )
    for field in ("spec.router.strategy", "spec.autoscaling.predictive.mode", "spec.runtime.apiKeySecretRef"):
        assert f"`{field}`" in expected
    for key in ("host", "port", "batching.maxQueueRequests", "maxBodyBytes", "shutdownGraceSeconds", "workers"):
        assert f"| `server.{key}` |" in expected


def test_the_reference_names_every_server_key_the_operator_renders_from_the_spec() -> None:
    from moe_operator.children import runtime_file_config
    from moe_operator.reference import SERVER_KEYS_FROM_SPEC

    runtime = {
        "port": 9000, "batching": {"maxBatchTokens": 99}, "maxRequestTokens": 77,
        "terminationGracePeriodSeconds": 100, "workers": 3,
    }
    default = runtime_file_config(MoERouterSpec()).to_wire()["server"]
    changed = runtime_file_config(parse_spec({"runtime": runtime})).to_wire()["server"]
    assert {key for key in default if changed[key] != default[key]} == set(SERVER_KEYS_FROM_SPEC)


def test_pipes_in_the_reference_never_split_a_table_cell() -> None:
    from moe_operator.reference import reference_markdown

    for row in reference_markdown().splitlines():
        if row.startswith("| `"):
            assert len(re.split(r"(?<!\\)\|", row)) == 7, row
