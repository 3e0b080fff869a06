"""IcebergTable: resolve the catalog and schema, create or evolve the table (compatible changes
only), keep its properties, schedule maintenance, report the table's observed state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError
from pyiceberg.schema import Schema

from k2 import tables as k2_tables
from k2_operator import external
from k2_operator.conditions import Condition
from k2_operator.handlers import apply, cleanup, metrics, refs, runtime
from k2_operator.handlers import status as status_
from k2_operator.handlers.claims import Claim, owned_by_others
from k2_operator.handlers.events import event
from k2_operator.handlers.refs import Waiting
from k2_operator.models import GROUP, TABLE, VERSION, IcebergTableSpec
from k2_operator.render.table import render_table, table_definition

TABLE_READY = "TableReady"
CLAIMS_INDEX = "table_identifier_claims"
REQUIRED = (TABLE_READY,)
PRUNE_KINDS = ("ConfigMap", "CronJob")


class InvalidSpec(Waiting):
    """The spec cannot be satisfied as written (e.g. a partition column missing from the subject)."""


def resolve_schema(namespace: str, spec: IcebergTableSpec) -> Schema:
    if spec.schema_.fields:
        return external.iceberg_schema(spec.schema_.avro_record(spec.name))
    subject = spec.schema_.from_subject or ""
    avro = external.latest_avro_schema(refs.registry_url(namespace, spec.schema_.registry), subject)
    if avro is None:
        raise Waiting("SubjectNotFound", f"subject {subject} is not registered yet")
    return external.iceberg_schema(avro)


def catalog_for(namespace: str, spec: IcebergTableSpec) -> Any:
    data = runtime.get().kube.secret_data(namespace, spec.catalog_ref.name)
    if data is None:
        raise Waiting("SecretNotFound", f"catalog Secret {spec.catalog_ref.name} does not exist")
    try:
        settings = external.catalog_settings(data)
    except ValueError as exc:
        raise Waiting("InvalidCatalogSecret", f"catalog Secret {spec.catalog_ref.name}: {exc}") from exc
    return external.catalog(settings)


def observed_state(table: Any) -> dict[str, Any]:
    snapshot = table.current_snapshot()
    return {"identifier": ".".join(table.name()), "tableUuid": str(table.metadata.table_uuid),
            "location": table.location(), "schemaId": table.schema().schema_id,
            "columns": len(table.schema().fields),
            "currentSnapshotId": str(snapshot.snapshot_id) if snapshot else None,
            "snapshots": len(table.metadata.snapshots)}


def claim_key(namespace: str, spec: IcebergTableSpec) -> str:
    """Tables are one per identifier and catalog: the catalog is named by the Secret in the namespace."""
    return f"{namespace}/{spec.catalog_ref.name}/{spec.identifier}"


@kopf.index(GROUP, VERSION, TABLE.plural, id=CLAIMS_INDEX)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects
def table_identifier_claims(namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any],
                            status: Mapping[str, Any], **_: Any) -> dict[str, Claim]:
    try:
        model = IcebergTableSpec.model_validate(dict(spec))
    except ValidationError:
        return {}
    return {claim_key(namespace, model): Claim.of(namespace, name, meta, established=bool(status.get("tableUuid")))}


def reconcile(body: Mapping[str, Any], claims: Mapping[str, Any], *, trigger: str, attempt: int = 0) -> None:
    namespace = body["metadata"]["namespace"]
    with metrics.reconciling(TABLE, body, trigger) as logger:
        if status_.paused(TABLE, body):
            return
        spec = status_.validated(TABLE, body, IcebergTableSpec)
        if spec is None:
            return
        conflict = owned_by_others([claim_key(namespace, spec)], body["metadata"]["uid"], claims)
        if conflict:
            message = (f"table {spec.identifier} of catalog {spec.catalog_ref.name} is already managed by "
                       f"IcebergTable {next(iter(conflict.values())).ref}")
            status_.write_status(TABLE, body, [Condition.false(TABLE_READY, "ResourceConflict", message)],
                                 required=REQUIRED, observed_state={},
                                 ready_override=Condition.false("Ready", "ResourceConflict", message))
            return
        status = body.get("status") or {}
        changes: list[str] = []
        observed: dict[str, Any] = {"identifier": spec.identifier}
        retry = False
        try:
            cat = catalog_for(namespace, spec)
            schema = resolve_schema(namespace, spec)
            unknown = [c for c in [p.column for p in spec.partition_by] + list(spec.sort_by)
                       if c not in {f.name for f in schema.fields}]
            if unknown:
                raise InvalidSpec("UnknownColumn", f"partitionBy/sortBy name columns the schema does not have: "
                                  f"{', '.join(unknown)}")
            definition = table_definition(spec, schema)
            existing = k2_tables.load_table(cat, spec.identifier)
            mismatch = external.compare_table(existing, definition) if existing is not None else None
            if mismatch:
                check = Condition.false(TABLE_READY, mismatch.reason, f"{spec.identifier}: {mismatch.message}; "
                                        "nothing was changed")
                observed.update(observed_state(existing))
            else:
                table, created, evolved = k2_tables.ensure(cat, definition)
                changed_properties = [] if created else external.apply_properties(table, definition.properties)
                if created:
                    changes.append(f"created table {spec.identifier}")
                if evolved:
                    changes.append(f"added columns to {spec.identifier}")
                if changed_properties:
                    changes.append(f"set {', '.join(changed_properties)} on {spec.identifier}")
                observed.update(observed_state(table))
                check = Condition.true(TABLE_READY, "Reconciled",
                                       f"{spec.identifier} with {observed['columns']} columns")
        except InvalidSpec as exc:  # retrying cannot help; the drift loop looks again
            check = Condition.false(TABLE_READY, exc.reason, str(exc))
        except Waiting as exc:
            check = Condition.false(TABLE_READY, exc.reason, str(exc))
            retry = True
        except external.Unavailable as exc:
            check = Condition.false(TABLE_READY, "RegistryUnavailable", str(exc))
            retry = True
        except Exception as exc:  # noqa: BLE001 - catalog/storage failures of any driver: report and retry
            logger.warning("table.catalog_error", error=str(exc), error_type=type(exc).__name__)
            check = Condition.false(TABLE_READY, "CatalogError", f"{type(exc).__name__}: {exc}")
            retry = True
        if retry:
            observed = {k: v for k, v in {**status, **observed}.items()
                        if k not in ("conditions", "observedGeneration")}

        owner = runtime.owner(TABLE, body)
        objects = apply.render_children(namespace, lambda ctx: render_table(owner, spec, ctx=ctx))
        applied, pruned = apply.apply_children(TABLE, body, objects, PRUNE_KINDS)
        changes += apply.describe_changes(applied, pruned)
        status_.conclude(TABLE, body, [check], required=REQUIRED, observed_state=observed, changes=changes,
                         trigger=trigger, logger=logger, retry=retry, attempt=attempt)


@kopf.on.resume(GROUP, VERSION, TABLE.plural)
@kopf.on.create(GROUP, VERSION, TABLE.plural)
@kopf.on.update(GROUP, VERSION, TABLE.plural)  # type: ignore[arg-type]  # kopf's protocol cannot name the index kwargs it injects
def table_changed(body: kopf.Body, table_identifier_claims: kopf.Index, reason: str, retry: int, **_: Any) -> None:
    reconcile(body, table_identifier_claims, trigger="change" if reason != "resume" else "resume", attempt=retry)


@kopf.on.delete(GROUP, VERSION, TABLE.plural, when=cleanup.deletes_external)
def table_deleted(body: kopf.Body, retry: int, **_: Any) -> None:
    """deletionPolicy Delete: drop the table and purge its files."""
    meta = body["metadata"]
    spec = IcebergTableSpec.model_validate(dict(body["spec"]))
    with metrics.reconciling(TABLE, body, "delete") as logger:
        if cleanup.skip_cleanup(body):
            event(body, "CleanupSkipped", f"{cleanup.SKIP_CLEANUP_ANNOTATION}=true: table "
                  f"{spec.identifier} is left in place", warning=True)
            return
        try:
            dropped = external.drop_table(catalog_for(meta["namespace"], spec), spec.identifier, purge=True)
        except Exception as exc:  # noqa: BLE001 - whatever the catalog raised: retry, then give up
            cleanup.cleanup_failed(TABLE, body, retry, exc, logger)
            return
        event(body, "CleanedUp", f"dropped and purged {spec.identifier}" if dropped
              else f"{spec.identifier} was already gone")
        metrics.track_ready(TABLE.kind, meta["namespace"], meta["name"], None)
