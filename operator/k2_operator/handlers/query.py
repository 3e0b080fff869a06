"""QueryService: resolve the served tables, render and apply the API's children, report the URL.

No external state, hence no finalizer: drift of its children is repaired from the child watch in
`handlers/children.py`, changes of the tables it serves by the drift loop (`handlers/drift.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from k2_operator.handlers import apply, metrics, refs, runtime
from k2_operator.handlers import status as status_
from k2_operator.models import GROUP, PIPELINE, QUERY, VERSION, IngestionPipelineSpec, QueryServiceSpec
from k2_operator.render.query import StreamTopics, render_query, url

TABLES_RESOLVED = refs.TABLES_RESOLVED
AVAILABLE = "Available"
REQUIRED = (TABLES_RESOLVED,)
PRUNE_KINDS = ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Ingress", "ServiceMonitor")


def reconcile(body: Mapping[str, Any], *, trigger: str, attempt: int = 0) -> None:
    owner = runtime.owner(QUERY, body)
    with metrics.reconciling(QUERY, body, trigger) as logger:
        if status_.paused(QUERY, body):
            return
        spec = status_.validated(QUERY, body, QueryServiceSpec)
        if spec is None:
            return
        status = body.get("status") or {}
        tables = refs.resolve_tables(owner.namespace, spec.tables)
        checks = [tables.condition]
        # status.replicas backs the scale subresource: the pods that exist, as the Deployment counts them.
        observed: dict[str, Any] = {"replicas": status.get("replicas") or 0, "url": url(owner, spec),
                                    "selector": owner.selector("query")}
        changes: list[str] = []
        if tables.specs:
            table = tables.specs[0]
            topics = stream_topics(owner.namespace, {t.name for t in spec.tables})
            objects = apply.render_children(owner.namespace, lambda ctx: render_query(
                owner, spec, table_namespace=table.namespace, catalog_secret=table.catalog_ref.name, ctx=ctx,
                topics=topics))
            applied, pruned = apply.apply_children(QUERY, body, objects, PRUNE_KINDS)
            changes = apply.describe_changes(applied, pruned)
            deployment = next(a.body for a in applied if a.body["kind"] == "Deployment")
            observed["availableReplicas"] = status_.available_replicas(deployment)
            observed["replicas"] = int((deployment.get("status") or {}).get("replicas") or 0)
            checks.append(status_.availability(AVAILABLE, spec.replicas, observed["availableReplicas"]))
        status_.conclude(QUERY, body, checks, required=REQUIRED, observed_state=observed, changes=changes,
                         trigger=trigger, logger=logger, retry=not tables.specs, attempt=attempt)


def stream_topics(namespace: str, tables: set[str]) -> StreamTopics | None:
    """The topics of the pipeline writing the served tables (the first by name if several do):
    what the API's live stream reads. None: no pipeline writes them (the defaults apply)."""
    pipelines = runtime.get().kube.list(runtime.resource_kind(PIPELINE), namespace)
    for body in sorted(pipelines, key=lambda b: b["metadata"]["name"]):
        try:
            spec = IngestionPipelineSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            continue  # its own reconcile reports it
        if tables & {t.name for t in spec.tables}:
            return StreamTopics(asset_class=spec.asset_class, exchange=spec.exchange,
                                registry=spec.schema_registry)
    return None


@kopf.on.resume(GROUP, VERSION, QUERY.plural)
@kopf.on.create(GROUP, VERSION, QUERY.plural)
@kopf.on.update(GROUP, VERSION, QUERY.plural)
def query_changed(body: kopf.Body, reason: str, retry: int, **_: Any) -> None:
    reconcile(body, trigger="change" if reason != "resume" else "resume", attempt=retry)
