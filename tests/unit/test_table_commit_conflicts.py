"""Metadata commits (maintenance, schema evolution, properties) racing a writer's commit.

The catalog is a real (SQLite) Iceberg catalog; the "writer" is a second table handle appending
through it at the worst moment, inside the other commit. pyiceberg 0.12's SQL catalog then
raises CommitFailedException (K2 tables turn pyiceberg's silent rebase off), as it did in CI.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import NestedField, StringType

from k2 import tables
from k2.stream import maintenance

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)
IDENTIFIER = "market.ticks"
ARROW = pa.schema([pa.field("exchange_date", pa.date32(), nullable=False),
                   pa.field("sequence_number", pa.int64(), nullable=False)])


def _rows(start: int, count: int) -> pa.Table:
    return pa.table({"exchange_date": [DAY] * count, "sequence_number": list(range(start, start + count))},
                    schema=ARROW)


@pytest.fixture
def table(ticks_table) -> Table:
    created = ticks_table()
    for start in (0, 10, 20):
        created.append(_rows(start, 10))
    return created


@pytest.fixture
def writer_commits_during_catalog_commit(table, monkeypatch):
    """Arm the next `times` catalog commits to lose the race to a writer.

    A writer's append lands after the catalog has read the table's current metadata and before it
    swaps in the new one: the exact window in which a concurrent commit makes the swap fail.
    """
    original = SqlCatalog._write_metadata
    appended: list[int] = []
    writer_committing = False

    def arm(times: int) -> list[int]:
        def write_metadata_while_a_writer_commits(metadata, io, metadata_path):
            nonlocal writer_committing
            if not writer_committing and len(appended) < times:
                writer_committing = True
                try:
                    start = 1000 + 10 * len(appended)
                    appended.append(start)
                    table.catalog.load_table(IDENTIFIER).append(_rows(start, 10))
                finally:
                    writer_committing = False
            return original(metadata, io, metadata_path)

        monkeypatch.setattr(SqlCatalog, "_write_metadata", staticmethod(write_metadata_while_a_writer_commits))
        return appended

    return arm


def _sequence_numbers(table: Table) -> list[int]:
    return sorted(table.refresh().scan().to_arrow()["sequence_number"].to_pylist())


def test_compaction_redone_when_a_writer_commits_in_between(table, writer_commits_during_catalog_commit, monkeypatch):
    monkeypatch.setattr(tables.time, "sleep", lambda _: None)
    appended = writer_commits_during_catalog_commit(2)
    table, compacted = maintenance.compact(table, min_files=2)
    assert compacted == 1 and len(appended) == 2
    expected = list(range(30)) + [n for start in appended for n in range(start, start + 10)]
    assert _sequence_numbers(table) == sorted(expected), "a writer's rows were lost or doubled"
    assert maintenance.files_per_partition(table.refresh()) == {DAY: 1}


def test_expiry_redone_when_a_writer_commits_in_between(table, writer_commits_during_catalog_commit, monkeypatch):
    monkeypatch.setattr(tables.time, "sleep", lambda _: None)
    appended = writer_commits_during_catalog_commit(2)
    table, expired = maintenance.expire(table, dt.timedelta(0))
    assert len(appended) == 2
    assert expired >= 3, "the snapshots older than the cutoff were not expired"
    assert _sequence_numbers(table) == sorted([*range(30), *range(1000, 1010), *range(1010, 1020)])


def test_maintenance_gives_up_with_a_clear_error_when_conflicts_never_stop(table, writer_commits_during_catalog_commit,
                                                                           monkeypatch):
    monkeypatch.setattr(tables.time, "sleep", lambda _: None)
    monkeypatch.setattr(tables, "MAX_COMMIT_ATTEMPTS", 3)
    writer_commits_during_catalog_commit(100)
    with pytest.raises(RuntimeError, match=r"snapshot expiry of market\.ticks kept conflicting after 3 attempts"):
        maintenance.expire(table, dt.timedelta(0))


def test_schema_evolution_redone_when_a_writer_commits_in_between(table, writer_commits_during_catalog_commit,
                                                                   monkeypatch):
    monkeypatch.setattr(tables.time, "sleep", lambda _: None)
    appended = writer_commits_during_catalog_commit(1)
    wider = Schema(*table.schema().fields, NestedField(3, "venue", StringType(), required=False))
    assert tables.evolve_schema(table, wider) and len(appended) == 1
    fresh = table.catalog.load_table(IDENTIFIER)
    assert [f.name for f in fresh.schema().fields] == ["exchange_date", "sequence_number", "venue"]
    assert _sequence_numbers(fresh) == sorted([*range(30), *range(1000, 1010)])
    assert not tables.evolve_schema(fresh, wider), "a second evolution to the same schema must change nothing"


def test_properties_set_when_a_writer_commits_in_between(table, writer_commits_during_catalog_commit, monkeypatch):
    monkeypatch.setattr(tables.time, "sleep", lambda _: None)
    appended = writer_commits_during_catalog_commit(1)
    table = tables.set_properties(table, {"write.target-file-size-bytes": "1048576"})
    assert len(appended) == 1 and table.properties["write.target-file-size-bytes"] == "1048576"
    assert _sequence_numbers(table) == sorted([*range(30), *range(1000, 1010)])


def test_table_creation_racing_another_creator_succeeds(table, monkeypatch):
    """Two writers starting together: the other one's namespace insert lands between our check and ours."""
    definition = tables.TableDefinition("market", "other", table.schema())
    original, checks = type(table.catalog).namespace_exists, []

    def lose_the_first_check(self, namespace):
        checks.append(namespace)
        return len(checks) > 1 and original(self, namespace)

    monkeypatch.setattr(type(table.catalog), "namespace_exists", lose_the_first_check)
    created = tables.ensure_table(table.catalog, definition)
    assert created.name() == ("market", "other")
    assert tables.ensure_table(table.catalog, definition).metadata.table_uuid == created.metadata.table_uuid
