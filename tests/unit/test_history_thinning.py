"""History thinning: a stream committing every fraction of a second keeps every snapshot of the
recent past and one per interval before it, so that the table's metadata (read and rewritten by
every commit and every metadata load) stays bounded however long the stream runs."""

from __future__ import annotations

import datetime as dt
import time

import pyarrow as pa
import pytest

from k2 import tables
from k2.settings import Settings
from k2.stream.maintenance import thin_history

pytestmark = pytest.mark.unit

DAY = dt.date(2014, 3, 10)
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), False), pa.field("sequence_number", pa.int64(), False)])


def _append(table, start: int) -> None:
    with tables.transaction(table) as tx:
        tx.append(pa.table({"exchange_date": [DAY] * 5, "sequence_number": list(range(start, start + 5))},
                           schema=ARROW))


def test_recent_snapshots_are_all_kept_and_older_ones_one_per_interval(ticks_table):
    table = ticks_table(tables.default_properties(Settings()))
    for start in range(0, 100, 5):
        _append(table, start)
        time.sleep(0.025)
    before = {s.snapshot_id: s.timestamp_ms for s in table.snapshots()}
    now_ms = max(before.values()) + 1
    detail_ms = (now_ms - min(before.values())) // 3
    # Two intervals or three over the older two thirds, whatever a loaded machine's commit pace:
    # most of their snapshots are to go.
    interval_ms = max(1, (now_ms - detail_ms - min(before.values())) // 2)

    table, expired = thin_history(table, detail=dt.timedelta(milliseconds=detail_ms),
                                  interval=dt.timedelta(milliseconds=interval_ms),
                                  now=dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC))

    kept = {s.snapshot_id: s.timestamp_ms for s in table.snapshots()}
    assert expired == len(before) - len(kept) > 0
    recent = {i for i, ts in before.items() if ts >= now_ms - detail_ms}
    assert recent <= kept.keys(), "a snapshot of the recent past was expired"
    older_buckets: dict[int, list[int]] = {}
    for snapshot_id, ts in before.items():
        if snapshot_id not in recent:
            older_buckets.setdefault(ts // interval_ms, []).append(snapshot_id)
    for bucket, ids in older_buckets.items():
        latest = max(ids, key=lambda i: before[i])
        assert set(ids) & kept.keys() == {latest}, f"interval {bucket}: kept {set(ids) & kept.keys()}, not its last"
    assert table.current_snapshot().snapshot_id == max(before, key=lambda i: before[i])
    assert sorted(table.scan().to_arrow()["sequence_number"].to_pylist()) == list(range(100))
    thinned = min(kept.values()) + 1
    as_of = table.snapshot_as_of_timestamp(thinned + interval_ms // 2)
    assert as_of is not None and as_of.snapshot_id in kept, "time travel between kept snapshots finds none"


def test_nothing_is_expired_while_all_of_it_is_recent(ticks_table):
    table = ticks_table(tables.default_properties(Settings()))
    for start in range(0, 30, 5):
        _append(table, start)
    count = len(table.snapshots())

    table, expired = thin_history(table, detail=dt.timedelta(hours=1), interval=dt.timedelta(milliseconds=1))

    assert expired == 0 and len(table.snapshots()) == count
