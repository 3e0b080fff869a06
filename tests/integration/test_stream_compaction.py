"""Automatic small-file compaction in `k2 stream run`: with tiny, frequent commits the writer
compacts partitions between polls, the rows stay exactly the rows produced, and the recorded Kafka
offsets survive the rewrite (exactly-once and the WebSocket catch-up depend on them)."""

from __future__ import annotations

import pytest

from k2 import tables
from k2.ingest.pipeline import ingest_files
from k2.stream.maintenance import files_per_partition
from k2.stream.runner import run
from k2_synthetic import generate

pytestmark = pytest.mark.integration


def test_the_stream_compacts_small_files_as_it_writes(tmp_path, embedded_settings):
    folder = generate(tmp_path / "ticks", symbols=2, days=2, seed=9)
    summary = ingest_files(folder, embedded_settings, kinds=("trades",), with_reference=False)
    settings = embedded_settings.model_copy(update={"batch_rows": 300, "compact_interval_seconds": 0.5,
                                                    "compact_min_files": 4})
    run(settings, ("trades",), until_idle=1.0)

    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    operations = [s.summary.operation.value for s in table.snapshots() if s.summary]
    appends = operations.count("append")
    assert appends > 10 and "replace" in operations and "delete" not in operations, sorted(set(operations))
    assert max(files_per_partition(table).values()) < appends / 2, "compacted: far fewer files than commits"
    data = table.scan(selected_fields=("symbol", "exchange_date", "sequence_number")).to_arrow()
    assert data.num_rows == summary.produced_total
    assert len(set(zip(*(data[c].to_pylist() for c in data.column_names), strict=True))) == data.num_rows
    recorded = tables.recorded_offsets(table)[settings.topic("trades")]
    assert sum(recorded.values()) == summary.produced_total, "offsets carried through the rewrites"


def test_the_stream_thins_its_history_as_it_writes(tmp_path, embedded_settings):
    """Sub-second commits for a trading day would leave tens of thousands of snapshots, each
    commit rewriting them all: the stream keeps the recent ones and one per interval before."""
    folder = generate(tmp_path / "ticks", symbols=2, days=2, seed=9)
    summary = ingest_files(folder, embedded_settings, kinds=("trades",), with_reference=False)
    settings = embedded_settings.model_copy(update={"batch_rows": 300, "compact_interval_seconds": 0,
                                                    "history_detail_seconds": 0.0,
                                                    "history_interval_seconds": 3600.0})
    result = run(settings, ("trades",), until_idle=1.0)

    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    commits = summary.produced_total // 300
    assert commits > 20
    # commits after the last pass are still all there; an hour boundary may split the rest in two
    assert len(table.snapshots()) < commits / 3, f"{len(table.snapshots())} snapshots kept of {commits}+"
    assert sum(result.rows_written.values()) == summary.produced_total
    data = table.scan(selected_fields=("sequence_number",)).to_arrow()
    assert data.num_rows == summary.produced_total
    assert sum(tables.recorded_offsets(table)[settings.topic("trades")].values()) == summary.produced_total
