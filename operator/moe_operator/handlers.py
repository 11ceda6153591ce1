"""kopf wiring only: settings, the MoERouter handlers, the child watches and the timers.

Every handler takes the per-MoERouter lock, reads the MoERouter afresh under it (the body kopf
passed may predate a write made while the handler waited: a predictive tick's floor and condition),
and calls into ``reconcile`` (the predictive timer queries Prometheus first and takes the lock only to
write what it found); nothing here computes children or status. Timer periods come from the
environment so tests can run fast:
``MOE_OPERATOR_RESYNC_SECONDS`` (drift timer, default 300), ``MOE_OPERATOR_PREDICTIVE_TICK_SECONDS``
(how often the predictive timer checks whether its per-object interval is due, default 10) and
``MOE_OPERATOR_WATCH_TIMEOUT_SECONDS`` (server-side watch timeout, default 600) and
``MOE_OPERATOR_RETRY_BASE_SECONDS`` (first retry delay for a Degraded MoERouter, doubling up to 300).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from moe_operator import api, reconcile
from moe_operator.children import CONFIG_MAP, DEPLOYMENT, HPA, NETWORK_POLICY, PDB, SERVICE
from moe_operator.kube import Kube
from moe_operator.labels import ANNOTATION_PREFIX, FINALIZER, MANAGED_BY_LABEL, OPERATOR_NAME
from moe_operator.phase import router_phase


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{variable} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{variable} must be positive, got {raw!r}")
    return value


RESYNC_SECONDS = _seconds("MOE_OPERATOR_RESYNC_SECONDS", 300.0)
PREDICTIVE_TICK_SECONDS = _seconds("MOE_OPERATOR_PREDICTIVE_TICK_SECONDS", 10.0)
WATCH_TIMEOUT_SECONDS = _seconds("MOE_OPERATOR_WATCH_TIMEOUT_SECONDS", 600.0)
RETRY_BASE_SECONDS = _seconds("MOE_OPERATOR_RETRY_BASE_SECONDS", 5.0)
MAX_BACKOFF_SECONDS = 300.0

ROUTERS = (api.GROUP, api.VERSION, api.PLURAL)
WATCHED_CHILDREN = (CONFIG_MAP, DEPLOYMENT, SERVICE, HPA, NETWORK_POLICY, PDB)
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={OPERATOR_NAME}"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # only Warning events: a healthy steady state writes nothing
    settings.watching.server_timeout = WATCH_TIMEOUT_SECONDS
    watch_only_our_children(settings)
    memo.kube = Kube.from_environment()


def watch_only_our_children(settings: kopf.OperatorSettings) -> None:
    """Let the API server filter the child watches: the operator never sees (nor caches) others' objects."""
    selectors = getattr(settings.watching, "label_selectors", None)
    if selectors is None:  # kopf before server-side selectors: the handlers' own label filter still applies
        logging.getLogger(__name__).warning(
            "this kopf has no settings.watching.label_selectors: every %s in scope is watched",
            "/".join(resource.plural for resource in WATCHED_CHILDREN),
        )
        return
    for resource in WATCHED_CHILDREN:
        selectors[resource.group, resource.version, resource.plural] = CHILD_SELECTOR


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        kube.close()


def _backoff(retry: int) -> float:
    return float(min(RETRY_BASE_SECONDS * 2**retry, MAX_BACKOFF_SECONDS))


def _report(body: kopf.Body | Mapping[str, Any], outcome: reconcile.Outcome) -> None:
    if outcome.problem is not None and outcome.new_problem:
        kopf.warn(body, reason=outcome.problem.reason, message=outcome.problem.message)  # type: ignore[arg-type]


@kopf.on.resume(*ROUTERS)
@kopf.on.create(*ROUTERS)
@kopf.on.update(*ROUTERS)
async def reconcile_router(
    body: kopf.Body, memo: kopf.Memo, retry: int, reason: str, namespace: str | None, name: str, **_: Any
) -> None:
    async with reconcile.lock_for(namespace or "", name):
        current = await reconcile.current_router(memo.kube, body)
        if current is None:
            return  # deleted (or being deleted) while waiting: the children go with the owner references
        outcome = await reconcile.reconcile(memo.kube, current, trigger=str(reason))
    _report(body, outcome)
    if outcome.problem is not None and outcome.invalid_spec:
        raise kopf.PermanentError(f"{outcome.problem.reason}: {outcome.problem.message}")
    if outcome.problem is not None:
        raise kopf.TemporaryError(f"{outcome.problem.reason}: {outcome.problem.message}", delay=_backoff(retry))


@kopf.on.delete(*ROUTERS, optional=True)
async def forget_router(namespace: str | None, name: str, **_: Any) -> None:
    reconcile.forget(namespace or "", name)  # the children go with the owner references


DRIFT_SPREAD_DONE = "drift_spread_done"


@kopf.timer(*ROUTERS, id="drift", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync(
    body: kopf.Body, memo: kopf.Memo, namespace: str | None, name: str,
    stopped: kopf.DaemonStopped | None = None, **_: Any,
) -> None:
    if not memo.get(DRIFT_SPREAD_DONE):
        # Every router's timer starts with the operator: without a spread, all of them resync in the same
        # second of every period (a burst of API calls at each). Each run is due an interval after the last.
        # Waiting on ``stopped``, not sleeping: kopf does not cancel a running timer when its object is deleted.
        memo[DRIFT_SPREAD_DONE] = True
        delay = router_phase(namespace or "", name) * RESYNC_SECONDS
        if stopped is None:  # called directly (tests), not as kopf's timer
            await asyncio.sleep(delay)
        elif await stopped.wait(delay):
            return
    async with reconcile.lock_for(namespace or "", name):
        current = await reconcile.current_router(memo.kube, body)
        if current is None:
            return
        outcome = await reconcile.reconcile(memo.kube, current, trigger="resync")
    _report(body, outcome)


def _predictive_enabled(spec: kopf.Spec, **_: Any) -> bool:
    autoscaling = spec.get("autoscaling") or {}
    return bool(autoscaling.get("enabled")) and (autoscaling.get("predictive") or {}).get("mode", "Off") != "Off"


@kopf.timer(*ROUTERS, id="predictive", interval=PREDICTIVE_TICK_SECONDS, when=_predictive_enabled)
async def predictive(body: kopf.Body, memo: kopf.Memo, namespace: str | None, name: str, **_: Any) -> None:
    now = datetime.now(tz=UTC)
    if not reconcile.predictive_due(memo, body, now):
        return
    # The lock is taken for the writes only: a spec edit never waits for a Prometheus query.
    lock = reconcile.lock_for(namespace or "", name)
    outcome = await reconcile.predictive_tick(memo.kube, body, memo, now=now, lock=lock)
    _report(body, outcome)


async def on_child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    kube: Kube | None = memo.get("kube")
    if kube is None:
        return
    outcome = await reconcile.refresh_from_child(kube, body, deleted=type == "DELETED")
    if outcome is not None and outcome.router is not None:
        # A problem a child's event finds first (a spec edit racing its rollout) gets its Warning event here:
        # the MoERouter's own handler, reading the status this wrote, sees nothing new to report.
        _report(outcome.router, outcome)


for _child in WATCHED_CHILDREN:
    kopf.on.event(
        _child.group,
        _child.version,
        _child.plural,
        id=f"watch-{_child.plural}",
        labels={MANAGED_BY_LABEL: OPERATOR_NAME},
    )(on_child_event)

del _child
