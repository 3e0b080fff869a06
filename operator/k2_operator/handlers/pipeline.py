"""IngestionPipeline: topics → schemas → table binding → children, then status.

Each step reports one condition; a step that cannot succeed (a shrink, an incompatible schema, a
topic another pipeline owns) leaves its external state untouched and says why, the others still
run. Unreachable systems are retried with backoff; a missing IcebergTable is waited for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from k2 import topics as k2_topics
from k2.schemas.registry import SchemaIncompatible, value_subject
from k2_operator import conditions, external
from k2_operator.conditions import Condition
from k2_operator.handlers import runtime
from k2_operator.kube import CHILD_KINDS
from k2_operator.models import GROUP, PIPELINE, TABLE, VERSION, IcebergTableSpec, IngestionPipelineSpec
from k2_operator.render.pipeline import TableBinding, continuous, ingest_job_name, render_pipeline
from k2_operator.render.pipeline import names as pipeline_names

TOPICS_READY = "TopicsReady"
SCHEMAS_REGISTERED = "SchemasRegistered"
TABLES_RESOLVED = "TablesResolved"
CONSUMERS_AVAILABLE = "ConsumersAvailable"
INGEST_COMPLETE = "IngestComplete"
REQUIRED = (TOPICS_READY, SCHEMAS_REGISTERED, TABLES_RESOLVED)
PRUNE_KINDS = ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "Job")
CLAIMS_INDEX = "pipeline_topic_claims"


@dataclass(frozen=True, order=True)
class Claim:
    """Who asked for a topic first: the oldest pipeline wins, ties broken by namespace/name."""

    created: str
    namespace: str
    name: str
    uid: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@kopf.index(GROUP, VERSION, PIPELINE.plural, id=CLAIMS_INDEX)
def pipeline_topic_claims(namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any],
                          **_: Any) -> dict[str, Claim]:
    try:
        model = IngestionPipelineSpec.model_validate(dict(spec))
    except ValidationError:
        return {}
    claim = Claim(meta.get("creationTimestamp") or "", namespace, name, meta.get("uid") or "")
    return {topic: claim for topic in model.topic_names().values()}


def conflicts(spec: IngestionPipelineSpec, uid: str, claims: Mapping[str, Any]) -> dict[str, Claim]:
    """topic → the older pipeline that owns it, for each of this pipeline's topics owned by another."""
    owners = {}
    for topic in spec.topic_names().values():
        store = claims.get(topic) or []
        owner = min(store, default=None)
        if owner is not None and owner.uid != uid:
            owners[topic] = owner
    return owners


def _registry_url(namespace: str, spec: IngestionPipelineSpec) -> str:
    rt = runtime.get()
    ref = spec.schema_registry
    if ref and ref.secret_ref:
        data = rt.kube.secret_data(namespace, ref.secret_ref.name)
        if not data or ref.secret_ref.key not in data:
            raise LookupError(f"Secret {ref.secret_ref.name} has no key {ref.secret_ref.key}")
        return data[ref.secret_ref.key]
    return ref.url if ref and ref.url else rt.settings.registry_url


def resolve_tables(namespace: str, spec: IngestionPipelineSpec) -> tuple[TableBinding | None, Condition, bool]:
    """(binding, TablesResolved, waiting): the referenced IcebergTables must exist, be Ready, be named
    after one of the pipeline's kinds and share one catalog and namespace."""
    if not spec.tables:
        return None, Condition.true(TABLES_RESOLVED, "NoTables", "no IcebergTables referenced: no consumers"), False
    kube = runtime.get().kube
    found: list[IcebergTableSpec] = []
    for ref in spec.tables:
        body = kube.get(runtime.resource_kind(TABLE), namespace, ref.name)
        if body is None:
            return None, Condition.false(TABLES_RESOLVED, "TableNotFound",
                                         f"IcebergTable {ref.name} does not exist"), True
        table = IcebergTableSpec.model_validate(body["spec"])
        if table.name not in spec.topics.kinds:
            return None, Condition.false(TABLES_RESOLVED, "InvalidTableReference",
                                         f"IcebergTable {ref.name} is table {table.name!r}; consumers write "
                                         f"tables named after topics.kinds {list(spec.topics.kinds)}"), False
        if not conditions.is_ready(body.get("status")):
            return None, Condition.false(TABLES_RESOLVED, "TableNotReady",
                                         f"IcebergTable {ref.name} is not Ready yet"), True
        found.append(table)
    if len({(t.namespace, t.catalog_ref.name) for t in found}) > 1:
        return None, Condition.false(TABLES_RESOLVED, "InvalidTableReference",
                                     "the referenced IcebergTables must share one catalogRef and namespace"), False
    first = found[0]
    binding = TableBinding(kinds=tuple(t.name for t in found), namespace=first.namespace,  # type: ignore[misc]
                           catalog_secret=first.catalog_ref.name,
                           target_file_size_bytes=first.properties.target_file_size_bytes)
    names = ", ".join(f"{t.namespace}.{t.name}" for t in found)
    return binding, Condition.true(TABLES_RESOLVED, "Resolved", f"writing {names}"), False


def reconcile(body: Mapping[str, Any], claims: Mapping[str, Any], *, trigger: str) -> None:
    rt = runtime.get()
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with runtime.reconciling(PIPELINE, body, trigger) as logger:
        spec = IngestionPipelineSpec.model_validate(dict(body["spec"]))
        status = body.get("status") or {}
        changes: list[str] = []
        checks: list[Condition] = []
        observed: dict[str, Any] = {}
        retry = False

        owned_by_others = conflicts(spec, meta["uid"], claims)
        if owned_by_others:
            message = "; ".join(f"topic {t} is already managed by IngestionPipeline {c.ref}"
                                for t, c in sorted(owned_by_others.items()))
            conflict = Condition.false(TOPICS_READY, "ResourceConflict", message)
            runtime.write_status(PIPELINE, body, [conflict], required=REQUIRED, observed_state={},
                                 ready_override=Condition.false("Ready", "ResourceConflict", message))
            return

        # 1. Topics (k2.topics: create, grow, apply config; never shrink), plus the shared DLQ.
        topic_by_kind = spec.topic_names()
        wanted = [k2_topics.TopicSpec(t, spec.topics.partitions, spec.topics.replication_factor,
                                      dict(spec.topics.config)) for t in topic_by_kind.values()]
        dlq = k2_topics.TopicSpec(spec.dlq_topic(), 1, spec.topics.replication_factor)
        partitions: dict[str, int] = {}
        try:
            states = external.ensure_topics(rt.settings.kafka_bootstrap, [*wanted, dlq])
            # From what was just applied: Kafka's metadata can lag a partition change by a moment.
            partitions = {state.name: state.partitions for state in states}
            for state in states[:-1]:
                if state.created:
                    changes.append(f"created topic {state.name} ({state.partitions} partitions)")
                if state.grown_from is not None:
                    changes.append(f"grew topic {state.name} from {state.grown_from} to {state.partitions} partitions")
                if state.config_changed:
                    changes.append(f"set {', '.join(state.config_changed)} on topic {state.name}")
            checks.append(Condition.true(TOPICS_READY, "Reconciled",
                                         f"{len(wanted)} topics with {spec.topics.partitions} partitions"))
        except k2_topics.TopicShrinkRefused as exc:
            checks.append(Condition.false(TOPICS_READY, "ShrinkRefused", str(exc)))
        except external.Unavailable as exc:
            checks.append(Condition.false(TOPICS_READY, "KafkaUnavailable", str(exc)))
            retry = True
        try:
            if not partitions:
                partitions = external.topic_partitions(rt.settings.kafka_bootstrap, list(topic_by_kind.values()))
            observed["topics"] = [{"name": t, "partitions": partitions[t]} for t in topic_by_kind.values()
                                  if t in partitions]
        except external.Unavailable:
            observed["topics"] = status.get("topics") or []

        # 2. Value schemas (k2.schemas.registry: compatibility checked before anything changes).
        try:
            url = _registry_url(namespace, spec)
            registrations = external.register_value_schemas(url, topic_by_kind, spec.compatibility)
            observed["schemas"] = [{"subject": r.subject, "schemaId": r.schema_id, "version": r.version}
                                   for r in registrations]
            before = {s["subject"]: (s.get("schemaId"), s.get("version")) for s in status.get("schemas") or []}
            changes += [f"registered {r.subject} version {r.version} (id {r.schema_id})" for r in registrations
                        if before.get(r.subject) != (r.schema_id, r.version)]
            checks.append(Condition.true(SCHEMAS_REGISTERED, "Registered",
                                         f"{len(registrations)} subjects at {spec.compatibility}"))
        except SchemaIncompatible as exc:
            checks.append(Condition.false(SCHEMAS_REGISTERED, "SchemaIncompatible", str(exc)))
            observed["schemas"] = status.get("schemas") or []
        except LookupError as exc:
            checks.append(Condition.false(SCHEMAS_REGISTERED, "SecretNotFound", str(exc)))
            retry = True
        except external.Unavailable as exc:
            checks.append(Condition.false(SCHEMAS_REGISTERED, "RegistryUnavailable", str(exc)))
            observed["schemas"] = status.get("schemas") or []
            retry = True
        except Exception as exc:  # noqa: BLE001 - whatever the registry answered: report it, retry
            logger.warning("pipeline.registry_error", error=str(exc), error_type=type(exc).__name__)
            checks.append(Condition.false(SCHEMAS_REGISTERED, "RegistryError", f"{type(exc).__name__}: {exc}"))
            observed["schemas"] = status.get("schemas") or []
            retry = True

        # 3. Tables the consumers write.
        binding, tables_condition, waiting = resolve_tables(namespace, spec)
        checks.append(tables_condition)

        # 4. Children. The ingest Job runs once per source: once recorded, it is not recreated.
        objects = render_pipeline(name, namespace, spec, binding, rt.render_context())
        job_name = ingest_job_name(name, spec) if spec.source.type != "none" and not continuous(spec) else None
        recorded = (status.get("ingest") or {}).get("job")
        keep = []
        if job_name and recorded == job_name:
            objects = [o for o in objects if o["kind"] != "Job"]
            keep.append(f"Job/{job_name}")
        if binding is None and spec.tables:
            # Tables unresolved (a catalog outage, a table being recreated): leave running consumers
            # and their settings alone rather than tear them down or rewrite them half-configured.
            n = pipeline_names(name)
            keep += [f"Deployment/{n['consumer']}", f"Service/{n['metrics']}", f"PodDisruptionBudget/{n['consumer']}",
                     f"ServiceMonitor/{n['consumer']}", f"ConfigMap/{n['settings']}"]
            if rt.kube.get(CHILD_KINDS["ConfigMap"], namespace, n["settings"]) is not None:
                objects = [o for o in objects if o["kind"] != "ConfigMap"]
        applied, pruned = runtime.apply_children(PIPELINE, body, objects, PRUNE_KINDS, keep=keep)
        changes += runtime.describe_changes(applied, pruned)

        deployment = next((a.body for a in applied if a.body["kind"] == "Deployment"
                           and a.body["metadata"]["name"] == pipeline_names(name)["consumer"]), None)
        if deployment is None and binding is None and spec.tables:  # kept as it was, see above
            deployment = rt.kube.get(CHILD_KINDS["Deployment"], namespace, pipeline_names(name)["consumer"])
        desired = spec.consumer.replicas if deployment else 0
        available = runtime.available_replicas(deployment)
        observed["consumers"] = {"replicas": desired, "availableReplicas": available}
        checks.append(runtime.availability(CONSUMERS_AVAILABLE, desired, available) if deployment else
                      Condition.true(CONSUMERS_AVAILABLE, "NoConsumers", "no tables bound: no consumers"))
        if job_name:
            job = rt.kube.get(CHILD_KINDS["Job"], namespace, job_name)
            phase = job_phase(job, recorded_phase=(status.get("ingest") or {}).get("phase"))
            observed["ingest"] = {"job": job_name, "phase": phase}
            checks.append(Condition(INGEST_COMPLETE, "True" if phase == "Succeeded" else
                                    "False" if phase == "Failed" else "Unknown", f"Ingest{phase}",
                                    f"Job {job_name} {phase.lower()}"))

        if not job_name:
            observed["ingest"] = None  # merge patch: remove what a former source left
        runtime.conclude(PIPELINE, body, checks, required=REQUIRED, observed_state=observed, changes=changes,
                         trigger=trigger, logger=logger, retry=retry or waiting,
                         remove=() if job_name else (INGEST_COMPLETE,))


def job_phase(job: Mapping[str, Any] | None, recorded_phase: str | None = None) -> str:
    if job is None:
        return recorded_phase or "Pending"
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Succeeded"
        if condition.get("status") == "True" and condition.get("type") in ("Failed", "FailureTarget"):
            return "Failed"
    return "Running" if status.get("active") or status.get("startTime") else "Pending"


# --- handlers -----------------------------------------------------------------------------------------
@kopf.on.resume(GROUP, VERSION, PIPELINE.plural)
@kopf.on.create(GROUP, VERSION, PIPELINE.plural)
@kopf.on.update(GROUP, VERSION, PIPELINE.plural)
def pipeline_changed(body: kopf.Body, pipeline_topic_claims: kopf.Index, reason: str, **_: Any) -> None:
    reconcile(body, pipeline_topic_claims, trigger="change" if reason != "resume" else "resume")


@kopf.timer(GROUP, VERSION, PIPELINE.plural, interval=runtime.config_value("drift_interval"),
            initial_delay=runtime.config_value("drift_initial_delay"), id="pipeline_drift")
def pipeline_drift(body: kopf.Body, pipeline_topic_claims: kopf.Index, **_: Any) -> None:
    reconcile(body, pipeline_topic_claims, trigger="drift")


def _deletes_external(spec: Mapping[str, Any], **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Delete"


@kopf.on.delete(GROUP, VERSION, PIPELINE.plural, when=_deletes_external)
def pipeline_deleted(body: kopf.Body, pipeline_topic_claims: kopf.Index, retry: int, **_: Any) -> None:
    """deletionPolicy Delete: remove this pipeline's topics and subjects (never the shared DLQ,
    never a topic another pipeline owns); give up after `cleanup_attempts` or on the annotation."""
    rt = runtime.get()
    meta = body["metadata"]
    spec = IngestionPipelineSpec.model_validate(dict(body["spec"]))
    with runtime.reconciling(PIPELINE, body, "delete") as logger:
        if runtime.skip_cleanup(body):
            runtime.event(body, "CleanupSkipped", f"{runtime.SKIP_CLEANUP_ANNOTATION}=true: topics and subjects "
                          "are left in place", warning=True)
            return
        others = conflicts(spec, meta["uid"], pipeline_topic_claims)
        mine = [t for t in spec.topic_names().values() if t not in others]
        try:
            external.delete_topics(rt.settings.kafka_bootstrap, mine)
            external.delete_subjects(_registry_url(meta["namespace"], spec), [value_subject(t) for t in mine])
        except (external.Unavailable, LookupError) as exc:
            runtime.cleanup_failed(PIPELINE, body, retry, exc, logger)
            return
        runtime.event(body, "CleanedUp", f"deleted topics and subjects of {', '.join(mine) or 'nothing'}")
        rt.track_ready(PIPELINE.kind, meta["uid"], None)
