"""Iceberg table definitions and the catalog: one place for schema, partitioning, sort order and
properties, used by the stream writer (create/evolve), the operator (IcebergTable) and the query
engine (pruning)."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.expressions import EqualTo
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table, TableProperties
from pyiceberg.table import Transaction as IcebergTransaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.table.update import update_table_metadata
from pyiceberg.transforms import BucketTransform, IdentityTransform, Transform
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from k2 import schemas
from k2.reach import Unreachable, redacted
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.tables")

OFFSETS_PROPERTY = "k2.kafka.offsets"  # snapshot summary key: {"topic": {"partition": next_offset}}
# snapshot summary key: the exchange time (µs since the epoch) of the newest tick the table holds
NEWEST_TICK_PROPERTY = "k2.newest-tick-us"
KEY_COLUMNS: dict[TableKind, tuple[str, ...]] = {
    "trades": ("symbol", "exchange_date", "sequence_number"),
    "quotes": ("symbol", "exchange_date", "sequence_number"),
    "reference": ("symbol", "company_id"),
}


@dataclass(frozen=True)
class TableDefinition:
    """What a K2 table looks like; rendered from an IcebergTable CR or the built-in defaults."""

    namespace: str
    name: str
    schema: Schema
    partition_by: tuple[tuple[str, str], ...] = ()  # (source column, transform: identity|bucket[N])
    sort_by: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def identifier(self) -> str:
        return f"{self.namespace}.{self.name}"

    def partition_spec(self) -> PartitionSpec:
        fields = []
        for position, (column, transform) in enumerate(self.partition_by):
            source = self.schema.find_field(column)
            tf: Transform[Any, Any]
            if transform == "identity":
                tf, name = IdentityTransform(), column
            elif transform.startswith("bucket["):
                buckets = int(transform[len("bucket["):-1])
                tf, name = BucketTransform(buckets), f"{column}_bucket"
            else:
                raise ValueError(f"unsupported partition transform {transform!r}")
            fields.append(PartitionField(source_id=source.field_id, field_id=1000 + position,
                                         transform=tf, name=name))
        return PartitionSpec(*fields)

    def sort_order(self) -> SortOrder:
        return SortOrder(*[SortField(source_id=self.schema.find_field(c).field_id, transform=IdentityTransform(),
                                     direction=SortDirection.ASC, null_order=NullOrder.NULLS_LAST)
                           for c in self.sort_by])


# pyiceberg retries a conflicting commit by itself, rebasing it on whatever was committed meanwhile.
# K2's writers must not: a stale batch would then land next to the one that fenced it, and a
# compaction's overwrite would delete files a writer added. Conflicts surface to K2's code, which
# re-reads the table and re-checks before trying again.
REQUIRED_PROPERTIES = {"commit.retry.num-retries": "0"}
MAX_COMMIT_ATTEMPTS = 30  # writers commit every few seconds; retrying with backoff finds a gap


def default_properties(settings: Settings) -> dict[str, str]:
    return {
        **REQUIRED_PROPERTIES,
        "write.format.default": "parquet",
        "write.parquet.compression-codec": "zstd",
        "write.target-file-size-bytes": str(settings.target_file_size_bytes),
        "format-version": "2",
        # Each commit writes a metadata file listing every snapshot kept; without this they all stay,
        # and a streaming table's metadata grew with the square of its commits (bench_scale).
        "write.metadata.delete-after-commit.enabled": "true",
        "write.metadata.previous-versions-max": "100",
        # Each append adds a manifest, and planning a scan or a compaction reads every one: merged
        # once 100 have gathered (Java Iceberg's default; pyiceberg's is a manifest per commit for ever).
        "commit.manifest-merge.enabled": "true",
        # Files are sorted by symbol, and DuckDB prunes by row group: at pyiceberg's default of 1M
        # rows a day's file was one group, so a one-symbol query read the whole day's rows.
        "write.parquet.row-group-limit": "65536",
    }


def builtin_definition(kind: TableKind, settings: Settings) -> TableDefinition:
    """K2's tables: ticks partitioned by exchange-local trading date and sorted so that one
    symbol's rows sit together in time order (row-group statistics then prune by symbol)."""
    partition_by: tuple[tuple[str, str], ...] = ()
    sort_by: tuple[str, ...] = ()
    if kind in ("trades", "quotes"):
        partition_by = (("exchange_date", "identity"),)
        sort_by = ("symbol", "exchange_timestamp", "sequence_number")
    return TableDefinition(settings.namespace, kind, schemas.iceberg_schema(kind), partition_by, sort_by,
                           default_properties(settings))


_CATALOG_INIT_ATTEMPTS = 3
# What SQLite and PostgreSQL say when a CREATE TABLE lost to another process's.
_CREATED_MEANWHILE = ("already exists", "duplicate key value")


def catalog(settings: Settings) -> Catalog:
    props: dict[str, Any] = {"type": "sql", "uri": settings.resolved_catalog_uri,
                             "warehouse": settings.warehouse_uri, "init_catalog_tables": "true"}
    if settings.s3_endpoint:
        props.update({"s3.endpoint": settings.s3_endpoint, "s3.region": settings.s3_region,
                      "s3.path-style-access": "true"})
        if settings.s3_access_key and settings.s3_secret_key:
            props["s3.access-key-id"] = settings.s3_access_key.get_secret_value()
            props["s3.secret-access-key"] = settings.s3_secret_key.get_secret_value()
    try:
        return _opened(settings.catalog_name, props)
    except OperationalError as exc:  # the database did not answer (or a SQLite file cannot be opened)
        raise Unreachable("The Iceberg catalog database", redacted(settings.resolved_catalog_uri), "K2_CATALOG_URI",
                          str(exc.orig).strip().splitlines()[0]) from exc


def _opened(name: str, props: dict[str, Any]) -> Catalog:
    """pyiceberg checks that its tables exist, then creates them: processes opening a new catalog
    together (a stream's writers) can find them created between the two. They exist then, so
    opening again finds them."""
    for _ in range(_CATALOG_INIT_ATTEMPTS - 1):
        try:
            return load_catalog(name, **props)
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if not any(s in str(exc.orig) for s in _CREATED_MEANWHILE):
                raise
    return load_catalog(name, **props)


class EnsuredTable(NamedTuple):
    table: Table
    created: bool
    evolved: bool


@contextmanager
def _warehouse_reachable(cat: Catalog) -> Iterator[None]:
    """Object storage that does not answer is named, with its endpoint and the setting to change."""
    try:
        yield
    except OSError as exc:
        endpoint = cat.properties.get("s3.endpoint")
        if endpoint and "NETWORK_CONNECTION" in str(exc):
            raise Unreachable("S3 (the Iceberg warehouse)", endpoint, "K2_S3_ENDPOINT",
                              str(exc).split("AWS Error ", 1)[-1].splitlines()[0]) from exc
        raise


def ensure(cat: Catalog, definition: TableDefinition) -> EnsuredTable:
    """Create the table if absent; otherwise evolve its schema with compatible additions only."""
    with _warehouse_reachable(cat):
        return _ensure(cat, definition)


def _ensure(cat: Catalog, definition: TableDefinition) -> EnsuredTable:
    try:
        cat.create_namespace(definition.namespace)
    except (NamespaceAlreadyExistsError, IntegrityError):
        pass  # IntegrityError: another process created it between the SQL catalog's check and insert
    # Looked up first: the SQL catalog writes a table's first metadata file before it finds the
    # name taken, so creating an existing table would leave an orphan file at every start.
    table = load_table(cat, definition.identifier)
    if table is None:
        try:
            table = cat.create_table(definition.identifier, schema=definition.schema,
                                     partition_spec=definition.partition_spec(), sort_order=definition.sort_order(),
                                     properties={**definition.properties, **REQUIRED_PROPERTIES})
            log.info("table.created", table=definition.identifier)
            return EnsuredTable(table, created=True, evolved=False)
        except TableAlreadyExistsError:  # created by another process meanwhile
            table = cat.load_table(definition.identifier)
    missing = {k: v for k, v in REQUIRED_PROPERTIES.items() if table.properties.get(k) != v}
    if missing:
        table = set_properties(table, missing)
    evolved = evolve_schema(table, definition.schema)  # leaves `table` current
    return EnsuredTable(table, created=False, evolved=evolved)


def ensure_table(cat: Catalog, definition: TableDefinition) -> Table:
    return ensure(cat, definition).table


def commit_retrying_conflicts(table: Table, action: str, commit: Callable[[Table], None], *,
                              on_conflict: Callable[[], None] | None = None) -> Table:
    """Run `commit` on a fresh read of the table until no other commit lands in between.

    K2 tables turn pyiceberg's own retry off (it would rebase blindly), so every conflict lands
    here and the whole step is redone — decisions included — from the table as it is now.
    Returns `table` itself, current: pyiceberg's `refresh` and every commit through a transaction
    update the handle in place. `on_conflict` is called after each conflict (metrics).
    """
    for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
        table = table.refresh()
        try:
            commit(table)
            return table
        except (CommitFailedException, ValidationException) as exc:
            log.warning("table.commit_conflict", table=".".join(table.name()), action=action, attempt=attempt,
                        error=str(exc))
            if on_conflict is not None:
                on_conflict()
            time.sleep(min(0.02 * 2 ** min(attempt, 5), 1.0) * random.uniform(0.5, 1.5))
    raise RuntimeError(f"{action} of {'.'.join(table.name())} kept conflicting after {MAX_COMMIT_ATTEMPTS} attempts")


class Transaction(IcebergTransaction):
    """pyiceberg's transaction, with its view of the metadata computed once per change.

    pyiceberg recomputes that view (a deep copy of the whole table metadata) on every read of
    `table_metadata`, about twenty per append, and the metadata holds every snapshot kept: a
    streaming commit's cost grew with each commit before it. The view only changes when the base
    metadata or the staged updates do, and its models are frozen, so it is shared until then."""

    _view: tuple[TableMetadata, tuple, TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        base, updates = self._table.metadata, self._updates
        view = self._view
        if view is None or view[0] is not base or view[1] is not updates:
            view = self._view = (base, updates, update_table_metadata(base, updates))
        return view[2]


def transaction(table: Table) -> Transaction:
    """A transaction on `table` (use it as a context manager: it commits on leaving)."""
    return Transaction(table)


def set_properties(table: Table, properties: dict[str, str]) -> Table:
    def commit(current: Table) -> None:
        with transaction(current) as tx:
            tx.set_properties(properties)

    return commit_retrying_conflicts(table, "setting properties", commit)


def evolve_schema(table: Table, schema: Schema) -> bool:
    """Add the columns of `schema` missing from the table (as optional). Returns whether it changed.

    When it looks at the catalog, `table` ends up current (see `commit_retrying_conflicts`).
    """
    def missing(current: Table) -> list[str]:
        existing = {f.name for f in current.schema().fields}
        return [f.name for f in schema.fields if f.name not in existing]

    if not missing(table):
        return False
    added: list[str] = []

    def commit(current: Table) -> None:
        added[:] = missing(current)  # another writer may have added them meanwhile
        if added:
            with current.update_schema() as update:
                update.union_by_name(schema)

    commit_retrying_conflicts(table, "schema evolution", commit)
    if added:
        log.info("table.schema_evolved", table=".".join(table.name()), added=added)
    return bool(added)


def load_table(cat: Catalog, identifier: str) -> Table | None:
    try:
        with _warehouse_reachable(cat):
            return cat.load_table(identifier)
    except NoSuchTableError:
        return None


def metadata_location(cat: Catalog, identifier: str) -> str | None:
    """Where the table's current metadata file is, from the catalog's row alone: the file itself
    (every kept snapshot) is read only when this moved. None when the table does not exist.
    K2's catalog is pyiceberg's SQL catalog (`catalog`): one indexed row read."""
    if not isinstance(cat, SqlCatalog):
        loaded = load_table(cat, identifier)
        return loaded.metadata_location if loaded else None
    namespace = Catalog.namespace_to_string(Catalog.namespace_from(identifier))
    with Session(cat.engine) as session:
        return session.scalar(select(IcebergTables.metadata_location).where(
            IcebergTables.catalog_name == cat.name, IcebergTables.table_namespace == namespace,
            IcebergTables.table_name == Catalog.table_name_from(identifier)))


def _recorded(table: Table, key: str, snapshot: Snapshot | None = None) -> str | None:
    """Summary property `key` of `snapshot` (default: the current one), or of its newest ancestor
    that has it. Snapshots made by maintenance carry K2's forward (carried_properties), but walking
    the lineage keeps this right for snapshots made by other tools too."""
    snapshot = snapshot or table.current_snapshot()
    while snapshot is not None:
        raw = snapshot.summary.additional_properties.get(key) if snapshot.summary else None
        if raw:
            return raw
        snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
    return None


def recorded_offsets(table: Table, snapshot: Snapshot | None = None) -> dict[str, dict[int, int]]:
    """The Kafka offsets recorded by `snapshot` (default: the current one) or its lineage."""
    raw = _recorded(table, OFFSETS_PROPERTY, snapshot)
    parsed = json.loads(raw) if raw else {}
    return {topic: {int(p): int(o) for p, o in parts.items()} for topic, parts in parsed.items()}


def day_sequence_marks(table: Table, snapshot_id: int, epoch_day: int) -> dict[tuple[str, int], int]:
    """The highest sequence number `snapshot_id` stores per symbol of one exchange date (epoch day),
    reading that day's partition only: `quality.StoredSequences` loads a table's marks with it."""
    day = (dt.date(1970, 1, 1) + dt.timedelta(days=epoch_day)).isoformat()
    stored = table.scan(row_filter=EqualTo("exchange_date", day), selected_fields=("symbol", "sequence_number"),
                        snapshot_id=snapshot_id).to_arrow()
    if not stored.num_rows:
        return {}
    highest = stored.group_by("symbol").aggregate([("sequence_number", "max")])
    return {(symbol, epoch_day): seq for symbol, seq in zip(highest["symbol"].to_pylist(),
                                                           highest["sequence_number_max"].to_pylist(), strict=True)}


def recorded_newest_tick_us(table: Table) -> int:
    """The exchange time (µs) of the newest tick the current snapshot holds; 0 if none recorded."""
    return int(_recorded(table, NEWEST_TICK_PROPERTY) or 0)


def target_file_size(table: Table) -> int:
    """The data file size writers and compaction aim for (pyiceberg's default when unset)."""
    return int(table.properties.get(TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                    TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT))


def carried_properties(table: Table) -> dict[str, str]:
    """K2's summary properties of the current snapshot, for a maintenance commit to carry forward."""
    carried = {key: _recorded(table, key) for key in (OFFSETS_PROPERTY, NEWEST_TICK_PROPERTY)}
    return {key: value for key, value in carried.items() if value}


def offsets_held_since_ms(table: Table, topic: str, partitions: set[int]) -> int:
    """Since when (ms) the table has recorded its current offsets for these partitions: the
    time of the oldest snapshot in the main lineage that already had them, 0 when that lineage
    runs out first (snapshots expired, or no commit yet). Whatever was done with messages past
    those offsets was done after it."""
    current = recorded_offsets(table).get(topic, {})
    wanted = {p: current.get(p) for p in partitions}
    since = 0
    snapshot: Snapshot | None = table.current_snapshot()
    while snapshot is not None:
        raw = snapshot.summary.additional_properties.get(OFFSETS_PROPERTY) if snapshot.summary else None
        if raw:
            offsets = {int(p): int(o) for p, o in json.loads(raw).get(topic, {}).items()}
            if {p: offsets.get(p) for p in partitions} != wanted:
                return since
        since = snapshot.timestamp_ms
        snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
    return 0


def encode_offsets(offsets: dict[str, dict[int, int]]) -> str:
    return json.dumps({t: {str(p): o for p, o in sorted(parts.items())} for t, parts in sorted(offsets.items())},
                      separators=(",", ":"))
