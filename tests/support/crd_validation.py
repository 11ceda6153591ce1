"""Validate custom objects the way the API server does: defaults, structural schema, unknown fields, CEL."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
from openapi_schema_validator import OAS30Validator

Schema = dict[str, Any]


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill in ``default`` values top-down, as the API server does before validation."""
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def unknown_fields(value: Any, schema: Schema, path: str = "") -> Iterator[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and "properties" in schema:
        for name, child_value in value.items():
            if name not in schema["properties"]:
                yield f"{path}.{name}"
            else:
                yield from unknown_fields(child_value, schema["properties"][name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


def cel_violations(value: Any, schema: Schema, path: str = "") -> Iterator[str]:
    """Messages of every failing ``x-kubernetes-validations`` rule, evaluated with the CEL runtime."""
    if value is None:
        return
    environment = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = environment.program(environment.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            yield f"{path}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                yield from cel_violations(value[name], child, f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from cel_violations(item, schema["items"], f"{path}[{index}]")


def crd_schema(crd: dict[str, Any], version: str) -> Schema:
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: Schema = served["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"version {version} not in CRD {crd['metadata']['name']}")


def validate_custom_object(obj: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """All problems with ``obj`` against ``crd``; empty when the API server would accept it."""
    version = obj["apiVersion"].rsplit("/", 1)[-1]
    schema = crd_schema(crd, version)
    defaulted = apply_defaults(copy.deepcopy(obj), schema)
    problems = [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in OAS30Validator(schema).iter_errors(defaulted)
    ]
    problems += [f"unknown field {field}" for field in unknown_fields(defaulted, schema)]
    if not problems:
        problems += list(cel_violations(defaulted, schema))
    return problems
