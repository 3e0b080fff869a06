"""K2's questions asked of QuestDB, on the same ticks, and the exact comparison of the answers.

Used by `benchmarks/bench_peers.py` (which times them) and by its test (which proves the answers
are equal). The ticks are read from K2's own Iceberg tables, so both engines hold the same rows,
and sent over ILP (HTTP) with prices as DECIMAL(18, 6), K2's type: figures compare exactly.
Rows go in globally sorted by (time, symbol, sequence number), so QuestDB's storage order within
one timestamp is K2's tick order and its first()/last() and ASOF JOIN pick the same rows.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue, And, EqualTo, GreaterThanOrEqual, LessThan
from questdb import Sender, TimestampNanos

from k2 import tables
from k2.query import bars, ticks
from k2.query.bars import BarQuery
from k2.query.cursor import fingerprint
from k2.query.engine import Engine
from k2.query.filters import TickFilter, columns
from k2.settings import Settings
from k2.stack.questdb import QuestDB

SYDNEY = ZoneInfo("Australia/Sydney")
TOLERANCE = dt.timedelta(seconds=5)  # the API's default tolerance_ms for /v1/trades/asof
DDL = {
    "trades": "CREATE TABLE IF NOT EXISTS {table} (symbol SYMBOL, exchange SYMBOL, sequence_number LONG, "
              "price DECIMAL(18, 6), volume LONG, qualifiers VARCHAR, venue VARCHAR, buyer_id VARCHAR, "
              "ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL",
    "quotes": "CREATE TABLE IF NOT EXISTS {table} (symbol SYMBOL, exchange SYMBOL, sequence_number LONG, "
              "bid_price DECIMAL(18, 6), ask_price DECIMAL(18, 6), bid_size LONG, ask_size LONG, "
              "is_crossed BOOLEAN, is_one_sided BOOLEAN, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL",
}
_SYMBOL_COLUMNS = ("symbol", "exchange")
_SKIPPED = {"exchange_timestamp", "exchange_date", "ingest_timestamp", "source_id"}
# Compared per question: the figures, not every column of a page.
TRADE_FIGURES = ("exchange_timestamp", "sequence_number", "price", "volume")
QUOTE_FIGURES = ("quote_timestamp", "bid_price", "ask_price", "bid_size", "ask_size")
BAR_FIGURES = ("open", "high", "low", "close", "volume", "trade_count", "vwap")


# loading ----------------------------------------------------------------------------------------
def read_ticks(settings: Settings, kind: str, symbol: str | None = None,
               day: dt.date | None = None) -> list[dict]:
    """K2's rows of one table (optionally one symbol / local day), in the order QuestDB should get them."""
    flt = AlwaysTrue() if symbol is None else EqualTo("symbol", symbol)
    if day is not None:
        epoch_day = (day - dt.date(1970, 1, 1)).days
        flt = And(flt, And(GreaterThanOrEqual("exchange_date", epoch_day), LessThan("exchange_date", epoch_day + 1)))
    table = tables.catalog(settings).load_table(f"{settings.namespace}.{kind}")
    rows = table.scan(row_filter=flt).to_arrow()
    order = [("exchange_timestamp", "ascending"), ("symbol", "ascending"), ("sequence_number", "ascending")]
    return rows.sort_by(order).to_pylist()


@dataclass(frozen=True)
class Load:
    rows: int
    send_s: float  # ILP send until the last batch was acknowledged
    queryable_s: float  # first send until every row answers a count over PG/HTTP


def load(qdb: QuestDB, table: str, kind: str, rows: Sequence[dict]) -> Load:
    """Create `table` (unless it exists) and send `rows` over ILP/HTTP; returns once QuestDB's
    count shows all of them."""
    qdb.exec(DDL[kind].format(table=table))
    expected = qdb.exec(f"SELECT count() FROM {table}")["dataset"][0][0] + len(rows)
    started = time.perf_counter()
    with Sender.from_conf(f"http::addr=127.0.0.1:{qdb.port};auto_flush_rows=50000;") as sender:
        for row in rows:
            sender.row(table, symbols={c: row[c] for c in _SYMBOL_COLUMNS},
                       columns={c: v for c, v in row.items()
                                if v is not None and c not in _SKIPPED and c not in _SYMBOL_COLUMNS},
                       at=TimestampNanos(_epoch_us(row["exchange_timestamp"]) * 1000))
        sender.flush()
    sent = time.perf_counter()
    # ILP over HTTP acknowledges the WAL commit; rows are queryable once the WAL is applied.
    while qdb.exec(f"SELECT count() FROM {table}")["dataset"][0][0] < expected:
        time.sleep(0.005)
    return Load(len(rows), sent - started, time.perf_counter() - started)


# the questions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One question, as K2's engine and API ask it and as QuestDB SQL."""

    name: str
    questdb_sql: str
    figures: tuple[str, ...]
    api: tuple[str, str, dict | None]  # method, path, JSON body


def _day(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=SYDNEY)
    return start, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), SYDNEY)


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def questions(symbol: str, day: dt.date, trades: str = "trades", quotes: str = "quotes") -> list[Question]:
    start, end = _day(day)
    in_day = f"symbol = '{symbol}' AND ts >= '{_utc(start)}' AND ts < '{_utc(end)}'"
    ohlcv = ("first(price) open, max(price) high, min(price) low, last(price) close, sum(volume) volume, "
             "count() trade_count, sum(price * volume) / sum(volume) vwap")
    window = f"start={start.isoformat()}&end={end.isoformat()}".replace("+", "%2B")
    trade_columns = "ts exchange_timestamp, sequence_number, price, volume"
    seconds = int(TOLERANCE.total_seconds())
    return [
        Question("daily summary (VWAP)", f"SELECT {ohlcv} FROM {trades} WHERE {in_day}", BAR_FIGURES,
                 ("GET", f"/v1/summary/{symbol}/{day.isoformat()}", None)),
        Question("1-minute OHLCV", f"SELECT ts bucket_start, {ohlcv} FROM {trades} WHERE {in_day} "
                                   "SAMPLE BY 1m ALIGN TO CALENDAR TIME ZONE 'Australia/Sydney'",
                 ("bucket_start", *BAR_FIGURES),
                 ("POST", "/v1/aggregations", {"symbols": [symbol], "interval": "1m", "start": start.isoformat(),
                                               "end": end.isoformat()})),
        Question("100 trades (first page of the day)",
                 f"SELECT {trade_columns} FROM {trades} WHERE {in_day} LIMIT 100", TRADE_FIGURES,
                 ("GET", f"/v1/trades?symbol={symbol}&{window}&limit=100", None)),
        Question("100 trades ASOF JOIN quote",
                 f"SELECT t.exchange_timestamp, t.sequence_number, t.price, t.volume, q.ts quote_timestamp, "
                 f"q.bid_price, q.ask_price, q.bid_size, q.ask_size "
                 f"FROM (SELECT symbol, {trade_columns}, ts FROM {trades} WHERE {in_day} LIMIT 100) t "
                 f"ASOF JOIN (SELECT symbol, ts, bid_price, ask_price, bid_size, ask_size FROM {quotes} "
                 f"WHERE symbol = '{symbol}' AND ts >= '{_utc(start - TOLERANCE)}' AND ts < '{_utc(end)}') q "
                 f"ON (symbol) TOLERANCE {seconds}s",
                 (*TRADE_FIGURES, *QUOTE_FIGURES),
                 ("GET", f"/v1/trades/asof?symbol={symbol}&{window}&limit=100&tolerance_ms={seconds * 1000}", None)),
    ]


def k2_answer(engine: Engine, question: Question, symbol: str, day: dt.date) -> pa.Table:
    """The question through K2's engine (what the API serves), as a table of its figures."""
    start, end = _day(day)
    flt = TickFilter((symbol,), None, start, end)
    if question.name.startswith("daily"):
        row = bars.summary(engine, symbol, day)
        return pa.Table.from_pylist([row] if row else [])
    if question.name.startswith("1-minute"):
        return bars.bars(engine, BarQuery((symbol,), "1m", start, end), max_rows=10_000)
    if "ASOF" in question.name:
        rel = ticks.quoted_trades_relation(engine, engine.pin("trades"), engine.pin("quotes"), flt, TOLERANCE)
        return ticks.page(engine, rel, fields=ticks.QUOTED_TRADE_COLUMNS, limit=100, cursor=None,
                          fingerprint=fingerprint("trades_asof", flt, int(TOLERANCE.total_seconds() * 1000))).rows
    rel = ticks.tick_relation(engine, engine.pin("trades"), flt)
    return ticks.page(engine, rel, fields=columns("trades"), limit=100, cursor=None,
                      fingerprint=fingerprint("trades", flt)).rows


# comparing ------------------------------------------------------------------------------------
def _epoch_us(moment: dt.datetime) -> int:
    if moment.tzinfo is None:  # QuestDB's PG wire sends UTC without a zone
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def exact(value: object, questdb_type: str = "") -> object:
    """One figure in a form that compares exactly across engines: instants as epoch µs, numbers
    as Decimal (so 36.667 equals 36.667000). A float is kept as it is: it equals no exact figure."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, dt.datetime):
        return _epoch_us(value)
    if isinstance(value, str) and questdb_type.startswith("TIMESTAMP"):
        return _epoch_us(dt.datetime.fromisoformat(value))
    if isinstance(value, int | Decimal | str):
        return Decimal(value)
    raise TypeError(f"cannot compare {type(value).__name__} {value!r}")


def k2_rows(table: pa.Table, figures: Sequence[str]) -> list[tuple]:
    return [tuple(exact(row[f]) for f in figures) for row in table.select(list(figures)).to_pylist()]


def pg_rows(rows: Iterable[Sequence]) -> list[tuple]:
    return [tuple(exact(v) for v in row) for row in rows]


def http_rows(answer: dict) -> list[tuple]:
    types = [c["type"] for c in answer["columns"]]
    return [tuple(exact(v, t) for v, t in zip(row, types, strict=True)) for row in answer["dataset"]]


class Mismatch(AssertionError):
    """Two engines gave different figures for the same question."""


def assert_same(question: str, k2: list[tuple], peer: list[tuple], peer_name: str) -> None:
    if k2 == peer:
        return
    if len(k2) != len(peer):
        raise Mismatch(f"{question}: K2 gave {len(k2)} rows, {peer_name} {len(peer)}")
    index = next(i for i, (a, b) in enumerate(zip(k2, peer, strict=True)) if a != b)
    raise Mismatch(f"{question}: row {index} differs: K2 {k2[index]} vs {peer_name} {peer[index]}")
