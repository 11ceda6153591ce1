"""The configuration reference (docs/configuration.md), generated from the same models as the CRD.

``python -m moe_operator.reference > docs/configuration.md``; a test fails when the file is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from moe_operator.crd import model_schema, openapi_schema
from router_runtime.config import CONFIG_FILE_NAME, ServerConfig

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
        parts.append(f"CEL: `{rule['rule']}`")
    return "; ".join(parts)


def _table_cell(text: str) -> str:
    """A pipe splits a Markdown table cell even inside a code span (CEL's ``||``, a pattern's ``a|b``)."""
    return text.replace("|", "\\|")


def _default(node: Schema) -> str:
    if "default" not in node or node["default"] == {}:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _rows(node: Schema, path: str) -> list[str]:
    description = _table_cell(" ".join(str(node.get("description", "")).split()))
    constraints = _table_cell(_constraints(node))
    rows = [f"| `{path}` | {_type_of(node)} | {_default(node)} | {constraints} | {description} |"]
    for name, child in node.get("properties", {}).items():
        rows.extend(_rows(child, f"{path}.{name}"))
    return rows


#: The ``server`` keys of router.yaml the operator renders from a MoERouter (``children.runtime_file_config``).
SERVER_KEYS_FROM_SPEC = {
    "port": "`spec.runtime.port`",
    "batching": "`spec.runtime.batching`",
    "maxRequestTokens": "`spec.runtime.maxRequestTokens`",
    "shutdownGraceSeconds": "`spec.runtime.terminationGracePeriodSeconds` less the preStop sleep and a 5 s margin",
    "workers": "`spec.runtime.workers`",
}

RUNTIME_FILE_HEADER = f"""
## {CONFIG_FILE_NAME}: the runtime's own file

The runtime reads one YAML file (`moe-router serve --config {CONFIG_FILE_NAME}`; in a pod, the one the
operator renders into the router's ConfigMap), with two sections: `router`, the same schema as
`spec.router` above, and `server`:

| field | type | default | constraints | description |
|---|---|---|---|---|
"""


def _server_keys_note(server: Schema) -> str:
    rendered = [f"`server.{key}` from {source}" for key, source in SERVER_KEYS_FROM_SPEC.items()]
    defaults = [f"`server.{key}`" for key in server["properties"] if key not in SERVER_KEYS_FROM_SPEC]
    return (
        f"\nIn a MoERouter's ConfigMap the operator sets {', '.join(rendered)}; "
        f"{' and '.join(defaults)} keep their defaults.\n"
    )


def reference_markdown() -> str:
    spec = openapi_schema()["properties"]["spec"]
    server = model_schema(ServerConfig)
    return (
        HEADER + "\n".join(_rows(spec, "spec")) + "\n"
        + RUNTIME_FILE_HEADER + "\n".join(_rows(server, "server")) + "\n"
        + _server_keys_note(server)
    )


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
