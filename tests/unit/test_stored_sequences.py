"""The highest stored sequence number per (symbol, day), which the stream writer and the API's live
tails de-duplicate against: read from the table one day at a time, as ticks of the day arrive."""

from __future__ import annotations

import types

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.table import Table

from k2 import tables
from k2.quality import GapDetector
from k2.query.sample import load_asx
from k2.settings import Settings
from k2.stream.writer import TableWriter
from k2_synthetic import generate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def trades(tmp_path_factory: pytest.TempPathFactory) -> Table:
    root = tmp_path_factory.mktemp("stored-sequences")
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{root}/catalog.db", warehouse=str(root / "wh"),
                        s3_endpoint=None)
    load_asx(settings, generate(root / "ticks", symbols=3, days=3, seed=5), kinds=("trades",))
    return tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))


def _expected(table: Table) -> dict[tuple[str, int], int]:
    stored = table.scan().to_arrow()
    days = pc.cast(stored["exchange_date"], pa.int32())
    highest = stored.append_column("day", days).group_by(["symbol", "day"]).aggregate([("sequence_number", "max")])
    return dict(zip(zip(highest["symbol"].to_pylist(), highest["day"].to_pylist(), strict=True),
                    highest["sequence_number_max"].to_pylist(), strict=True))


def test_a_days_marks_are_the_tables_highest_sequence_numbers_of_that_day(trades: Table) -> None:
    table = trades
    snapshot_id = table.current_snapshot().snapshot_id
    stored = table.scan().to_arrow()
    days = pc.cast(stored["exchange_date"], pa.int32()).to_numpy()
    for day in sorted(set(days.tolist())):
        of_day = stored.filter(pa.array(days == day)).group_by("symbol").aggregate([("sequence_number", "max")])
        expected = dict(zip(((s, day) for s in of_day["symbol"].to_pylist()),
                            of_day["sequence_number_max"].to_pylist(), strict=True))
        assert len(expected) == 3
        assert tables.day_sequence_marks(table, snapshot_id, day) == expected
    assert tables.day_sequence_marks(table, snapshot_id, int(days.max()) + 1) == {}, "a day the table lacks"


def test_the_writer_reads_no_stored_sequence_numbers_until_ticks_of_a_day_arrive(trades, monkeypatch) -> None:
    """On every partition assignment the writer read the highest sequence number of every stored
    (symbol, day): a scan of the whole table, in time and memory, before it consumed anything."""
    expected = _expected(trades)
    scans, scan = [], Table.scan

    def counted(self, *args, **kwargs):
        scans.append(kwargs)
        return scan(self, *args, **kwargs)

    monkeypatch.setattr(Table, "scan", counted)
    writer = types.SimpleNamespace(table=trades, sequenced=True, detector=GapDetector("stream"))
    writer._stored_day = lambda day: TableWriter._stored_day(writer, day)
    TableWriter._load_watermarks(writer)
    assert scans == []
    day = min(d for _, d in expected)
    arrived = pa.table({"exchange_date": pa.array([day, day], pa.int32()).cast(pa.date32())})
    TableWriter._read_stored_days(writer, arrived)
    assert len(scans) == 1, "one read of the day, shared by the de-duplication and the gap detector"
    of_day = {k: v for k, v in expected.items() if k[1] == day}
    assert {k: writer.watermarks.get(k, 0) for k in of_day} == of_day
    assert {k: writer.detector.last_seen.get(k, 0) for k in of_day} == of_day
    assert len(scans) == 1
