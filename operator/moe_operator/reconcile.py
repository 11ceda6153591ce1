"""Level-based reconcile of one MoERouter: desired vs actual, apply only differences, prune, report.

Every entry point (create/update/resume, the drift timer, the child watches, the predictive timer)
comes through here, serialised per MoERouter by one lock, so they never fight. A reconcile whose
children and status already match sends no write request at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

from moe_operator import api, drift
from moe_operator.api import MoERouterSpec, SpecError, parse_spec
from moe_operator.children import (
    CHILD_RESOURCES,
    CONFIG_MAP,
    DEPLOYMENT,
    MONITORING_GROUP,
    ChildResource,
    Owner,
    child_name,
    desired_children,
    desired_config_map,
    is_config_map_name,
    mounted_config_maps,
)
from moe_operator.condition_metrics import condition_metrics
from moe_operator.kube import MOEROUTERS, Kube, KubeError
from moe_operator.labels import FIELD_MANAGER, HANDOVER_FIELD_MANAGER, MANAGED_BY_LABEL, OPERATOR_NAME, ROUTER_LABEL
from moe_operator.scaling.metrics import scaling_metrics
from moe_operator.status import DEGRADED, Problem, desired_status, status_patch

RECONCILES = Counter(
    "moe_operator_reconciles_total", "Reconciles of MoERouters by trigger and result.", ["trigger", "result"]
)
CHILD_WRITES = Counter(
    "moe_operator_child_writes_total", "Children applied or pruned, by kind and action.", ["kind", "action"]
)
RECONCILE_SECONDS = Histogram("moe_operator_reconcile_seconds", "Duration of one reconcile.", ["trigger"])

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one reconcile did; ``problem`` set means the MoERouter is Degraded."""

    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    status_written: bool = False
    problem: Problem | None = None
    new_problem: bool = False  # the Degraded reason/message differs from what the status said
    invalid_spec: bool = False
    #: The MoERouter reconciled (as read then): what a Warning event about ``problem`` is attached to.
    router: Mapping[str, Any] | None = None

    @property
    def writes(self) -> int:
        return len(self.applied) + len(self.pruned) + int(self.status_written)


_locks: collections.defaultdict[tuple[str, str], asyncio.Lock] = collections.defaultdict(asyncio.Lock)


#: Child kinds the operator may not read (RBAC): skipped when pruning for the rest of the process's life.
_unreadable_kinds: set[str] = set()

#: (kind, namespace, name) -> the resourceVersion of a child last seen in sync (our apply or our check).
_in_sync: dict[tuple[str, str, str], str] = {}

#: (namespace, router, uid) -> the ConfigMap left alone by the last prune: a settled router skips the list.
_config_maps_pruned: dict[tuple[str, str, str], str] = {}

#: (kind, namespace, router, uid) of children the spec does not want and that are known gone (pruned, or
#: found absent): later reconciles skip the GET (two to five per reconcile and router otherwise). Cleared
#: for a kind as soon as the spec wants it again; a new process checks each once.
_known_absent: set[tuple[str, str, str, str]] = set()


def lock_for(namespace: str, name: str) -> asyncio.Lock:
    """One lock per MoERouter: reconciles of the same object never interleave."""
    return _locks[(namespace, name)]


async def current_router(kube: Kube, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The MoERouter as the API server holds it now (None once it is gone or being deleted).

    Handlers call this under the object's lock: the body an event or timer was started with can
    predate what another handler wrote while this one waited for the lock (a predictive tick's
    floor and PredictionReady condition), and reconciling from it would undo those writes.
    """
    metadata = body.get("metadata") or {}
    current = await kube.get(MOEROUTERS, metadata.get("namespace"), metadata["name"])
    if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
        return None  # being deleted: the owner references take the children, nothing to reconcile
    return current


def forget(namespace: str, name: str) -> None:
    """Drop what the process remembers about a deleted MoERouter (locks, sync marks, metric series)."""
    _locks.pop((namespace, name), None)
    for pruned in [key for key in _config_maps_pruned if key[:2] == (namespace, name)]:
        del _config_maps_pruned[pruned]
    for absent in [key for key in _known_absent if key[1:3] == (namespace, name)]:
        _known_absent.discard(absent)
    scaling_metrics().forget(namespace, name)
    condition_metrics().forget(namespace, name)
    for resource in CHILD_RESOURCES:
        if resource != CONFIG_MAP:
            _in_sync.pop((resource.kind, namespace, child_name(resource, name)), None)
    config_maps = [key for key in _in_sync if key[:2] == (CONFIG_MAP.kind, namespace)]
    for key in config_maps:
        if is_config_map_name(name, key[2]):
            del _in_sync[key]


def _remember(kind: str, obj: Mapping[str, Any] | None) -> None:
    metadata = (obj or {}).get("metadata") or {}
    if metadata.get("resourceVersion"):
        key = (kind, metadata.get("namespace") or "default", metadata.get("name") or "")
        _in_sync[key] = str(metadata["resourceVersion"])


def already_judged(child: Mapping[str, Any]) -> bool:
    """Whether this exact version of a child was already seen in sync (e.g. the echo of our own apply)."""
    metadata = child.get("metadata") or {}
    key = (str(child.get("kind")), metadata.get("namespace") or "default", metadata.get("name") or "")
    version = metadata.get("resourceVersion")
    return version is not None and _in_sync.get(key) == str(version)


def predictive_floor(spec: MoERouterSpec, status: Mapping[str, Any]) -> int | None:
    """The minReplicas the predictive controller holds in effect (read back after a restart)."""
    if not spec.autoscaling.enabled or spec.autoscaling.predictive.mode != "Active":
        return None
    prediction = status.get("prediction") or {}
    value = prediction.get("appliedMinReplicas")
    return int(value) if isinstance(value, int) else None


def forget_scaling_series(namespace: str, name: str, spec: MoERouterSpec) -> None:
    """Drop the predictive metrics nothing updates any more: all of them once the forecast stops (mode Off
    or autoscaling disabled: the timer no longer runs), the held floor's outside Active mode."""
    autoscaling = spec.autoscaling
    if not autoscaling.enabled or autoscaling.predictive.mode == "Off":
        scaling_metrics().forget(namespace, name)
    elif autoscaling.predictive.mode != "Active":
        scaling_metrics().forget_floor(namespace, name)


def _owned_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid and ref.get("kind") == api.KIND for ref in references)


async def _missing_secret_key(
    kube: Kube, namespace: str, wanted: list[tuple[str, str, str]]
) -> Problem | None:
    """The first (field path, Secret, key) whose Secret or key does not exist or is not text, as a Problem."""
    secrets: dict[str, dict[str, bytes] | None] = {}
    for path, name, key in wanted:
        if name not in secrets:
            try:
                secrets[name] = await kube.read_secret(namespace, name)
            except KubeError as exc:
                if exc.reason != "InvalidSecret":
                    raise
                return Problem("SecretKeyInvalid", f"{path}: {exc.message}")
        data = secrets[name]
        if data is None:
            return Problem("SecretNotFound", f"{path}: Secret {namespace}/{name} does not exist")
        if key not in data:
            return Problem("SecretKeyNotFound", f"{path}: Secret {namespace}/{name} has no key {key!r}")
        try:
            data[key].decode("utf-8")
        except UnicodeDecodeError:
            return Problem("SecretKeyInvalid", f"{path}: key {key!r} of Secret {namespace}/{name} is not UTF-8 text")
    return None


async def check_references(kube: Kube, namespace: str, spec: MoERouterSpec) -> Problem | None:
    """The Secret key the pods need (runtime.apiKeySecretRef) must exist before they are rolled.

    Prometheus credentials are not checked here: they matter to the forecast only (PredictionReady).
    """
    runtime_ref = spec.runtime.api_key_secret_ref
    if runtime_ref is None:
        return None
    return await _missing_secret_key(
        kube, namespace, [("spec.runtime.apiKeySecretRef", runtime_ref.name, runtime_ref.key)]
    )


async def check_prometheus_references(kube: Kube, namespace: str, spec: MoERouterSpec) -> Problem | None:
    """The Secret keys the forecast's Prometheus client needs must exist."""
    predictive = spec.autoscaling.predictive
    if predictive.mode == "Off" or predictive.prometheus is None:
        return None
    prometheus = predictive.prometheus
    base = "spec.autoscaling.predictive.prometheus"
    wanted: list[tuple[str, str, str]] = []  # (field path, secret, key)
    if prometheus.bearer_token_secret_ref is not None:
        ref = prometheus.bearer_token_secret_ref
        wanted.append((f"{base}.bearerTokenSecretRef", ref.name, ref.key))
    if prometheus.basic_auth_secret_ref is not None:
        basic = prometheus.basic_auth_secret_ref
        wanted.append((f"{base}.basicAuthSecretRef", basic.name, basic.username_key))
        wanted.append((f"{base}.basicAuthSecretRef", basic.name, basic.password_key))
    if prometheus.tls.ca_secret_ref is not None:
        ref = prometheus.tls.ca_secret_ref
        wanted.append((f"{base}.tls.caSecretRef", ref.name, ref.key))
    return await _missing_secret_key(kube, namespace, wanted)


async def write_status(
    kube: Kube,
    body: Mapping[str, Any],
    *,
    spec: MoERouterSpec | None,
    deployment: Mapping[str, Any] | None,
    problem: Problem | None,
    now: datetime,
) -> bool:
    """Patch the status only where it differs; True when a write was sent."""
    metadata = body.get("metadata") or {}
    current = dict(body.get("status") or {})
    desired = desired_status(
        name=metadata["name"],
        spec=spec,
        generation=metadata.get("generation"),
        deployment=deployment,
        current=current,
        problem=problem,
        now=now,
    )
    namespace = metadata.get("namespace") or "default"
    condition_metrics().export(namespace, metadata["name"], desired.get("conditions") or [])
    patch = status_patch(current, desired)
    if not patch:
        return False
    await kube.patch_status(MOEROUTERS, metadata.get("namespace"), metadata["name"], patch)
    return True


def _degraded(status: Mapping[str, Any]) -> tuple[str, str] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == DEGRADED and condition.get("status") == "True":
            return str(condition.get("reason")), str(condition.get("message"))
    return None


async def reconcile(
    kube: Kube,
    body: Mapping[str, Any],
    *,
    trigger: str,
    now: datetime | None = None,
    min_replicas_floor: int | None = None,
) -> Outcome:
    """Bring one MoERouter's children and status in line with its spec (``body`` is the MoERouter)."""
    moment = now or datetime.now(tz=UTC)
    owner = Owner.from_body(body)
    status = body.get("status") or {}
    outcome = Outcome(router=body)
    with RECONCILE_SECONDS.labels(trigger=trigger).time():
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            # Never touch running children for a spec the schema let through but that cannot work.
            outcome.problem = Problem("InvalidSpec", str(exc))
            outcome.invalid_spec = True
            outcome.new_problem = _degraded(status) != ("InvalidSpec", str(exc))
            outcome.status_written = await write_status(
                kube, body, spec=None, deployment=await kube.get(DEPLOYMENT, owner.namespace, owner.name),
                problem=outcome.problem, now=moment,
            )
            RECONCILES.labels(trigger=trigger, result="invalid").inc()
            return outcome

        forget_scaling_series(owner.namespace, owner.name, spec)
        problem = await check_references(kube, owner.namespace, spec)
        deployment: Mapping[str, Any] | None
        if problem is not None:
            deployment = await kube.get(DEPLOYMENT, owner.namespace, owner.name)
        else:
            floor = min_replicas_floor if min_replicas_floor is not None else predictive_floor(spec, status)
            deployment, problem = await _apply_children(kube, owner, spec, floor, outcome)
        outcome.problem = problem
        if problem is not None:
            outcome.new_problem = _degraded(status) != (problem.reason, problem.message)
        outcome.status_written = await write_status(
            kube, body, spec=spec, deployment=deployment, problem=problem, now=moment
        )
    RECONCILES.labels(trigger=trigger, result="degraded" if problem else "ok").inc()
    if outcome.writes:
        log.info(
            "reconciled %s/%s (%s): applied %s, pruned %s, status %s",
            owner.namespace, owner.name, trigger, outcome.applied or "-", outcome.pruned or "-",
            "written" if outcome.status_written else "unchanged",
        )
    return outcome


def _needs_replicas_handover(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether applying ``desired`` would drop a spec.replicas the operator's own apply still owns.

    The API server removes a field its only applier stops applying, and defaulting then sets 1:
    turning autoscaling on would cut a running router to one pod before the HPA acts.
    """
    if "replicas" in (desired.get("spec") or {}) or "replicas" not in (actual.get("spec") or {}):
        return False
    entries = (actual.get("metadata") or {}).get("managedFields") or []
    if any(entry.get("manager") == HANDOVER_FIELD_MANAGER for entry in entries):
        return False
    ours = next(
        (e for e in entries if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply"), None
    )
    if ours is None:
        return False  # never applied by us: nothing of ours to drop
    fields = ours.get("fieldsV1") or {}
    return not fields or "f:replicas" in (fields.get("f:spec") or {})  # no field set recorded: assume owned


async def _hand_over_replicas(kube: Kube, actual: Mapping[str, Any]) -> None:
    """Co-own spec.replicas at its live value under a second manager, so the operator's next apply keeps it."""
    metadata = actual.get("metadata") or {}
    handover = {
        "apiVersion": DEPLOYMENT.api_version,
        "kind": DEPLOYMENT.kind,
        "metadata": {"name": metadata.get("name"), "namespace": metadata.get("namespace")},
        "spec": {"replicas": (actual.get("spec") or {})["replicas"]},
    }
    try:
        await kube.apply(DEPLOYMENT, handover, field_manager=HANDOVER_FIELD_MANAGER, force=False)
    except KubeError as exc:
        if exc.status != 409:
            raise
        return  # the value changed under us (the HPA scaled): its new owner keeps it, nothing to hold
    CHILD_WRITES.labels(kind=DEPLOYMENT.kind, action="handover").inc()


def _rbac_denied(exc: KubeError) -> bool:
    """A 403 from authorization (quota and admission webhooks answer 403 too, worded otherwise)."""
    return exc.status == 403 and " cannot " in exc.message


def _not_permitted(resource: ChildResource, verb: str, name: str, namespace: str) -> Problem:
    """The operator's RBAC does not allow a child it needs; the message names the grant that is missing."""
    target = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    if resource.group == MONITORING_GROUP:
        option = f"spec.monitoring.{resource.kind[0].lower()}{resource.kind[1:]}"
        return Problem(
            "MonitoringNotPermitted",
            f"{option} asks for {resource.kind} {namespace}/{name} but the operator may not {verb} {target}: "
            f"set the chart value rbac.monitoringChildren=true (grants get, list, watch, create, patch, delete "
            f"on {target}) or turn {option} off",
        )
    return Problem(
        "ChildNotPermitted",
        f"the operator may not {verb} {target} ({resource.kind} {namespace}/{name}): "
        "its (Cluster)Role lacks that rule; reinstall the chart or config/rbac",
    )


async def _apply_children(
    kube: Kube, owner: Owner, spec: MoERouterSpec, floor: int | None, outcome: Outcome
) -> tuple[Mapping[str, Any] | None, Problem | None]:
    desired = desired_children(owner, spec, min_replicas_floor=floor)
    desired_kinds = {child["kind"] for child in desired}
    resources = {resource.kind: resource for resource in CHILD_RESOURCES}
    deployment: Mapping[str, Any] | None = None
    problems: list[Problem] = []  # the first one is reported: later ones are often its consequences
    conflicted: set[str] = set()
    for child in desired:
        resource = resources[child["kind"]]
        name = child["metadata"]["name"]
        if resource == DEPLOYMENT and CONFIG_MAP.kind in conflicted:
            # Pods would mount the foreign ConfigMap and run someone else's router.yaml.
            deployment = await kube.get(DEPLOYMENT, owner.namespace, name)
            continue
        try:
            actual = await kube.get(resource, owner.namespace, name)
        except KubeError as exc:
            if exc.status == 403:
                problems.append(_not_permitted(resource, "get", name, owner.namespace))
                continue
            raise
        if actual is not None and not _owned_by(actual, owner):
            conflicted.add(resource.kind)
            problems.append(Problem(
                "ChildConflict", f"{child['kind']} {owner.namespace}/{name} exists and is not owned by this MoERouter"
            ))
            continue
        reasons = drift.child_drift(child, actual)
        if reasons:
            log.debug("%s %s/%s drifted: %s", child["kind"], owner.namespace, name, "; ".join(reasons[:5]))
            if resource == DEPLOYMENT and actual is not None and _needs_replicas_handover(child, actual):
                await _hand_over_replicas(kube, actual)
            try:
                actual = await kube.apply(resource, drift.stamped(child))
            except KubeError as exc:
                if exc.status == 404 and resource.group == MONITORING_GROUP:
                    problems.append(Problem(
                        "PrometheusOperatorMissing",
                        f"spec.monitoring asks for a {child['kind']} but its CRD is not installed",
                    ))
                    continue
                if _rbac_denied(exc):
                    problems.append(_not_permitted(resource, "patch", name, owner.namespace))
                    continue
                if exc.status in (400, 403, 422):  # 403 here: a quota or an admission webhook said no
                    problems.append(Problem("ApplyRejected", f"{child['kind']} {name}: {exc.reason}: {exc.message}"))
                    continue
                raise
            outcome.applied.append(f"{child['kind']}/{name}")
            CHILD_WRITES.labels(kind=child["kind"], action="apply").inc()
            if resource == CONFIG_MAP:  # a new config: the one it replaces needs pruning, even if reverted to
                _config_maps_pruned.pop((owner.namespace, owner.name, owner.uid), None)
        _remember(child["kind"], actual)
        if resource == DEPLOYMENT:
            deployment = actual
    for resource in CHILD_RESOURCES:
        absent = (resource.kind, owner.namespace, owner.name, owner.uid)
        if resource.kind in desired_kinds:
            _known_absent.discard(absent)
            continue
        if resource.kind in _unreadable_kinds or absent in _known_absent:
            continue
        name = child_name(resource, owner.name)
        try:
            stale = await kube.get(resource, owner.namespace, name)
        except KubeError as exc:
            if exc.status == 403:  # not granted (e.g. monitoring kinds): nothing of ours to prune, ask no more
                _unreadable_kinds.add(resource.kind)
                continue
            raise
        if stale is not None and _owned_by(stale, owner) and await kube.delete(resource, owner.namespace, name):
            outcome.pruned.append(f"{resource.kind}/{name}")
            CHILD_WRITES.labels(kind=resource.kind, action="prune").inc()
        _known_absent.add(absent)  # nothing of ours left (a foreign object of that name is never ours to prune)
    if CONFIG_MAP.kind not in conflicted and deployment is not None:
        current = next(child["metadata"]["name"] for child in desired if child["kind"] == CONFIG_MAP.kind)
        await prune_config_maps(kube, owner, current, deployment, outcome)
    return deployment, (problems[0] if problems else None)


def rollout_complete(deployment: Mapping[str, Any]) -> bool:
    """Whether every pod of the Deployment runs its current template (no old ReplicaSet has pods left).

    As ``kubectl rollout status``: the controller saw the latest generation and the updated, total and
    available replica counts all equal spec.replicas (zero replicas: no pod at all).
    """
    metadata = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    observed, generation = status.get("observedGeneration"), metadata.get("generation")
    if observed is None or (generation is not None and observed < generation):
        return False
    wanted = int(spec.get("replicas", 1))
    counts = (status.get("updatedReplicas"), status.get("replicas"), status.get("availableReplicas"))
    return all(int(count or 0) == wanted for count in counts)


async def prune_config_maps(
    kube: Kube, owner: Owner, current: str, deployment: Mapping[str, Any], outcome: Outcome
) -> None:
    """Delete this router's ConfigMaps other than ``current`` once no pod can mount them again.

    Old pods keep reading their own (immutable) ConfigMap while a rollout runs or is stuck, and a
    restarted or added old pod must still find it: so only a complete rollout of a template that
    mounts ``current`` frees the others. Deleting the MoERouter removes them all (owner references).
    """
    if current not in mounted_config_maps(deployment) or not rollout_complete(deployment):
        return
    key = (owner.namespace, owner.name, owner.uid)
    if _config_maps_pruned.get(key) == current:
        return  # pruned already for this config: a settled router sends no list request
    selector = f"{MANAGED_BY_LABEL}={OPERATOR_NAME},{ROUTER_LABEL}={owner.name}"
    for config_map in await kube.list(CONFIG_MAP, owner.namespace, label_selector=selector):
        name = str((config_map.get("metadata") or {}).get("name"))
        if name == current or not _owned_by(config_map, owner):
            continue
        try:
            deleted = await kube.delete(CONFIG_MAP, owner.namespace, name)
        except KubeError as exc:
            if not _rbac_denied(exc):
                raise
            # Harmless to serving: the old ConfigMaps stay (retried next time) until the MoERouter is deleted.
            log.warning("cannot prune ConfigMap %s/%s (%s): grant delete on configmaps", owner.namespace, name,
                        exc.message)
            return
        if deleted:
            outcome.pruned.append(f"{CONFIG_MAP.kind}/{name}")
            CHILD_WRITES.labels(kind=CONFIG_MAP.kind, action="prune").inc()
    _config_maps_pruned[key] = current


async def refresh_from_child(kube: Kube, child: Mapping[str, Any], *, deleted: bool) -> Outcome | None:
    """A child changed or vanished: restore it if it drifted, refresh status if it is the Deployment.

    Returns None when the child has no live MoERouter owner.
    """
    metadata = child.get("metadata") or {}
    namespace = metadata.get("namespace") or "default"
    if not deleted and already_judged(child):
        return Outcome()
    reference = next(
        (ref for ref in metadata.get("ownerReferences") or [] if ref.get("kind") == api.KIND and ref.get("controller")),
        None,
    )
    if reference is None:
        return None
    async with lock_for(namespace, reference["name"]):
        owner_body = await kube.get(MOEROUTERS, namespace, reference["name"])
        if owner_body is None or (owner_body.get("metadata") or {}).get("uid") != reference.get("uid"):
            return None
        if (owner_body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        try:
            spec = parse_spec(owner_body.get("spec"))
        except SpecError:
            return None  # the owner's own handlers report an invalid spec
        owner = Owner.from_body(owner_body)
        floor = predictive_floor(spec, owner_body.get("status") or {})
        wanted = next(
            (
                candidate
                for candidate in desired_children(owner, spec, min_replicas_floor=floor)
                if candidate["kind"] == child.get("kind") and candidate["metadata"]["name"] == metadata.get("name")
            ),
            None,
        )
        resource = next((r for r in CHILD_RESOURCES if r.kind == child.get("kind")), None)
        if resource is None:
            return Outcome()
        if resource == CONFIG_MAP and wanted is None:
            return Outcome()  # an older config (kept for old pods, or just pruned): nothing to restore
        # Events can queue up behind others: judge the child as it is now, not as the event saw it.
        current = None if deleted else await kube.get(resource, namespace, str(metadata.get("name")))
        if current is None or (wanted is not None and drift.child_drift(wanted, current)):
            return await reconcile(kube, owner_body, trigger="child")
        _remember(resource.kind, current)
        if resource == DEPLOYMENT:
            degraded = _degraded(owner_body.get("status") or {})
            if degraded is not None and degraded[0] != "ProgressDeadlineExceeded":
                # A conflict, an RBAC refusal or a rejection is judged only by a whole reconcile.
                return await reconcile(kube, owner_body, trigger="child")
            outcome = Outcome(router=owner_body)
            problem = await check_references(kube, namespace, spec)
            if problem is not None:  # first seen here (a spec edit racing its rollout): the event is posted here
                outcome.problem = problem
                outcome.new_problem = _degraded(owner_body.get("status") or {}) != (problem.reason, problem.message)
            outcome.status_written = await write_status(
                kube, owner_body, spec=spec, deployment=current, problem=problem, now=datetime.now(tz=UTC)
            )
            # A finished rollout frees the ConfigMaps only old pods mounted.
            await prune_config_maps(kube, owner, desired_config_map(owner, spec)["metadata"]["name"], current, outcome)
            return outcome
        return Outcome()


# --- predictive scaling --------------------------------------------------------------------------

PREDICTIVE_LAST_TICK = "predictive_last_tick"
PREDICTIVE_STATE = "predictive_state"
PREDICTIVE_LAST_WRITE = "predictive_last_write"
#: A tick whose status differs only in what moves every tick (the predicted load, the backtest error,
#: the condition's message and the prediction's timestamp) writes it at most this often: each write is a
#: watch event for every client watching MoERouters (GitOps controllers, ``kubectl get -w``).
STATUS_REFRESH_SECONDS = 600.0
#: Prediction fields a tick may change without a write (within ``STATUS_REFRESH_SECONDS``).
_VOLATILE_PREDICTION_KEYS = frozenset({"predictedLoad", "backtestError", "updatedAt"})


def predictive_due(memo: Any, body: Mapping[str, Any], now: datetime) -> bool:
    """Whether this MoERouter's own interval (spec...predictive.intervalSeconds) has elapsed."""
    predictive = ((body.get("spec") or {}).get("autoscaling") or {}).get("predictive") or {}
    interval = float(predictive.get("intervalSeconds") or 60)
    last: datetime | None = memo.get(PREDICTIVE_LAST_TICK)
    return last is None or (now - last).total_seconds() >= interval


async def resolve_prometheus_auth(kube: Kube, namespace: str, spec: MoERouterSpec) -> tuple[Any, Problem | None]:
    """The scaling controller's PrometheusAuth from the referenced Secrets, or the problem with them."""
    from moe_operator.scaling.prometheus import PrometheusAuth, ca_bundle_problem

    prometheus = spec.autoscaling.predictive.prometheus
    problem = await check_prometheus_references(kube, namespace, spec)
    if prometheus is None or problem is not None:
        return None, problem

    async def value(name: str, key: str) -> str:
        data = await kube.read_secret(namespace, name)
        return (data or {})[key].decode("utf-8")  # checked above: present and text

    bearer = basic_user = basic_password = ca_pem = None
    if prometheus.bearer_token_secret_ref is not None:
        ref = prometheus.bearer_token_secret_ref
        bearer = (await value(ref.name, ref.key)).strip()
    if prometheus.basic_auth_secret_ref is not None:
        basic = prometheus.basic_auth_secret_ref
        basic_user = await value(basic.name, basic.username_key)
        basic_password = await value(basic.name, basic.password_key)
    if prometheus.tls.ca_secret_ref is not None:
        ref = prometheus.tls.ca_secret_ref
        ca_pem = await value(ref.name, ref.key)
        invalid = None if prometheus.tls.insecure_skip_verify else ca_bundle_problem(ca_pem)
        if invalid is not None:
            field = "spec.autoscaling.predictive.prometheus.tls.caSecretRef"
            return None, Problem(
                "SecretKeyInvalid", f"{field}: key {ref.key!r} of Secret {namespace}/{ref.name} {invalid}"
            )
    auth = PrometheusAuth(
        bearer_token=bearer,
        username=basic_user,
        password=basic_password,
        ca_pem=ca_pem,
        insecure_skip_verify=prometheus.tls.insecure_skip_verify,
    )
    return auth, None


def _wire(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "to_wire"):
        return dict(value.to_wire())
    if hasattr(value, "model_dump"):
        return dict(value.model_dump(by_alias=True, exclude_none=True, mode="json"))
    return {key: item for key, item in dict(value).items() if item is not None}


def _status_refresh_seconds(spec: MoERouterSpec, floor: int | None) -> float:
    """How long a tick that moves only the load may leave the status unwritten.

    While a floor above minReplicas is held, ``updatedAt`` is what a restarted operator counts the grace
    period and the stabilisation window from (``controller.restored_state``): refreshed at least every
    quarter of either, a restart ends them at most a quarter early.
    """
    if floor is None or floor <= spec.autoscaling.min_replicas:
        return STATUS_REFRESH_SECONDS
    predictive = spec.autoscaling.predictive
    quarter = min(predictive.grace_period_seconds, predictive.scale_down_stabilization_seconds) / 4
    return min(STATUS_REFRESH_SECONDS, quarter)


def _materially_changed(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether a predictive status write says something new: a condition's status or reason, or a
    prediction field other than the load, the backtest error and the timestamp (a floor, a model)."""
    def conditions(status: Mapping[str, Any]) -> dict[Any, tuple[Any, Any]]:
        return {c.get("type"): (c.get("status"), c.get("reason")) for c in status.get("conditions") or []}

    def stable(status: Mapping[str, Any]) -> dict[str, Any] | None:
        prediction = status.get("prediction")
        if prediction is None:
            return None
        return {key: value for key, value in prediction.items() if key not in _VOLATILE_PREDICTION_KEYS}

    return conditions(current) != conditions(desired) or stable(current) != stable(desired)


def _without_timestamp(prediction: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in prediction.items() if key != "updatedAt"}


async def predictive_tick(
    kube: Kube, body: Mapping[str, Any], memo: Any, *, now: datetime, lock: asyncio.Lock | None = None
) -> Outcome:
    """One forecast: status.prediction and PredictionReady, and in Active mode the HPA's minReplicas.

    The prediction is written only when something but its timestamp changed; ``appliedMinReplicas``
    is the floor every reconcile passes to the HPA builder, so reconcile and this timer agree.

    ``lock`` (the router's, from the timer) is taken only to write: the Prometheus query can take
    its whole timeout, and a spec edit of this router must not wait for it. Under the lock the
    MoERouter is read afresh; a forecast made for a spec that has changed since is dropped (the next
    tick makes one for the new spec).
    """
    from moe_operator.scaling.controller import restored_state, run_tick

    memo[PREDICTIVE_LAST_TICK] = now
    metadata = body.get("metadata") or {}
    namespace, name = metadata.get("namespace") or "default", metadata["name"]
    # kopf's body is a live view, replaced in place by every watch event: keep the spec this forecast is for.
    spec_at_start = copy.deepcopy(body.get("spec"))
    try:
        spec = parse_spec(spec_at_start)
    except SpecError:
        return Outcome()  # reported by the reconcile handlers
    auth, problem = await resolve_prometheus_auth(kube, namespace, spec)
    state = memo.get(PREDICTIVE_STATE)
    if state is None:  # this process's first tick: go on from the floor the status records
        state = memo[PREDICTIVE_STATE] = restored_state(spec, (body.get("status") or {}).get("prediction"), now)
    refused = (problem.reason, problem.message) if problem is not None else None
    result = await run_tick(spec, name=name, namespace=namespace, state=state, now=now, auth=auth, refused=refused)
    if lock is None:
        return await _write_prediction(kube, body, memo, spec, result, problem, now)
    async with lock:
        current = await current_router(kube, body)
        if current is None:
            return Outcome()
        if current.get("spec") != spec_at_start:
            # Edited while the query ran: the edit's reconcile applied the new spec; this forecast is for the
            # old one, and the series it just set may be ones the new spec has no use for (mode Off).
            with contextlib.suppress(SpecError):
                forget_scaling_series(namespace, name, parse_spec(current.get("spec")))
            return Outcome()
        return await _write_prediction(kube, current, memo, spec, result, problem, now)


async def _write_prediction(
    kube: Kube, body: Mapping[str, Any], memo: Any, spec: MoERouterSpec, result: Any, problem: Problem | None,
    now: datetime,
) -> Outcome:
    """The tick's ``result`` into the status of ``body`` (the MoERouter as it is now), and its floor onto the HPA."""
    from moe_operator.status import PREDICTION_READY, set_condition

    outcome = Outcome(router=body)
    metadata = body.get("metadata") or {}
    namespace, name = metadata.get("namespace") or "default", metadata["name"]
    current = dict(body.get("status") or {})
    conditions = [dict(condition) for condition in current.get("conditions") or []]
    prediction = dict(current.get("prediction") or {})
    floor: int | None = None
    if problem is not None:  # a Warning event names the Secret; the tick failed like a failed query
        outcome.problem = problem
        previous = next((c for c in conditions if c.get("type") == PREDICTION_READY), {})
        # The condition's message goes on with what happens to the floor: the Secret's part is its start.
        outcome.new_problem = previous.get("reason") != problem.reason or not str(
            previous.get("message", "")
        ).startswith(problem.message)
    fresh = _wire(result.prediction)
    if spec.autoscaling.predictive.mode == "Active" and result.min_replicas is not None:
        floor = int(result.min_replicas)
        fresh["appliedMinReplicas"] = floor
    else:
        fresh.pop("appliedMinReplicas", None)
    if _without_timestamp(fresh) != _without_timestamp(prediction):
        prediction = fresh
    conditions = set_condition(
        conditions, type=PREDICTION_READY, status=str(result.condition_status),
        reason=str(result.condition_reason), message=str(result.condition_message),
        generation=metadata.get("generation"), now=now,
    )
    desired = {**current, "conditions": conditions}
    condition_metrics().export(namespace, name, conditions)
    if prediction:
        desired["prediction"] = prediction
    patch = status_patch(current, desired)
    last_write: datetime | None = memo.get(PREDICTIVE_LAST_WRITE)
    due = last_write is None or (now - last_write).total_seconds() >= _status_refresh_seconds(spec, floor)
    if patch and (due or outcome.new_problem or _materially_changed(current, desired)):
        await kube.patch_status(MOEROUTERS, namespace, name, patch)
        memo[PREDICTIVE_LAST_WRITE] = now
        outcome.status_written = True
    if floor is not None and floor != predictive_floor(spec, current):
        applied = await reconcile(
            kube, {**body, "status": desired}, trigger="predictive", now=now, min_replicas_floor=floor
        )
        outcome.applied, outcome.pruned = applied.applied, applied.pruned
    return outcome
