"""What each kept snapshot costs a streaming table: commit and metadata-load time as snapshots
accumulate, the reason `k2 stream run` thins its history (`k2.stream.maintenance.thin_history`).

One-row appends to a K2-configured table in a private SQLite catalog, as a stream committing
every fraction of a second makes them; at each size, the median of a few loads and appends.

    python benchmarks/bench_snapshots.py --sizes 100 1000
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.types import DateType, LongType, NestedField

from k2 import tables
from k2.settings import Settings
from k2.stream.maintenance import thin_history

DAY = dt.date(2026, 1, 5)
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), False), pa.field("sequence_number", pa.int64(), False)])
SAMPLES = 7


def _append(table, seq: int) -> None:
    with tables.transaction(table) as tx:
        tx.append(pa.table({"exchange_date": [DAY], "sequence_number": [seq]}, schema=ARROW))


def _median_ms(action, times: int = SAMPLES) -> float:
    taken = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        taken.append(time.perf_counter() - started)
    return statistics.median(taken) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="k2-bench-snapshots-"))
    cat = SqlCatalog("k2", uri=f"sqlite:///{home}/catalog.db", warehouse=f"file://{home}/warehouse")
    table = tables.ensure_table(cat, tables.TableDefinition(
        "market", "ticks", Schema(NestedField(1, "exchange_date", DateType(), required=True),
                                  NestedField(2, "sequence_number", LongType(), required=True)),
        partition_by=(("exchange_date", "identity"),), sort_by=("sequence_number",),
        properties=tables.default_properties(Settings())))
    seq = 0
    rows = []
    for size in sorted(args.sizes):
        print(f"committing up to {size:,} snapshots…", file=sys.stderr)
        while len(table.snapshots()) < size:
            seq += 1
            _append(table, seq)
        load = _median_ms(lambda: cat.load_table("market.ticks"))

        def commit() -> None:
            nonlocal seq
            seq += 1
            _append(table, seq)

        rows.append((size, load, _median_ms(commit)))
    table, expired = thin_history(table, detail=dt.timedelta(0), interval=dt.timedelta(hours=1))
    kept = len(table.snapshots())
    thinned = (kept, _median_ms(lambda: cat.load_table("market.ticks")), _median_ms(lambda: _append(table, 0)))

    smallest = rows[0]
    print("\n### What each kept snapshot costs (one-row commits, SQLite catalog, median of "
          f"{SAMPLES})\n")
    print("| snapshots kept | metadata load ms | commit ms | load ÷ smallest | commit ÷ smallest |")
    print("|---:|---:|---:|---:|---:|")
    for size, load, commit_ms in [*rows, thinned]:
        print(f"| {size:,} | {load:.1f} | {commit_ms:.1f} | {load / smallest[1]:.2f}× | "
              f"{commit_ms / smallest[2]:.2f}× |")
    print(f"\nThe last row: after `thin_history` (detail 0, one per hour) expired {expired:,} of them.")


if __name__ == "__main__":
    main()
