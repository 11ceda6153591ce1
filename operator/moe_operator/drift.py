"""Pure drift detection: does an observed object already hold everything the desired one says?

The API server adds defaulted fields (``protocol: TCP``, ``terminationMessagePath``, ...), status and
bookkeeping metadata, and normalises quantities (``1000m`` -> ``1``). A child is in sync when every
field of the desired object is present in the actual one with an equal value. Keyed lists (items
with a unique ``name``, ``uid``, ``mountPath`` or ``containerPort``) are matched by key, so items that
other field managers added do not count (server-side apply would keep them: counting them would
apply forever); other lists must match pairwise.

Fields the operator stopped setting cannot be seen that way, so every applied child also carries a
digest of its desired form (``moerouter.io/applied-digest``): a different digest means the spec
changed and the child must be applied again (server-side apply then drops the abandoned fields).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from moe_operator.labels import ANNOTATION_PREFIX

APPLIED_DIGEST_ANNOTATION = f"{ANNOTATION_PREFIX}/applied-digest"

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX_SCALE: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str) -> Decimal | None:
    """A Kubernetes resource quantity as a number (``"500m"`` -> 0.5); None when it is not one."""
    match = _QUANTITY.match(value.strip())
    if match is None:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX_SCALE[suffix]
    except (InvalidOperation, KeyError):
        return None


def _scalars_equal(desired: Any, actual: Any) -> bool:
    if desired == actual and type(desired) is type(actual):
        return True
    if isinstance(desired, bool) or isinstance(actual, bool):
        return False
    if isinstance(desired, int | float) and isinstance(actual, int | float):
        return desired == actual
    if isinstance(desired, str) and isinstance(actual, str):
        left, right = parse_quantity(desired), parse_quantity(actual)
        return left is not None and right is not None and left == right
    return False


#: Keys that identify the items of Kubernetes' keyed lists (server-side apply merges those by key, so
#: items other managers add stay and must not count as drift).
LIST_KEYS = ("uid", "name", "mountPath", "containerPort")


def _list_key(items: list[Any]) -> str | None:
    for key in LIST_KEYS:
        if items and all(isinstance(item, Mapping) and key in item for item in items):
            values = [item[key] for item in items]
            if len(set(map(str, values))) == len(values):
                return key
    return None


def _walk_list(desired: list[Any], actual: list[Any], path: str, found: list[str]) -> None:
    key = _list_key(desired)
    if key is not None:
        by_key = {str(item.get(key)): item for item in actual if isinstance(item, Mapping)}
        for item in desired:
            item_path = f"{path}[{key}={item[key]}]"
            if str(item[key]) not in by_key:
                found.append(f"{item_path}: missing")
            else:
                _walk(item, by_key[str(item[key])], item_path, found)
    elif len(desired) != len(actual):
        found.append(f"{path}: {len(actual)} items instead of {len(desired)}")
    else:
        for index, (want, have) in enumerate(zip(desired, actual, strict=True)):
            _walk(want, have, f"{path}[{index}]", found)


def _walk(desired: Any, actual: Any, path: str, found: list[str]) -> None:
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            found.append(f"{path or '.'}: expected an object")
            return
        for key, value in desired.items():
            child_path = f"{path}.{key}"
            if key not in actual:
                if value is not None:
                    found.append(f"{child_path}: missing")
                continue
            _walk(value, actual[key], child_path, found)
    elif isinstance(desired, list):
        if not isinstance(actual, list):
            found.append(f"{path}: expected a list")
        else:
            _walk_list(desired, actual, path, found)
    elif desired is None:
        if actual is not None:
            found.append(f"{path}: should be unset")
    elif not _scalars_equal(desired, actual):
        found.append(f"{path}: {actual!r} instead of {desired!r}")


def differences(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Paths where ``actual`` does not hold what ``desired`` says (extra fields in ``actual`` are fine)."""
    found: list[str] = []
    _walk(desired, actual, "", found)
    return found


def holds(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether ``actual`` already holds every field of ``desired``."""
    return not differences(desired, actual)


def applied_digest(desired: Mapping[str, Any]) -> str:
    """A stable digest of a desired object (its own digest annotation excluded)."""
    metadata = dict(desired.get("metadata") or {})
    annotations = {
        key: value
        for key, value in (metadata.get("annotations") or {}).items()
        if key != APPLIED_DIGEST_ANNOTATION
    }
    if annotations:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    canonical = json.dumps({**desired, "metadata": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def stamped(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The desired object with its digest annotation, as it is applied."""
    metadata = dict(desired.get("metadata") or {})
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        APPLIED_DIGEST_ANNOTATION: applied_digest(desired),
    }
    return {**desired, "metadata": metadata}


def child_drift(desired: Mapping[str, Any], actual: Mapping[str, Any] | None) -> list[str]:
    """Why a child must be applied again; ``[]`` means it is in sync and no write is needed.

    ``desired`` is the builder's object (unstamped); ``actual`` is what the API server returned, or
    None when the child does not exist.
    """
    if actual is None:
        return ["absent"]
    reasons = []
    annotations = (actual.get("metadata") or {}).get("annotations") or {}
    if annotations.get(APPLIED_DIGEST_ANNOTATION) != applied_digest(desired):
        reasons.append("desired state changed since the last apply")
    reasons.extend(differences(stamped(desired), actual))
    return reasons
