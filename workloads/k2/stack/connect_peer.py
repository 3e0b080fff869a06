"""What `benchmarks/bench_connect.py` compares between K2's stream and Iceberg's Kafka Connect sink.

Both sinks write the same topics into Iceberg tables of a SQL catalog on SQLite (K2 through
pyiceberg, the sink through Iceberg's JdbcCatalog: the catalog tables are the same, so pyiceberg
reads both). Their column types differ where the converter knows no logical type: Apicurio's
converter hands the sink Avro's timestamp-micros as a plain long, and the sink widens decimals to
precision 38. `fingerprint` normalises both before it hashes the rows, so equal rows give equal
figures whatever the order of the files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import EqualTo

# The columns that make a tick what it is; ingest_timestamp and source_id are the loader's.
KEY_COLUMNS = ("symbol", "exchange", "exchange_date", "sequence_number", "exchange_timestamp")
FIGURE_COLUMNS = {"trades": ("price", "volume"), "quotes": ("bid_price", "ask_price", "bid_size", "ask_size")}


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    checksum: int  # sum of the rows' hashes, so the order of files and rows does not matter


def normalise(table: pa.Table) -> pa.Table:
    """Timestamps as epoch microseconds, decimals at precision 38: the sink's types."""
    columns = {}
    for name in table.column_names:
        column = table[name]
        if pa.types.is_timestamp(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("us", tz=column.type.tz)), pa.int64())
        elif pa.types.is_decimal(column.type):
            column = pc.cast(column, pa.decimal128(38, column.type.scale))
        columns[name] = column
    return pa.table(columns)


def fingerprint(table: pa.Table, kind: str) -> Fingerprint:
    rows = normalise(table.select([*KEY_COLUMNS, *FIGURE_COLUMNS[kind]]))
    hashed = ", ".join(f"CAST({c} AS VARCHAR)" for c in rows.column_names)
    answer = duckdb.sql(f"SELECT count(*), coalesce(sum(hash({hashed})::HUGEINT), 0) FROM rows").fetchone()
    assert answer is not None  # an aggregate always answers one row
    return Fingerprint(int(answer[0]), int(answer[1]))


def table_fingerprint(catalog: Catalog, identifier: str, kind: str) -> Fingerprint:
    return fingerprint(catalog.load_table(identifier).scan().to_arrow(), kind)


def _data_snapshots(table: Any) -> list[Any]:
    """The table's snapshots that added rows, oldest first."""
    snaps = [s for s in table.snapshots() if int(s.summary.additional_properties.get("added-records", 0)) > 0]
    return sorted(snaps, key=lambda s: s.timestamp_ms)


def first_commit(tables: list[Any]) -> float:
    """Epoch seconds of the first commit that added rows to any of `tables`."""
    return min(_data_snapshots(t)[0].timestamp_ms for t in tables) / 1000


def steady_rate(tables: list[Any]) -> float:
    """Rows/s once the first commit is done: the rows added after it ÷ first → last commit, over all
    `tables` (a writer's start and its first batch are left out)."""
    snaps = sorted((s for t in tables for s in _data_snapshots(t)), key=lambda s: s.timestamp_ms)
    if len(snaps) < 2 or snaps[-1].timestamp_ms == snaps[0].timestamp_ms:
        return float("nan")
    rows = sum(int(s.summary.additional_properties["added-records"]) for s in snaps[1:])
    return rows / ((snaps[-1].timestamp_ms - snaps[0].timestamp_ms) / 1000)


def committed_rows(catalog: Catalog, identifier: str) -> int:
    """Rows in the table's current snapshot, from its summary (no data file is read); 0 before any."""
    try:
        snapshot = catalog.load_table(identifier).current_snapshot()
    except Exception:  # noqa: BLE001 - the sink creates its table with the first record
        return 0
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary.additional_properties.get("total-records", 0))


def wait_for_rows(catalog: Catalog, identifier: str, rows: int, timeout: float,
                  alive: Callable[[], None] = lambda: None) -> float:
    """Seconds until the table's current snapshot holds `rows` rows; `alive` raises if the writer died."""
    started = time.perf_counter()
    while (seen := committed_rows(catalog, identifier)) < rows:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{identifier}: {seen:,} of {rows:,} rows after {timeout:.0f} s")
        alive()
        time.sleep(0.05)
    return time.perf_counter() - started


def probes_seen(catalog: Catalog, identifier: str, symbol: str, last_snapshot: Any) -> tuple[Any, set[int]]:
    """The sequence numbers of `symbol` in the table, if a snapshot was committed since `last_snapshot`."""
    try:
        table = catalog.load_table(identifier)
    except Exception:  # noqa: BLE001 - not created yet
        return last_snapshot, set()
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.snapshot_id == last_snapshot:
        return last_snapshot, set()
    rows = table.scan(row_filter=EqualTo("symbol", symbol), selected_fields=("sequence_number",)).to_arrow()
    return snapshot.snapshot_id, set(rows["sequence_number"].to_pylist())
