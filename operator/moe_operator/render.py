"""``moe-operator render -f FILE``: the children the operator would apply, as a YAML stream, offline.

``--no-owner-references`` leaves out the owner references, for committing the output to Git and
applying it without the operator: an owner reference to a MoERouter that does not exist on the
cluster (offline the uid is a placeholder) makes the garbage collector delete the child.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from moe_operator.api import API_VERSION, KIND, SpecError, parse_spec
from moe_operator.children import Manifest, Owner, desired_children

#: Offline there is no API server to assign a uid; the live operator uses the real one.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the router.yaml inside the ConfigMap) as readable literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: Iterable[Mapping[str, Any]]) -> str:
    return yaml.dump_all(list(manifests), Dumper=_ManifestDumper, sort_keys=False, width=100)


class RenderError(ValueError):
    """The input is not a MoERouter the operator could reconcile."""


def moerouters_in(documents: Iterable[Any]) -> list[Mapping[str, Any]]:
    routers = [
        document
        for document in documents
        if isinstance(document, Mapping) and document.get("kind") == KIND
    ]
    if not routers:
        raise RenderError(f"no {KIND} object found (expected kind: {KIND}, apiVersion: {API_VERSION})")
    for router in routers:
        if router.get("apiVersion") != API_VERSION:
            raise RenderError(f"apiVersion must be {API_VERSION}, got {router.get('apiVersion')!r}")
        if not (router.get("metadata") or {}).get("name"):
            raise RenderError("metadata.name is required")
    return routers


def without_owner_references(child: Manifest) -> Manifest:
    metadata = {key: value for key, value in child["metadata"].items() if key != "ownerReferences"}
    return {**child, "metadata": metadata}


def render_children(
    router: Mapping[str, Any], default_namespace: str = "default", *, owner_references: bool = True
) -> list[Manifest]:
    metadata = dict(router.get("metadata") or {})
    metadata.setdefault("namespace", default_namespace)
    metadata.setdefault("uid", PLACEHOLDER_UID)
    name = metadata["name"]
    try:
        spec = parse_spec(router.get("spec"))
    except SpecError as exc:
        raise RenderError(f"{KIND} {name}: {exc}") from None
    children = desired_children(Owner.from_body({**router, "metadata": metadata}), spec)
    return children if owner_references else [without_owner_references(child) for child in children]


def render_stream(text: str, default_namespace: str = "default", *, owner_references: bool = True) -> str:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise RenderError(f"not valid YAML: {exc}") from None
    children = [
        child
        for router in moerouters_in(documents)
        for child in render_children(router, default_namespace, owner_references=owner_references)
    ]
    return dump_manifests(children)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="MoERouter YAML file ('-' for stdin)")
    parser.add_argument("-n", "--namespace", default="default", help="namespace when the object names none")
    parser.add_argument(
        "--no-owner-references",
        dest="owner_references",
        action="store_false",
        help="leave out ownerReferences (for applying the output without the operator, e.g. from Git)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text(encoding="utf-8")
        sys.stdout.write(render_stream(text, args.namespace, owner_references=args.owner_references))
    except (OSError, RenderError) as exc:
        print(f"moe-operator render: {exc}", file=sys.stderr)
        return 2
    return 0
