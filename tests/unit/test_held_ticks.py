"""Pages of named symbols answered from held ticks equal the SQL path's, page for page, cursor for
cursor and type for type: over days of two files each whose hours overlap, one and several
symbols, an exchange, ranges, and with the live tail's rows added.

Real embedded catalog (SQLite + local warehouse) with synthetic ticks; two engines over it, one
holding files' ticks and one without.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from k2.observability import HELD_TICK_BYTES, HELD_TICK_FILES, REGISTRY
from k2.query import heldticks, ticks
from k2.query.cursor import Cursor, fingerprint
from k2.query.engine import Engine, PerFile, Pin
from k2.query.filters import TickFilter, columns
from k2.query.sample import load_asx
from k2.query.tail import TailRows
from k2.settings import Settings
from k2_synthetic import generate

pytestmark = pytest.mark.unit

SYDNEY = ZoneInfo("Australia/Sydney")


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    """(holding ticks, without) over the same tables: two loads, so two files a day over the same hours."""
    tmp = tmp_path_factory.mktemp("held")
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{tmp}/catalog.db", warehouse=str(tmp / "wh"),
                        namespace="market", s3_endpoint=None, log_level="WARNING", query_cache_mb=0)
    for seed in (1, 2):  # seeds whose ticks have unique (time, symbol, sequence) keys (test_tick_pages)
        load_asx(settings, generate(tmp / f"load{seed}", symbols=3, days=2, seed=seed), kinds=("trades", "quotes"))
    held, plain = Engine(settings), Engine(settings.model_copy(update={"query_tick_cache_mb": 0}))
    assert held.held_ticks is not None and plain.held_ticks is None
    yield held, plain
    held.close()
    plain.close()


def _symbols(engine: Engine) -> list[str]:
    table = engine.table("trades", fresh=True).scan(selected_fields=("symbol",)).to_arrow()
    return sorted(set(table["symbol"].to_pylist()))


def _held_files() -> float:
    return REGISTRY.get_sample_value("k2_query_held_tick_files_total", {"result": "hit"}) or 0.0


@dataclass(frozen=True)
class _Page:
    rows: pa.Table
    next_cursor: str | None

    def __eq__(self, other: object) -> bool:  # same types, same values, same cursor (not same chunks)
        return (isinstance(other, _Page) and self.rows.schema == other.rows.schema
                and self.rows.equals(other.rows) and self.next_cursor == other.next_cursor)


def _all_pages(engine: Engine, kind: str, flt: TickFilter, limit: int, pin: Pin | None = None) -> list[_Page]:
    """Every page: its rows and its next cursor."""
    pages, cursor = [], None
    while True:
        rel = ticks.tick_relation(engine, pin or engine.pin(kind), flt)
        page = ticks.page(engine, rel, fields=columns(kind), limit=limit, cursor=cursor,  # type: ignore[arg-type]
                          fingerprint=fingerprint(kind, flt))  # type: ignore[arg-type]
        pages.append(_Page(page.rows, page.next_cursor))
        if page.next_cursor is None:
            return pages
        cursor = Cursor.decode(page.next_cursor, fingerprint(kind, flt))  # type: ignore[arg-type]


def _filters(symbols: list[str]) -> list[TickFilter]:
    day = dt.datetime(2014, 3, 10, tzinfo=SYDNEY)  # the first of the two days
    return [TickFilter((symbols[0],)),
            TickFilter(tuple(symbols[:2])),
            TickFilter((symbols[1], "NOPE"), "ASX"),
            TickFilter((symbols[0],), "NASDAQ"),  # an exchange it is not on: no rows
            TickFilter((symbols[2],), None, day + dt.timedelta(hours=15, minutes=50), day + dt.timedelta(hours=34)),
            TickFilter(tuple(symbols), None, day + dt.timedelta(hours=11, seconds=7.5), day + dt.timedelta(hours=11.5))]


@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_pages_of_held_ticks_equal_sql(engines, kind: str):
    held, plain = engines
    used = _held_files()
    filters = _filters(_symbols(plain))
    for flt, limit in [*((f, n) for f in filters for n in (1999, 50_000)), (filters[-1], 7)]:
        expected = _all_pages(plain, kind, flt, limit)
        assert _all_pages(held, kind, flt, limit) == expected, (flt, limit)
    assert len(_all_pages(plain, kind, filters[0], 1999)) > 3, "many pages"
    assert _held_files() > used, "pages were answered from held ticks"


def _later_ticks(engine: Engine, symbols: list[str], rows: int) -> TailRows:
    """`rows` stored trades of `symbols`, 41 minutes later and with sequence numbers no stored tick
    has: new ticks the stream has not committed yet, as the live tail holds them."""
    stored = engine.table("trades", fresh=True).scan().to_arrow()
    some = stored.filter(pc.is_in(stored["symbol"], pa.array(symbols))).slice(0, rows)
    later = some.set_column(some.schema.get_field_index("exchange_timestamp"), "exchange_timestamp",
                            pc.add(some["exchange_timestamp"], pa.scalar(dt.timedelta(minutes=41))))
    later = later.set_column(later.schema.get_field_index("sequence_number"), "sequence_number",
                             pc.add(later["sequence_number"], 10_000_000))
    return TailRows(later, ())


def _exported(engine: Engine, kind: str, flt: TickFilter, limit: int | None, pin: Pin | None = None,
              **bounds) -> pa.Table:
    rel = ticks.tick_relation(engine, pin or engine.pin(kind), flt)
    result = ticks.stream(engine, rel, fields=columns(kind), limit=limit, **bounds)  # type: ignore[arg-type]
    return pa.Table.from_batches(list(result.batches), schema=result.schema)


def _exports(query: str) -> float:
    return REGISTRY.get_sample_value("k2_query_executions_total", {"query": query, "outcome": "ok"}) or 0.0


@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_exports_of_held_ticks_equal_sql(engines, kind: str):
    held, plain = engines
    answered = _exports("held_ticks_export")
    for flt in _filters(_symbols(plain)):
        for limit in (None, 7, 1999):
            expected = _exported(plain, kind, flt, limit)
            got = _exported(held, kind, flt, limit)
            assert got.schema == expected.schema and got.equals(expected), (flt, limit)
    assert _exports("held_ticks_export") > answered, "exports were answered from held ticks"


def test_an_export_larger_than_held_ticks_answer_streams_from_sql_and_equals_it(engines):
    held, plain = engines
    flt = TickFilter(tuple(_symbols(plain)[:2]))
    everything = _exported(plain, "trades", flt, None)
    assert everything.num_rows > 1000
    by_sql, by_held = _exports("trades_export"), _exports("held_ticks_export")
    for limit in (None, everything.num_rows, 1001):  # over the bound: SQL; at it (1000): held ticks
        assert _exported(held, "trades", flt, limit, held_up_to=1000).equals(everything.slice(0, limit))
    assert _exported(held, "trades", flt, 1000, held_up_to=1000).equals(everything.slice(0, 1000))
    assert _exports("trades_export") == by_sql + 3
    assert _exports("held_ticks_export") == by_held + 1


def test_exports_of_held_ticks_add_the_live_tail(engines):
    _, plain = engines
    symbols = _symbols(plain)
    tail = _later_ticks(plain, symbols[:1], 300)
    flt = TickFilter((symbols[0],))
    answered = _exports("held_ticks_export")
    got, expected = (_exported(e, "trades", flt, None, pin=replace(e.pin("trades"), tail=tail)) for e in engines)
    assert got.equals(expected)
    assert got.num_rows == _exported(plain, "trades", flt, None).num_rows + 300
    assert _exports("held_ticks_export") == answered + 1


def test_pages_of_held_ticks_add_the_live_tail(engines):
    _, plain = engines
    symbols = _symbols(plain)
    tail = _later_ticks(plain, symbols[:2], 700)
    for flt in (TickFilter((symbols[0],)), TickFilter(tuple(symbols[:2]), "ASX")):
        pages = [_all_pages(e, "trades", flt, 997, pin=replace(e.pin("trades"), tail=tail)) for e in engines]
        assert pages[0] == pages[1], flt
        without = _all_pages(plain, "trades", flt, 997)
        grown = sum(p.rows.num_rows for p in pages[0]) - sum(p.rows.num_rows for p in without)
        assert grown == pc.sum(pc.is_in(tail.table["symbol"], pa.array(list(flt.symbols)))).as_py()


def test_a_page_without_symbols_is_left_to_sql(engines):
    held, plain = engines
    before = _held_files() + (REGISTRY.get_sample_value("k2_query_held_tick_files_total", {"result": "read"}) or 0)
    assert _all_pages(held, "trades", TickFilter(), 9999) == _all_pages(plain, "trades", TickFilter(), 9999)
    after = _held_files() + (REGISTRY.get_sample_value("k2_query_held_tick_files_total", {"result": "read"}) or 0)
    assert after == before


def test_a_symbol_on_two_exchanges_in_one_file_pages_only_the_asked_exchange():
    base = dt.datetime(2014, 3, 10, 0, tzinfo=dt.UTC)
    rows = pa.table({
        "symbol": ["BHP"] * 6,
        "exchange": ["ASX", "NASDAQ", "ASX", "NASDAQ", "NASDAQ", "ASX"],
        "exchange_timestamp": pa.array([base + dt.timedelta(seconds=s) for s in (1, 1, 2, 3, 4, 5)],
                                       pa.timestamp("us", tz="UTC")),
        "sequence_number": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
    })
    held = heldticks._index(rows)
    assert held.exchanges == {"BHP": frozenset({"ASX", "NASDAQ"})}
    window = heldticks._Window(TickFilter(("BHP",), "NASDAQ"), None)
    page = window.rows(held, "BHP", ("exchange", "sequence_number"), wanted=2)
    assert page is not None and page.column_names[-3:] == list(heldticks.KEY_COLUMNS)
    assert page["sequence_number"].to_pylist() == [2, 4], "the first two NASDAQ rows, none of ASX"


def _all_quoted_pages(engine: Engine, flt: TickFilter, limit: int, tolerance: dt.timedelta,
                      trades: Pin | None = None, quotes: Pin | None = None) -> list[_Page]:
    """Every page of trades with their prevailing quotes: its rows and its next cursor."""
    pages, cursor, key = [], None, fingerprint("trades_asof", flt, tolerance)
    while True:
        rel = ticks.quoted_trades_relation(engine, trades or engine.pin("trades"), quotes or engine.pin("quotes"),
                                           flt, tolerance)
        page = ticks.page(engine, rel, fields=ticks.QUOTED_TRADE_COLUMNS, limit=limit, cursor=cursor,
                          fingerprint=key)
        pages.append(_Page(page.rows, page.next_cursor))
        if page.next_cursor is None:
            return pages
        cursor = Cursor.decode(page.next_cursor, key)


def _held_pages() -> float:
    return REGISTRY.get_sample_value("k2_query_executions_total", {"query": "held_quotes_page", "outcome": "ok"}) or 0.0


@pytest.mark.parametrize("tolerance_ms", [0, 700, 5_000, 86_400_000])
def test_trades_with_prevailing_quotes_from_held_ticks_equal_sql(engines, tolerance_ms: int):
    held, plain = engines
    tolerance = dt.timedelta(milliseconds=tolerance_ms)
    before = _held_pages()
    filters = _filters(_symbols(plain))
    for flt, limit in [*((f, 1999) for f in filters), (filters[1], 50_000), (filters[-1], 7)]:
        expected = _all_quoted_pages(plain, flt, limit, tolerance)
        assert _all_quoted_pages(held, flt, limit, tolerance) == expected, (flt, limit)
    assert _held_pages() > before, "pages were answered from held ticks"
    whole = pa.concat_tables(p.rows for p in _all_quoted_pages(plain, filters[0], 50_000, tolerance))
    stale = whole["bid_price"].null_count
    assert stale < whole.num_rows, "trades were quoted"
    assert stale > 0 or tolerance_ms > 5_000, "some trades had no quote, or one too old for the tolerance"


def test_held_quotes_answer_pages_and_add_the_live_tails(engines):
    _, plain = engines
    symbols = _symbols(plain)
    before = _held_pages()
    stored = {kind: plain.table(kind, fresh=True).scan().to_arrow() for kind in ("trades", "quotes")}

    def later(rows: pa.Table, minutes: float) -> TailRows:
        """Ticks of the first two symbols, `minutes` later with new sequence numbers: not committed yet."""
        some = rows.filter(pc.is_in(rows["symbol"], pa.array(symbols[:2]))).slice(0, 900)
        some = some.set_column(some.schema.get_field_index("exchange_timestamp"), "exchange_timestamp",
                               pc.add(some["exchange_timestamp"], pa.scalar(dt.timedelta(minutes=minutes))))
        return TailRows(some.set_column(some.schema.get_field_index("sequence_number"), "sequence_number",
                                        pc.add(some["sequence_number"], 10_000_000)), ())

    trade_tail, quote_tail = later(stored["trades"], 41), later(stored["quotes"], 40.99)
    for flt in (TickFilter((symbols[0],)), TickFilter(tuple(symbols[:2]), "ASX")):
        pages = [_all_quoted_pages(e, flt, 997, dt.timedelta(seconds=5),
                                   trades=replace(e.pin("trades"), tail=trade_tail),
                                   quotes=replace(e.pin("quotes"), tail=quote_tail)) for e in engines]
        assert pages[0] == pages[1], flt
    assert _held_pages() > before, "pages were answered from held ticks"


def test_a_quote_exactly_as_old_as_the_tolerance_prevails_and_one_microsecond_older_does_not(engines):
    held, plain = engines
    flt = TickFilter(tuple(_symbols(plain)))
    whole = pa.concat_tables(p.rows for p in _all_quoted_pages(plain, flt, 50_000, dt.timedelta(days=1)))
    ages = pc.subtract(whole["exchange_timestamp"], whole["quote_timestamp"]).cast(pa.int64())
    age = dt.timedelta(microseconds=pc.max(ages).as_py())  # the oldest quote any trade has
    assert age > dt.timedelta(0)
    stale = []
    for tolerance in (age, age - dt.timedelta(microseconds=1)):
        pages = _all_quoted_pages(held, flt, 1999, tolerance)
        assert pages == _all_quoted_pages(plain, flt, 1999, tolerance), tolerance
        stale.append(sum(p.rows["quote_timestamp"].null_count for p in pages))
    assert stale[1] > stale[0], "the oldest quote is stale one microsecond short of its age"


def test_a_file_larger_than_the_budget_is_left_to_sql_and_not_decoded_again(engines):
    held, plain = engines
    small = Engine(held.settings.model_copy(update={"query_tick_cache_mb": 1}))
    try:
        flt = TickFilter(tuple(_symbols(plain)))
        sizes = [heldticks._index(plain.run("t", "SELECT * FROM {src} ORDER BY symbol, exchange_timestamp, "
                                                  "sequence_number", {}, {"src": one})).nbytes
                 for one in _single_file_scans(plain, "trades")]
        assert min(sizes) > 2**20, "every file decodes to more than the budget"
        refused = _too_large()
        for _ in range(2):
            assert _all_pages(small, "trades", flt, 1999) == _all_pages(plain, "trades", flt, 1999)
            assert (_all_quoted_pages(small, flt, 1999, dt.timedelta(seconds=5))
                    == _all_quoted_pages(plain, flt, 1999, dt.timedelta(seconds=5)))
        assert _too_large() > refused, "the files were found too large to hold"
    finally:
        small.close()


def _too_large() -> float:
    return REGISTRY.get_sample_value("k2_query_held_tick_files_total", {"result": "too_large"}) or 0


def _single_file_scans(engine: Engine, kind: str) -> list:
    scan = engine.plan(engine.pin(kind), TickFilter())
    return [replace(scan, files=(f,), time_bounds=None) for f in scan.files]


def test_a_per_file_value_larger_than_the_budget_is_made_once_and_never_kept(engines):
    """The store rollups and held ticks share: a value past the whole budget is not kept (cachetools
    would raise) and not made again; its callers answer by SQL."""
    _, plain = engines
    pin = plain.pin("trades")
    file = plain.plan(pin, TickFilter()).files[0]
    store = PerFile(1, HELD_TICK_FILES, HELD_TICK_BYTES, "read")
    made = []

    @dataclass(frozen=True)
    class Sized:
        nbytes: int

    def make(scan) -> Sized:
        made.append(scan)
        return Sized(2**20 + 1)

    before = _too_large()
    assert store.get(pin, file, make) is None and store.get(pin, file, make) is None
    assert len(made) == 1 and _too_large() == before + 2 and store.currsize == 0
    assert store.get(pin, plain.plan(pin, TickFilter()).files[1], lambda scan: Sized(1000)) == Sized(1000)


def test_an_export_whose_files_cannot_be_held_together_is_left_to_sql_and_decodes_none(engines):
    """Each file fits the budget, all of them do not: an export reading them all from held ticks
    would evict its own files as it went and, asked again, decode every one again (a polled export
    over a streaming table's small files took a second a request). SQL answers it, every time."""
    held, plain = engines
    small = Engine(held.settings.model_copy(update={"query_tick_cache_mb": _room_for_one_file(plain)}))
    try:
        flt = TickFilter((_symbols(plain)[0],))  # every day's files
        expected = _export(plain, flt)
        made = _made()
        for _ in range(3):
            assert _export(small, flt).equals(expected)
        assert _made() == made, "no file was decoded for an export that cannot be held"
    finally:
        small.close()
    roomy = Engine(held.settings)  # the default budget: the same export is held
    try:
        assert _export(roomy, flt).equals(expected)
        assert _made() > made
    finally:
        roomy.close()


def _room_for_one_file(plain: Engine) -> int:
    """A budget in MB that holds any one trades file's ticks, not all of them together."""
    sizes = [heldticks._index(plain.run("t", "SELECT * FROM {src} ORDER BY symbol, exchange_timestamp, "
                                              "sequence_number", {}, {"src": one})).nbytes
             for one in _single_file_scans(plain, "trades")]
    budget_mb = -(-(max(sizes) + 1024) // 2**20)
    assert sum(sizes) > budget_mb * 2**20, "together the files are more than the budget, which holds any one"
    return budget_mb


def _export(engine: Engine, flt: TickFilter) -> pa.Table:
    rel = ticks.tick_relation(engine, engine.pin("trades"), flt)
    result = ticks.stream(engine, rel, fields=columns("trades"), limit=None)
    return pa.Table.from_batches(list(result.batches), result.schema)


def _made() -> float:
    return REGISTRY.get_sample_value("k2_query_held_tick_files_total", {"result": "read"}) or 0


def test_a_page_reading_more_files_than_can_be_held_together_stops_before_the_one_that_does_not_fit(engines):
    """A page that finds no row reads every file of its range (here: a symbol between the files'
    least and greatest, so no file is pruned). With room for one file, it must not evict what it
    read to decode the next, over and over: it stops, SQL answers, and asked again it decodes
    nothing."""
    held, plain = engines
    small = Engine(held.settings.model_copy(update={"query_tick_cache_mb": _room_for_one_file(plain)}))
    try:
        flt = TickFilter((_symbols(plain)[0] + "Z",))
        expected = _all_pages(plain, "trades", flt, 100)
        assert _all_pages(small, "trades", flt, 100) == expected
        made = _made()
        for _ in range(3):
            assert _all_pages(small, "trades", flt, 100) == expected
        assert _made() == made, "asked again, the page decoded no file"
    finally:
        small.close()
