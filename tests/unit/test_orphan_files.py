"""Orphan files: what no kept snapshot or logged metadata file references, removed by `k2 maintain`
once older than the safety age. A real (SQLite) catalog over a local warehouse."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.types import DateType, LongType, NestedField

from k2 import tables
from k2.stream import maintenance

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), nullable=False),
                   pa.field("sequence_number", pa.int64(), nullable=False)])
DEFINITION = tables.TableDefinition(
    "market", "ticks", Schema(NestedField(1, "exchange_date", DateType(), required=True),
                              NestedField(2, "sequence_number", LongType(), required=True)),
    partition_by=(("exchange_date", "identity"),), sort_by=("sequence_number",))


def _rows(start: int, count: int) -> pa.Table:
    return pa.table({"exchange_date": [DAY] * count, "sequence_number": list(range(start, start + count))},
                    schema=ARROW)


@pytest.fixture
def catalog(tmp_path) -> SqlCatalog:
    return SqlCatalog("k2", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{tmp_path}/warehouse")


def _files(table) -> set[str]:
    root = Path(table.location().removeprefix("file://"))
    return {str(p) for p in root.rglob("*") if p.is_file()}


def _age(paths: set[str], hours: float) -> None:
    then = time.time() - hours * 3600
    for path in paths:
        os.utime(path, (then, then))


def test_ensuring_an_existing_table_writes_no_file(catalog):
    table = tables.ensure_table(catalog, DEFINITION)
    table.append(_rows(0, 10))
    before = _files(table)
    tables.ensure_table(catalog, DEFINITION)  # what every writer start does
    assert _files(table) == before


def test_only_unreferenced_files_older_than_the_safety_age_are_removed(catalog):
    table = tables.ensure_table(catalog, DEFINITION)
    for start in (0, 10, 20):
        table.append(_rows(start, 10))
    kept = _files(table)
    assert kept == maintenance.referenced_files(table)
    data_dir = Path(next(p for p in kept if p.endswith(".parquet"))).parent
    stray_data, stray_manifest = data_dir / "00000-0-killed.parquet", Path(table.location()[7:]) / "metadata" / "x.avro"
    stray_data.write_bytes(b"PAR1 rows of a commit that never happened")
    stray_manifest.write_bytes(b"a manifest of it")
    orphans = {str(stray_data), str(stray_manifest)}

    _age(orphans, hours=1)
    table, removed = maintenance.remove_orphans(table, dt.timedelta(hours=2))
    assert removed == 0 and _files(table) == kept | orphans  # younger than the safety age: kept

    _age(kept | orphans, hours=3)  # everything older than the age: only the unreferenced go
    table, removed = maintenance.remove_orphans(table, dt.timedelta(hours=2))
    assert removed == 2 and _files(table) == kept
    assert table.scan().to_arrow().num_rows == 30


def test_files_of_expired_snapshots_become_orphans(catalog):
    table = tables.ensure_table(catalog, DEFINITION)
    for start in (0, 10, 20):
        table.append(_rows(start, 10))
    replaced = {p for p in _files(table) if p.endswith(".parquet")}
    table, compacted = maintenance.compact(table, min_files=2)
    assert compacted == 1
    table, expired = maintenance.expire(table, dt.timedelta(0))
    assert expired >= 3 and len(table.snapshots()) == 1  # only the current snapshot is kept
    table, removed = maintenance.remove_orphans(table, dt.timedelta(0))
    assert removed >= len(replaced) and not replaced & _files(table)
    assert _files(table) == maintenance.referenced_files(table)
    assert sorted(table.scan().to_arrow()["sequence_number"].to_pylist()) == list(range(30))
