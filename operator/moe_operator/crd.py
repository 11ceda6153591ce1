"""The MoERouter CustomResourceDefinition, generated from the pydantic models.

pydantic emits JSON Schema (2020-12); the API server wants a *structural*
OpenAPI v3.0 schema. This module inlines ``$ref``s, unwraps ``Optional``,
turns numeric ``exclusiveMinimum`` into the v3.0 form, drops what Kubernetes
rejects, and gives nested objects ``default: {}`` so their own defaults apply.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from moe_operator.api import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, MoERouterSpec, MoERouterStatus
from moe_operator.labels import OPERATOR_NAME, PART_OF_LABEL

Schema = dict[str, Any]

CRD_NAME = f"{PLURAL}.{GROUP}"
#: Keys of JSON Schema that a structural CRD schema does not accept (or that add noise).
_DROPPED_KEYS = {"title", "additionalProperties", "$defs", "examples"}
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
#: Annotations that keep Argo CD and Flux from deleting or pruning the CRD (and with it every router).
KEEP_CRD_ANNOTATIONS = {
    "argocd.argoproj.io/sync-options": "Delete=false,Prune=false",
    "kustomize.toolkit.fluxcd.io/prune": "disabled",
}


def _resolve(schema: Schema, definitions: Schema) -> Schema:
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{key: value for key, value in schema.items() if key != "$ref"}}
        return _resolve(merged, definitions)
    return schema


def _unwrap_optional(schema: Schema, definitions: Schema) -> Schema:
    """``anyOf: [X, null]`` -> X, keeping the outer description/extras."""
    variants = schema.get("anyOf")
    if not variants:
        return schema
    concrete = [variant for variant in variants if variant.get("type") != "null"]
    if len(concrete) != 1:
        raise ValueError(f"cannot express a union of {len(concrete)} types in a structural schema: {schema}")
    outer = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**_resolve(concrete[0], definitions), **outer}


def structural(schema: Schema, definitions: Schema) -> Schema:
    """Convert one pydantic JSON-Schema node into a structural OpenAPI v3.0 node."""
    schema = _unwrap_optional(_resolve(schema, definitions), definitions)
    if schema.get(_PRESERVE):
        node: Schema = {"type": "object", _PRESERVE: True}
        if "description" in schema:
            node["description"] = schema["description"]
        return node

    node = {key: value for key, value in schema.items() if key not in _DROPPED_KEYS}
    if node.get("default", ...) is None:
        del node["default"]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[inclusive] = node.pop(bound)
            node[bound] = True

    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {
            name: _with_object_default(structural(child, definitions))
            for name, child in node["properties"].items()
        }
    elif node.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(schema["additionalProperties"], definitions)
    if "items" in node:
        node["items"] = structural(node["items"], definitions)
    return node


def _with_object_default(node: Schema) -> Schema:
    """Nested objects with properties default to ``{}`` so the API server fills in their defaults."""
    if node.get("type") == "object" and "properties" in node and "default" not in node and not node.get(
        "required"
    ):
        return {**node, "default": {}}
    return node


#: A DNS-1035 label of at most 63 characters: what a Service name and a label value both accept.
NAME_PATTERN = "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"


def model_schema(model: type[BaseModel]) -> Schema:
    """A model's structural schema (wire names), as the CRD holds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def openapi_schema() -> Schema:
    status = model_schema(MoERouterStatus)
    status[_PRESERVE] = True  # status may carry fields of newer operator versions
    return {
        "type": "object",
        "description": "A Mixture-of-Experts router deployment with predictive autoscaling.",
        # The name becomes the Service's name (a DNS-1035 label) and a label value on the pods: refuse at
        # admission what would otherwise create some children and then fail on the others.
        "x-kubernetes-validations": [
            {
                "rule": f"!has(self.metadata.name) || self.metadata.name.matches('{NAME_PATTERN}')",
                "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting "
                "with a letter, ending with a letter or digit, at most 63 characters): it names the router's "
                "Service and labels its pods",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {**model_schema(MoERouterSpec), "default": {}},
            "status": status,
        },
    }


def custom_resource_definition() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {PART_OF_LABEL: OPERATOR_NAME},
            # Deleting the CRD deletes every MoERouter and, through them, every router: GitOps tools must not
            # do it on their own when an Application or Kustomization is pruned or deleted (docs/gitops.md).
            "annotations": dict(KEEP_CRD_ANNOTATIONS),
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["moe"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {
                            "name": "Predicted",
                            "type": "number",
                            "description": "Forecast request rate (requests/s) over the horizon",
                            "jsonPath": ".status.prediction.predictedLoad",
                        },
                        {
                            "name": "Recommended",
                            "type": "integer",
                            "priority": 1,
                            "jsonPath": ".status.prediction.recommendedReplicas",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases (``&id001``) for schema parts the models share: every node written out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `moe-operator crd` from the pydantic models. Do not edit by hand.\n"
    return header + yaml.dump(custom_resource_definition(), Dumper=_PlainDumper, sort_keys=False, width=100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            print(f"moe-operator crd: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0
