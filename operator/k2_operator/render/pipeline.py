"""IngestionPipeline → settings ConfigMap, consumer Deployment (`k2 stream run`), its metrics
Service, PodDisruptionBudget and ServiceMonitor, and the ingest: a Job for sources that run to
completion (folder sources such as asx-csv, synthetic), a Deployment for continuous ones (feed),
as the source's registration (`k2.sources.SOURCES`) says; a folder source is never continuous
(`k2.sources.register` refuses it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from k2.sources import SOURCES
from k2_operator.models import FolderInput, IngestionPipelineSpec, SyntheticSource, TableKind
from k2_operator.render import common
from k2_operator.render.common import Owner, RenderContext, WorkloadConfig

INGEST_DEADLINE_SECONDS = 12 * 3600  # a stuck ingest fails instead of holding its pod forever
FINISHED_JOB_TTL_SECONDS = 24 * 3600
# What only `k2 stream run` reads (batching, compaction, the tables' namespace and file size).
STREAM_ONLY_SETTINGS = frozenset({"batch_rows", "batch_bytes", "batch_seconds", "compact_interval_seconds",
                                  "compact_min_files", "compact_max_bytes", "history_detail_seconds",
                                  "history_interval_seconds", "namespace", "target_file_size_bytes"})
# What only a file ingest (`k2 ingest folder`, a Job) reads: changing it restarts no Deployment.
FILE_INGEST_ONLY_SETTINGS = frozenset({"ingest_workers"})


@dataclass(frozen=True)
class TableBinding:
    """The IcebergTables a pipeline writes, resolved by the handler: which kinds, in which
    Iceberg namespace, through which catalog Secret."""

    kinds: tuple[TableKind, ...]
    namespace: str
    catalog_secret: str
    target_file_size_bytes: int | None = None


@dataclass(frozen=True)
class Names:
    """The names of a pipeline's children."""

    settings: str
    consumer: str
    metrics: str
    ingest: str
    feed: str

    @classmethod
    def of(cls, name: str) -> Names:
        return cls(settings=f"{name}-settings", consumer=f"{name}-consumer", metrics=f"{name}-consumer-metrics",
                   ingest=f"{name}-ingest", feed=f"{name}-feed")


def continuous(spec: IngestionPipelineSpec) -> bool:
    """The source runs until stopped (a Deployment), not to completion (a Job)."""
    return spec.source.type in SOURCES and SOURCES[spec.source.type].continuous


def consumer_group(name: str, namespace: str) -> str:
    """Prefix of the consumer groups (`k2 stream run` appends `-<table>`)."""
    return f"k2-stream-{namespace}-{name}"


def source_digest(spec: IngestionPipelineSpec) -> str:
    """Identifies one ingest run: a new source (or new topics) is a new Job, an unchanged one is not."""
    return common.short_hash({"source": spec.source.model_dump(mode="json", exclude={"resources"}),
                              "kinds": list(spec.topics.kinds), "exchange": spec.exchange,
                              "assetClass": spec.asset_class})


def ingest_job_name(name: str, spec: IngestionPipelineSpec) -> str:
    return f"{Names.of(name).ingest}-{source_digest(spec)}"


def workload_config(spec: IngestionPipelineSpec, binding: TableBinding | None, ctx: RenderContext) -> WorkloadConfig:
    values: dict[str, Any] = {
        "asset_class": spec.asset_class, "exchange": spec.exchange,
        "topic_partitions": spec.topics.partitions, "topic_replication": spec.topics.replication_factor,
        "compatibility": spec.compatibility,
        "batch_rows": spec.consumer.batch_rows, "batch_bytes": spec.consumer.batch_bytes,
        "batch_seconds": spec.consumer.batch_seconds,
        "compact_interval_seconds": spec.consumer.compact_interval_seconds,
        "compact_min_files": spec.consumer.compact_min_files,
        "compact_max_bytes": spec.consumer.compact_max_bytes,
        "history_detail_seconds": spec.consumer.history_detail_seconds,
        "history_interval_seconds": spec.consumer.history_interval_seconds,
        "stream_process_per_table": spec.consumer.process_per_table,
        "gap_alert": spec.consumer.gap_alert, "gap_halt": spec.consumer.gap_halt,
        "metrics_port": ctx.workload_metrics_port, "ingest_workers": spec.source.workers,
    }
    if spec.source.feed is not None:
        values["feed_stale_seconds"] = spec.source.feed.stale_seconds
    registry, secrets = common.registry_settings(spec.schema_registry, ctx)
    values.update(registry)
    if binding is not None:
        values["namespace"] = binding.namespace
        if binding.target_file_size_bytes:
            values["target_file_size_bytes"] = binding.target_file_size_bytes
        secrets.extend(common.catalog_secret_env(binding.catalog_secret))
    return WorkloadConfig(common.workload_settings(ctx, **values), tuple(secrets))


def feed_workload(spec: IngestionPipelineSpec, ctx: RenderContext) -> WorkloadConfig:
    """The feed's part of the pipeline's configuration: no catalog (it only writes to Kafka) and
    nothing only the consumers read, so changing those never restarts it: a restarted feed misses
    what the venue sends meanwhile."""
    return replace(workload_config(spec, None, ctx), unused=STREAM_ONLY_SETTINGS | FILE_INGEST_ONLY_SETTINGS)


def _metrics_probes(ctx: RenderContext) -> dict[str, Any]:
    return {"liveness": common.http_probe("/metrics", "metrics", period=20, failure=3, initial=10),
            "readiness": common.http_probe("/metrics", "metrics", period=10, initial=5)}


def consumer_deployment(owner: Owner, spec: IngestionPipelineSpec, *, binding: TableBinding,
                        workload: WorkloadConfig, ctx: RenderContext) -> dict[str, Any]:
    n = Names.of(owner.name)
    # One consumer group per pipeline (and table): pipelines of other exchanges writing tables of
    # the same name must not share a group.
    args = ["stream", "run", "--tables", ",".join(binding.kinds),
            "--group-id", consumer_group(owner.name, owner.namespace)]
    probes = _metrics_probes(ctx)
    # Liveness is the poll loop's progress (`/livez`, K2_STREAM_STALL_SECONDS), not /metrics.
    box = common.container(name="stream", ctx=ctx, args=args, config_map=n.settings, workload=workload,
                           resources=spec.consumer.resources, ports=[("metrics", ctx.workload_metrics_port)],
                           liveness=common.http_probe("/livez", "metrics", period=20, failure=3, initial=10),
                           readiness=probes["readiness"])
    template = common.pod_template(owner=owner, component="consumer", spec=common.pod_spec([box], ctx),
                                   workload=workload, ctx=ctx, metrics_port=ctx.workload_metrics_port,
                                   pod=spec.consumer.pod)
    # SIGTERM makes `k2 stream run` flush and commit its open batches: give it time to.
    template["spec"]["terminationGracePeriodSeconds"] = 60
    return common.deployment(owner=owner, name=n.consumer, component="consumer", replicas=spec.consumer.replicas,
                             template=template)


def ingest_args(spec: IngestionPipelineSpec) -> list[str]:
    """The `k2` command of the source's registration (`k2.sources.SOURCES`), with this spec's options;
    any folder source given `source.folder` runs as `k2 ingest folder PATH --source TYPE`."""
    source = spec.source
    if source.type not in SOURCES:
        raise ValueError(f"source type {source.type!r} has no ingest command")
    command = list(SOURCES[source.type].command)
    if source.type == "synthetic":
        synthetic = source.synthetic or SyntheticSource()
        return [*command, "--symbols", str(synthetic.symbols), "--days", str(synthetic.days),
                "--seed", str(synthetic.seed), "--no-progress"]
    if source.folder is not None:
        return ["ingest", "folder", source.folder.path, "--source", source.type, *_folder_options(spec, source.folder)]
    if source.type == "asx-csv" and source.asx_csv is not None:
        return [*command, source.asx_csv.path, *_folder_options(spec, source.asx_csv)]
    if source.type == "feed" and source.feed is not None:
        return [*command, source.feed.url, "--protocol", source.feed.protocol,
                "--channels", ",".join(source.feed.channels), "--symbols", ",".join(source.feed.symbols) or "*"]
    raise ValueError(f"source type {source.type!r} has no ingest command")


def _folder_options(spec: IngestionPipelineSpec, folder: FolderInput) -> list[str]:
    args = ["--no-progress"]
    data_kinds = [k for k in spec.topics.kinds if k != "reference"]
    if data_kinds:
        args += ["--topics", ",".join(data_kinds)]
    if folder.symbols:
        args += ["--symbols", ",".join(folder.symbols)]
    return args


def _input_volume(spec: IngestionPipelineSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The folder source's claim, mounted read-only (its mounts, its volumes): the ingest never writes it."""
    folder = spec.source.folder_input
    if folder is None or not folder.claim_name:
        return [], []
    return ([{"name": "input", "mountPath": folder.mount_path, "readOnly": True}],
            [{"name": "input", "persistentVolumeClaim": {"claimName": folder.claim_name, "readOnly": True}}])


def ingest_job(owner: Owner, spec: IngestionPipelineSpec, *, workload: WorkloadConfig,
               ctx: RenderContext) -> dict[str, Any]:
    mounts, volumes = _input_volume(spec)
    probes = _metrics_probes(ctx)
    box = common.container(name="ingest", ctx=ctx, args=ingest_args(spec), config_map=Names.of(owner.name).settings,
                           workload=workload, resources=spec.source.resources,
                           ports=[("metrics", ctx.workload_metrics_port)], liveness=probes["liveness"],
                           readiness=probes["readiness"], extra_mounts=mounts)
    pod = common.pod_spec([box], ctx, restart_policy="Never", extra_volumes=volumes, tmp_size="4Gi")
    template = common.pod_template(owner=owner, component="ingest", spec=pod, workload=workload, ctx=ctx,
                                   metrics_port=ctx.workload_metrics_port, pod=spec.source.pod)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": owner.metadata(name=ingest_job_name(owner.name, spec), component="ingest",
                                   annotations={"k2.io/source-digest": source_digest(spec)}),
        # A rerun of the same source is harmless (sequence numbers are deterministic and the stream
        # de-duplicates), so a failed pod is retried a couple of times.
        "spec": {"backoffLimit": 2, "template": template, "activeDeadlineSeconds": INGEST_DEADLINE_SECONDS,
                 # The pipeline records the Job's outcome in its status, so the Job itself can go.
                 "ttlSecondsAfterFinished": FINISHED_JOB_TTL_SECONDS},
    }


def feed_deployment(owner: Owner, spec: IngestionPipelineSpec, *, workload: WorkloadConfig,
                    ctx: RenderContext) -> dict[str, Any]:
    """One pod per feed: two would ingest every tick twice (the stream would drop the copies, but
    the feed's entitlement is usually for one connection). Liveness is feed progress (`/livez`:
    a message, even a heartbeat, within twice the stale period), so a hung session is restarted."""
    n = Names.of(owner.name)
    box = common.container(name="feed", ctx=ctx, args=ingest_args(spec), config_map=n.settings, workload=workload,
                           resources=spec.source.resources, ports=[("metrics", ctx.workload_metrics_port)],
                           liveness=common.http_probe("/livez", "metrics", period=15, failure=2, initial=10),
                           readiness=common.http_probe("/metrics", "metrics", period=10, initial=5))
    pod = common.pod_spec([box], ctx)
    template = common.pod_template(owner=owner, component="feed", spec=pod,
                                   workload=workload, ctx=ctx, metrics_port=ctx.workload_metrics_port,
                                   pod=spec.source.pod)
    template["spec"]["terminationGracePeriodSeconds"] = 60  # SIGTERM flushes the producer and the DLQ
    deployment = common.deployment(owner=owner, name=n.feed, component="feed", replicas=1, template=template)
    deployment["spec"]["strategy"] = {"type": "Recreate"}  # never two sessions at once
    return deployment


def render_pipeline(owner: Owner, spec: IngestionPipelineSpec, *, binding: TableBinding | None,
                    ctx: RenderContext) -> list[dict[str, Any]]:
    """Every child object of the pipeline as it should be. Consumers exist only once the tables are
    bound (`binding`), so they never create a table their IcebergTable has not defined yet."""
    n = Names.of(owner.name)
    workload = workload_config(spec, binding, ctx)
    objects = [common.config_map(owner=owner, name=n.settings, component="pipeline", workload=workload)]
    if binding is not None and binding.kinds:
        objects += [
            consumer_deployment(owner, spec, binding=binding, ctx=ctx,
                                workload=replace(workload, unused=FILE_INGEST_ONLY_SETTINGS)),
            common.service(owner=owner, name=n.metrics, component="consumer", headless=True,
                           meta=spec.consumer.service, ports=[
                {"name": "metrics", "port": ctx.workload_metrics_port, "targetPort": "metrics", "protocol": "TCP"}]),
            common.pod_disruption_budget(owner=owner, name=n.consumer, component="consumer"),
        ]
        if ctx.service_monitor:
            objects.append(common.service_monitor(owner=owner, name=n.consumer, component="consumer", port="metrics",
                                                  meta=spec.consumer.service_monitor))
    if continuous(spec):
        objects.append(feed_deployment(owner, spec, workload=feed_workload(spec, ctx), ctx=ctx))
    elif spec.source.type != "none":
        objects.append(ingest_job(owner, spec, workload=workload, ctx=ctx))
    return objects
