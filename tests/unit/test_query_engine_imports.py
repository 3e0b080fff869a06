"""The engine's guard against DuckDB's per-parameter `import pandas` is scoped to starting a query:
importing K2 leaves the host's import machinery as it was (docs/duckdb-pandas-probe.md)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from k2.query.engine import Engine
from k2.settings import Settings

pytestmark = pytest.mark.unit


def test_importing_k2_adds_no_import_finder() -> None:
    probe = ("import sys; before = list(sys.meta_path); import k2.query.engine, k2.api.app; "
             "print([type(f).__module__ for f in sys.meta_path if f not in before])")
    added = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "k2" not in added, added


class _Counting(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.searches = 0

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "pandas":
            self.searches += 1


@pytest.mark.skipif(importlib.util.find_spec("pandas") is not None, reason="pandas is installed here")
def test_a_query_with_parameters_does_not_search_for_pandas(tmp_path: Path) -> None:
    engine = Engine(Settings(catalog_uri=f"sqlite:///{tmp_path}/c.db", warehouse=str(tmp_path / "w")))
    engine.run("probe", "SELECT 1", {}, {}, cacheable=False)  # pandas is looked for once, on first use
    counting = _Counting()
    sys.meta_path.insert(0, counting)
    try:
        result = engine.run("probe", "SELECT $a + $b AS s", {"a": 1, "b": 2}, {}, cacheable=False)
        assert result["s"].to_pylist() == [3]
        assert counting.searches == 0
        importlib.util.find_spec("pandas")  # outside a query the import machinery is as it was
        assert counting.searches == 1
    finally:
        sys.meta_path.remove(counting)
        engine.close()
