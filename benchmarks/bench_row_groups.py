"""One symbol's rows from a day's file, as the day grows: the cost of the file's row-group size.

A day's file is sorted by symbol and DuckDB prunes by row group, so a one-symbol query decodes the
groups that hold the symbol. Timed: a 1x-sized day (21 symbols) in one group, and a 100x-sized day
(259 symbols, as `bench_scale.py` makes) in one group (pyiceberg's default limit, 1M rows) and in
groups of K2's `write.parquet.row-group-limit`. Synthetic columns; p50 of 200 runs after 20.

    python benchmarks/bench_row_groups.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from k2 import tables
from k2.settings import Settings

ROWS_PER_SYMBOL_DAY = 1_420  # 100x: 36.9M rows / (259 symbols x 50 days x 2 tables), about the same at 1x


def day(symbols: int) -> pa.Table:
    rng = np.random.default_rng(1)
    n = symbols * ROWS_PER_SYMBOL_DAY
    return pa.table({"symbol": np.repeat([f"S{i:03d}" for i in range(symbols)], ROWS_PER_SYMBOL_DAY),
                     "exchange_timestamp": np.sort(rng.integers(0, 10**10, n)),
                     "price": rng.integers(1, 10**6, n), "volume": rng.integers(1, 1000, n)})


def p50_ms(con: duckdb.DuckDBPyConnection, path: str) -> float:
    sql = (f"SELECT count(*), sum(price * volume), min(price), max(price) FROM read_parquet('{path}') "
           "WHERE symbol = 'S007'")
    for _ in range(20):
        con.execute(sql).fetchall()
    times = []
    for _ in range(200):
        started = time.perf_counter()
        con.execute(sql).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    limit = int(tables.default_properties(Settings())["write.parquet.row-group-limit"])
    cases = [("1x day, one group", day(21), 1 << 20), ("100x day, one group (1M-row limit)", day(259), 1 << 20),
             (f"100x day, K2's {limit:,}-row groups", day(259), limit)]
    con = duckdb.connect()
    print("\n### One symbol from a day's file, by row-group size\n")
    print("| file | rows | row groups | p50 ms | ÷ 1x day |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for i, (name, table, group_rows) in enumerate(cases):
            path = f"{tmp}/{i}.parquet"
            pq.write_table(table, path, compression="zstd", row_group_size=group_rows)
            ms = p50_ms(con, path)
            base = base or ms
            groups = pq.ParquetFile(path).num_row_groups
            print(f"| {name} | {table.num_rows:,} | {groups} | {ms:.2f} | {ms / base:.2f}× |")


if __name__ == "__main__":
    main()
