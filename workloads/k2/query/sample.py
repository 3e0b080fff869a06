"""Load a folder (ASX-format, or of any registered folder source) straight into K2's Iceberg
tables, without Kafka.

For tests, benchmarks and offline analysis of a sample. Records are built by the same source
reader as `k2 ingest` uses and laid out as the stream writer lays them out (sorted by
symbol, time and sequence number), with one append per table and local day, so the tables get a
history of snapshots to time-travel through. The production path is `k2 ingest` → Kafka →
`k2 stream run`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from k2 import tables
from k2.settings import Settings, TableKind
from k2.sources import folder_source
from k2.stream.writer import rows_to_arrow

_EPOCH_DATE = dt.date(1970, 1, 1)
_SORT = [("symbol", "ascending"), ("exchange_timestamp", "ascending"), ("sequence_number", "ascending")]


def load_asx(settings: Settings, root: Path, *, symbols: Collection[str] | None = None,
             days: Collection[dt.date] | None = None,
             kinds: tuple[TableKind, ...] = ("trades", "quotes", "reference"),
             source: str = "asx-csv") -> dict[TableKind, list[int]]:
    """Append the folder's ticks (optionally only some symbols and local days); returns the
    snapshot ids committed per table, oldest first. `source`: the registered folder source
    that reads it."""
    folder = folder_source(source)
    cat = tables.catalog(settings)
    ingest_us = time.time_ns() // 1000
    wanted_symbols = set(symbols) if symbols is not None else None
    wanted_days = {(d - _EPOCH_DATE).days for d in days} if days is not None else None
    committed: dict[TableKind, list[int]] = {}
    for kind in kinds:
        table = tables.ensure_table(cat, tables.builtin_definition(kind, settings))
        schema = table.schema().as_arrow()
        if kind == "reference":
            batches = [list(folder.reference_records(root, ingest_us, wanted_symbols))]
        else:
            by_day: dict[int, list[dict]] = defaultdict(list)
            for tick_file in folder.discover(root, wanted_symbols, (kind,)):
                builder = folder.reader(tick_file, ingest_us)
                with tick_file.path.open() as fh:
                    for line in fh:
                        # Built before filtering, so sequence numbers match a full load's.
                        record = builder.build(line)
                        if wanted_days is None or record["exchange_date"] in wanted_days:
                            by_day[record["exchange_date"]].append(record)
            batches = [by_day[day] for day in sorted(by_day)]
        committed[kind] = []
        for rows in batches:
            if rows:
                table.append(_sorted(rows_to_arrow(rows, schema)))
                snapshot = table.current_snapshot()
                if snapshot is not None:  # an append always makes one
                    committed[kind].append(snapshot.snapshot_id)
    return committed


def _sorted(data: pa.Table) -> pa.Table:
    keys = [(name, order) for name, order in _SORT if name in data.column_names]
    return data.take(pc.sort_indices(data, sort_keys=keys)) if keys else data
