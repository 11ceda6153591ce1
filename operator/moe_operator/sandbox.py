"""A local Kubernetes API sandbox for the integration tests, the benchmark and ``make demo``.

It is kmock's ``KubernetesEmulator`` (the mock API server by kopf's author) with the semantics the
operator relies on filled in: uid, resourceVersion, creationTimestamp, ``metadata.generation`` bumped
on spec changes, label and field selectors on list/watch, watch resumption from a resourceVersion,
merge / JSON / strategic-merge patches, server-side apply (create when absent, merge, drop the fields
a field manager stopped applying), the ``/status`` and ``/scale`` subresources, finalizers,
owner-reference cascade on delete, immutable ConfigMaps and Secrets, ``generateName``, API discovery
of the built-in kinds the operator touches and of the MoERouter CRD (with kubectl's short names, e.g.
``kubectl get moer``), and just enough OpenAPI v3 for ``kubectl apply`` to use server-side field validation.

Two clearly fake controllers stand in for kube-controller-manager so that ``Ready`` can be shown:
the *fake deployment controller* fills ``Deployment.status`` a short delay after each spec change,
and the *fake HPA controller* keeps the target Deployment's replicas within the HPA's bounds. No pods
exist. Every HTTP request is recorded (``sandbox.log``) so tests can count writes.

Not emulated: authentication/RBAC, admission, OpenAPI schema validation, per-field ownership
conflicts (apply always behaves as ``force=true``) and keyed list merges (lists are atomic).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import re
import secrets
import socket
import string
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from moe_operator import api

JSON = dict[str, Any]

#: (group, version, plural, kind, namespaced, subresources)
BUILTIN_RESOURCES: tuple[tuple[str, str, str, str, bool, tuple[str, ...]], ...] = (
    ("", "v1", "namespaces", "Namespace", False, ("status",)),
    ("", "v1", "configmaps", "ConfigMap", True, ()),
    ("", "v1", "secrets", "Secret", True, ()),
    ("", "v1", "services", "Service", True, ("status",)),
    ("", "v1", "events", "Event", True, ()),
    ("", "v1", "pods", "Pod", True, ("status",)),
    ("events.k8s.io", "v1", "events", "Event", True, ()),
    ("apps", "v1", "deployments", "Deployment", True, ("status", "scale")),
    ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("status",)),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ()),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("status",)),
    ("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True, ()),
    ("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule", True, ()),
    ("coordination.k8s.io", "v1", "leases", "Lease", True, ()),
    ("kopf.dev", "v1", "kopfpeerings", "KopfPeering", True, ()),
    ("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", False, ()),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("status",),
    ),
    (api.GROUP, api.VERSION, api.PLURAL, api.KIND, True, ("status", "scale")),
)
#: kubectl's short names (``kubectl get moer``, ``kubectl get cm``).
SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "namespaces": ("ns",),
    "configmaps": ("cm",),
    "services": ("svc",),
    "events": ("ev",),
    "pods": ("po",),
    "deployments": ("deploy",),
    "horizontalpodautoscalers": ("hpa",),
    "networkpolicies": ("netpol",),
    "poddisruptionbudgets": ("pdb",),
    "customresourcedefinitions": ("crd", "crds"),
    api.PLURAL: tuple(api.SHORT_NAMES),
}
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

FAKE_DEPLOYMENT_CONTROLLER = "sandbox-fake-deployment-controller"
FAKE_HPA_CONTROLLER = "sandbox-fake-hpa-controller"
EVENT_LOG_SIZE = 50_000


@dataclasses.dataclass(frozen=True)
class Call:
    """One HTTP request the sandbox served, in RBAC terms."""

    verb: str  # get | list | watch | create | update | patch | delete
    group: str
    resource: str  # plural, with "/subresource" when one was addressed
    namespace: str | None
    name: str | None
    user_agent: str
    content_type: str
    label_selector: str = ""  # what a list or watch asked the server to filter by

    @property
    def is_write(self) -> bool:
        return self.verb in WRITE_VERBS


@dataclasses.dataclass
class _Watch:
    resource: kmock.resource
    namespace: str | None
    match: Callable[[JSON], bool]
    queue: asyncio.Queue[tuple[int, JSON]]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
        }


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors -----------------------------------------------------------------------------------

_SELECTOR_TERM = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<absent>[^\s,=!()]+)"
    r"|(?P<key>[^\s,=!()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,=!()]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return terms


Labels = Mapping[str, str]


def _label_check(match: re.Match[str]) -> Callable[[Labels], bool]:
    key = match["key"]
    if match["absent"]:
        absent = match["absent"]
        return lambda labels: absent not in labels
    if match["op"] in ("=", "=="):
        value = match["value"]
        return lambda labels: labels.get(key) == value
    if match["op"] == "!=":
        value = match["value"]
        return lambda labels: labels.get(key) != value
    if match["setop"]:
        values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
        if match["setop"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    return lambda labels: key in labels


def parse_label_selector(selector: str) -> Callable[[Labels], bool]:
    """A predicate over labels for a Kubernetes label selector string; ApiError(400) when malformed."""
    checks: list[Callable[[Labels], bool]] = []
    for term in _split_terms(selector):
        match = _SELECTOR_TERM.match(term)
        if match is None:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        checks.append(_label_check(match))
    return lambda labels: all(check(labels) for check in checks)


def _field_value(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _field_check(path: str, op: str, expected: str) -> Callable[[Mapping[str, Any]], bool]:
    if op == "!=":
        return lambda obj: str(_field_value(obj, path) or "") != expected
    return lambda obj: str(_field_value(obj, path) or "") == expected


def parse_field_selector(selector: str) -> Callable[[Mapping[str, Any]], bool]:
    """Equality field selectors (``metadata.name=x``, ``involvedObject.uid!=y``)."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(selector):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if match is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        checks.append(_field_check(*match.groups()))
    return lambda obj: all(check(obj) for check in checks)


# --- patches -------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` deletes; lists replace)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(target: JSON, operations: Any) -> JSON:
    """RFC 6902 JSON patch: add, remove, replace, test, copy, move."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc: Any = copy.deepcopy(target)

    def locate(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise ApiError(422, "Invalid", "the whole document cannot be patched")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        return parent, parts[-1]

    def get(path: str) -> Any:
        parent, last = locate(path)
        return parent[int(last)] if isinstance(parent, list) else parent[last]

    def remove(path: str) -> Any:
        parent, last = locate(path)
        return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)

    def add(path: str, value: Any) -> None:
        parent, last = locate(path)
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value

    try:
        for operation in operations:
            op, path = operation["op"], operation["path"]
            if op == "add":
                add(path, copy.deepcopy(operation["value"]))
            elif op == "remove":
                remove(path)
            elif op == "replace":
                remove(path)
                add(path, copy.deepcopy(operation["value"]))
            elif op == "test":
                if get(path) != operation["value"]:
                    raise ApiError(422, "Invalid", f"test failed at {path}")
            elif op in ("copy", "move"):
                value = copy.deepcopy(get(operation["from"]))
                if op == "move":
                    remove(operation["from"])
                add(path, value)
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch operation {op!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"JSON patch does not apply: {exc!r}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "Invalid", "a patched object must stay an object")
    return doc


def _drop_abandoned(base: Any, previous: Any, applied: Any, others: Sequence[Any] = ()) -> Any:
    """Remove from ``base`` the fields a manager applied before but no longer applies.

    A field another manager's apply still holds stays (shared ownership), as with the API server.
    """
    if not (isinstance(base, Mapping) and isinstance(previous, Mapping)):
        return base
    result = dict(base)
    applied_map = applied if isinstance(applied, Mapping) else {}
    other_maps = [other for other in others if isinstance(other, Mapping)]
    for key, old in previous.items():
        still_held = [other[key] for other in other_maps if key in other]
        if key not in applied_map:
            if not still_held:
                result.pop(key, None)
            elif isinstance(old, Mapping):
                result[key] = _drop_abandoned(result.get(key), old, {}, still_held)
        elif key in result and isinstance(old, Mapping):
            result[key] = _drop_abandoned(result[key], old, applied_map[key], still_held)
    return result


def _fields_v1(applied: Any) -> JSON:
    """The FieldsV1 set of an apply configuration (maps only; a list counts as one field)."""
    if not isinstance(applied, Mapping):
        return {}
    return {f"f:{key}": _fields_v1(value) for key, value in applied.items()}


def _applied_fields(applied: Mapping[str, Any]) -> JSON:
    owned = {key: value for key, value in applied.items() if key not in ("apiVersion", "kind")}
    owned["metadata"] = {
        key: value for key, value in (applied.get("metadata") or {}).items() if key not in ("name", "namespace")
    }
    if not owned["metadata"]:
        del owned["metadata"]
    return _fields_v1(owned)


def _apply_merge(base: Any, applied: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(applied, Mapping):
        result = dict(base)
        for key, value in applied.items():
            result[key] = _apply_merge(result.get(key), value)
        return result
    return copy.deepcopy(applied)


# --- request parsing ------------------------------------------------------------------------------


def parse_path(path: str) -> kmock_parsing.ParsedPath:
    """Split a Kubernetes REST path into group/version/namespace/plural/name/subresource."""
    parts = [part for part in path.strip("/").split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    elif len(parts) == 2 and parts[0] == "apis":
        return kmock_parsing.ParsedPath(group=parts[1])
    else:
        return kmock_parsing.ParsedPath()
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return kmock_parsing.ParsedPath(group, version, plural, namespace, name, subresource)


async def _parse_request(raw_request: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    body = await raw_request.read()
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        data = None
    parsed = parse_path(raw_request.path)
    resource = (
        None
        if parsed.group is None
        else kmock.resource(group=parsed.group, version=parsed.version, plural=parsed.plural)
    )
    method = kmock.method(raw_request.method)
    return kmock.Request(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=method,
        params=dict(raw_request.query),
        headers=dict(raw_request.headers),
        cookies=dict(raw_request.cookies),
        data=data,
        body=body,
        text=text,
        action=kmock_parsing.guess_k8s(parsed, method, dict(raw_request.query)),
        resource=resource,
        namespace=parsed.namespace,
        name=parsed.name,
        subresource=parsed.subresource,
    )


# --- the emulator --------------------------------------------------------------------------------

_SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


@attrs.define(kw_only=True)
class Sandbox(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with real API-server semantics; see the module docstring."""

    ready_delay: float = 0.3  # seconds before the fake deployment controller reports pods available
    log: list[Call] = attrs.field(factory=list, init=False)
    #: A stand-in for missing RBAC rules: every request for these resource plurals answers 403.
    forbidden: set[str] = attrs.field(factory=set, init=False)

    _revision: int = attrs.field(default=1, init=False)
    _events: collections.deque[tuple[int, kmock.resource, JSON]] = attrs.field(
        factory=lambda: collections.deque(maxlen=EVENT_LOG_SIZE), init=False
    )
    _watches: list[_Watch] = attrs.field(factory=list, init=False)
    _applied: dict[tuple[Any, ...], dict[str, JSON]] = attrs.field(factory=dict, init=False)
    _kinds: dict[kmock.resource, tuple[str, bool, frozenset[str]]] = attrs.field(factory=dict, init=False)
    _controller_tasks: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    _state_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /version/"] << self._serve_server_version  # what the official client asks for
        for group, version, plural, kind, namespaced, subresources in BUILTIN_RESOURCES:
            self.serve_resource(group, version, plural, kind, namespaced=namespaced, subresources=subresources)

    def serve_resource(
        self,
        group: str,
        version: str,
        plural: str,
        kind: str,
        *,
        namespaced: bool = True,
        subresources: tuple[str, ...] = (),
    ) -> None:
        """Make a resource discoverable and servable."""
        resource = kmock.resource(group=group, version=version, plural=plural)
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs=set(VERBS),
            shortnames=set(SHORT_NAMES.get(plural, ())),
            subresources=set(subresources),
        )
        self._kinds[resource] = (kind, namespaced, frozenset(subresources))

    # --- reading state (for tests) ---------------------------------------------------------------

    def object_of(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> JSON | None:
        """The stored object (a deep copy), or None."""
        key = (kmock.resource(group=group, version=version, plural=plural), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def items(self, group: str, version: str, plural: str, namespace: str | None = None) -> list[JSON]:
        resource = kmock.resource(group=group, version=version, plural=plural)
        return [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self._objects.items()
            if res == resource and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def seed(self, group: str, version: str, plural: str, body: Mapping[str, Any]) -> JSON:
        """Create an object directly (no HTTP request is logged), e.g. a Secret a test needs."""
        resource = kmock.resource(group=group, version=version, plural=plural)
        namespace = (body.get("metadata") or {}).get("namespace")
        return self._create(resource, namespace, body, None)

    def restore(self, group: str, version: str, plural: str, body: Mapping[str, Any]) -> JSON:
        """Store an object exactly as given (uid, generation, status kept), as after an etcd restore."""
        resource = kmock.resource(group=group, version=version, plural=plural)
        metadata = body.get("metadata") or {}
        key = self._key(resource, metadata.get("namespace"), metadata["name"])
        return copy.deepcopy(self._store(key, copy.deepcopy(dict(body)), "ADDED"))

    # --- request dispatch ------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Parse with our own path rules (kmock 0.8 misreads ``/api/v1/namespaces``) and answer."""
        try:
            request = await _parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            return await self._handle(request)
        except ApiError as exc:
            return aiohttp.web.json_response(exc.status(), status=exc.code)
        except kmock.KubernetesError as exc:
            error = ApiError(exc.status, exc.reason or "Error", exc.message or "")
            return aiohttp.web.json_response(error.status(), status=exc.status)
        except Exception as exc:  # the sandbox must answer like a server, not drop the connection
            error = ApiError(500, "InternalError", f"sandbox failure: {exc!r}")
            return aiohttp.web.json_response(error.status(), status=500)


    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if request.url.path.startswith("/openapi/v3"):
            return aiohttp.web.json_response(self._openapi_v3(request.url.path))
        if resource is not None and resource.plural is None and resource.version:
            return aiohttp.web.json_response(self._resource_list(resource.group or "", resource.version))
        if resource is None or resource.plural is None:
            return await kmock.RawHandler._handle(self, request)  # discovery, version, root
        self._record(request)
        try:
            if resource not in self._kinds:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {resource}")
            if resource.plural in self.forbidden:
                raise self._forbidden(request)
            if request.action == kmock.action.WATCH:
                return await self._watch(request)
            async with self._state_lock:
                code, body = self._dispatch(request)
            return aiohttp.web.json_response(body, status=code)
        except ApiError as exc:
            return aiohttp.web.json_response(exc.status(), status=exc.code)

    @staticmethod
    def _forbidden(request: kmock.Request) -> ApiError:
        """An RBAC denial worded as the API server words it (the operator tells it from quota/webhook 403s)."""
        resource = request.resource
        assert resource is not None
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        if request.action == kmock.action.WATCH:
            verb = "watch"
        else:
            verb = verbs.get(str(getattr(request.method, "value", request.method)), "get" if request.name else "list")
        group = f".{resource.group}" if resource.group else ""
        named = f' "{request.name}"' if request.name else ""
        scope = f' in the namespace "{request.namespace}"' if request.namespace else " at the cluster scope"
        return ApiError(
            403,
            "Forbidden",
            f'{resource.plural}{group}{named} is forbidden: User "system:serviceaccount:sandbox:operator" cannot '
            f'{verb} resource "{resource.plural}" in API group "{resource.group}"{scope} (sandbox RBAC)',
        )

    def _resource_list(self, group: str, version: str) -> JSON:
        """Discovery of one group/version (kmock 0.8 writes ``/v1`` for the core group)."""
        entries: list[JSON] = []
        for resource, (kind, namespaced, subresources) in self._kinds.items():
            if resource.group != group or resource.version != version:
                continue
            entries.append({
                "name": resource.plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                "verbs": sorted(VERBS), "shortNames": list(SHORT_NAMES.get(resource.plural or "", ())),
            })
            for subresource in sorted(subresources):
                entries.append({
                    "name": f"{resource.plural}/{subresource}", "singularName": "", "namespaced": namespaced,
                    "kind": "Scale" if subresource == "scale" else kind, "verbs": ["get", "patch", "update"],
                })
        if not entries:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {group}/{version}")
        return {
            "apiVersion": "v1", "kind": "APIResourceList",
            "groupVersion": f"{group}/{version}" if group else version, "resources": entries,
        }

    def _openapi_v3(self, path: str) -> JSON:
        """Just enough OpenAPI v3 for kubectl to see server-side field validation (it sends fieldValidation)."""
        group_versions = {
            (f"apis/{r.group}/{r.version}" if r.group else f"api/{r.version}") for r in self._kinds
        }
        if path.rstrip("/") == "/openapi/v3":
            return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"} for gv in sorted(group_versions)}}
        group_version = path[len("/openapi/v3/"):].strip("/")
        if group_version not in group_versions:
            raise ApiError(404, "NotFound", f"no OpenAPI document for {group_version}")
        field_validation = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
        paths = {}
        for resource, (kind, namespaced, _) in self._kinds.items():
            prefix = f"apis/{resource.group}/{resource.version}" if resource.group else f"api/{resource.version}"
            if prefix != group_version:
                continue
            scope = "/namespaces/{namespace}" if namespaced else ""
            operation = {
                "parameters": [field_validation],
                "x-kubernetes-group-version-kind": {
                    "group": resource.group or "", "version": resource.version, "kind": kind,
                },
            }
            for suffix in ("", "/{name}"):
                paths[f"/{prefix}{scope}/{resource.plural}{suffix}"] = {
                    verb: operation for verb in ("post", "put", "patch")
                }
        return {"openapi": "3.0.0", "info": {"title": "sandbox", "version": "v1"}, "paths": paths,
                "components": {"schemas": {}}}

    def _record(self, request: kmock.Request) -> None:
        method = request.method.value
        if request.action == kmock.action.WATCH:
            verb = "watch"
        elif method == "GET":
            verb = "get" if request.name else "list"
        elif method == "POST":
            verb = "create"
        elif method == "PUT":
            verb = "update"
        elif method == "PATCH":
            verb = "patch"
        elif method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
        else:
            verb = method.lower()
        assert request.resource is not None
        plural = request.resource.plural or ""
        self.log.append(
            Call(
                verb=verb,
                group=request.resource.group or "",
                resource=f"{plural}/{request.subresource}" if request.subresource else plural,
                namespace=request.namespace,
                name=request.name,
                user_agent=request.headers.get("User-Agent", ""),
                content_type=request.headers.get("Content-Type", ""),
                label_selector=request.params.get("labelSelector", ""),
            )
        )

    def _dispatch(self, request: kmock.Request) -> tuple[int, JSON]:
        assert request.resource is not None
        method = request.method.value
        _, _, subresources = self._kinds[request.resource]
        if request.subresource and request.subresource not in subresources:
            raise ApiError(404, "NotFound", f"{request.resource.plural} has no {request.subresource} subresource")
        if method == "GET" and request.name is None:
            return 200, self._list(request)
        if method == "GET":
            return 200, self._read(request)
        if method == "POST" and request.name is None:
            return 201, self._create(request.resource, request.namespace, self._body(request), request)
        if method == "PUT" and request.name is not None:
            return 200, self._replace(request)
        if method == "PATCH" and request.name is not None:
            return self._patch(request)
        if method == "DELETE" and request.name is not None:
            return 200, self._delete_request(request)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        text = request.text
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ApiError(400, "BadRequest", f"the request body is neither JSON nor YAML: {exc}") from None

    # --- storage primitives ----------------------------------------------------------------------

    def _key(self, resource: kmock.resource, namespace: str | None, name: str) -> tuple[Any, ...]:
        _, namespaced, _ = self._kinds[resource]
        return (resource, namespace if namespaced else None, name)

    def _current(self, key: tuple[Any, ...]) -> JSON | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].raw

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _publish(self, resource: kmock.resource, event_type: str, obj: JSON) -> None:
        revision = int(obj["metadata"]["resourceVersion"])
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        self._events.append((revision, resource, event))
        for watch in self._watches:
            if watch.resource == resource and watch.match(obj):
                watch.queue.put_nowait((revision, event))

    def _store(self, key: tuple[Any, ...], obj: JSON, event_type: str) -> JSON:
        obj["metadata"]["resourceVersion"] = self._next_revision()
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        self._publish(key[0], event_type, obj)
        self._after_write(key, obj)
        return obj

    # --- verbs -----------------------------------------------------------------------------------

    def _list(self, request: kmock.Request) -> JSON:
        assert request.resource is not None
        match = self._matcher(request)
        kind, _, _ = self._kinds[request.resource]
        items = [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self._objects.items()
            if res == request.resource
            and not obj.deleted
            and (request.namespace is None or ns == request.namespace)
            and match(obj.raw)
        ]
        items.sort(key=lambda item: (item["metadata"].get("namespace") or "", item["metadata"]["name"]))
        group_version = request.resource.version if not request.resource.group else (
            f"{request.resource.group}/{request.resource.version}"
        )
        return {
            "apiVersion": group_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }

    def _read(self, request: kmock.Request) -> JSON:
        assert request.resource is not None and request.name is not None
        obj = self._current(self._key(request.resource, request.namespace, request.name))
        if obj is None:
            raise self._not_found(request.resource, request.name)
        if request.subresource == "scale":
            return self._scale_of(request.resource, obj)
        return copy.deepcopy(obj)

    @staticmethod
    def _not_found(resource: kmock.resource, name: str) -> ApiError:
        group = f".{resource.group}" if resource.group else ""
        return ApiError(404, "NotFound", f'{resource.plural}{group} "{name}" not found')

    def _manager(self, request: kmock.Request | None) -> str:
        if request is None:
            return "sandbox"
        return request.params.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]

    def _create(
        self,
        resource: kmock.resource,
        namespace: str | None,
        body: Any,
        request: kmock.Request | None,
        operation: str = "Update",
        fields: JSON | None = None,
    ) -> JSON:
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be an object")
        kind, namespaced, subresources = self._kinds[resource]
        obj = copy.deepcopy(dict(body))
        metadata = dict(obj.get("metadata") or {})
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            alphabet = string.ascii_lowercase + string.digits
            metadata["name"] = metadata["generateName"] + "".join(secrets.choice(alphabet) for _ in range(5))
        if namespaced:
            body_namespace = metadata.get("namespace")
            if namespace and body_namespace and body_namespace != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
            metadata["namespace"] = namespace or body_namespace or "default"
        else:
            metadata.pop("namespace", None)
        key = self._key(resource, metadata.get("namespace"), metadata["name"])
        if self._current(key) is not None:
            group = f".{resource.group}" if resource.group else ""
            raise ApiError(409, "AlreadyExists", f'{resource.plural}{group} "{metadata["name"]}" already exists')
        metadata.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            managedFields=[self._managed_entry(self._manager(request), operation, resource, fields)],
        )
        obj["metadata"] = metadata
        obj["apiVersion"] = resource.version if not resource.group else f"{resource.group}/{resource.version}"
        obj["kind"] = kind
        if "status" in subresources:
            obj.pop("status", None)
        self._default(resource, obj)
        return copy.deepcopy(self._store(key, obj, "ADDED"))

    @staticmethod
    def _managed_entry(manager: str, operation: str, resource: kmock.resource, fields: JSON | None = None) -> JSON:
        api_version = resource.version if not resource.group else f"{resource.group}/{resource.version}"
        return {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": _now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields or {},  # recorded for applies only: Update entries own nothing here
        }

    @staticmethod
    def _default(resource: kmock.resource, obj: JSON) -> None:
        """The API server's defaulting for the fields the operator's tests look at."""
        if resource.plural == "deployments" and resource.group == "apps":
            obj.setdefault("spec", {}).setdefault("replicas", 1)
        if resource.plural == "services" and resource.group == "":
            for port in obj.get("spec", {}).get("ports", []) or []:
                port.setdefault("protocol", "TCP")

    def _update(
        self,
        resource: kmock.resource,
        key: tuple[Any, ...],
        old: JSON,
        new: JSON,
        *,
        subresource: str | None,
        manager: str,
        operation: str,
        fields: JSON | None = None,
    ) -> JSON:
        """Commit a new version of an existing object with the API server's invariants."""
        _, _, subresources = self._kinds[resource]
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the object must stay an object")
        new = copy.deepcopy(new)
        new_meta = dict(new.get("metadata") or {})
        old_meta = old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            if field in old_meta:
                new_meta[field] = old_meta[field]
            else:
                new_meta.pop(field, None)
        new_meta["generation"] = old_meta.get("generation", 1)
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
        new_meta["managedFields"] = old_meta.get("managedFields", [])
        new["metadata"] = new_meta
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif "status" in subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        if old_meta.get("deletionTimestamp") and new_meta.get("finalizers", []) != old_meta.get("finalizers", []):
            added = set(new_meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(422, "Invalid", "no new finalizers can be added to an object being deleted")
        _check_immutable(resource, old, new)
        if subresource is None:
            self._default(resource, new)
        entry = next((item for item in new_meta["managedFields"]
                      if item.get("manager") == manager and item.get("operation") == operation), None)
        # An apply that changes no value still changes who owns what (e.g. a field handed over).
        ownership_changed = operation == "Apply" and (entry is None or entry.get("fieldsV1") != (fields or {}))
        if new == old and not ownership_changed:
            return copy.deepcopy(old)
        if _spec_of(new) != _spec_of(old):
            new["metadata"]["generation"] = old_meta.get("generation", 1) + 1
        new["metadata"]["managedFields"] = [
            *(entry for entry in new_meta["managedFields"] if entry.get("manager") != manager
              or entry.get("operation") != operation),
            self._managed_entry(manager, operation, resource, fields),
        ]
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._store(key, new, "MODIFIED")
            self._remove(key)
            return copy.deepcopy(new)
        return copy.deepcopy(self._store(key, new, "MODIFIED"))

    def _replace(self, request: kmock.Request) -> JSON:
        assert request.resource is not None and request.name is not None
        key = self._key(request.resource, request.namespace, request.name)
        old = self._current(key)
        body = self._body(request)
        if old is None:
            raise self._not_found(request.resource, request.name)
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the request body must be an object")
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes "
                           "to the latest version and try again")
        if request.subresource == "scale":
            return self._set_scale(request, key, old, body)
        return self._update(request.resource, key, old, dict(body), subresource=request.subresource,
                            manager=self._manager(request), operation="Update")

    def _patch(self, request: kmock.Request) -> tuple[int, JSON]:
        assert request.resource is not None and request.name is not None
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        key = self._key(request.resource, request.namespace, request.name)
        old = self._current(key)
        body = self._body(request)
        manager = self._manager(request)
        if content_type == "application/apply-patch+yaml":
            return self._server_side_apply(request, key, old, body, manager)
        if old is None:
            raise self._not_found(request.resource, request.name)
        if request.subresource == "scale":
            return 200, self._set_scale(request, key, old, merge_patch(self._scale_of(request.resource, old), body))
        if content_type == "application/json-patch+json":
            new = json_patch(old, body)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            # Strategic merge is approximated by a JSON merge patch (lists replace instead of merging by key).
            if not isinstance(body, Mapping):
                raise ApiError(400, "BadRequest", "a merge patch must be an object")
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            new = merge_patch(old, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch content type {content_type!r}")
        return 200, self._update(request.resource, key, old, new, subresource=request.subresource,
                                 manager=manager, operation="Update")

    def _server_side_apply(
        self, request: kmock.Request, key: tuple[Any, ...], old: JSON | None, body: Any, manager: str
    ) -> tuple[int, JSON]:
        assert request.resource is not None and request.name is not None
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "an apply patch must be an object")
        if "fieldManager" not in request.params:
            raise ApiError(400, "BadRequest", "fieldManager is required for apply patches")
        kind, _, _ = self._kinds[request.resource]
        if body.get("kind") != kind:
            raise ApiError(400, "BadRequest", f"the apply patch must be of kind {kind}, not {body.get('kind')!r}")
        applied = {
            **copy.deepcopy(dict(body)),
            "metadata": {
                key_: value
                for key_, value in (body.get("metadata") or {}).items()
                if key_ not in _SERVER_METADATA
            },
        }
        if (applied["metadata"].get("name") or request.name) != request.name:
            raise ApiError(400, "BadRequest", "the name in the body does not match the URL")
        per_manager = self._applied.setdefault(key, {})
        if old is None:
            if request.subresource:
                raise self._not_found(request.resource, request.name)
            applied["metadata"]["name"] = request.name
            created = self._create(request.resource, request.namespace, applied, request, "Apply",
                                   _applied_fields(applied))
            per_manager[manager] = applied
            return 201, created
        previous = per_manager.get(manager)
        base = copy.deepcopy(old)
        if previous is not None:
            others = [config for other, config in per_manager.items() if other != manager]
            base = _drop_abandoned(base, previous, applied, others)
        new = _apply_merge(base, applied)
        per_manager[manager] = applied
        return 200, self._update(request.resource, key, old, new, subresource=request.subresource,
                                 manager=manager, operation="Apply", fields=_applied_fields(applied))

    def _delete_request(self, request: kmock.Request) -> JSON:
        assert request.resource is not None and request.name is not None
        key = self._key(request.resource, request.namespace, request.name)
        options = self._body(request) or {}
        propagation = options.get("propagationPolicy") if isinstance(options, Mapping) else None
        return self._delete(key, cascade=propagation != "Orphan", request=request)

    def _delete(self, key: tuple[Any, ...], *, cascade: bool, request: kmock.Request | None = None) -> JSON:
        resource = key[0]
        obj = self._current(key)
        if obj is None:
            raise self._not_found(resource, key[2])
        metadata = obj["metadata"]
        if metadata.get("finalizers"):
            if metadata.get("deletionTimestamp"):
                return copy.deepcopy(obj)
            marked = copy.deepcopy(obj)
            marked["metadata"]["deletionTimestamp"] = _now()
            return copy.deepcopy(self._store(key, marked, "MODIFIED"))
        self._remove(key, cascade=cascade)
        return copy.deepcopy(obj)

    def _remove(self, key: tuple[Any, ...], *, cascade: bool = True) -> None:
        obj = copy.deepcopy(self._objects[key].raw)
        obj["metadata"]["resourceVersion"] = self._next_revision()
        self._objects[key].delete()
        self._applied.pop(key, None)
        self._publish(key[0], "DELETED", obj)
        if cascade:
            self._collect_dependents(obj["metadata"]["uid"])

    def _collect_dependents(self, owner_uid: str) -> None:
        """The garbage collector: delete objects whose every owner is gone (background propagation)."""
        live_uids = {
            obj.raw["metadata"]["uid"] for obj in self._objects.values() if not obj.deleted
        }
        dependents = [
            key
            for key, obj in list(self._objects.items())
            if not obj.deleted
            and any(ref.get("uid") == owner_uid for ref in obj.raw["metadata"].get("ownerReferences") or [])
            and not any(ref.get("uid") in live_uids for ref in obj.raw["metadata"].get("ownerReferences") or [])
        ]
        for key in dependents:
            if self._current(key) is not None:
                self._delete(key, cascade=True)

    # --- /scale ------------------------------------------------------------------------------------

    def _scale_of(self, resource: kmock.resource, obj: JSON) -> JSON:
        _, _, subresources = self._kinds[resource]
        if "scale" not in subresources:
            raise ApiError(404, "NotFound", f"{resource.plural} has no scale subresource")
        status = obj.get("status") or {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                key: obj["metadata"][key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in obj["metadata"]
            },
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
            "status": {"replicas": status.get("replicas", 0), "selector": status.get("selector", "")},
        }

    def _set_scale(self, request: kmock.Request, key: tuple[Any, ...], old: JSON, scale: Any) -> JSON:
        assert request.resource is not None
        replicas = ((scale or {}).get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, "Invalid", "spec.replicas must be a non-negative integer")
        new = copy.deepcopy(old)
        new.setdefault("spec", {})["replicas"] = replicas
        updated = self._update(request.resource, key, old, new, subresource=None,
                               manager=self._manager(request), operation="Update")
        return self._scale_of(request.resource, updated)

    # --- watch -------------------------------------------------------------------------------------

    def _matcher(self, request: kmock.Request) -> Callable[[JSON], bool]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        namespace = request.namespace
        name = request.name

        def match(obj: JSON) -> bool:
            metadata = obj.get("metadata") or {}
            return (
                (namespace is None or metadata.get("namespace") == namespace)
                and (name is None or metadata.get("name") == name)
                and labels(metadata.get("labels") or {})
                and fields(obj)
            )

        return match

    async def _watch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None and request._raw_request is not None
        match = self._matcher(request)
        since = request.params.get("resourceVersion", "")
        timeout = float(request.params.get("timeoutSeconds") or 1800)
        watch = _Watch(request.resource, request.namespace, match, asyncio.Queue())
        async with self._state_lock:
            if since in ("", "0"):
                backlog = [
                    (self._revision, {"type": "ADDED", "object": copy.deepcopy(obj.raw)})
                    for (res, _, _), obj in self._objects.items()
                    if res == request.resource and not obj.deleted and match(obj.raw)
                ]
            else:
                oldest = self._events[0][0] if self._events else self._revision + 1
                if int(since) < oldest - 1 and int(since) < self._revision:
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({oldest})")
                backlog = [
                    (revision, event)
                    for revision, resource, event in self._events
                    if revision > int(since) and resource == request.resource and match(event["object"])
                ]
            self._watches.append(watch)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(request._raw_request)
            for _, event in backlog:
                await response.write(json.dumps(event).encode() + b"\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            transport = request._raw_request.transport
            while loop.time() < deadline and transport is not None and not transport.is_closing():
                try:
                    _, event = await asyncio.wait_for(watch.queue.get(), timeout=1.0)
                except TimeoutError:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._watches.remove(watch)
        return response

    # --- the fake controllers ------------------------------------------------------------------------

    def _after_write(self, key: tuple[Any, ...], obj: JSON) -> None:
        resource = key[0]
        if resource.group == "apps" and resource.plural == "deployments":
            generation = obj["metadata"].get("generation", 1)
            if (obj.get("status") or {}).get("observedGeneration") != generation:
                self._spawn(self._fake_deployment_controller(key, generation))
        elif resource.group == "autoscaling" and resource.plural == "horizontalpodautoscalers":
            self._fake_hpa_controller(obj)

    def _spawn(self, coroutine: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # writes from tests outside a loop: no controllers then
            coroutine.close()
            return
        self._controller_tasks.add(task)
        task.add_done_callback(self._controller_tasks.discard)

    async def _fake_deployment_controller(self, key: tuple[Any, ...], generation: int) -> None:
        """FAKE: pretend the ReplicaSet rolled out and every pod became ready after ``ready_delay``."""
        await asyncio.sleep(self.ready_delay)
        async with self._state_lock:
            current = self._current(key)
            if current is None or current["metadata"].get("generation") != generation:
                return
            replicas = int((current.get("spec") or {}).get("replicas", 1))
            status = {
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                     "message": "Deployment has minimum availability.", "lastUpdateTime": _now(),
                     "lastTransitionTime": _now()},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                     "message": "ReplicaSet has successfully progressed.", "lastUpdateTime": _now(),
                     "lastTransitionTime": _now()},
                ],
            }
            if replicas == 0:
                for field in ("readyReplicas", "availableReplicas"):
                    status.pop(field)
            self._update(key[0], key, current, {**current, "status": status}, subresource="status",
                         manager=FAKE_DEPLOYMENT_CONTROLLER, operation="Update")

    def _fake_hpa_controller(self, hpa: JSON) -> None:
        """FAKE: keep the target Deployment's replicas within [minReplicas, maxReplicas] (no metrics)."""
        spec = hpa.get("spec") or {}
        target = spec.get("scaleTargetRef") or {}
        if target.get("kind") != "Deployment":
            return
        resource = kmock.resource(group="apps", version="v1", plural="deployments")
        key = self._key(resource, hpa["metadata"].get("namespace"), target.get("name", ""))
        current = self._current(key)
        if current is None:
            return
        replicas = int((current.get("spec") or {}).get("replicas", 1))
        wanted = min(max(replicas, int(spec.get("minReplicas", 1))), int(spec.get("maxReplicas", replicas)))
        if wanted != replicas:
            new = copy.deepcopy(current)
            new["spec"]["replicas"] = wanted
            self._update(resource, key, current, new, subresource=None, manager=FAKE_HPA_CONTROLLER,
                         operation="Update")

    async def settle(self) -> None:
        """Wait until the fake controllers have nothing left to do."""
        while self._controller_tasks:
            await asyncio.gather(*list(self._controller_tasks), return_exceptions=True)


#: The fields an ``immutable: true`` ConfigMap or Secret may never change again (``immutable`` included).
IMMUTABLE_FIELDS = ("immutable", "data", "binaryData", "stringData")


def _check_immutable(resource: kmock.resource, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """The API server's rule for immutable ConfigMaps and Secrets: only their metadata may change."""
    if resource.group != "" or resource.plural not in ("configmaps", "secrets") or old.get("immutable") is not True:
        return
    for field in IMMUTABLE_FIELDS:
        if new.get(field) != old.get(field):
            raise ApiError(422, "Invalid", f'{old.get("kind")} "{old["metadata"]["name"]}" is invalid: '
                           f"{field}: Forbidden: field is immutable when `immutable` is set")


def _spec_of(obj: Mapping[str, Any]) -> JSON:
    """Everything but metadata and status: what ``metadata.generation`` counts changes of."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


# --- running it ------------------------------------------------------------------------------------


def kubeconfig(url: str, *, namespace: str = "default") -> JSON:
    """A kubeconfig for a plain-HTTP server without authentication."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {"server": url}}],
        "users": [{"name": "sandbox", "user": {}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox",
                                                      "namespace": namespace}}],
        "current-context": "sandbox",
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Running:
    sandbox: Sandbox
    url: str
    kubeconfig_path: Path


@contextlib.asynccontextmanager
async def serve(
    kubeconfig_path: Path, *, port: int = 0, ready_delay: float = 0.3, namespaces: tuple[str, ...] = ("default",)
) -> AsyncIterator[Running]:
    """Start the sandbox on a loopback port and write a kubeconfig for it."""
    sandbox = Sandbox(ready_delay=ready_delay)
    async with sandbox, kmock.Server(sandbox, port=port or None) as server:
        url = f"http://127.0.0.1:{server.port}"
        await asyncio.to_thread(kubeconfig_path.write_text, yaml.safe_dump(kubeconfig(url)))
        namespace_resource = kmock.resource(group="", version="v1", plural="namespaces")
        async with sandbox._state_lock:
            for namespace in namespaces:
                sandbox._create(namespace_resource, None, {"metadata": {"name": namespace}}, None)
        try:
            yield Running(sandbox, url, kubeconfig_path)
        finally:
            for task in list(sandbox._controller_tasks):
                task.cancel()


class SandboxThread:
    """The sandbox on its own event loop in a background thread (for synchronous callers)."""

    def __init__(self, kubeconfig_path: Path, *, port: int = 0, ready_delay: float = 0.3) -> None:
        self._path, self._port, self._delay = kubeconfig_path, port, ready_delay
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="sandbox", daemon=True)
        self.running: Running | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._path, port=self._port, ready_delay=self._delay) as running:
            self.running = running
            self._started.set()
            await self._stop.wait()

    def __enter__(self) -> Running:
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the sandbox did not start within 30 s")
        assert self.running is not None
        return self.running

    def __exit__(self, *_: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
