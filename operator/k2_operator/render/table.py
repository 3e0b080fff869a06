"""IcebergTable → `k2.tables.TableDefinition` (what `ensure_table` creates and evolves) and, with
a compaction schedule, a `k2 maintain` CronJob with its settings ConfigMap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyiceberg.schema import Schema

from k2 import tables
from k2_operator.models import (
    COMPRESSION_PROPERTY,
    MAX_SNAPSHOT_AGE_PROPERTY,
    MIN_SNAPSHOTS_PROPERTY,
    TARGET_FILE_SIZE_PROPERTY,
    IcebergTableSpec,
)
from k2_operator.render import common
from k2_operator.render.common import Owner, RenderContext, WorkloadConfig

MAINTENANCE_DEADLINE_SECONDS = 4 * 3600  # a stuck compaction must not block the next run (Forbid)
FINISHED_JOB_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Names:
    """The names of an IcebergTable's children."""

    settings: str
    maintenance: str

    @classmethod
    def of(cls, name: str) -> Names:
        return cls(settings=f"{name}-maintenance-settings", maintenance=f"{name}-maintenance")


def properties(spec: IcebergTableSpec) -> dict[str, str]:
    """K2's default table properties (`k2.tables.default_properties`), then the CR's choices."""
    defaults = tables.default_properties(common.DeclaredSettings(
        target_file_size_bytes=spec.properties.target_file_size_bytes))
    return {
        **defaults,
        COMPRESSION_PROPERTY: spec.properties.compression,
        TARGET_FILE_SIZE_PROPERTY: str(spec.properties.target_file_size_bytes),
        MAX_SNAPSHOT_AGE_PROPERTY: str(int(spec.snapshot_retention.max_age_hours * 3600 * 1000)),
        MIN_SNAPSHOTS_PROPERTY: str(spec.snapshot_retention.min_snapshots_to_keep),
        **spec.properties.extra,
    }


def table_definition(spec: IcebergTableSpec, schema: Schema) -> tables.TableDefinition:
    """The definition `k2.tables.ensure_table` works from; `schema` comes from `spec.schema.fields`
    or the registered subject (resolved by the handler, since that needs the registry)."""
    return tables.TableDefinition(
        namespace=spec.namespace, name=spec.name, schema=schema,
        partition_by=tuple((p.column, p.transform) for p in spec.partition_by),
        sort_by=tuple(spec.sort_by), properties=properties(spec))


def workload_config(spec: IcebergTableSpec, ctx: RenderContext) -> WorkloadConfig:
    settings = common.workload_settings(ctx, namespace=spec.namespace,
                                        target_file_size_bytes=spec.properties.target_file_size_bytes,
                                        metrics_port=ctx.workload_metrics_port)
    return WorkloadConfig(settings, tuple(common.catalog_secret_env(spec.catalog_ref.name)),
                          unused=frozenset({"registry_url"}))  # `k2 maintain` never talks to the registry


def maintenance_cron_job(owner: Owner, spec: IcebergTableSpec, *, workload: WorkloadConfig,
                         ctx: RenderContext) -> dict[str, Any]:
    n = Names.of(owner.name)
    args = ["maintain", "--table", spec.name, "--retention-hours", f"{spec.snapshot_retention.max_age_hours:g}"]
    box = common.container(
        name="maintain", ctx=ctx, args=args, config_map=n.settings, workload=workload,
        resources=common.Resources(requests={"cpu": "250m", "memory": "512Mi"}, limits={"memory": "2Gi"}),
        ports=[("metrics", ctx.workload_metrics_port)],
        liveness=common.http_probe("/metrics", "metrics", period=30, failure=3, initial=10),
        readiness=common.http_probe("/metrics", "metrics", period=30, initial=5))
    template = common.pod_template(owner=owner, component="maintenance",
                                   spec=common.pod_spec([box], ctx, restart_policy="OnFailure"), workload=workload,
                                   ctx=ctx, pod=spec.maintenance_pod)
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": owner.metadata(name=n.maintenance, component="maintenance"),
        "spec": {
            "schedule": spec.compaction_schedule,
            "timeZone": spec.compaction_time_zone,
            # Compaction commits conflict with each other, never run two at once.
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": owner.labels("maintenance")},
                            "spec": {"backoffLimit": 2, "template": template,
                                     "activeDeadlineSeconds": MAINTENANCE_DEADLINE_SECONDS,
                                     "ttlSecondsAfterFinished": FINISHED_JOB_TTL_SECONDS}},
        },
    }


def render_table(owner: Owner, spec: IcebergTableSpec, *, ctx: RenderContext) -> list[dict[str, Any]]:
    if not spec.compaction_schedule:
        return []
    n = Names.of(owner.name)
    workload = workload_config(spec, ctx)
    return [common.config_map(owner=owner, name=n.settings, component="maintenance", workload=workload),
            maintenance_cron_job(owner, spec, workload=workload, ctx=ctx)]
