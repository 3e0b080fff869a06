"""Rollups: each data file's trades aggregated once per symbol and minute, so that a daily summary
or OHLCV/VWAP bars of whole minutes combine a few hundred partial aggregates instead of reading
and sorting ticks (DuckDB's fixed cost per query alone was most of a summary's time).

A data file never changes, so its partials never go stale, and the snapshot being read picks them:
the plan's files, plus the live tail's rows past the snapshot, aggregated per request. Combining
partials is exact: highs and lows are extremes of extremes, volumes, counts and notionals are sums,
and a bucket's open (close) is that of the partial whose first (last) trade comes first (last) in
(exchange_timestamp, sequence_number) order, the order the SQL path uses; VWAP is divided as
`k2.query.sql.exact_ratio` divides. What partials cannot answer exactly is left to SQL (`None`):
TWAP (a price prevails across minutes), gap filling, ranges not on whole minutes, row-level
deletes, and a scope that does not cover every row asked for.

A file's partials are computed by the first query that reads the file: one GROUP BY over the file,
for all of its symbols. They are kept per process up to `query_rollup_mb` (K2_QUERY_ROLLUP_MB),
least recently used out first.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import AlwaysTrue

from k2.query.engine import Engine, Pin, Scan, record_query
from k2.query.filters import INTERVALS, Interval, local_midnight, micros
from k2.query.sql import exact_ratio

_MINUTE_US = 60_000_000
_PRICE = pa.decimal128(18, 6)
_INSTANT = pa.timestamp("us", tz="UTC")
# The columns bars of fill none have (k2.query.bars), in order.
COLUMNS = ("symbol", "bucket_start", "bucket_end", "open", "high", "low", "close", "volume", "trade_count", "vwap")

# Per symbol, exchange, local date and minute of the rows read. A minute never spans two local
# dates: every exchange's midnight is on a whole minute.
_PARTIALS = """
    SELECT symbol, exchange, exchange_date, minute,
           open_key.us AS open_us, open_key.seq AS open_seq, open,
           close_key.us AS close_us, close_key.seq AS close_seq, close,
           high, low, volume, trade_count, notional
    FROM (
        SELECT symbol, exchange, exchange_date,
               epoch_us(exchange_timestamp) - (epoch_us(exchange_timestamp) % 60000000 + 60000000) % 60000000
                   AS minute,
               min(struct_pack(us := epoch_us(exchange_timestamp), seq := sequence_number)) AS open_key,
               arg_min(price, (exchange_timestamp, sequence_number)) AS open,
               max(struct_pack(us := epoch_us(exchange_timestamp), seq := sequence_number)) AS close_key,
               arg_max(price, (exchange_timestamp, sequence_number)) AS close,
               max(price) AS high, min(price) AS low, sum(volume)::BIGINT AS volume, count(*) AS trade_count,
               sum(price * volume) AS notional
        FROM {trades} GROUP BY ALL
    )
    ORDER BY symbol, exchange, minute
"""


@dataclass(frozen=True)
class Partials:
    """One file's (or the tail's) partials: per (symbol, exchange), its minutes in order."""

    by_key: Mapping[tuple[str, str], pa.Table]
    nbytes: int


@dataclass(frozen=True)
class BarRequest:
    symbols: tuple[str, ...]
    exchange: str
    interval: Interval
    start: dt.datetime
    end: dt.datetime
    zone: ZoneInfo
    origin_us: int  # intraday buckets are whole widths from this instant


def bars(engine: Engine, scan: Scan, request: BarRequest) -> pa.Table | None:
    """OHLCV and VWAP bars as `k2.query.bars` computes them with fill none (`COLUMNS`, by symbol
    and time), from partials; None when partials cannot answer exactly."""
    started = time.perf_counter()
    by_symbol = _symbol_minutes(engine, scan, request)
    if by_symbol is None:
        return None
    symbols = [_bars(symbol, parts, request) for symbol, parts in by_symbol.items()]
    record_query("rollup_bars", "ok", started)
    if not symbols:
        return pa.table({c: pa.array([], t) for c, t in _TYPES.items()})
    return pa.concat_tables(symbols)


def summary(engine: Engine, scan: Scan, request: BarRequest) -> dict[str, Any] | None:
    """The one 1d bar of `request`'s single symbol over its one local day (a daily summary): open,
    high, low, close, volume, trade_count and vwap; trade_count 0 and the prices None when it did not
    trade; None when partials cannot answer exactly. Reduced in numpy straight to Python values
    (`_totals`): building a table of bars cost three times as much for its one row."""
    started = time.perf_counter()
    (symbol,) = request.symbols
    by_symbol = _symbol_minutes(engine, scan, request)
    if by_symbol is None:
        return None
    parts = by_symbol.get(symbol)
    if not parts:
        totals: dict[str, Any] = dict.fromkeys(("open", "high", "low", "close", "vwap")) | {"volume": 0,
                                                                                          "trade_count": 0}
    else:
        totals = _totals(pa.concat_tables(parts) if len(parts) > 1 else parts[0]) or \
            _bars(symbol, parts, request).drop_columns(["symbol", "bucket_start", "bucket_end"]).to_pylist()[0]
    record_query("rollup_summary", "ok", started)
    return totals


def _symbol_minutes(engine: Engine, scan: Scan, request: BarRequest) -> dict[str, list[pa.Table]] | None:
    """Per symbol asked for that traded in the range (in symbol order), its partials' minutes in the
    range from every file and the live tail; None when partials cannot answer exactly."""
    if engine.rollups is None or scan.has_deletes or scan.pin.since is not None:
        return None
    start_us, end_us = micros(request.start), micros(request.end)
    if start_us % _MINUTE_US or end_us % _MINUTE_US:
        return None
    if scan.scope is not None and not all(scan.scope.allows(s, request.exchange) for s in request.symbols):
        return None
    held = [engine.rollups.get(scan.pin, f, lambda one: _computed(engine, one)) for f in scan.files]
    files = [partials for partials in held if partials is not None]
    if len(files) < len(held):
        return None  # a file's partials are larger than the whole budget
    sources = [*files, *_tail_partials(engine, scan.pin, request.symbols, request.exchange)]
    by_symbol = {}
    for symbol in sorted(set(request.symbols)):
        key = (symbol, request.exchange)
        parts = [_minutes(s.by_key[key], start_us, end_us) for s in sources if key in s.by_key]
        parts = [p for p in parts if p.num_rows]
        if parts:
            by_symbol[symbol] = parts
    return by_symbol


_TYPES = {"symbol": pa.string(), "bucket_start": _INSTANT, "bucket_end": _INSTANT, "open": _PRICE, "high": _PRICE,
          "low": _PRICE, "close": _PRICE, "volume": pa.int64(), "trade_count": pa.int64(), "vwap": _PRICE}


def _tail_partials(engine: Engine, pin: Pin, symbols: tuple[str, ...], exchange: str) -> tuple[Partials, ...]:
    """Partials of the live tail's rows of `symbols`, computed per request: the tail moves."""
    tail = pin.tail
    if tail is None or not tail.table.num_rows:
        return ()
    rows = tail.table.filter(pc.and_(pc.is_in(tail.table["symbol"], pa.array(symbols, pa.string())),
                                     pc.equal(tail.table["exchange"], exchange)))
    if not rows.num_rows:
        return ()
    no_files = Scan(replace(pin, since=None, tail=replace(tail, table=rows)), AlwaysTrue(), ())
    return (_computed(engine, no_files),)


def _computed(engine: Engine, scan: Scan) -> Partials:
    table = engine.run("rollup_partials", _PARTIALS, {}, {"trades": scan}, cacheable=False)
    keys = list(zip(table["symbol"].to_pylist(), table["exchange"].to_pylist(), strict=True))
    rows = table.drop_columns(["symbol", "exchange"])
    by_key, first = {}, 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[first]:
            by_key[keys[first]] = rows.slice(first, i - first)
            first = i
    return Partials(by_key, table.nbytes)


def _minutes(part: pa.Table, start_us: int, end_us: int) -> pa.Table:
    """The partials of minutes in [start, end): a slice, as a key's partials are in minute order."""
    first, end = np.searchsorted(part["minute"].to_numpy(), [start_us, end_us], "left")
    return part.slice(first, end - first)


def _bars(symbol: str, parts: list[pa.Table], request: BarRequest) -> pa.Table:
    """One symbol's bars from its partials' minutes in the range."""
    rows = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if request.interval == "1d":
        buckets = rows["exchange_date"].cast(pa.int32()).to_numpy().astype(np.int64)
    else:
        width = INTERVALS[request.interval] // dt.timedelta(microseconds=1)
        minute = rows["minute"].to_numpy()
        buckets = minute - ((minute - request.origin_us) % width + width) % width
    if len(parts) > 1 or request.interval != "1m":
        buckets, rows = _grouped(rows, buckets)
    starts, ends = _bucket_instants(buckets, request)
    return pa.table({
        "symbol": pa.array([symbol] * len(buckets), pa.string()), "bucket_start": starts, "bucket_end": ends,
        "open": rows["open"], "high": rows["high"], "low": rows["low"], "close": rows["close"],
        "volume": rows["volume"], "trade_count": rows["trade_count"],
        "vwap": _vwap(rows["notional"].combine_chunks(), rows["volume"].to_numpy()),
    })


def _grouped(rows: pa.Table, buckets: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """Partials combined per bucket, buckets ascending."""
    by_open = np.lexsort((rows["open_seq"].to_numpy(), rows["open_us"].to_numpy(), buckets))
    by_close = np.lexsort((rows["close_seq"].to_numpy(), rows["close_us"].to_numpy(), buckets))
    ordered = buckets[by_open]
    firsts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lasts = np.r_[firsts[1:], len(ordered)] - 1
    by_opening = rows.take(by_open)
    combined = _combined(by_opening, firsts)
    if combined is None:  # a notional or a sum past 64 bits: Arrow's 128-bit sums
        summed = (by_opening.append_column("bucket", pa.array(ordered))
                  .group_by("bucket", use_threads=False)
                  .aggregate([("high", "max"), ("low", "min"), ("volume", "sum"), ("trade_count", "sum"),
                              ("notional", "sum")]))
        combined = {"high": summed["high_max"], "low": summed["low_min"], "volume": summed["volume_sum"],
                    "trade_count": summed["trade_count_sum"], "notional": summed["notional_sum"]}
    return ordered[firsts], pa.table({
        "open": by_opening["open"].take(firsts), "high": combined["high"], "low": combined["low"],
        "close": rows["close"].take(by_close[lasts]), "volume": combined["volume"],
        "trade_count": combined["trade_count"], "notional": combined["notional"],
    })


_SUMMED = ("high", "low", "volume", "trade_count", "notional")


def _summable(rows: pa.Table) -> tuple[dict[str, np.ndarray], dict[str, pa.DataType]] | None:
    """`_SUMMED`'s columns as int64 (decimals unscaled) with their types, when none holds a null and
    no sum of them can pass 64 bits; None otherwise."""
    columns = {name: rows[name].combine_chunks() for name in _SUMMED}
    if any(column.null_count for column in columns.values()):
        return None
    notional = _words(columns["notional"])
    if notional is None or np.abs(notional.astype(np.float64)).sum() >= 2.0**62:
        return None
    high, low = _words(columns["high"]), _words(columns["low"])
    assert high is not None and low is not None  # decimal(18, _) always fits 64 bits
    values = {"high": high, "low": low, "volume": columns["volume"].to_numpy(),
              "trade_count": columns["trade_count"].to_numpy(), "notional": notional}
    return values, {name: column.type for name, column in columns.items()}


def _combined(rows: pa.Table, firsts: np.ndarray) -> dict[str, pa.Array] | None:
    """High, low, volume, count and notional per run of `rows` starting at `firsts`, summed on 64-bit
    integers (a fraction of a group-by's fixed cost); None where a value or a sum may not fit."""
    if (summable := _summable(rows)) is None:
        return None
    values, types = summable
    return {"high": _decimal(np.maximum.reduceat(values["high"], firsts), types["high"]),
            "low": _decimal(np.minimum.reduceat(values["low"], firsts), types["low"]),
            "volume": pa.array(np.add.reduceat(values["volume"], firsts)),
            "trade_count": pa.array(np.add.reduceat(values["trade_count"], firsts)),
            "notional": _decimal(np.add.reduceat(values["notional"], firsts), types["notional"])}


def _totals(rows: pa.Table) -> dict[str, Any] | None:
    """`_grouped`'s combination for a single bucket, as Python values; None where `_combined` would
    not sum on 64 bits either (the caller then takes the general path)."""
    if (summable := _summable(rows)) is None:
        return None
    values, types = summable
    first = np.lexsort((rows["open_seq"].to_numpy(), rows["open_us"].to_numpy()))[0]
    last = np.lexsort((rows["close_seq"].to_numpy(), rows["close_us"].to_numpy()))[-1]
    volume = int(values["volume"].sum())

    def scaled(unscaled: np.int64, name: str) -> Decimal:
        return Decimal(int(unscaled)).scaleb(-cast(pa.Decimal128Type, types[name]).scale)

    return {"open": rows["open"][int(first)].as_py(), "high": scaled(values["high"].max(), "high"),
            "low": scaled(values["low"].min(), "low"), "close": rows["close"][int(last)].as_py(),
            "volume": volume, "trade_count": int(values["trade_count"].sum()),
            "vwap": exact_ratio(scaled(values["notional"].sum(), "notional"), volume)}


def _words(decimals: pa.Array) -> np.ndarray | None:
    """The unscaled values of a decimal128 array as int64, or None where one needs more bits."""
    first = 2 * decimals.offset  # two 64-bit words a value, least significant first
    words = np.frombuffer(decimals.buffers()[1], dtype=np.int64)[first:first + 2 * len(decimals)]
    low, high = words[0::2], words[1::2]
    return low if np.array_equal(high, low >> 63) else None


def _decimal(unscaled: np.ndarray, kind: pa.DataType) -> pa.Array:
    """int64 unscaled values as a decimal128 array of `kind`."""
    words = np.empty(2 * len(unscaled), dtype=np.int64)
    words[0::2], words[1::2] = unscaled, unscaled >> 63
    return pa.Array.from_buffers(kind, len(unscaled), [None, pa.py_buffer(words)])


def _bucket_instants(buckets: np.ndarray, request: BarRequest) -> tuple[pa.Array, pa.Array]:
    if request.interval == "1d":  # local days: 23 or 25 hours long where the clocks change
        days = [dt.date.fromordinal(dt.date(1970, 1, 1).toordinal() + int(d)) for d in buckets]
        return (pa.array([local_midnight(d, request.zone) for d in days], _INSTANT),
                pa.array([local_midnight(d + dt.timedelta(days=1), request.zone) for d in days], _INSTANT))
    width = INTERVALS[request.interval] // dt.timedelta(microseconds=1)
    return pa.array(buckets, _INSTANT), pa.array(buckets + width, _INSTANT)


def _vwap(notional: pa.Array, volume: np.ndarray) -> pa.Array:
    """`exact_ratio(notional, volume)` of every bar, as decimal(18, 6): on 64-bit integers where every
    unscaled notional fits in one, as Python integers otherwise."""
    low = None if notional.null_count else _words(notional)
    if low is None:
        return pa.array([exact_ratio(n, int(v)) for n, v in zip(notional.to_pylist(), volume, strict=True)], _PRICE)
    safe = np.where(volume == 0, 1, volume)
    quotient, remainder = np.divmod(low, safe)
    quotient += (2 * remainder > safe) | ((2 * remainder == safe) & (quotient % 2 == 1))
    ratios = _decimal(quotient, _PRICE)
    return pc.if_else(pa.array(volume == 0), pa.scalar(None, _PRICE), ratios) if (volume == 0).any() else ratios
