"""Arrow results as Python rows.

pyarrow converts time-zone-aware timestamps to Python one value at a time through a slow path
when pytz is absent (about 40 µs a value: half a second for a few thousand ticks). Results here
are always UTC, so the columns are read as naive UTC, which is fast, and UTC is attached after.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa


def to_rows(data: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
    aware = [(i, f) for i, f in enumerate(table.schema) if pa.types.is_timestamp(f.type) and f.type.tz]
    for i, field in aware:
        table = table.set_column(i, field.name, table.column(i).cast(pa.timestamp(field.type.unit)))
    rows = table.to_pylist()
    names = [field.name for _, field in aware]
    for row in rows:
        for name in names:
            if row[name] is not None:
                row[name] = row[name].replace(tzinfo=dt.UTC)
    return rows
