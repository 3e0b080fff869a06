"""`k2-query --local` on a catalog without K2's tables says so and names the catalog it read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_local_on_an_empty_catalog_names_it_and_fails(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")}, "COLUMNS": "400"}  # no wrapping
    proc = subprocess.run([str(Path(sys.executable).with_name("k2-query")), "symbols", "--local"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"the catalog sqlite:///{tmp_path}/.k2/catalog.db" in proc.stderr
    assert "has no K2 tables" in proc.stderr and "K2_CATALOG_URI" in proc.stderr
