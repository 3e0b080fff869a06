"""Bars: OHLCV, VWAP and TWAP over buckets aligned to the exchange's local clock, with gap filling.

Definitions. Prices are exact decimals; the ratios are rounded half-to-even to 6 decimal places.
- open / close: the first / last trade of the bucket in (exchange_timestamp, sequence_number) order.
- vwap: Σ price × volume / Σ volume.
- twap: Σ price × held / Σ held, where `held` is how long the price prevailed: from its trade to
  the next trade in the same bucket, and for the bucket's last trade to the end of the bucket (cut
  at the query's `end`). Time before the bucket's first trade is not counted, so a bucket's TWAP
  depends only on its own trades. With a 1d interval the day's last trade therefore prevails
  until local midnight: use intraday intervals for session TWAPs.
- Buckets start on multiples of the interval on the local clock. A 1d bar is exactly one
  `exchange_date` (23 or 25 hours long on DST-change days); intraday buckets are fixed lengths of
  real time, so the hour a DST change repeats is two 1h buckets.

Gap filling, after QuestDB's SAMPLE BY FILL:
- none: only buckets with trades;
- null: every bucket of [start, end) for every symbol asked for, the empty ones all null;
- prev: empty buckets become flat bars at the last traded price before them (open = high = low =
  close = vwap = twap), with volume and trade_count 0, since carrying volume forward would invent
  trades. Buckets before a symbol's first trade in the range stay null.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

import pyarrow as pa

from k2.exchanges import DEFAULT_EXCHANGE
from k2.query import rollups
from k2.query.engine import Engine, Pin, Scan
from k2.query.errors import InvalidQuery
from k2.query.filters import INTERVALS, Interval, TickFilter, exchange_zone, local_midnight, micros
from k2.query.sql import Where, exact_ratio, ident

Metric = Literal["ohlcv", "vwap", "twap"]
Fill = Literal["none", "null", "prev"]
METRIC_FIELDS: dict[str, tuple[str, ...]] = {
    "ohlcv": ("open", "high", "low", "close", "volume", "trade_count", "vwap"),
    "vwap": ("vwap", "volume", "trade_count"),
    "twap": ("twap", "trade_count"),
}
_PRICE_FIELDS = frozenset({"open", "high", "low", "close", "vwap", "twap"})
_COUNT_FIELDS = frozenset({"volume", "trade_count"})
_ORDERED = "ORDER BY exchange_timestamp, sequence_number"

# Per bucket, from the rows of `weighted`; the ratios are finished in `computed` (calling the
# macro inside the aggregation measured twice as slow).
_AGGREGATES = {
    "open": f"first(price {_ORDERED})",
    "high": "max(price)",
    "low": "min(price)",
    "close": f"last(price {_ORDERED})",
    "volume": "sum(volume)::BIGINT",
    "trade_count": "count(*)",
    "notional": "sum(price * volume)",
    "held_notional": "sum(price * held_us)",
    "held_us": "sum(held_us)",
}
_COMPUTED = {"vwap": "{ratio}(notional, volume)", "twap": "{ratio}(held_notional, held_us)"}
# From this bound on the bars of a request, ratios start from a DOUBLE estimate (k2.query.sql: it
# saved about 4.5 µs a bar and cost 0.4 ms more to plan, so it pays from about 100 bars; the bound
# counts empty buckets too). A daily summary, or hourly bars of a day, divide at once.
_ESTIMATED_RATIOS_FROM = 100
_NEEDS = {"vwap": ("notional", "volume"), "twap": ("held_notional", "held_us")}


@dataclass(frozen=True)
class BarQuery:
    symbols: tuple[str, ...]
    interval: Interval
    start: dt.datetime
    end: dt.datetime
    metric: Metric = "ohlcv"
    fill: Fill = "none"
    exchange: str = DEFAULT_EXCHANGE

    @property
    def fields(self) -> tuple[str, ...]:
        return METRIC_FIELDS[self.metric]

    @property
    def width(self) -> dt.timedelta:
        return INTERVALS[self.interval]


def bars(engine: Engine, q: BarQuery, *, max_rows: int, pin: Pin | None = None) -> pa.Table:
    """Columns: symbol, bucket_start, bucket_end and the metric's fields, by symbol and time."""
    zone = exchange_zone(q.exchange)
    flt = TickFilter(q.symbols, q.exchange, q.start, q.end)
    where = Where().ticks(flt, prefix="f_")
    params = {**where.params, **_bucket_params(zone, q.width), "range_end": q.end, "limit": max_rows + 1}
    if q.fill != "none":
        # Filled results have one row per bucket and symbol: refuse before computing them.
        buckets = _bucket_bound(q)
        if buckets > max_rows:
            raise InvalidQuery("interval", f"about {buckets} bars asked for; at most {max_rows} per request: "
                                           "narrow the range or widen the interval")
        params.update(grid_start=_first_bucket(q.start, zone, q.interval), symbols=list(flt.symbols))
    scan = engine.plan(pin or engine.pin("trades", live=True), flt)
    result = _rolled_up(engine, scan, q)
    if result is None:
        result = engine.run(f"bars_{q.metric}", _sql(q, where), params, {"trades": scan})
    if result.num_rows > max_rows:
        raise InvalidQuery("interval", f"more than {max_rows} bars: narrow the range or widen the interval")
    return result


def summary(engine: Engine, symbol: str, day: dt.date, exchange: str = DEFAULT_EXCHANGE) -> dict | None:
    """One exchange-local day of one symbol (its 1d bar): symbol, exchange, date, open, high, low,
    close, volume, trade_count, vwap. None when it did not trade that day."""
    zone = exchange_zone(exchange)
    start, end = local_midnight(day, zone), local_midnight(day + dt.timedelta(days=1), zone)
    scan = engine.plan(engine.pin("trades", live=True), TickFilter((symbol,), exchange, start, end))
    rolled = rollups.summary(engine, scan, _bar_request(BarQuery((symbol,), "1d", start, end, exchange=exchange)))
    if rolled is not None:
        return {"symbol": symbol, "exchange": exchange, "date": day, **rolled} if rolled["trade_count"] else None
    found = engine.run("summary", _SUMMARY, {"symbol": symbol, "exchange": exchange, "day": day},
                       {"trades": scan}).to_pylist()[0]
    if not found["trade_count"]:
        return None
    vwap = exact_ratio(found.pop("notional"), found["volume"])
    return {"symbol": symbol, "exchange": exchange, "date": day, **found, "vwap": vwap}


def _rolled_up(engine: Engine, scan: Scan, q: BarQuery) -> pa.Table | None:
    """The bars from files' partial aggregates (k2.query.rollups), or None where they cannot answer."""
    if q.metric == "twap" or q.fill != "none":
        return None
    result = rollups.bars(engine, scan, _bar_request(q))
    return None if result is None else result.select(["symbol", "bucket_start", "bucket_end", *q.fields])


def _bar_request(q: BarQuery) -> rollups.BarRequest:
    zone = exchange_zone(q.exchange)
    return rollups.BarRequest(q.symbols, q.exchange, q.interval, q.start, q.end, zone,
                              micros(_INTRADAY_ORIGIN.replace(tzinfo=zone)))


# The 1d bar of one symbol as one ungrouped aggregate over its `exchange_date` (the local day), the
# ratio divided in Python: bars' general SQL took DuckDB about half as long again to plan and run.
_SUMMARY_COLUMNS = ("open", "high", "low", "close", "volume", "trade_count", "notional")
_SUMMARY = ("SELECT " + ", ".join(f"{_AGGREGATES[c]} AS {c}" for c in _SUMMARY_COLUMNS) + " "
            "FROM {trades} WHERE symbol = $symbol AND exchange = $exchange AND exchange_date = $day")


@dataclass(frozen=True)
class _Calendar:
    """How one interval maps instants to buckets, in SQL."""

    key: str  # what a row is grouped by
    start: str  # a bucket's start, from its `{key}`
    end: str  # a bucket's end, from its `{start}`
    grid: str  # every bucket start from $grid_start up to $range_end


# A local day is exactly a trade's `exchange_date`, so days are grouped by it and turned into
# instants once per bucket, not per row (on some Parquet files DuckDB converted every row, which
# cost more than the rest of a daily summary; on K2's own it was already cheap). DuckDB's
# time_bucket(INTERVAL '1 day', ts, zone) is avoided: it is slow (calendar arithmetic per row) and,
# in DuckDB 1.4, wrong on DST-change days. Days are 23 or 25 hours long there, so their ends and
# grid are stepped on the local clock.
_DAILY = _Calendar(
    key="exchange_date",
    start="timezone($tz, {key}::TIMESTAMP)",
    end="timezone($tz, timezone($tz, {start}) + $width)",
    grid="SELECT timezone($tz, unnest(range(timezone($tz, $grid_start::TIMESTAMPTZ), "
         "timezone($tz, $range_end::TIMESTAMPTZ), $width))) AS bucket_start",
)
# Intraday buckets are fixed lengths of real time, whole widths from local midnight of 3 January
# 2000 (DuckDB's time_bucket origin), so aligned to the local clock wherever the zone's offsets
# differ by whole widths (every exchange K2 knows): an hour repeated by a DST change is two
# buckets, as it is two hours of trading. They are computed on epoch microseconds with the
# origin's instant bound once: time_bucket(width, ts, zone) gives the same buckets (a unit test
# holds the two equal) but converts every row's time zone, about a tenth of a 1-minute bar query.
_INTRADAY = _Calendar(
    key="make_timestamptz(epoch_us(exchange_timestamp) "
        "- ((epoch_us(exchange_timestamp) - $origin_us) % $width_us + $width_us) % $width_us)",
    start="{key}",
    end="{start} + $width",
    grid="SELECT unnest(range($grid_start::TIMESTAMPTZ, $range_end::TIMESTAMPTZ, $width)) AS bucket_start",
)
_INTRADAY_ORIGIN = dt.datetime(2000, 1, 3)


def _bucket_bound(q: BarQuery) -> int:
    """At most this many bars: one per bucket of the range (and a partial one) and distinct symbol."""
    return len(set(q.symbols)) * (math.ceil((q.end - q.start) / q.width) + 1)


def _bucket_params(zone: ZoneInfo, width: dt.timedelta) -> dict[str, object]:
    """The parameters the calendars' SQL uses."""
    return {"tz": zone.key, "width": width, "origin_us": micros(_INTRADAY_ORIGIN.replace(tzinfo=zone)),
            "width_us": width // dt.timedelta(microseconds=1)}


def _calendar(interval: Interval) -> _Calendar:
    return _DAILY if interval == "1d" else _INTRADAY


def _first_bucket(start: dt.datetime, zone: ZoneInfo, interval: Interval) -> dt.datetime:
    """The start of the bucket holding `start` (the grid's first)."""
    if interval == "1d":
        return local_midnight(start.astimezone(zone).date(), zone)
    # in UTC: adding to a time of `zone` itself would step its wall clock, not real time
    origin, width = _INTRADAY_ORIGIN.replace(tzinfo=zone).astimezone(dt.UTC), INTERVALS[interval]
    return origin + (start - origin) // width * width


def _sql(q: BarQuery, where: Where) -> str:
    calendar = _calendar(q.interval)
    fields = q.fields
    # `close` is always computed: fill=prev carries it forward.
    needed = dict.fromkeys(["close", *[n for f in fields for n in _NEEDS.get(f, (f,))]])
    held = ""
    if "held_us" in needed:
        bucket_end = calendar.end.format(start=calendar.start.format(key="bucket_key"))
        held = (f", epoch_us(coalesce(lead(exchange_timestamp) OVER (PARTITION BY symbol, bucket_key {_ORDERED}), "
                f"least({bucket_end}, $range_end))) - epoch_us(exchange_timestamp) AS held_us")
    aggregates = ", ".join(f"{_AGGREGATES[n]} AS {n}" for n in needed)
    ratio = "k2_exact_ratio_estimated" if _bucket_bound(q) >= _ESTIMATED_RATIOS_FROM else "k2_exact_ratio"
    computed = ", ".join(f"{_COMPUTED.get(f, f).format(ratio=ratio)} AS {ident(f)}"
                         for f in dict.fromkeys(["close", *fields]))
    ctes = f"""
        WITH ticks AS (
            SELECT symbol, exchange_timestamp, sequence_number, price, volume, {calendar.key} AS bucket_key
            FROM {{trades}} {where.sql()}
        ), weighted AS (SELECT *{held} FROM ticks),
        aggregated AS (SELECT symbol, bucket_key, {aggregates} FROM weighted GROUP BY symbol, bucket_key),
        computed AS (SELECT symbol, {calendar.start.format(key="bucket_key")} AS bucket_start, {computed}
                     FROM aggregated)
    """
    if q.fill == "none":
        columns = ", ".join(ident(f) for f in fields)
        return (f"{ctes} SELECT symbol, bucket_start, {calendar.end.format(start='bucket_start')} AS bucket_end, "
                f"{columns} FROM computed ORDER BY symbol, bucket_start LIMIT $limit")
    return f"""{ctes}, grid AS (
            SELECT s.symbol, g.bucket_start
            FROM (SELECT unnest($symbols) AS symbol) s CROSS JOIN ({calendar.grid}) g
        )
        SELECT grid.symbol AS symbol, grid.bucket_start AS bucket_start,
               {calendar.end.format(start="grid.bucket_start")} AS bucket_end,
               {", ".join(_filled(f, q.fill) for f in fields)}
        FROM grid LEFT JOIN computed c ON c.symbol = grid.symbol AND c.bucket_start = grid.bucket_start
        WINDOW before AS (PARTITION BY grid.symbol ORDER BY grid.bucket_start)
        ORDER BY symbol, bucket_start LIMIT $limit
    """


def _filled(field: str, fill: Fill) -> str:
    column = f"c.{ident(field)}"
    if fill == "prev" and field in _PRICE_FIELDS:
        column = f"CASE WHEN c.bucket_start IS NULL THEN last_value(c.close IGNORE NULLS) OVER before ELSE {column} END"
    elif fill == "prev" and field in _COUNT_FIELDS:
        column = f"coalesce({column}, 0)"
    return f"{column} AS {ident(field)}"
