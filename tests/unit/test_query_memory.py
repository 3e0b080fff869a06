"""K2_QUERY_MEMORY_MB bounds DuckDB: an export's sort larger than it spills to disk instead of growing
the process. Measured as the growth of this process's peak RSS (Linux: VmHWM, reset through clear_refs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2.query.engine import Engine
from k2.settings import Settings

pytestmark = pytest.mark.unit
ROWS = 4_000_000
# About 300 MiB to sort: ids, random keys and 40-byte strings; streamed out 65,536 rows at a time.
SORT = f"SELECT i, random() AS r, repeat('x', 40) AS pad FROM range({ROWS}) t(i) ORDER BY r"


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024


def test_a_sort_larger_than_the_query_memory_spills_instead_of_growing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # DuckDB's spill files go to .tmp under the working directory
    settings = Settings(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "wh"),
                        query_memory_mb=64, query_threads=1)
    engine = Engine(settings)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _peak_rss()
        result = engine.stream("memory_probe", SORT, {}, {})
        rows = sum(batch.num_rows for batch in result.batches)
        growth = _peak_rss() - baseline
    finally:
        engine.close()
    assert rows == ROWS
    # Unbounded (K2_QUERY_MEMORY_MB=0), the sort grows the process by about 390 MiB; with 64, by about
    # 90 (the limit, DuckDB's allocations outside it, the batches in flight).
    assert growth < 192 * 2**20, f"peak RSS grew {growth / 2**20:.0f} MiB"
