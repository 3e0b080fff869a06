"""Writing a resource's status: conditions merged one way for every kind, the derived Ready, an
Event when Ready moves, and how every reconcile ends (`conclude`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from k2_operator import conditions
from k2_operator.conditions import Condition
from k2_operator.handlers import backoff, metrics, runtime
from k2_operator.handlers.events import event
from k2_operator.models import KindInfo

M = TypeVar("M", bound=BaseModel)

PAUSE_ANNOTATION = "k2.io/pause-reconciliation"
PAUSED = "ReconciliationPaused"

# Not ready yet for an expected reason (a dependency is still being created): a Normal Event.
WAITING_REASONS = frozenset({"Reconciling", "TableNotFound", "TableNotReady", "SubjectNotFound", "SecretNotFound"})


def write_status(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition], *, required: Sequence[str],
                 observed_state: Mapping[str, Any], ready_override: Condition | None = None,
                 announce: bool = True, remove: Sequence[str] = ()) -> Condition:
    """Merge `checks`, the derived Synced (applied) and Ready (applied and serving) into the
    resource's conditions and write the status; `ready_override` (a conflict, a refusal) fails both.

    An Event is posted when Ready changes status or reason, so `kubectl describe` tells the story.
    """
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions") or []
    synced = (dataclasses.replace(ready_override, type=conditions.SYNCED) if ready_override
              else conditions.summary(checks, required))
    merged = conditions.merge(previous, [*checks, synced], generation=meta.get("generation"), remove=remove)
    ready = conditions.readiness(synced, [conditions.find(merged, t) for t in info.serving])
    merged = conditions.merge(merged, [ready], generation=meta.get("generation"))
    status = {**observed_state, "conditions": merged, "observedGeneration": meta.get("generation")}
    runtime.get().kube.patch_status(runtime.resource_kind(info), meta["namespace"], meta["name"], status)
    metrics.track_ready(info.kind, meta["namespace"], meta["name"], ready.ok)
    if announce:
        _announce(body, previous, ready)
    return ready


def conclude(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition], *, required: Sequence[str],
             observed_state: Mapping[str, Any], changes: Sequence[str], trigger: str, logger: Any,
             retry: bool, attempt: int = 0, remove: Sequence[str] = ()) -> Condition:
    """How every reconcile ends: the status, an Event for what it changed, one log line, and a
    retry (kopf.TemporaryError, backing off with `attempt`) while it waits for something."""
    ready = write_status(info, body, checks, required=required, observed_state=observed_state,
                         remove=(*remove, PAUSED))
    meta = body["metadata"]
    report_changes(body, changes, trigger,
                   spec_unchanged=(body.get("status") or {}).get("observedGeneration") == meta.get("generation"))
    logger.info(f"{info.kind.lower()}.reconciled", ready=ready.status, reason=ready.reason, changes=list(changes))
    if retry:
        raise kopf.TemporaryError(ready.message, delay=backoff.retry_delay(attempt))
    return ready


def report_changes(body: Mapping[str, Any], changes: Sequence[str], trigger: str, *, spec_unchanged: bool) -> None:
    """One Event per reconcile that changed something; a change nobody asked for is drift."""
    if not changes:
        return
    if trigger != "change" and spec_unchanged:
        event(body, "DriftRepaired", "; ".join(changes))
    else:
        event(body, "Reconciled", "; ".join(changes))


def patch_conditions(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition],
                     observed_state: Mapping[str, Any]) -> None:
    """Update conditions that need no reconcile (availability, the ingest Job) and observed fields;
    Ready follows them, Synced is left as it is."""
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions") or []
    generation = (body.get("status") or {}).get("observedGeneration")
    merged = conditions.merge(previous, checks, generation=generation)
    synced = conditions.find(merged, conditions.SYNCED)
    if synced is not None:
        as_condition = Condition(conditions.SYNCED, synced["status"], synced["reason"], synced.get("message", ""))
        ready = conditions.readiness(as_condition, [conditions.find(merged, t) for t in info.serving])
        merged = conditions.merge(merged, [ready], generation=generation)
        metrics.track_ready(info.kind, meta["namespace"], meta["name"], ready.ok)
        _announce(body, previous, ready)
    runtime.get().kube.patch_status(runtime.resource_kind(info), meta["namespace"], meta["name"],
                                    {**observed_state, "conditions": merged})


def _announce(body: Mapping[str, Any], previous: Sequence[Mapping[str, Any]], ready: Condition) -> None:
    before = conditions.find(previous, conditions.READY)
    if before is None or before.get("status") != ready.status or before.get("reason") != ready.reason:
        event(body, ready.reason if not ready.ok else "Ready", ready.message,
              warning=ready.status == "False" and ready.reason not in WAITING_REASONS)


def is_paused(body: Mapping[str, Any]) -> bool:
    return (body["metadata"].get("annotations") or {}).get(PAUSE_ANNOTATION, "").lower() == "true"


def paused(info: KindInfo, body: Mapping[str, Any]) -> bool:
    """Strimzi's pause: with the annotation set nothing is applied, repaired or created (deletion
    still cleans up); the resource says so in a ReconciliationPaused condition."""
    if not is_paused(body):
        return False
    if (conditions.find((body.get("status") or {}).get("conditions"), PAUSED) or {}).get("status") != "True":
        patch_conditions(info, body, [Condition.true(PAUSED, "PauseAnnotation",
                                                     f"{PAUSE_ANNOTATION}=true: nothing is applied until it is "
                                                     "removed")], {})
    return True


def validated(info: KindInfo, body: Mapping[str, Any], model: type[M]) -> M | None:
    """The spec as its model, or None after saying why it is invalid (Ready=False, InvalidSpec).

    The CRD schema catches most mistakes; what only the model checks (a malformed quantity, say)
    must end as a condition a user sees, not as an exception retried forever."""
    try:
        return model.model_validate(dict(body["spec"]))
    except ValidationError as exc:
        problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        write_status(info, body, [], required=(), observed_state={},
                     ready_override=Condition.false(conditions.READY, "InvalidSpec", problems))
        return None


def available_replicas(deployment: Mapping[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0)


def availability(type_: str, desired: int, available: int) -> Condition:
    if desired == 0:
        return Condition.true(type_, "ScaledToZero", "no replicas requested")
    if available >= desired:
        return Condition.true(type_, "MinimumReplicasAvailable", f"{available}/{desired} replicas available")
    return Condition.false(type_, "ReplicasUnavailable", f"{available}/{desired} replicas available")
