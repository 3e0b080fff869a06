"""Fixtures of the query-stage tests: real Iceberg tables in a temporary embedded catalog (SQLite +
local warehouse) loaded from the ASX sample, the API over them, and an independent oracle that
computes expected figures from the CSV files in plain Python (`decimal`, `fractions`).

The oracle (`asx_oracle`) is the root conftest's, shared with the kind suite. The ASX sample lives
outside the repository; tests that need it skip when it is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from k2.api.app import create_app
from k2.query.engine import Engine
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings
from k2_synthetic import generate

ASX_ROWS = {"trades": 200_545, "quotes": 169_629}


def lakehouse_settings(root: Path, **overrides: object) -> Settings:
    """Settings for a private embedded lakehouse; everything a K2_* variable could change is explicit."""
    values: dict[str, object] = {
        "mode": "dev", "catalog_uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "warehouse"),
        "namespace": "market", "api_keys": None, "api_keys_file": None, "rate_limit": "100000/minute",
        "max_rows": 10_000, "s3_endpoint": None, "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def lakehouse_settings_for():
    """`lakehouse_settings` for tests that build their own (mutable) lakehouse."""
    return lakehouse_settings


@dataclass(frozen=True)
class AsxLakehouse:
    settings: Settings
    engine: Engine
    snapshots: dict[str, list[int]]  # per table, one per loaded day (trades, quotes) or one (reference)


@pytest.fixture(scope="session")
def asx_lakehouse(asx_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsxLakehouse]:
    """The whole ASX sample, one append per table and day; shared and never modified by tests."""
    settings = lakehouse_settings(tmp_path_factory.mktemp("asx-lakehouse"))
    snapshots = load_asx(settings, asx_root)
    engine = Engine(settings)
    yield AsxLakehouse(settings, engine, snapshots)
    engine.close()


@pytest.fixture(scope="session")
def synthetic_lakehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsxLakehouse]:
    """Four symbols over two days of synthetic ticks: for tests that need some data, not the ASX sample's."""
    root = tmp_path_factory.mktemp("synthetic-lakehouse")
    settings = lakehouse_settings(root)
    snapshots = load_asx(settings, generate(root / "ticks", symbols=4, days=2, seed=2014))
    engine = Engine(settings)
    yield AsxLakehouse(settings, engine, snapshots)
    engine.close()


@pytest.fixture(scope="session")
def asx_api(asx_lakehouse: AsxLakehouse) -> Iterator[TestClient]:
    """The API over the shared lakehouse, sending the dev key by default."""
    app = create_app(asx_lakehouse.settings, engine=asx_lakehouse.engine)
    with TestClient(app, headers={"X-API-Key": DEV_API_KEY}) as client:
        yield client
