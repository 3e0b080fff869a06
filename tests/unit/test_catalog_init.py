"""Processes that open a new catalog database at the same moment (the stream's writers, say) all get
the catalog: pyiceberg checks whether its tables exist and then creates them, and between the two
another process may have created them."""

from __future__ import annotations

import pytest
from pyiceberg.catalog.sql import SqlCatalog, SqlCatalogBaseTable

from k2 import tables
from k2.settings import Settings

pytestmark = pytest.mark.unit


def test_a_catalog_whose_tables_another_process_created_meanwhile_is_opened(tmp_path, monkeypatch) -> None:
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "wh"),
                        s3_endpoint=None)
    created = SqlCatalog.create_tables
    races = []

    def lose_the_race(self: SqlCatalog) -> None:
        created(self)  # the other process, between this one's check and its CREATE TABLE
        races.append(self)
        SqlCatalogBaseTable.metadata.create_all(self.engine, checkfirst=False)  # "table ... already exists"

    monkeypatch.setattr(SqlCatalog, "create_tables", lose_the_race)
    cat = tables.catalog(settings)
    assert races, "the race was not staged"
    assert cat.list_namespaces() == []
