"""QueryService: resolve the served tables, render and apply the API's children, report the URL.

No external state, hence no finalizer and no timer (kopf timers need one): drift of its children
is repaired from the child watch in `handlers/children.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from k2_operator import conditions
from k2_operator.conditions import Condition
from k2_operator.handlers import runtime
from k2_operator.models import GROUP, QUERY, TABLE, VERSION, IcebergTableSpec, QueryServiceSpec
from k2_operator.render.query import render_query, url

TABLES_RESOLVED = "TablesResolved"
AVAILABLE = "Available"
REQUIRED = (TABLES_RESOLVED,)
PRUNE_KINDS = ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Ingress", "ServiceMonitor")


def resolve_tables(namespace: str, spec: QueryServiceSpec) -> tuple[IcebergTableSpec | None, Condition]:
    kube = runtime.get().kube
    found = []
    for ref in spec.tables:
        body = kube.get(runtime.resource_kind(TABLE), namespace, ref.name)
        if body is None:
            return None, Condition.false(TABLES_RESOLVED, "TableNotFound", f"IcebergTable {ref.name} does not exist")
        if not conditions.is_ready(body.get("status")):
            return None, Condition.false(TABLES_RESOLVED, "TableNotReady", f"IcebergTable {ref.name} is not Ready yet")
        found.append(IcebergTableSpec.model_validate(body["spec"]))
    if len({(t.namespace, t.catalog_ref.name) for t in found}) > 1:
        return None, Condition.false(TABLES_RESOLVED, "InvalidTableReference",
                                     "the served IcebergTables must share one catalogRef and namespace")
    return found[0], Condition.true(TABLES_RESOLVED, "Resolved",
                                    "serving " + ", ".join(t.identifier for t in found))


def reconcile(body: Mapping[str, Any], *, trigger: str) -> None:
    rt = runtime.get()
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with runtime.reconciling(QUERY, body, trigger) as logger:
        spec = QueryServiceSpec.model_validate(dict(body["spec"]))
        status = body.get("status") or {}
        table, resolved = resolve_tables(namespace, spec)
        checks = [resolved]
        # status.replicas backs the scale subresource: the pods that exist, as the Deployment counts them.
        observed: dict[str, Any] = {"replicas": status.get("replicas") or 0, "url": url(name, namespace, spec)}
        changes: list[str] = []
        if table is not None:
            objects = render_query(name, namespace, spec, table_namespace=table.namespace,
                                   catalog_secret=table.catalog_ref.name, ctx=rt.render_context())
            applied, pruned = runtime.apply_children(QUERY, body, objects, PRUNE_KINDS)
            changes = runtime.describe_changes(applied, pruned)
            deployment = next(a.body for a in applied if a.body["kind"] == "Deployment")
            observed["availableReplicas"] = runtime.available_replicas(deployment)
            observed["replicas"] = int((deployment.get("status") or {}).get("replicas") or 0)
            checks.append(runtime.availability(AVAILABLE, spec.replicas, observed["availableReplicas"]))
        runtime.conclude(QUERY, body, checks, required=REQUIRED, observed_state=observed, changes=changes,
                         trigger=trigger, logger=logger, retry=table is None)


@kopf.on.resume(GROUP, VERSION, QUERY.plural)
@kopf.on.create(GROUP, VERSION, QUERY.plural)
@kopf.on.update(GROUP, VERSION, QUERY.plural)
def query_changed(body: kopf.Body, reason: str, **_: Any) -> None:
    reconcile(body, trigger="change" if reason != "resume" else "resume")
