"""The configuration reference (docs/configuration.md), generated from the same models as the CRD.

``python -m moe_operator.reference > docs/configuration.md``; a test fails when the file is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from moe_operator.crd import openapi_schema

Schema = dict[str, Any]

HEADER = """# MoERouter configuration reference

Generated from the pydantic models (`moe_operator.api`, `router_runtime.config`) by
`python -m moe_operator.reference`; the CRD in `crds/` comes from the same models.
Cross-field rules are enforced both by the API server (CEL) and by the operator.

| field | type | default | constraints | description |
|---|---|---|---|---|
"""


def _type_of(node: Schema) -> str:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type_of(node['additionalProperties'])}"
    if "enum" in node:
        return " \\| ".join(f"`{value}`" for value in node["enum"])
    return kind


def _constraints(node: Schema) -> str:
    parts = []
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') is True else '>='} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') is True else '<='} {node['maximum']}")
    if "minLength" in node:
        parts.append(f"length >= {node['minLength']}")
    if "maxLength" in node:
        parts.append(f"length <= {node['maxLength']}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(f"CEL: `{_table_cell(rule['rule'])}`")
    return "; ".join(parts)


def _table_cell(text: str) -> str:
    """A pipe splits a Markdown table cell even inside a code span (CEL's ``||``): escape it."""
    return text.replace("|", "\\|")


def _default(node: Schema) -> str:
    if "default" not in node or node["default"] == {}:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _rows(node: Schema, path: str) -> list[str]:
    description = _table_cell(" ".join(str(node.get("description", "")).split()))
    rows = [f"| `{path}` | {_type_of(node)} | {_default(node)} | {_constraints(node)} | {description} |"]
    for name, child in node.get("properties", {}).items():
        rows.extend(_rows(child, f"{path}.{name}"))
    return rows


def reference_markdown() -> str:
    spec = openapi_schema()["properties"]["spec"]
    return HEADER + "\n".join(_rows(spec, "spec")) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
