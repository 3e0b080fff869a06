"""`k2.query.planning` on a real (SQLite) Iceberg catalog: the same scan tasks as pyiceberg's own
planning, for filters that prune by partition, by column metrics and not at all, over appends
and a compaction; and a new snapshot's plan reads only the manifests it added."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import AlwaysTrue, And, EqualTo, GreaterThanOrEqual
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import DateType, LongType, NestedField, StringType

from k2 import tables
from k2.query import planning
from k2.stream import maintenance

pytestmark = pytest.mark.unit
DAYS = [dt.date(2014, 3, 10), dt.date(2014, 3, 11)]
ARROW = pa.schema([pa.field("symbol", pa.string(), nullable=False),
                   pa.field("exchange_date", pa.date32(), nullable=False),
                   pa.field("sequence_number", pa.int64(), nullable=False)])
FILTERS = [AlwaysTrue(), EqualTo("exchange_date", DAYS[1].isoformat()), EqualTo("symbol", "RIO"),
           And(EqualTo("symbol", "BHP"), GreaterThanOrEqual("sequence_number", 25))]


def _append(table: Table, symbol: str, day: dt.date, start: int) -> None:
    table.append(pa.table({"symbol": [symbol] * 10, "exchange_date": [day] * 10,
                           "sequence_number": list(range(start, start + 10))}, schema=ARROW))


@pytest.fixture
def table(tmp_path) -> Table:
    cat = SqlCatalog("k2", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{tmp_path}/warehouse")
    definition = tables.TableDefinition(
        "market", "ticks",
        Schema(NestedField(1, "symbol", StringType(), required=True),
               NestedField(2, "exchange_date", DateType(), required=True),
               NestedField(3, "sequence_number", LongType(), required=True)),
        partition_by=(("exchange_date", "identity"),), sort_by=("symbol", "sequence_number"))
    created = tables.ensure_table(cat, definition)
    for day in DAYS:  # one commit (one manifest) per symbol and batch, as the stream writes
        for start in (0, 10, 20):
            for symbol in ("BHP", "RIO"):
                _append(created, symbol, day, start)
    return created


def _files(tasks) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((t.file.file_path, tuple(sorted(d.file_path for d in t.delete_files))) for t in tasks)


def _same_as_pyiceberg(table: Table, cache: planning.ManifestCache) -> None:
    snapshot = table.current_snapshot()
    for row_filter in FILTERS:
        ours = planning.plan_files(table, snapshot, row_filter, cache)
        theirs = table.scan(row_filter=row_filter, snapshot_id=snapshot.snapshot_id).plan_files()
        assert _files(ours) == _files(theirs), row_filter
        assert ours, row_filter  # every filter matches some file: the comparison is not vacuous


def test_plans_the_files_pyiceberg_plans_before_and_after_a_compaction(table):
    cache = planning.ManifestCache()
    _same_as_pyiceberg(table, cache)
    assert len(planning.plan_files(table, table.current_snapshot(), FILTERS[1], cache)) < \
        len(planning.plan_files(table, table.current_snapshot(), FILTERS[0], cache)), "no pruning"
    table, compacted = maintenance.compact(table, min_files=2)
    assert compacted == 2
    _same_as_pyiceberg(table, cache)
    _same_as_pyiceberg(table, planning.ManifestCache())  # and from nothing cached


def test_a_new_snapshot_reads_only_the_manifests_it_added(table):
    cache = planning.ManifestCache()
    planning.plan_files(table, table.current_snapshot(), AlwaysTrue(), cache)
    first = cache.reads
    assert first == len(table.current_snapshot().manifests(table.io))
    _append(table, "BHP", DAYS[1], 30)
    tasks = planning.plan_files(table, table.current_snapshot(), EqualTo("symbol", "BHP"), cache)
    assert cache.reads == first + 1
    assert any(t.file.record_count == 10 and t.file.file_path not in {
        f.file.file_path for f in table.scan(snapshot_id=table.snapshots()[-2].snapshot_id).plan_files()}
        for t in tasks), "the new file is planned"


def test_the_cache_is_bounded_by_entries(table):
    cache = planning.ManifestCache(max_entries=4)
    for _ in range(2):
        planning.plan_files(table, table.current_snapshot(), AlwaysTrue(), cache)
        assert cache.held <= 4
    manifests = len(table.current_snapshot().manifests(table.io))
    # room for two one-entry manifests: the second plan reads all again but the (at most two) kept
    assert cache.reads >= 2 * manifests - 2
