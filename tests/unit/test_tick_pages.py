"""Keyset pages read a table's files earliest first and stop once the page is known: exact pages
over files of many days, over files whose times overlap, and after a cursor; and a page early in
the range opens only the files it needs (the others can be gone from storage and it still answers).

Real embedded catalog (SQLite + local warehouse) with synthetic ticks.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest
from pyiceberg.io.pyarrow import PyArrowFileIO

from k2.query import ticks
from k2.query.cursor import Cursor, fingerprint
from k2.query.engine import Engine
from k2.query.errors import Unavailable
from k2.query.filters import TickFilter, columns
from k2.query.sample import load_asx
from k2.settings import Settings, TableKind
from k2_synthetic import generate

pytestmark = pytest.mark.unit

DAYS = 4
SYDNEY = ZoneInfo("Australia/Sydney")
KEY = ("exchange_timestamp", "symbol", "sequence_number")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(mode="dev", catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "wh"),
                    namespace="market", s3_endpoint=None, log_level="WARNING", query_cache_mb=0)


@pytest.fixture
def one_load(settings: Settings, tmp_path: Path):
    """An engine over one load of the synthetic days (a file per day), and a filter of one symbol."""
    _load(settings, tmp_path / "a", seed=1)
    engine = Engine(settings)
    yield engine, TickFilter((_symbols(engine)[0],))
    engine.close()


def _lose_days(engine: Engine, lost) -> None:
    """Delete from storage the data files of the days `lost` says."""
    for path in _files(engine):
        if lost(dt.date.fromisoformat(path.split("exchange_date=")[1][:10])):
            Path(path).unlink()


def _load(settings: Settings, folder: Path, seed: int, kinds: tuple[TableKind, ...] = ("trades",)) -> None:
    load_asx(settings, generate(folder, symbols=2, days=DAYS, seed=seed), kinds=kinds)


def _rows(table: pa.Table) -> list[tuple]:
    """The rows as tuples, instants as epoch microseconds (Arrow converts them slowly here)."""
    return list(zip(*((c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c).to_pylist()
                      for c in table.select(list(columns("trades"))).columns), strict=True))


def _pages(engine: Engine, flt: TickFilter, limit: int) -> list[tuple]:
    """Every row, page by page."""
    rows: list[tuple] = []
    cursor = None
    while True:
        page = _page(engine, flt, limit, cursor)
        rows += _rows(page.rows)
        if page.next_cursor is None:
            return rows
        cursor = Cursor.decode(page.next_cursor, fingerprint("trades", flt))


def _page(engine: Engine, flt: TickFilter, limit: int, cursor: Cursor | None) -> ticks.Page:
    rel = ticks.tick_relation(engine, engine.pin("trades"), flt)
    return ticks.page(engine, rel, fields=columns("trades"), limit=limit, cursor=cursor,
                      fingerprint=fingerprint("trades", flt))


def _every_row(engine: Engine, flt: TickFilter) -> pa.Table:
    """The table's rows in tick order, read by pyiceberg, not by pages."""
    table = engine.table("trades", fresh=True).scan(row_filter=flt.iceberg_filter(timestamped=True)).to_arrow()
    if flt.symbols:
        table = table.filter(pa.compute.is_in(table["symbol"], pa.array(flt.symbols)))
    table = table.sort_by([(k, "ascending") for k in KEY])
    keys = zip(table["exchange_timestamp"].cast(pa.int64()).to_pylist(), table["symbol"].to_pylist(),
               table["sequence_number"].to_pylist(), strict=True)
    assert len(set(keys)) == table.num_rows, "the test needs unique tick keys"
    return table


def _files(engine: Engine) -> list[str]:
    return [PyArrowFileIO.parse_location(f.file_path)[2]
            for f in engine.plan(engine.pin("trades"), TickFilter()).files]


def test_pages_over_days_and_overlapping_files_are_every_row_once_in_order(settings: Settings, tmp_path: Path):
    _load(settings, tmp_path / "a", seed=1)
    _load(settings, tmp_path / "b", seed=2)  # a second file of each day, over the same hours
    engine = Engine(settings)
    try:
        assert len(_files(engine)) == 2 * DAYS
        symbol = _symbols(engine)[0]
        overnight = (dt.datetime(2014, 3, 11, 15, 50, tzinfo=SYDNEY), dt.datetime(2014, 3, 12, 10, 10, tzinfo=SYDNEY))
        for flt, limit in [(TickFilter(), 997), (TickFilter((symbol,)), 997), (TickFilter((symbol,)), 100_000),
                           (TickFilter((), None, *overnight), 7), (TickFilter((symbol,), None, *overnight), 7)]:
            expected = _rows(_every_row(engine, flt))
            assert len(expected) > 3 * limit or limit > len(expected), "pages of a few rows each, or one page"
            assert _pages(engine, flt, limit) == expected, (flt, limit, len(expected))
    finally:
        engine.close()


def test_an_early_page_opens_only_the_files_it_needs(one_load):
    engine, flt = one_load
    everything = _every_row(engine, flt)
    expected = _rows(everything)
    first_day = everything["exchange_date"][0].as_py()
    in_first_day = everything["exchange_date"].to_pylist().count(first_day)
    assert len(_files(engine)) == DAYS
    _lose_days(engine, lambda day: day != first_day)  # storage lost every later day
    first = _page(engine, flt, 100, None)
    assert _rows(first.rows) == expected[:100]
    last_of_day = _page(engine, flt, in_first_day - 1, None)
    assert _rows(last_of_day.rows) == expected[:in_first_day - 1]
    with pytest.raises((Unavailable, OSError)):
        _page(engine, flt, in_first_day + 1, None)  # this page needs the second day


def test_files_wholly_before_the_cursor_are_not_opened(one_load):
    engine, flt = one_load
    everything = _every_row(engine, flt)
    expected, dates = _rows(everything), everything["exchange_date"].to_pylist()
    days = sorted(set(dates))
    start = dates.index(days[1])
    first = _page(engine, flt, start + 10, None)
    cursor = Cursor.decode(first.next_cursor, fingerprint("trades", flt))
    _lose_days(engine, lambda day: day == days[0])
    assert _rows(_page(engine, flt, 50, cursor).rows) == expected[start + 10:start + 60]


def test_pages_of_quoted_trades_over_days_are_the_whole_join(settings: Settings, tmp_path: Path):
    _load(settings, tmp_path / "a", seed=1, kinds=("trades", "quotes"))
    engine = Engine(settings)
    try:
        flt = TickFilter((_symbols(engine)[0],))
        fp = fingerprint("trades_asof", flt)

        def page(limit: int, cursor: Cursor | None) -> ticks.Page:
            rel = ticks.quoted_trades_relation(engine, engine.pin("trades"), engine.pin("quotes"), flt,
                                               dt.timedelta(seconds=5))
            return ticks.page(engine, rel, fields=ticks.QUOTED_TRADE_COLUMNS, limit=limit, cursor=cursor,
                              fingerprint=fp)

        whole = page(100_000, None)  # more than the range holds: every file is read
        assert whole.next_cursor is None and whole.rows.num_rows > 4_000
        rows, cursor = [], None
        while True:
            part = page(997, cursor)
            rows.append(part.rows)
            if part.next_cursor is None:
                break
            cursor = Cursor.decode(part.next_cursor, fp)
        assert pa.concat_tables(rows).equals(whole.rows)
    finally:
        engine.close()


def _symbols(engine: Engine) -> list[str]:
    return sorted(set(engine.table("trades", fresh=True).scan(selected_fields=("symbol",)).to_arrow()["symbol"]
                      .to_pylist()))
