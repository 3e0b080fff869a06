"""`k2.tables.transaction`: pyiceberg's transaction with its metadata view computed once per
change (pyiceberg deep-copies the whole table metadata on each of ~20 reads per append, so a
streaming commit's cost grew with every snapshot kept), on a real (SQLite) catalog."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pyiceberg.table
import pytest
from pyiceberg.table import Table

from k2 import tables
from k2.settings import Settings

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), nullable=False),
                   pa.field("sequence_number", pa.int64(), nullable=False)])


@pytest.fixture
def table(ticks_table) -> Table:
    return ticks_table()


@pytest.fixture
def metadata_views(monkeypatch) -> list[int]:
    """Counts every computation of a transaction's metadata view, pyiceberg's or K2's."""
    calls: list[int] = []
    original = tables.update_table_metadata

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tables, "update_table_metadata", counting)
    monkeypatch.setattr(pyiceberg.table, "update_table_metadata", counting)
    return calls


def _rows(start: int) -> pa.Table:
    return pa.table({"exchange_date": [DAY] * 10, "sequence_number": list(range(start, start + 10))}, schema=ARROW)


def test_an_append_computes_the_metadata_view_once_per_change(table, metadata_views):
    for start in (0, 10, 20):
        metadata_views.clear()
        with tables.transaction(table) as tx:
            tx.append(_rows(start), snapshot_properties={"k2.offsets": str(start)})
        assert len(metadata_views) <= 3, f"{len(metadata_views)} metadata views for one append"
    assert table.scan().to_arrow().num_rows == 30
    assert [s.summary["k2.offsets"] for s in table.snapshots()] == ["0", "10", "20"]


def test_the_view_follows_staged_updates_and_a_new_base(table):
    tx = tables.transaction(table)
    before = tx.table_metadata
    assert tx.table_metadata is before, "unchanged: shared"
    tx.set_properties({"k2.test": "staged"})
    assert tx.table_metadata.properties["k2.test"] == "staged"
    tx.commit_transaction()
    table.append(_rows(0))  # the base moves: a new transaction sees the new snapshot
    assert tables.transaction(table).table_metadata.current_snapshot_id == table.current_snapshot().snapshot_id


def test_old_metadata_files_are_deleted_after_commits(tmp_path, ticks_table):
    table = ticks_table({**tables.default_properties(Settings()), "write.metadata.previous-versions-max": "3"})
    for start in range(0, 100, 10):
        with tables.transaction(table) as tx:
            tx.append(_rows(start))
    kept = list((tmp_path / "warehouse").rglob("*.metadata.json"))
    assert len(kept) <= 4, f"{len(kept)} metadata files kept for 11 versions with previous-versions-max 3"
    assert table.scan().to_arrow().num_rows == 100
    assert tables.default_properties(Settings())["write.metadata.delete-after-commit.enabled"] == "true"


def test_a_streaming_tables_manifests_stay_bounded_however_many_commits(ticks_table):
    """Each append adds a manifest; planning a scan, and every compaction commit, reads them all.
    At 100x the sample thousands of stream commits made `k2 maintain` 550x slower than at 1x."""
    table = ticks_table({**tables.default_properties(Settings()), "commit.manifest.min-count-to-merge": "10"})
    for start in range(0, 400, 10):
        with tables.transaction(table) as tx:
            tx.append(_rows(start))
    manifests = table.current_snapshot().manifests(table.io)
    assert len(manifests) <= 10, f"{len(manifests)} manifests after 40 appends"
    assert sorted(table.scan().to_arrow()["sequence_number"].to_pylist()) == list(range(400))


def test_files_are_written_in_row_groups_small_enough_to_prune_by_symbol(ticks_table, tmp_path):
    """A day's file is sorted by symbol, but DuckDB prunes by row group: with pyiceberg's default
    of 1M rows a day's file was one group, and a one-symbol query read the whole day (at 100x the
    sample, point queries took 1.5-1.7x as long as at 1x)."""
    table = ticks_table(tables.default_properties(Settings()))
    rows = 200_000  # a day of one table at 100x the sample holds about 370k
    table.append(pa.table({"exchange_date": [DAY] * rows, "sequence_number": list(range(rows))}, schema=ARROW))
    files = list((tmp_path / "warehouse").rglob("*.parquet"))
    assert len(files) == 1 and pq.ParquetFile(files[0]).num_row_groups >= 3
