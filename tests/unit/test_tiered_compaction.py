"""Size-tiered compaction, what the stream runs as it writes: like-sized small files merge once
enough gather, well-sized files are never read again, the rows and the recorded offsets survive,
and the rewrite is a `replace` that a catch-up (rows appended since a snapshot) reads across."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2 import tables
from k2.query import planning
from k2.query.engine import _appended_files
from k2.settings import Settings
from k2.stream.maintenance import compact_tiers, live_data_files, size_tier, tiers_due

pytestmark = pytest.mark.unit

DAY = dt.date(2014, 3, 10)
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), False), pa.field("sequence_number", pa.int64(), False)])
TARGET = 40_000  # bytes: a file of 3,000 random longs is well sized, one of 5 consecutive ones small
ANY_SIZE = 2**40


def _append(table, sequence_numbers, offset: int) -> None:
    with tables.transaction(table) as tx:
        tx.append(pa.table({"exchange_date": [DAY] * len(sequence_numbers), "sequence_number": sequence_numbers},
                           schema=ARROW),
                  snapshot_properties={tables.OFFSETS_PROPERTY: json.dumps({"ticks": {"0": offset}})})


def _paths(table) -> set[str]:
    return {task.file.file_path for task in table.scan().plan_files()}


def _rows(table) -> Counter:
    return Counter(table.scan().to_arrow()["sequence_number"].to_pylist())


@pytest.fixture
def table(ticks_table):
    return ticks_table({**tables.default_properties(Settings()), "write.target-file-size-bytes": str(TARGET)})


def test_like_sized_files_merge_once_enough_gather_and_well_sized_ones_are_left_alone(table):
    rng = np.random.default_rng(7)
    _append(table, rng.integers(10**6, 10**15, 3_000).tolist(), 2_000)
    (big,) = _paths(table)
    assert table.scan().plan_files()[0].file.file_size_in_bytes >= TARGET // 2, "the big file is well sized"
    for n in range(3):
        _append(table, list(range(n * 5, n * 5 + 5)), 2_005 + n * 5)
    assert tiers_due(live_data_files(table), 4, TARGET, ANY_SIZE) == [], "three small files are not yet a tier of four"
    assert compact_tiers(table, 4, ANY_SIZE)[1] == 0
    _append(table, list(range(15, 20)), 2_020)
    rows = _rows(table)

    table, merged = compact_tiers(table, 4, ANY_SIZE)

    assert merged == 1
    after = _paths(table)
    assert big in after and len(after) == 2, "the well-sized file is kept as it is, the four small ones are one"
    assert _rows(table) == rows
    current = table.current_snapshot()
    assert current.summary.operation.value == "replace"
    assert tables.recorded_offsets(table) == {"ticks": {0: 2_020}}, "offsets carried through the rewrite"


def test_a_catch_up_reads_across_a_compaction(table):
    """Before, compaction was an overwrite (a delete, then an append of the same rows): a catch-up
    over it was refused as not an append, or would have read every rewritten row twice."""
    for n in range(4):
        _append(table, list(range(n * 5, n * 5 + 5)), 5 + n * 5)
    since = table.current_snapshot()
    _append(table, [100, 101], 22)
    table, merged = compact_tiers(table, 4, ANY_SIZE)
    assert merged == 1
    _append(table, [102], 23)

    files = _appended_files("trades", table, since, table.current_snapshot(), planning.ManifestCache())

    appended = Counter(v for f in files for v in pq.read_table(
        f.file_path.removeprefix("file://"), partitioning=None)["sequence_number"].to_pylist())
    assert appended == Counter([100, 101, 102])


def test_a_merge_takes_no_more_bytes_than_allowed(table):
    """A pass pauses the writer and holds what it merges in memory: bounded by configuration."""
    for n in range(6):
        _append(table, list(range(n * 5, n * 5 + 5)), 5 + n * 5)
    sizes = sorted(task.file.file_size_in_bytes for task in table.scan().plan_files())
    assert tiers_due(live_data_files(table), 4, TARGET, sum(sizes[:3])) == [], "three files fit: fewer than the fan-in"
    (group,) = tiers_due(live_data_files(table), 4, TARGET, sum(sizes[:5]))
    assert len(group) == 5
    table, merged = compact_tiers(table, 4, sum(sizes[:5]))
    assert merged == 1 and len(_paths(table)) == 2
    assert _rows(table) == Counter(range(30))


def test_a_tier_spans_a_factor_of_the_fan_in_in_size():
    assert size_tier(1, 8) == size_tier(64 * 1024 - 1, 8) == 0
    assert size_tier(64 * 1024, 8) == size_tier(8 * 64 * 1024 - 1, 8) == 1
    assert size_tier(8 * 64 * 1024, 8) == 2
