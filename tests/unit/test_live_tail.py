"""The live tail's bookkeeping: which ticks past a snapshot it answers, and when it must answer
none (it does not hold every message from the snapshot's offsets on)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from k2 import schemas
from k2.quality import StoredSequences
from k2.query import tail as tail_module
from k2.query.tail import KindTail

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)
EPOCH_DAY = (DAY - dt.date(1970, 1, 1)).days


def _ticks(symbol: str, seqs: list[int]) -> pa.Table:
    schema = schemas.arrow_schema("trades")
    n = len(seqs)
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns.update(symbol=pa.array([symbol] * n), exchange=pa.array(["ASX"] * n),
                   exchange_date=pa.array([DAY] * n, pa.date32()), sequence_number=pa.array(seqs, pa.int64()))
    return pa.table({f.name: columns[f.name].cast(f.type) for f in schema}, schema=schema)


def _add(tail: KindTail, partition: int, first_offset: int, symbol: str, seqs: list[int]) -> None:
    offsets = np.arange(first_offset, first_offset + len(seqs), dtype=np.int64)
    tail.add(_ticks(symbol, seqs), np.full(len(seqs), partition, np.int64), offsets,
             {partition: first_offset + len(seqs)})


def _seqs(rows) -> list[int]:
    return rows.table["sequence_number"].to_pylist()


def test_it_answers_past_any_snapshot_it_covers_and_drops_what_the_stream_drops():
    tail = KindTail("trades", schemas.arrow_schema("trades"), {("BHP", EPOCH_DAY): 3}, max_rows=1000)
    tail.open_partition(0, 10)
    _add(tail, 0, 10, "BHP", [2, 4, 5, 4, 7])  # 2 is at or below the table's 3; the second 4 repeats
    assert _seqs(tail.after({0: 10})) == [4, 5, 7]
    assert _seqs(tail.after({0: 12})) == [5, 7], "rows at offsets the snapshot holds are not added"
    assert tail.after({0: 9}) is None, "a snapshot before the tail's start: it lacks offset 9"
    assert tail.after({0: 10, 1: 0}) is None, "a partition the tail does not read"


def test_a_partition_read_from_its_beginning_covers_a_snapshot_that_recorded_nothing_for_it():
    tail = KindTail("trades", schemas.arrow_schema("trades"), {}, max_rows=1000)
    tail.open_partition(0, None)
    _add(tail, 0, 0, "RIO", [1, 2])
    assert _seqs(tail.after({})) == [1, 2]


def test_rows_go_once_committed_and_past_the_grace_period_or_beyond_the_bound(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(tail_module.time, "monotonic", lambda: clock[0])
    tail = KindTail("trades", schemas.arrow_schema("trades"), {}, max_rows=5)
    tail.open_partition(0, 0)
    _add(tail, 0, 0, "BHP", [1, 2, 3])
    assert _seqs(tail.after({0: 3})) == []  # a query saw a snapshot holding all three
    _add(tail, 0, 3, "BHP", [4])
    assert _seqs(tail.after({0: 0})) == [1, 2, 3, 4], "within the grace period an older pin still reads them"
    clock[0] += tail_module.GRACE_SECONDS + 1
    _add(tail, 0, 4, "BHP", [5])
    assert tail.after({0: 0}) is None, "let go: offsets 0-2 are no longer held"
    assert _seqs(tail.after({0: 3})) == [4, 5]
    _add(tail, 0, 5, "BHP", [6, 7, 8, 9, 10])  # 7 rows held, over the bound of 5: the oldest go
    assert tail.after({0: 3}) is None
    assert _seqs(tail.after({0: 5})) == [6, 7, 8, 9, 10]


def test_the_tables_marks_are_read_a_day_at_a_time_when_ticks_of_that_day_arrive():
    """The hub read every stored (symbol, day)'s highest sequence number when it started: a scan of
    the whole table, whose time and memory grew with the data (37M rows at 100× the sample)."""
    loaded = []

    def load_day(day: int) -> dict[tuple[str, int], int]:
        loaded.append(day)
        return {("BHP", day): 3, ("RIO", day): 9}

    tail = KindTail("trades", schemas.arrow_schema("trades"), StoredSequences(load_day), max_rows=1000)
    tail.open_partition(0, 10)
    assert loaded == [], "nothing is read before a tick arrives"
    _add(tail, 0, 10, "BHP", [2, 4, 5, 4, 7])
    _add(tail, 0, 15, "BHP", [3, 8])
    assert loaded == [EPOCH_DAY], "a day's marks are read once, for every symbol of the day"
    assert _seqs(tail.after({0: 10})) == [4, 5, 7, 8]

