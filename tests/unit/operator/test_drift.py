"""drift: a child is in sync when the server's object holds every desired field."""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest

from moe_operator.api import parse_spec
from moe_operator.children import Owner, desired_children
from moe_operator.drift import (
    APPLIED_DIGEST_ANNOTATION,
    applied_digest,
    child_drift,
    differences,
    holds,
    parse_quantity,
    stamped,
)

OWNER = Owner(name="r", namespace="ns", uid="uid-1", labels={}, annotations={})


def deployment() -> dict:
    children = desired_children(OWNER, parse_spec({}))
    return next(child for child in children if child["kind"] == "Deployment")


def as_served(desired: dict) -> dict:
    """What an API server returns after applying: defaults, bookkeeping metadata and status added."""
    served = copy.deepcopy(stamped(desired))
    served["metadata"].update(uid="x", resourceVersion="42", generation=3, managedFields=[{"manager": "m"}])
    container = served["spec"]["template"]["spec"]["containers"][0]
    container["terminationMessagePath"] = "/dev/termination-log"
    container["ports"][0]["hostPort"] = None
    served["spec"]["progressDeadlineSeconds"] = 600
    served["status"] = {"replicas": 2}
    return served


def test_server_defaulted_fields_do_not_count_as_drift():
    desired = deployment()
    assert child_drift(desired, as_served(desired)) == []


def test_an_absent_child_drifts():
    assert child_drift(deployment(), None) == ["absent"]


def test_a_hand_edited_field_is_reported_by_path():
    desired = deployment()
    served = as_served(desired)
    served["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    (reason,) = child_drift(desired, served)
    assert reason.startswith(".spec.template.spec.containers[name=router].image: 'evil:latest'")


def test_a_removed_list_item_is_drift():
    desired = deployment()
    served = as_served(desired)
    served["spec"]["template"]["spec"]["volumes"].pop()
    assert any("volumes" in reason for reason in child_drift(desired, served))


def test_items_other_managers_add_to_keyed_lists_are_not_drift():
    desired = deployment()
    served = as_served(desired)
    container = served["spec"]["template"]["spec"]["containers"][0]
    container["env"].insert(0, {"name": "INJECTED_BY_A_WEBHOOK", "value": "1"})
    served["metadata"]["ownerReferences"].append({"uid": "someone-else", "kind": "Other", "name": "o"})
    assert child_drift(desired, served) == []


def test_a_keyed_item_changed_by_hand_is_drift_named_by_its_key():
    desired = deployment()
    served = as_served(desired)
    served["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "/elsewhere"
    (reason,) = child_drift(desired, served)
    assert reason.startswith(".spec.template.spec.containers[name=router].env[name=")


def test_unkeyed_lists_compare_pairwise():
    assert differences({"a": [1, 2]}, {"a": [1, 2, 3]}) == [".a: 3 items instead of 2"]
    assert differences({"a": [{"x": 1}]}, {"a": [{"x": 2}]}) == [".a[0].x: 2 instead of 1"]


def test_a_changed_desired_state_drifts_even_when_only_a_field_was_dropped():
    desired = deployment()
    served = as_served(desired)
    smaller = copy.deepcopy(desired)
    del smaller["spec"]["revisionHistoryLimit"]
    assert holds(stamped(smaller)["spec"], served["spec"])
    assert child_drift(smaller, served)[0] == "desired state changed since the last apply"


def test_the_digest_ignores_its_own_annotation_and_key_order():
    desired = deployment()
    reordered = dict(reversed(list(desired.items())))
    assert applied_digest(desired) == applied_digest(reordered) == applied_digest(stamped(desired))
    assert stamped(desired)["metadata"]["annotations"][APPLIED_DIGEST_ANNOTATION] == applied_digest(desired)


def test_stamping_does_not_mutate_the_builder_output():
    desired = deployment()
    before = copy.deepcopy(desired)
    stamped(desired)
    assert desired == before


@pytest.mark.parametrize(
    ("desired", "actual"),
    [("1000m", "1"), ("1Gi", "1073741824"), ("0.5", "500m"), ("2k", "2000"), (1, 1.0)],
)
def test_equal_quantities_in_other_notations_hold(desired, actual):
    assert differences({"v": desired}, {"v": actual}) == []


@pytest.mark.parametrize(("desired", "actual"), [("1", "2"), (True, 1), ("http", "https"), (1, "1")])
def test_different_scalars_do_not_hold(desired, actual):
    assert differences({"v": desired}, {"v": actual}) != []


def test_a_desired_null_means_absent():
    assert holds({"a": None}, {}) and not holds({"a": None}, {"a": 1})


def test_type_mismatches_are_reported_not_raised():
    assert differences({"a": {"b": 1}}, {"a": [1]}) == [".a: expected an object"]
    assert differences({"a": [1]}, {"a": "x"}) == [".a: expected a list"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", Decimal("0.5")), ("2Gi", Decimal(2 * 2**30)), ("1e3", Decimal(1000)), ("3", Decimal(3))],
)
def test_quantities_parse(text, value):
    assert parse_quantity(text) == value


def test_non_quantities_parse_to_none():
    assert parse_quantity("router") is None and parse_quantity("1.2.3") is None
