"""Label, annotation and naming constants shared by the builders, handlers and status code."""

from __future__ import annotations

from collections.abc import Mapping

from moe_operator.api import GROUP

OPERATOR_NAME = "moe-router-operator"
FIELD_MANAGER = "moe-router-operator"
#: Holds spec.replicas for the moment the operator stops applying it, so the API server keeps the live value.
HANDOVER_FIELD_MANAGER = "moe-router-operator-handover"
APP_NAME = "moe-router"

#: Our own prefix for annotations and the finalizer (never kopf's defaults).
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
LAST_HANDLED_ANNOTATION = f"{GROUP}/last-handled-configuration"

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PART_OF_LABEL = "app.kubernetes.io/part-of"
ROUTER_LABEL = f"{GROUP}/router"

COMPONENT = "router"

#: Metadata from these prefixes belongs to other tools and is never copied onto children.
FOREIGN_ANNOTATION_PREFIXES = ("kopf.zalando.org/", "kubectl.kubernetes.io/", "argocd.argoproj.io/")


def selector_labels(name: str) -> dict[str, str]:
    """The immutable labels that select one MoERouter's pods."""
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: name, COMPONENT_LABEL: COMPONENT}


def common_labels(name: str) -> dict[str, str]:
    """Labels on every child of one MoERouter."""
    return {
        **selector_labels(name),
        MANAGED_BY_LABEL: OPERATOR_NAME,
        PART_OF_LABEL: OPERATOR_NAME,
        ROUTER_LABEL: name,
    }


def selector_string(name: str) -> str:
    """``status.selector``: the label selector in its string form (for the /scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def is_foreign(key: str) -> bool:
    return key.startswith(FOREIGN_ANNOTATION_PREFIXES)


def without_foreign(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Labels or annotations of the MoERouter that may travel to its children."""
    return {key: value for key, value in (metadata or {}).items() if not is_foreign(key)}
