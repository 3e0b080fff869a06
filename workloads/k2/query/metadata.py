"""What the tables hold: sizes, snapshots, freshness and symbols.

Sizes and watermarks come from Iceberg metadata (file record counts, sizes and column bounds),
not from scanning data, so they cost the same however large the tables grow. The dataclasses
are also the API's response items (pydantic validates and documents dataclasses as they are).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated

import pyarrow as pa
from pydantic import Field
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from k2.query import planning
from k2.query.engine import Engine, Scan
from k2.query.filters import EARLIEST, TickFilter
from k2.settings import TABLE_KINDS, TableKind


@dataclass(frozen=True)
class TableStats:
    table: str
    rows: int
    files: int
    bytes: int
    partitions: int
    snapshot_id: int | None
    committed_at: Annotated[dt.datetime | None, Field(description="when the latest snapshot was committed")]
    event_watermark: Annotated[dt.datetime | None, Field(description="newest exchange_timestamp (tick tables)")]
    ingest_watermark: Annotated[dt.datetime | None, Field(description="newest ingest_timestamp")]


@dataclass(frozen=True)
class SnapshotInfo:
    table: str
    snapshot_id: int
    parent_id: int | None
    committed_at: dt.datetime
    operation: str | None
    added_rows: int | None
    total_rows: int | None
    current: bool


def table_stats(engine: Engine, kind: TableKind) -> TableStats:
    pin = engine.pin(kind)
    files = engine.plan(pin, TickFilter()).files
    return TableStats(
        table=engine.settings.table_identifier(kind),
        rows=sum(f.record_count for f in files),
        files=len(files),
        bytes=sum(f.file_size_in_bytes for f in files),
        partitions=len({f.partition for f in files}),
        snapshot_id=pin.snapshot_id,
        committed_at=_ms(pin.snapshot.timestamp_ms) if pin.snapshot else None,
        event_watermark=_upper_bound(pin.table, files, "exchange_timestamp"),
        ingest_watermark=_upper_bound(pin.table, files, "ingest_timestamp"),
    )


def stats(engine: Engine) -> list[TableStats]:
    return [table_stats(engine, kind) for kind in TABLE_KINDS]


def snapshots(engine: Engine, kind: TableKind) -> list[SnapshotInfo]:
    """The table's retained snapshots, newest first."""
    table = engine.table(kind)
    if table is None:
        return []
    current = table.current_snapshot()
    name = engine.settings.table_identifier(kind)
    return [_snapshot_info(name, s, current) for s in sorted(table.snapshots(), key=lambda s: s.timestamp_ms,
                                                              reverse=True)]


def symbols(engine: Engine) -> pa.Table:
    """Every symbol with trades or quotes: counts, first and last trading date, company name."""
    scans: dict[str, Scan] = {kind: engine.plan(engine.pin(kind), TickFilter()) for kind in TABLE_KINDS}
    sql = """
        WITH t AS (SELECT symbol, exchange, count(*) AS trades, min(exchange_date) AS first_date,
                          max(exchange_date) AS last_date FROM {trades} GROUP BY symbol, exchange),
             q AS (SELECT symbol, exchange, count(*) AS quotes, min(exchange_date) AS first_date,
                          max(exchange_date) AS last_date FROM {quotes} GROUP BY symbol, exchange),
             r AS (SELECT symbol, exchange, max(company_name) AS company_name FROM {reference}
                   GROUP BY symbol, exchange)
        SELECT symbol, exchange, r.company_name, coalesce(t.trades, 0) AS trades, coalesce(q.quotes, 0) AS quotes,
               least(t.first_date, q.first_date) AS first_date, greatest(t.last_date, q.last_date) AS last_date
        FROM t FULL JOIN q USING (symbol, exchange) LEFT JOIN r USING (symbol, exchange)
        ORDER BY symbol, exchange
    """
    return engine.run("symbols", sql, {}, scans)


def _snapshot_info(table: str, snapshot: Snapshot, current: Snapshot | None) -> SnapshotInfo:
    summary = snapshot.summary
    props = summary.additional_properties if summary else {}
    return SnapshotInfo(
        table=table, snapshot_id=snapshot.snapshot_id, parent_id=snapshot.parent_snapshot_id,
        committed_at=_ms(snapshot.timestamp_ms), operation=summary.operation.value if summary else None,
        added_rows=_optional_int(props.get("added-records")), total_rows=_optional_int(props.get("total-records")),
        current=current is not None and current.snapshot_id == snapshot.snapshot_id,
    )


def _upper_bound(table: Table | None, files: tuple[DataFile, ...], column: str) -> dt.datetime | None:
    """The largest value of a timestamp column, from the files' column bounds."""
    if table is None or not files or column not in table.schema().column_names:
        return None
    values = [upper for _, upper in planning.column_bounds(table, files, column) if upper is not None]
    return EARLIEST + dt.timedelta(microseconds=max(values)) if values else None


def _ms(timestamp_ms: int) -> dt.datetime:
    return EARLIEST + dt.timedelta(milliseconds=timestamp_ms)


def _optional_int(value: str | None) -> int | None:
    return int(value) if value is not None else None
