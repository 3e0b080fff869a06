"""Pages of trades as-of-joined to quotes: the join runs on a page's trades, and pages stay exact."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import duckdb
import pyarrow as pa

from k2.query import ticks
from k2.query.engine import Pin
from k2.query.filters import TickFilter
from k2.schemas import arrow_schema
from k2.settings import TableKind

_T0 = dt.datetime(2014, 3, 12, 0, 0, tzinfo=dt.UTC)


class _TableName(str):
    """A scan here is the name of its Arrow table, with no files to read earliest first."""

    files = ()
    time_bounds = None


class _ArrowTables:
    """What `ticks` asks of an engine, answered by DuckDB over Arrow tables named by the scans'
    aliases; the SQL of each run is kept."""

    held_ticks = None  # no file's ticks held: every page is SQL's, which this test is about

    def __init__(self, **tables: pa.Table) -> None:
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        for name, table in tables.items():
            self.con.register(name, table)
        self.sql: list[str] = []

    def plan(self, pin: Pin, flt: TickFilter) -> str:
        return _TableName(pin.kind)

    def run(self, name: str, sql: str, params: dict, scans: dict, **_: object) -> pa.Table:
        self.sql.append(sql)
        text = sql.format(**{alias: table for alias, table in scans.items()})
        used = set(re.findall(r"\$(\w+)", text))
        return self.con.execute(text, {k: v for k, v in params.items() if k in used}).fetch_arrow_table()


def _ticks(kind: TableKind, rows: list[dict]) -> pa.Table:
    """Rows of the table's own schema (columns not given are null)."""
    return pa.Table.from_pylist([{"symbol": "BHP", "exchange": "ASX", **row} for row in rows], arrow_schema(kind))


def _tables() -> _ArrowTables:
    trades = _ticks("trades", [{"exchange_timestamp": _T0 + dt.timedelta(seconds=i // 2), "sequence_number": i,
                                "exchange_date": _T0.date(),
                                "price": Decimal(f"{30 + i}.5")} for i in range(40)])
    # several quotes share a timestamp: the highest sequence number prevailed
    quotes = _ticks("quotes", [{"exchange_timestamp": _T0 + dt.timedelta(seconds=i // 3), "sequence_number": i,
                                "exchange_date": _T0.date(), "bid_price": Decimal(i), "ask_price": Decimal(i + 1),
                                "bid_size": i, "ask_size": i}
                               for i in range(45)])
    return _ArrowTables(trades=trades, quotes=quotes)


def test_each_page_joins_only_its_own_trades_and_the_pages_are_the_whole_join_in_order():
    engine = _tables()
    pins = [Pin(kind, None, None) for kind in ("trades", "quotes")]
    rel = ticks.quoted_trades_relation(engine, *pins, TickFilter(("BHP",)), dt.timedelta(seconds=1))  # type: ignore[arg-type]
    whole = engine.con.execute(
        f"SELECT * FROM ({rel.text().format(trades='trades', quotes='quotes')}) ORDER BY {ticks.ORDER_BY}",
        dict(rel.params)).fetch_arrow_table()

    rows, cursor = [], None
    while True:
        page = ticks.page(engine, rel, fields=ticks.QUOTED_TRADE_COLUMNS, limit=7, cursor=cursor,  # type: ignore[arg-type]
                          fingerprint="f")
        rows += page.rows.to_pylist()
        if page.next_cursor is None:
            break
        cursor = ticks.Cursor.decode(page.next_cursor, "f")
    assert rows == whole.select(list(ticks.QUOTED_TRADE_COLUMNS)).to_pylist()
    assert [r["bid_price"] for r in rows[:4]] == [Decimal(2), Decimal(2), Decimal(5), Decimal(5)]
    # the ASOF join's left side is the page's trades (its conditions, order and limit), not the range's
    assert len(engine.sql) == 6 and all(sql.count("LIMIT $limit") == 2 for sql in engine.sql)
