"""The only Kubernetes client of the operator (besides kopf's own watch machinery).

It wraps the official ``kubernetes`` client (kubeconfig with exec plugins, or in-cluster config) and
calls it in a pool of threads of its own: other blocking work (Prometheus queries) cannot take the
threads API calls wait for. Objects are plain dicts addressed by (group, version, plural);
children are written with server-side apply under one field manager with forced conflicts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from moe_operator import api
from moe_operator.labels import FIELD_MANAGER

USER_AGENT = f"{FIELD_MANAGER}/0.1.0"
#: Threads (and pooled connections) for API calls: enough for reconciles of many MoERouters at once.
KUBE_WORKERS = 16

API_REQUESTS = Counter(
    "moe_operator_kubernetes_requests_total",
    "Kubernetes API requests sent by the operator's reconciler (kopf's own watches not included).",
    ["verb", "resource"],
)


class ResourceLike(Protocol):
    @property
    def group(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def plural(self) -> str: ...


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str


MOEROUTERS = Resource(api.GROUP, api.VERSION, api.PLURAL)
SECRETS = Resource("", "v1", "secrets")


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def object_path(resource: ResourceLike, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a collection or of one object."""
    base = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{resource.plural}"
    return f"{base}/{name}" if name else base


def load_configuration() -> Configuration:
    """In-cluster config inside a pod, otherwise the current kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        # Read $KUBECONFIG now: the client library captured it when it was imported.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return configuration


def _error(status: int | None, reason: str | None, body: bytes | str | None) -> KubeError:
    """A KubeError from a failed response, preferring the API server's Status reason and message."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    reason, message = str(reason or ""), text
    try:
        status_body = json.loads(text)
        reason, message = status_body.get("reason", reason), status_body.get("message", message)
    except (ValueError, AttributeError):
        pass
    return KubeError(int(status or 0), reason, message)


class Kube:
    """Async facade over the official client; every call runs in one of its ``workers`` threads.

    The client's connection pool should hold as many connections (``from_environment`` sizes it so):
    with fewer, the calls beyond it open a connection each and drop it afterwards.
    """

    def __init__(self, client: ApiClient, *, workers: int = KUBE_WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"a Kube needs at least one worker thread, got {workers}")
        self._client = client
        self._client.user_agent = USER_AGENT
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")

    @classmethod
    def from_environment(cls, *, workers: int = KUBE_WORKERS) -> Kube:
        configuration = load_configuration()
        configuration.connection_pool_maxsize = workers
        return cls(ApiClient(configuration), workers=workers)

    def close(self) -> None:
        """Stop taking calls and close the connections (calls in flight end with their own timeout)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, _ = self._client.param_serialize(
                method,
                path,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
            raw = response.read()
        except ApiException as exc:
            raise _error(exc.status, exc.reason, exc.body) from None
        except OSError as exc:  # connection refused, DNS, TLS: urllib3 errors derive from it
            raise KubeError(0, "Unreachable", str(exc)) from None
        if not 200 <= response.status < 300:
            raise _error(response.status, response.reason, raw)
        return json.loads(raw) if raw else {}

    async def _request(self, verb: str, resource: ResourceLike, method: str, path: str, **kwargs: Any) -> Any:
        API_REQUESTS.labels(verb=verb, resource=resource.plural).inc()
        call = functools.partial(self._call, method, path, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def get(self, resource: ResourceLike, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result = await self._request("get", resource, "GET", object_path(resource, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(result)

    async def list(
        self, resource: ResourceLike, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._request("list", resource, "GET", object_path(resource, namespace), query=query)
        return list(result.get("items") or [])

    async def apply(
        self, resource: ResourceLike, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply under our field manager, taking over conflicting fields (force) unless told not to."""
        metadata = obj["metadata"]
        path = object_path(resource, metadata.get("namespace"), metadata["name"])
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        result = await self._request(
            "patch",
            resource,
            "PATCH",
            path,
            query=query,
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )
        return dict(result)

    async def delete(self, resource: ResourceLike, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents collected by the garbage collector); False if absent."""
        try:
            await self._request(
                "delete",
                resource,
                "DELETE",
                object_path(resource, namespace, name),
                body={"propagationPolicy": "Background"},
                content_type="application/json",
            )
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, resource: ResourceLike, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """JSON-merge-patch the /status subresource; None when the object is gone."""
        try:
            result = await self._request(
                "patch",
                resource,
                "PATCH",
                object_path(resource, namespace, name) + "/status",
                body={"status": dict(patch)},
                content_type="application/merge-patch+json",
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(result)

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's data, base64-decoded to bytes; None when the Secret does not exist.

        Nothing is decoded to text here: a Secret may hold binary keys (a keystore, a DER certificate)
        next to the one a MoERouter references, and only the referenced key has to be text.
        """
        secret = await self.get(SECRETS, namespace, name)
        if secret is None:
            return None
        decoded: dict[str, bytes] = {}
        for key, value in (secret.get("data") or {}).items():
            try:
                decoded[key] = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise KubeError(422, "InvalidSecret", f"key {key!r} of Secret {name!r} is not base64") from None
        decoded.update({key: str(value).encode() for key, value in (secret.get("stringData") or {}).items()})
        return decoded
