"""IngestionPipeline: topics → schemas → table binding → children, then status.

Each step reports one condition; a step that cannot succeed (a shrink, an incompatible schema, a
topic another pipeline owns) leaves its external state untouched and says why, the others still
run. Unreachable systems are retried with backoff; a missing IcebergTable is waited for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from k2 import topics as k2_topics
from k2.kafka import table_group
from k2.schemas.registry import SchemaIncompatible, value_subject
from k2_operator import external
from k2_operator.conditions import Condition, Status
from k2_operator.handlers import apply, cleanup, metrics, refs, runtime
from k2_operator.handlers import status as status_
from k2_operator.handlers.claims import Claim, owned_by_others
from k2_operator.handlers.events import event
from k2_operator.kube import CHILD_KINDS
from k2_operator.models import GROUP, PIPELINE, VERSION, IcebergTableSpec, IngestionPipelineSpec
from k2_operator.render.pipeline import (
    Names,
    TableBinding,
    consumer_group,
    continuous,
    ingest_job_name,
    render_pipeline,
)

TOPICS_READY = "TopicsReady"
SCHEMAS_REGISTERED = "SchemasRegistered"
TABLES_RESOLVED = refs.TABLES_RESOLVED
CONSUMERS_AVAILABLE = "ConsumersAvailable"
CONSUMERS_CAUGHT_UP = "ConsumersCaughtUp"
INGEST_COMPLETE = "IngestComplete"
REQUIRED = (TOPICS_READY, SCHEMAS_REGISTERED, TABLES_RESOLVED)
PRUNE_KINDS = ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "Job")
CLAIMS_INDEX = "pipeline_topic_claims"


@kopf.index(GROUP, VERSION, PIPELINE.plural, id=CLAIMS_INDEX)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects
def pipeline_topic_claims(namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any],
                          status: Mapping[str, Any], **_: Any) -> dict[str, Claim]:
    try:
        model = IngestionPipelineSpec.model_validate(dict(spec))
    except ValidationError:
        return {}
    claim = Claim.of(namespace, name, meta, established=bool(status.get("topics")))
    return {topic: claim for topic in model.topic_names().values()}


def conflicts(spec: IngestionPipelineSpec, uid: str, claims: Mapping[str, Any]) -> dict[str, Claim]:
    """topic → the older pipeline that owns it, for each of this pipeline's topics owned by another."""
    return owned_by_others(spec.topic_names().values(), uid, claims)


def _tables_binding(namespace: str, spec: IngestionPipelineSpec) -> tuple[TableBinding | None, refs.Tables]:
    """The IcebergTables the consumers write: resolved like every kind's, and each must be named
    after one of the pipeline's record kinds."""
    if not spec.tables:
        none = Condition.true(TABLES_RESOLVED, "NoTables", "no IcebergTables referenced: no consumers")
        return None, refs.Tables((), none)

    def invalid(name: str, table: IcebergTableSpec) -> str | None:
        if table.name in spec.topics.kinds:
            return None
        return (f"IcebergTable {name} is table {table.name!r}; consumers write tables named after "
                f"topics.kinds {list(spec.topics.kinds)}")

    resolved = refs.resolve_tables(namespace, spec.tables, invalid=invalid)
    if not resolved.specs:
        return None, resolved
    first = resolved.specs[0]
    binding = TableBinding(kinds=tuple(t.name for t in resolved.specs),  # type: ignore[misc]
                           namespace=first.namespace, catalog_secret=first.catalog_ref.name,
                           target_file_size_bytes=first.properties.target_file_size_bytes)
    return binding, resolved


@dataclass
class Outcome:
    """What the steps of one reconcile found: conditions, observed status fields, changes, and
    whether to retry soon."""

    checks: list[Condition] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    retry: bool = False


def ensure_topics(spec: IngestionPipelineSpec, status: Mapping[str, Any], out: Outcome) -> None:
    """Topics (k2.topics: create, grow, apply config; never shrink), plus the shared DLQ."""
    bootstrap = runtime.get().settings.kafka_bootstrap
    topic_by_kind = spec.topic_names()
    wanted = [k2_topics.TopicSpec(t, spec.topics.partitions, spec.topics.replication_factor,
                                  dict(spec.topics.config)) for t in topic_by_kind.values()]
    dlq = k2_topics.TopicSpec(spec.dlq_topic(), 1, spec.topics.replication_factor)
    partitions: dict[str, int] = {}
    try:
        states = external.ensure_topics(bootstrap, [*wanted, dlq])
        # From what was just applied: Kafka's metadata can lag a partition change by a moment.
        partitions = {state.name: state.partitions for state in states}
        out.changes += [change for state in states[:-1] for change in _topic_changes(state)]
        out.checks.append(Condition.true(TOPICS_READY, "Reconciled",
                                         f"{len(wanted)} topics with {spec.topics.partitions} partitions"))
    except k2_topics.TopicShrinkRefused as exc:
        out.checks.append(Condition.false(TOPICS_READY, "ShrinkRefused", str(exc)))
    except external.Unavailable as exc:
        out.checks.append(Condition.false(TOPICS_READY, "KafkaUnavailable", str(exc)))
        out.retry = True
    try:
        if not partitions:
            partitions = external.topic_partitions(bootstrap, list(topic_by_kind.values()))
        out.observed["topics"] = [{"name": t, "partitions": partitions[t]} for t in topic_by_kind.values()
                                  if t in partitions]
    except external.Unavailable:
        out.observed["topics"] = status.get("topics") or []


def _topic_changes(state: k2_topics.TopicState) -> list[str]:
    changes = []
    if state.created:
        changes.append(f"created topic {state.name} ({state.partitions} partitions)")
    if state.grown_from is not None:
        changes.append(f"grew topic {state.name} from {state.grown_from} to {state.partitions} partitions")
    if state.config_changed:
        changes.append(f"set {', '.join(state.config_changed)} on topic {state.name}")
    return changes


def register_schemas(namespace: str, spec: IngestionPipelineSpec, status: Mapping[str, Any], out: Outcome,
                     logger: Any) -> None:
    """Value schemas (k2.schemas.registry: compatibility checked before anything changes)."""
    previous = status.get("schemas") or []
    try:
        url = refs.registry_url(namespace, spec.schema_registry)
        registrations = external.register_value_schemas(url, spec.topic_names(), spec.compatibility)
    except SchemaIncompatible as exc:
        out.checks.append(Condition.false(SCHEMAS_REGISTERED, "SchemaIncompatible", str(exc)))
        out.observed["schemas"] = previous
        return
    except refs.Waiting as exc:
        out.checks.append(Condition.false(SCHEMAS_REGISTERED, exc.reason, str(exc)))
    except external.Unavailable as exc:
        out.checks.append(Condition.false(SCHEMAS_REGISTERED, "RegistryUnavailable", str(exc)))
        out.observed["schemas"] = previous
    except Exception as exc:  # noqa: BLE001 - whatever the registry answered: report it, retry
        logger.warning("pipeline.registry_error", error=str(exc), error_type=type(exc).__name__)
        out.checks.append(Condition.false(SCHEMAS_REGISTERED, "RegistryError", f"{type(exc).__name__}: {exc}"))
        out.observed["schemas"] = previous
    else:
        out.observed["schemas"] = [{"subject": r.subject, "schemaId": r.schema_id, "version": r.version}
                                   for r in registrations]
        before = {s["subject"]: (s.get("schemaId"), s.get("version")) for s in previous}
        out.changes += [f"registered {r.subject} version {r.version} (id {r.schema_id})" for r in registrations
                        if before.get(r.subject) != (r.schema_id, r.version)]
        out.checks.append(Condition.true(SCHEMAS_REGISTERED, "Registered",
                                         f"{len(registrations)} subjects at {spec.compatibility}"))
        return
    out.retry = True


def apply_workloads(body: Mapping[str, Any], spec: IngestionPipelineSpec, binding: TableBinding | None,
                    out: Outcome) -> None:
    """Children. The ingest Job runs once per source, created once its topics and schemas are in
    place; once recorded, it is not recreated. While the
    tables are unresolved (a catalog outage, a table being recreated), running consumers and their
    settings are left alone rather than torn down or rewritten half-configured."""
    rt = runtime.get()
    owner = runtime.owner(PIPELINE, body)
    status = body.get("status") or {}
    objects = apply.render_children(owner.namespace, lambda ctx: render_pipeline(owner, spec, binding=binding, ctx=ctx))
    job_name = ingest_job_name(owner.name, spec) if spec.source.type != "none" and not continuous(spec) else None
    recorded = (status.get("ingest") or {}).get("job")
    keep = []
    n = Names.of(owner.name)
    job_held = False
    if job_name and (recorded == job_name or not _prerequisites_met(out)):
        # Once recorded, never re-run. Before the topics and schemas exist, not created yet: its
        # pods would fail on them and could use up the Job's backoff limit before Kafka is up.
        objects = [o for o in objects if o["kind"] != "Job"]
        job_held = recorded != job_name and rt.kube.get(CHILD_KINDS["Job"], owner.namespace, job_name) is None
        if not job_held:
            keep.append(f"Job/{job_name}")
    holding = binding is None and bool(spec.tables)
    if continuous(spec) and not _prerequisites_met(out) \
            and rt.kube.get(CHILD_KINDS["Deployment"], owner.namespace, n.feed) is None:
        # The feed only checks for its topics and schemas, so it starts once they exist. It need not
        # wait for the tables (its settings do not depend on them): its ticks wait in Kafka.
        objects = [o for o in objects if not (o["kind"] == "Deployment" and o["metadata"]["name"] == n.feed)]
    if holding:
        keep += [f"Deployment/{n.consumer}", f"Service/{n.metrics}", f"PodDisruptionBudget/{n.consumer}",
                 f"ServiceMonitor/{n.consumer}", f"ConfigMap/{n.settings}"]
        if rt.kube.get(CHILD_KINDS["ConfigMap"], owner.namespace, n.settings) is not None:
            objects = [o for o in objects if o["kind"] != "ConfigMap"]
    applied, pruned = apply.apply_children(PIPELINE, body, objects, PRUNE_KINDS, keep=keep)
    out.changes += apply.describe_changes(applied, pruned)

    deployment = next((a.body for a in applied if a.body["kind"] == "Deployment"
                       and a.body["metadata"]["name"] == n.consumer), None)
    if deployment is None and holding:
        deployment = rt.kube.get(CHILD_KINDS["Deployment"], owner.namespace, n.consumer)
    desired = spec.consumer.replicas if deployment else 0
    available = status_.available_replicas(deployment)
    out.observed["consumers"] = {"replicas": desired, "availableReplicas": available,
                                 "selector": owner.selector("consumer")}
    out.checks.append(status_.availability(CONSUMERS_AVAILABLE, desired, available) if deployment else
                      Condition.true(CONSUMERS_AVAILABLE, "NoConsumers", "no tables bound: no consumers"))
    if job_held:
        out.observed["ingest"] = {"job": None, "phase": "Pending"}  # the Job is recorded once it exists
        out.checks.append(Condition(INGEST_COMPLETE, "Unknown", "WaitingForTopicsAndSchemas",
                                    "the ingest Job is created once the topics and schemas are in place"))
    elif job_name:
        job = rt.kube.get(CHILD_KINDS["Job"], owner.namespace, job_name)
        phase = job_phase(job, recorded_phase=(status.get("ingest") or {}).get("phase"))
        out.observed["ingest"] = {"job": job_name, "phase": phase}
        out.checks.append(ingest_condition(job_name, phase))
    else:
        out.observed["ingest"] = None  # merge patch: remove what a former source left


def check_lag(namespace: str, name: str, spec: IngestionPipelineSpec, binding: TableBinding | None,
              out: Outcome) -> None:
    """Each bound table's consumer group against the end of its topic. `k2 stream` commits the
    group's offsets right after each Iceberg commit, so this is an upper bound of what the table
    lacks. Measured on every reconcile, the drift loop's included: Ready follows the consumers as
    they catch up or fall behind, with no edit to the resource."""
    if binding is None:
        if not spec.tables:
            out.checks.append(Condition.true(CONSUMERS_CAUGHT_UP, "NoConsumers", "no tables bound: no consumers"))
        return  # tables unresolved: the running consumers are kept, and so is their last measured lag
    if spec.consumer.ready_max_lag == 0:
        out.checks.append(Condition.true(CONSUMERS_CAUGHT_UP, "LagNotGated",
                                         "consumer.readyMaxLag is 0: lag does not gate Ready"))
        return
    # Unknown, not False, and retried: an outage says nothing about the consumers.
    unreachable = next((c for c in out.checks if c.reason == "KafkaUnavailable"), None)
    if unreachable is not None:  # found by the topics step already: not waited for twice
        out.checks.append(Condition.unknown(CONSUMERS_CAUGHT_UP, "KafkaUnavailable", unreachable.message))
        return
    bootstrap = runtime.get().settings.kafka_bootstrap
    group, topic_by_kind = consumer_group(name, namespace), spec.topic_names()
    try:
        lags: dict[str, int] = {kind: external.group_lag(bootstrap, table_group(group, kind), topic_by_kind[kind])
                                for kind in binding.kinds}
    except external.Unavailable as exc:
        out.checks.append(Condition.unknown(CONSUMERS_CAUGHT_UP, "KafkaUnavailable", str(exc)))
        out.retry = True
        return
    out.checks.append(lag_condition(lags, spec.consumer.ready_max_lag, spec.consumer.replicas))


def lag_condition(lags: Mapping[str, int], max_lag: int, replicas: int) -> Condition:
    """ConsumersCaughtUp from the messages each table's consumers are behind."""
    behind = ", ".join(f"{table} {lag}" for table, lag in lags.items())
    lagging = sorted(table for table, lag in lags.items() if lag > max_lag)
    if not lagging:
        return Condition.true(CONSUMERS_CAUGHT_UP, "LagBounded",
                              f"messages behind the topics' end: {behind} (readyMaxLag {max_lag})")
    idle = "; consumer.replicas is 0: nothing consumes them" if replicas == 0 else ""
    return Condition.false(CONSUMERS_CAUGHT_UP, "ConsumerLagging",
                           f"{', '.join(lagging)} more than readyMaxLag {max_lag} messages behind the topics' end "
                           f"(messages behind: {behind}){idle}")


def _prerequisites_met(out: Outcome) -> bool:
    """Whether this reconcile found the topics and schemas in place (what the ingest writes to)."""
    return all(c.status == "True" for c in out.checks if c.type in (TOPICS_READY, SCHEMAS_REGISTERED))


def reconcile(body: Mapping[str, Any], claims: Mapping[str, Any], *, trigger: str, attempt: int = 0) -> None:
    meta = body["metadata"]
    with metrics.reconciling(PIPELINE, body, trigger) as logger:
        if status_.paused(PIPELINE, body):
            return
        spec = status_.validated(PIPELINE, body, IngestionPipelineSpec)
        if spec is None:
            return
        status = body.get("status") or {}
        owned_by_others = conflicts(spec, meta["uid"], claims)
        if owned_by_others:
            message = "; ".join(f"topic {t} is already managed by IngestionPipeline {c.ref}"
                                for t, c in sorted(owned_by_others.items()))
            conflict = Condition.false(TOPICS_READY, "ResourceConflict", message)
            status_.write_status(PIPELINE, body, [conflict], required=REQUIRED, observed_state={},
                                 ready_override=Condition.false("Ready", "ResourceConflict", message))
            return

        out = Outcome()
        ensure_topics(spec, status, out)
        register_schemas(meta["namespace"], spec, status, out, logger)
        binding, tables = _tables_binding(meta["namespace"], spec)
        out.checks.append(tables.condition)
        apply_workloads(body, spec, binding, out)
        check_lag(meta["namespace"], meta["name"], spec, binding, out)
        status_.conclude(PIPELINE, body, out.checks, required=REQUIRED, observed_state=out.observed,
                         changes=out.changes, trigger=trigger, logger=logger, retry=out.retry or tables.waiting,
                         attempt=attempt,
                         remove=() if out.observed["ingest"] else (INGEST_COMPLETE,))


def ingest_condition(job_name: str, phase: str) -> Condition:
    status: Status = "True" if phase == "Succeeded" else "False" if phase == "Failed" else "Unknown"
    return Condition(INGEST_COMPLETE, status, f"Ingest{phase}", f"Job {job_name} {phase.lower()}")


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
@kopf.on.update(GROUP, VERSION, PIPELINE.plural)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects
def pipeline_changed(body: kopf.Body, pipeline_topic_claims: kopf.Index, reason: str, retry: int, **_: Any) -> None:
    reconcile(body, pipeline_topic_claims, trigger="change" if reason != "resume" else "resume", attempt=retry)


@kopf.on.delete(GROUP, VERSION, PIPELINE.plural, when=cleanup.deletes_external)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects
def pipeline_deleted(body: kopf.Body, pipeline_topic_claims: kopf.Index, retry: int, **_: Any) -> None:
    """deletionPolicy Delete: remove this pipeline's topics and subjects (never the shared DLQ,
    never a topic another pipeline owns); give up after `cleanup_attempts` or on the annotation."""
    rt = runtime.get()
    meta = body["metadata"]
    spec = IngestionPipelineSpec.model_validate(dict(body["spec"]))
    with metrics.reconciling(PIPELINE, body, "delete") as logger:
        if cleanup.skip_cleanup(body):
            event(body, "CleanupSkipped", f"{cleanup.SKIP_CLEANUP_ANNOTATION}=true: topics and subjects "
                  "are left in place", warning=True)
            return
        others = conflicts(spec, meta["uid"], pipeline_topic_claims)
        mine = [t for t in spec.topic_names().values() if t not in others]
        try:
            external.delete_topics(rt.settings.kafka_bootstrap, mine)
            external.delete_subjects(refs.registry_url(meta["namespace"], spec.schema_registry),
                                     [value_subject(t) for t in mine])
        except (external.Unavailable, refs.Waiting) as exc:
            cleanup.cleanup_failed(PIPELINE, body, retry, exc, logger)
            return
        event(body, "CleanedUp", f"deleted topics and subjects of {', '.join(mine) or 'nothing'}")
        metrics.track_ready(PIPELINE.kind, meta["namespace"], meta["name"], None)
