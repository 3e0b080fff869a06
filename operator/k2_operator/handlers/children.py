"""The watch on rendered children: repair drift as soon as it happens, keep availability current.

A child deleted by hand, or whose spec someone changed (its `generation`, or `resourceVersion` for
kinds without one, differs from what the operator last applied), makes the owner reconcile at
once, which re-applies it and posts a `DriftRepaired` Event. A Deployment whose available
replicas moved updates the owner's availability condition without a full reconcile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from k2_operator.handlers import apply, drift, pipeline, query, runtime, table
from k2_operator.handlers import status as status_
from k2_operator.kube import CHILD_KINDS
from k2_operator.models import API_VERSION, KINDS, PIPELINE, QUERY, IngestionPipelineSpec, KindInfo
from k2_operator.render.common import MANAGED_BY

WATCHED = ("ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "Ingress", "CronJob", "Job")
SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
_BY_KIND = {info.kind: info for info in KINDS}


def owner_of(child: Mapping[str, Any]) -> tuple[KindInfo, str] | None:
    for ref in child.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("apiVersion") == API_VERSION and ref.get("kind") in _BY_KIND and ref.get("controller"):
            return _BY_KIND[ref["kind"]], ref["name"]
    return None


def child_event(type: str | None, body: kopf.Body, pipeline_topic_claims: kopf.Index,
                table_identifier_claims: kopf.Index, **_: Any) -> None:
    if type not in ("MODIFIED", "DELETED"):
        return
    found = owner_of(body)
    if found is None:
        return
    info, owner_name = found
    rt = runtime.get()
    namespace = body["metadata"]["namespace"]
    with rt.lock(info.kind, namespace, owner_name):
        owner = rt.kube.get(runtime.resource_kind(info), namespace, owner_name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return  # the owner is going away; garbage collection takes the children
        if status_.is_paused(owner):
            return  # paused: a hand change stays until the annotation is removed
        drifted = type == "DELETED" or apply.applied_version(body) != apply.fingerprint(body)
        if drifted:
            try:
                drift.reconcile_owner(info, owner, {pipeline.CLAIMS_INDEX: pipeline_topic_claims,
                                                    table.CLAIMS_INDEX: table_identifier_claims}, trigger="drift")
            except kopf.TemporaryError:
                pass  # the owner's own handlers and timer retry; this was a best-effort repair
        elif body["kind"] == "Deployment":
            refresh_availability(info, owner, body)
        elif body["kind"] == "Job" and info is PIPELINE:
            refresh_ingest(owner, body)


def refresh_availability(info: KindInfo, owner: Mapping[str, Any], deployment: Mapping[str, Any]) -> None:
    available = status_.available_replicas(deployment)
    status = owner.get("status") or {}
    if info is PIPELINE:
        desired = IngestionPipelineSpec.model_validate(dict(owner["spec"])).consumer.replicas
        if (status.get("consumers") or {}).get("availableReplicas") == available:
            return
        status_.patch_conditions(info, owner, [status_.availability(pipeline.CONSUMERS_AVAILABLE, desired, available)],
                                 {"consumers": {"replicas": desired, "availableReplicas": available}})
    elif info is QUERY:
        desired = int(owner["spec"].get("replicas", 0))
        current = int((deployment.get("status") or {}).get("replicas") or 0)
        if (status.get("availableReplicas"), status.get("replicas")) == (available, current):
            return
        status_.patch_conditions(info, owner, [status_.availability(query.AVAILABLE, desired, available)],
                                 {"availableReplicas": available, "replicas": current})


def refresh_ingest(owner: Mapping[str, Any], job: Mapping[str, Any]) -> None:
    """The ingest Job moved (started, finished): IngestComplete follows at once, not at the next drift round."""
    recorded = (owner.get("status") or {}).get("ingest") or {}
    if recorded.get("job") != job["metadata"]["name"]:
        return  # a Job of a former source
    phase = pipeline.job_phase(job)
    if recorded.get("phase") == phase:
        return
    status_.patch_conditions(PIPELINE, owner, [pipeline.ingest_condition(job["metadata"]["name"], phase)],
                             {"ingest": {"job": job["metadata"]["name"], "phase": phase}})


for _kind in WATCHED:
    _child = CHILD_KINDS[_kind]
    _group, _, _version = _child.api_version.rpartition("/")
    kopf.on.event(group=_group, version=_version, plural=_child.plural, id=f"child_{_child.plural}",
                  labels={"app.kubernetes.io/managed-by": MANAGED_BY})(child_event)  # type: ignore[arg-type]  # kopf cannot type injected index kwargs; selector also server-side (startup)
