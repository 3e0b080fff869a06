"""Drift repair for every resource the operator watches, in one loop over kopf indexes.

Why not a kopf timer per resource: kopf puts a finalizer on every object that has a timer (to stop
it on deletion), so with the operator down nothing could be deleted, not even with deletionPolicy
Retain, and namespace deletion hung. Finalizers are now only where external cleanup needs one
(deletionPolicy Delete); the loop below re-reconciles each indexed resource every
`drift_interval` seconds, one at a time, reading the current object from the API first.

Drift of rendered children is also repaired at once by the child watch (`handlers/children.py`);
this loop catches what no watch sees: external state (topics, subjects, tables), a table that a
QueryService or pipeline refers to changing, Jobs finishing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping
from typing import Any

import kopf
import structlog

from k2_operator.handlers import metrics, pipeline, query, runtime, table
from k2_operator.models import GROUP, KINDS, PIPELINE, QUERY, VERSION, KindInfo

log = structlog.get_logger("k2_operator.drift")

ALL = "all"
BY_KIND = {info.kind: info for info in KINDS}


def index_id(info: KindInfo) -> str:
    return f"drift_{info.plural}"


def present(namespace: str, name: str, **_: Any) -> dict[str, tuple[str, str]]:
    """Index every resource of the kind by (namespace, name): the set the drift loop walks."""
    return {ALL: (namespace, name)}


for _info in KINDS:
    kopf.index(GROUP, VERSION, _info.plural, id=index_id(_info))(present)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects


def reconcile_owner(info: KindInfo, owner: Mapping[str, Any], claims: Mapping[str, Mapping[str, Any]], *,
                    trigger: str) -> None:
    """`claims`: index id → the claims index of the kind (topics of pipelines, identifiers of tables)."""
    if info is PIPELINE:
        pipeline.reconcile(owner, claims[pipeline.CLAIMS_INDEX], trigger=trigger)
    elif info is QUERY:
        query.reconcile(owner, trigger=trigger)
    else:
        table.reconcile(owner, claims[table.CLAIMS_INDEX], trigger=trigger)


def repair(info: KindInfo, namespace: str, name: str, claims: Mapping[str, Mapping[str, Any]]) -> None:
    """One drift check of one resource, as it is now; a failure is logged and left to the next round."""
    body = runtime.get().kube.get(runtime.resource_kind(info), namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    try:
        reconcile_owner(info, body, claims, trigger="drift")
    except kopf.TemporaryError:
        pass  # already reported on the resource's status; the next round tries again
    except Exception as exc:  # noqa: BLE001 - one broken resource must not stop the loop for the others
        log.warning("drift.failed", kind=info.kind, namespace=namespace, name=name, error=str(exc),
                    error_type=type(exc).__name__)


def snapshot(index: kopf.Index) -> dict[Any, list[Any]]:
    """A copy of an index, taken on the event loop (kopf updates indexes there)."""
    return {key: list(store) for key, store in index.items()}


async def run(indexes: Mapping[str, kopf.Index], *, interval: float, initial_delay: float) -> None:
    """Forever: every resource of every kind, one at a time in a worker thread, then sleep."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(initial_delay)
    while True:
        claims = {index: snapshot(indexes[index]) for index in (pipeline.CLAIMS_INDEX, table.CLAIMS_INDEX)}
        present = {(info.kind, namespace, name) for info in KINDS
                   for namespace, name in snapshot(indexes[index_id(info)]).get(ALL, [])}
        metrics.forget_absent(present)
        for kind, namespace, name in sorted(present):
            context = contextvars.copy_context()
            await loop.run_in_executor(None, context.run, repair, BY_KIND[kind], namespace, name, claims)
        await asyncio.sleep(interval)
