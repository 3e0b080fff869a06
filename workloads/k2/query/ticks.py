"""Reading ticks: keyset pages in tick order, streamed exports, the latest quote per symbol, and
trades as-of-joined to the quote that prevailed when they printed.

Tick order is (exchange_timestamp, symbol, sequence_number): unique per row, so keyset pages never
skip or repeat one, and within a symbol it is the exchange's own order.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
from pyiceberg.manifest import DataFile

from k2.query import heldticks
from k2.query.cursor import Cursor, Position
from k2.query.engine import Engine, Pin, ResultStream, Scan, record_query
from k2.query.filters import TickFilter, columns
from k2.query.heldticks import KEY_COLUMNS
from k2.query.sql import Where, ident, select_list

ORDER_BY = "exchange_timestamp, symbol, sequence_number"
QUOTE_FIELDS = ("bid_price", "ask_price", "bid_size", "ask_size")
QUOTED_TRADE_COLUMNS = (*columns("trades"), "quote_timestamp", *QUOTE_FIELDS)
# An export of named symbols up to this many rows is sliced from held ticks (a sixth of SQL's time on
# 6,446 rows); a larger one streams from DuckDB, so what it holds per export stays a chunk.
HELD_STREAM_ROWS = 65_536


@dataclass(frozen=True)
class Relation:
    """A subquery over planned scans: what pages and exports select from."""

    name: str  # the metrics label of queries over it
    sql: str  # refers to each scan as {alias}
    params: Mapping[str, Any]
    scans: Mapping[str, Scan]
    pins: Mapping[str, Pin]  # the table versions read, by role: what a cursor pins
    # The rows `sql` keeps one for one (the left side of an ASOF LEFT JOIN), written `{driving}` in it:
    # a page narrowed to its own rows there first joins a page of them, not every row of the range.
    driving: str | None = None
    paged: str = "src"  # the scan whose rows are the relation's rows, one for one
    ticks: TickFilter | None = None  # the trades or quotes it pages: which (held ticks can page those)
    quotes_within: dt.timedelta | None = None  # trades with their prevailing quotes: the tolerance

    def text(self, page: str = "") -> str:
        """`sql`, its driving rows narrowed by `page` (a page's conditions, order and limit)."""
        if self.driving is None:
            return self.sql
        return self.sql.replace("{driving}", f"SELECT * FROM ({self.driving}) {page}")

    def snapshot_ids(self) -> dict[str, int | None]:
        ids = {role: pin.snapshot_id for role, pin in self.pins.items()}
        for pin in self.pins.values():
            if pin.since is not None:
                ids["since"] = pin.since_snapshot_id
        return ids


def tick_relation(engine: Engine, pin: Pin, flt: TickFilter) -> Relation:
    """The ticks of one table matching `flt`."""
    where = Where().ticks(flt)
    return Relation(pin.kind, f"SELECT * FROM {{src}} {where.sql()}", where.params,
                    {"src": engine.plan(pin, flt)}, {pin.kind: pin}, ticks=flt)


def quoted_trades_relation(engine: Engine, trades: Pin, quotes: Pin, flt: TickFilter,
                           tolerance: dt.timedelta) -> Relation:
    """Each trade with the last quote at or before it (same symbol and exchange), as long as that
    quote is at most `tolerance` old; otherwise the quote columns are null.

    Several quotes may share a timestamp: the one with the highest sequence number is the one
    that prevailed, so quotes are reduced to that one first and the ASOF match is deterministic.
    """
    quote_filter = replace(flt, start=flt.start - tolerance if flt.start else None)
    tw = Where().ticks(flt, prefix="t_")
    qw = Where().ticks(quote_filter, prefix="q_")
    fresh = "t.exchange_timestamp - q.exchange_timestamp <= $tolerance"
    quote_columns = ", ".join(f"CASE WHEN {fresh} THEN q.{ident(c)} END AS {ident(c)}" for c in QUOTE_FIELDS)
    sql = f"""
        SELECT t.*, CASE WHEN {fresh} THEN q.exchange_timestamp END AS quote_timestamp, {quote_columns}
        FROM ({{driving}}) t
        ASOF LEFT JOIN (
            SELECT symbol, exchange, exchange_timestamp, {select_list(QUOTE_FIELDS)} FROM {{quotes}} {qw.sql()}
            QUALIFY row_number() OVER (PARTITION BY symbol, exchange, exchange_timestamp
                                       ORDER BY sequence_number DESC) = 1
        ) q ON t.symbol = q.symbol AND t.exchange = q.exchange AND t.exchange_timestamp >= q.exchange_timestamp
    """
    return Relation("trades_asof_quotes", sql, {**tw.params, **qw.params, "tolerance": tolerance},
                    {"trades": engine.plan(trades, flt), "quotes": engine.plan(quotes, quote_filter)},
                    {"trades": trades, "quotes": quotes}, driving=f"SELECT * FROM {{trades}} {tw.sql()}",
                    paged="trades", ticks=flt, quotes_within=tolerance)


@dataclass(frozen=True)
class Page:
    rows: pa.Table
    next_cursor: str | None  # None when this page is the last


def page(engine: Engine, rel: Relation, *, fields: tuple[str, ...], limit: int, cursor: Cursor | None,
         fingerprint: str) -> Page:
    """Up to `limit` rows after the cursor's position, in tick order."""
    where = Where()
    if cursor is not None:
        after = cursor.after
        where.add("exchange_timestamp >= $after_ts", after_ts=after.timestamp)  # prunes row groups
        where.add("exchange_timestamp > $after_ts OR (exchange_timestamp = $after_ts AND "
                  "(symbol > $after_symbol OR (symbol = $after_symbol AND sequence_number > $after_seq)))",
                  after_symbol=after.symbol, after_seq=after.sequence_number)
    # One row more than asked tells whether another page follows.
    narrowed = f"{where.sql()} ORDER BY {ORDER_BY} LIMIT $limit"
    sql = (f"SELECT {select_list(fields)}, epoch_us(exchange_timestamp) AS __k2_ts, symbol AS __k2_symbol, "
           f"sequence_number AS __k2_seq FROM ({rel.text(narrowed)}) {narrowed}")
    params = {**rel.params, **where.params, "limit": limit + 1}
    held = _held_rows(engine, rel, fields, limit + 1, cursor.after if cursor else None)
    result = held if held is not None else _earliest_rows(engine, rel, sql, params, limit + 1,
                                                          cursor.after.timestamp_us if cursor else None)
    next_cursor = None
    if result.num_rows > limit:
        last = result.slice(limit - 1, 1).select(list(KEY_COLUMNS)).to_pylist()[0]
        position = Position(last["__k2_ts"], last["__k2_symbol"], last["__k2_seq"])
        next_cursor = Cursor(rel.snapshot_ids(), position, fingerprint).encode()
    return Page(result.slice(0, limit).drop_columns(list(KEY_COLUMNS)), next_cursor)


def _held_rows(engine: Engine, rel: Relation, fields: tuple[str, ...], wanted: int,
               after: Position | None) -> pa.Table | None:
    """A page's rows from held ticks, or None where SQL must answer."""
    if rel.ticks is None:
        return None
    if rel.quotes_within is None:
        return heldticks.first_rows(engine, rel.scans[rel.paged], rel.ticks, fields, wanted, after)
    trade_fields = columns("trades")
    if fields != QUOTED_TRADE_COLUMNS:
        return None
    trades = heldticks.first_rows(engine, rel.scans["trades"], rel.ticks, trade_fields, wanted, after)
    if trades is None:
        return None
    return heldticks.with_prevailing_quotes(engine, rel.scans["quotes"], rel.ticks, trades, trade_fields,
                                            QUOTE_FIELDS, rel.quotes_within // dt.timedelta(microseconds=1))


def _earliest_rows(engine: Engine, rel: Relation, sql: str, params: Mapping[str, Any], wanted: int,
                   after_us: int | None) -> pa.Table:
    """The first `wanted` rows of a page's query, reading the paged table's files earliest first.

    A file whose least timestamp is past the last of `wanted` rows found in the files before it
    cannot hold any of the first `wanted`, so a page early in a long range opens a few files, not
    all of them (pyiceberg's pruning cannot know where a page ends). Reading stops when the unread
    files all start after the page's last row; until then it takes in every file starting at or
    before that row (which makes the next round the last) or, short of rows, four times as many.
    Files wholly before the cursor hold no row after it and are never read."""
    scan = rel.scans[rel.paged]
    if scan.time_bounds is None or len(scan.files) < 2:
        return engine.run(f"{rel.name}_page", sql, params, rel.scans)
    kept = [i for i, (_, high) in enumerate(scan.time_bounds) if after_us is None or high >= after_us]
    files, bounds = [scan.files[i] for i in kept], [scan.time_bounds[i] for i in kept]
    starts = [low for low, _ in bounds]
    read = _holding(files, wanted)
    while True:
        narrowed = replace(scan, files=tuple(files[:read]), time_bounds=tuple(bounds[:read]))
        result = engine.run(f"{rel.name}_page", sql, params, {**rel.scans, rel.paged: narrowed})
        if read >= len(files):
            return result
        if result.num_rows < wanted:
            read = max(4 * read, _holding(files, wanted, read + 1))
            continue
        reaching = bisect.bisect_right(starts, result["__k2_ts"][-1].as_py())
        if reaching <= read:
            return result
        read = reaching


def _holding(files: list[DataFile], wanted: int, at_least: int = 1) -> int:
    """How many of the first files it takes to hold `wanted` rows of any symbol (or all of them):
    fewer cannot answer the page, whatever they hold."""
    count, total = 0, 0
    for count, file in enumerate(files, start=1):
        total += file.record_count
        if count >= at_least and total >= wanted:
            break
    return count


def stream(engine: Engine, rel: Relation, *, fields: tuple[str, ...], limit: int | None,
           held_up_to: int = HELD_STREAM_ROWS) -> ResultStream:
    """Every matching row in tick order (up to `limit`), as Arrow batches: from held ticks when they
    are at most `held_up_to` rows, else streamed by DuckDB."""
    held = _held_stream(engine, rel, fields, limit, held_up_to)
    if held is not None:
        return held
    params = dict(rel.params)
    sql = f"SELECT {select_list(fields)} FROM ({rel.text()}) ORDER BY {ORDER_BY}"
    if limit is not None:
        sql += " LIMIT $limit"
        params["limit"] = limit
    return engine.stream(f"{rel.name}_export", sql, params, rel.scans)


def _held_stream(engine: Engine, rel: Relation, fields: tuple[str, ...], limit: int | None,
                 held_up_to: int) -> ResultStream | None:
    if rel.ticks is None or rel.quotes_within is not None:
        return None
    # An export reads every file of its range (a page stops at its last row): only from held ticks
    # when all of them can be held at once.
    if not heldticks.fit_together(engine, rel.scans[rel.paged], rel.ticks):
        return None
    started = time.perf_counter()
    wanted = held_up_to + 1 if limit is None else min(limit, held_up_to + 1)  # one more: too many to hold
    rows = heldticks.first_rows(engine, rel.scans[rel.paged], rel.ticks, fields, wanted, None, query=None)
    if rows is None or rows.num_rows > held_up_to:
        return None
    rows = rows.drop_columns(list(KEY_COLUMNS)).combine_chunks()
    record_query("held_ticks_export", "ok", started)
    return ResultStream(rows.schema, iter(rows.to_batches()))


def latest_quotes(engine: Engine, pin: Pin, flt: TickFilter, as_of: dt.datetime, *, cacheable: bool = True) -> pa.Table:
    """The last quote at or before `as_of` of each symbol matching `flt` (ignoring its start/end).
    `cacheable=False` when `as_of` is the clock: such a result is never asked for twice."""
    bounded = replace(flt, start=None, end=as_of + dt.timedelta(microseconds=1))
    where = Where().ticks(bounded)
    sql = (f"SELECT {select_list(columns('quotes'))} FROM {{src}} {where.sql()} "
           "QUALIFY row_number() OVER (PARTITION BY symbol, exchange "
           "ORDER BY exchange_timestamp DESC, sequence_number DESC) = 1 ORDER BY symbol, exchange")
    return engine.run("quotes_latest", sql, where.params, {"src": engine.plan(pin, bounded)}, cacheable=cacheable)
