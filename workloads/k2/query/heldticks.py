"""Held ticks: each data file's rows decoded once and kept in (symbol, exchange_timestamp,
sequence_number) order, so that a keyset page of named symbols is a binary search and a slice per
file instead of a DuckDB query (whose fixed cost was most of a page's time).

A file never changes, so its rows never go stale, and the page's plan picks the files: earliest
first, stopping once every file not yet read starts after the page's last row, as
`ticks._earliest_rows` does for SQL (a page early in a long range opens a day's files, not every
day's). The live tail's rows past the snapshot are filtered per request. Pages this cannot answer
exactly are left to SQL (`None`): no symbols named (every symbol of a range), row-level deletes,
files without time bounds, catch-up reads, a scope narrower than the named symbols' rows on the
page's exchange, and files lacking a column (written before the schema grew).

A page of trades with their prevailing quotes (`with_prevailing_quotes`) takes its trades so and
each trade's quote by a binary search per held quotes file.

Files are kept per process up to `query_tick_cache_mb` (K2_QUERY_TICK_CACHE_MB), least recently
used out first; a request reads held files only while they fit the budget together (`_Reading`,
`fit_together`), so none evicts its own files.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.manifest import DataFile

from k2.query.cursor import Position
from k2.query.engine import Engine, Pin, Scan, record_query
from k2.query.filters import TickFilter, micros

KEY_COLUMNS = ("__k2_ts", "__k2_symbol", "__k2_seq")  # a page row's place in tick order
_ROW_BYTES = 128  # a held row's size in memory until a held file tells (trades: about 110)
_ORDER = [(c, "ascending") for c in KEY_COLUMNS]


@dataclass(frozen=True)
class _HeldFile:
    rows: pa.Table  # by symbol, exchange_timestamp, sequence_number
    spans: Mapping[str, tuple[int, int]]  # symbol → its rows [first, end)
    exchanges: Mapping[str, frozenset[str]]  # symbol → the exchanges of its rows
    times: np.ndarray  # exchange_timestamp of each row, epoch µs
    sequences: np.ndarray
    nbytes: int
    columns: frozenset[str]  # `rows.column_names` is a new list at every read


def first_rows(engine: Engine, scan: Scan, flt: TickFilter, fields: tuple[str, ...], wanted: int,
               after: Position | None, *, query: str | None = "held_ticks_page") -> pa.Table | None:
    """The first `wanted` ticks of `flt` after `after`, in tick order: `fields` then `KEY_COLUMNS`,
    as a page's SQL gives them; None when held ticks cannot answer exactly. Counted as `query`
    (None: the caller counts it, once it knows the rows answer)."""
    if not _answerable(engine, scan, flt):
        return None
    assert scan.time_bounds is not None
    started = time.perf_counter()
    window, reading = _Window(flt, after), _Reading(engine, scan.pin)
    found: pa.Table | None = None
    for file, (low, high) in zip(scan.files, scan.time_bounds, strict=True):
        if not window.may_hold(low, high):
            continue
        if found is not None and found.num_rows >= wanted and low > found["__k2_ts"][wanted - 1].as_py():
            break  # this file and every later one start after the page's last row
        held = reading.held(file)
        if held is None or not held.columns.issuperset(fields):
            return None
        chunks = [window.rows(held, symbol, fields, wanted) for symbol in sorted(set(flt.symbols))]
        found = _first(found, [c for c in chunks if c is not None], wanted)
    if found is None:
        return None  # no file to take column types from: SQL answers (the tail alone, or nothing)
    tail = window.tail_rows(scan.pin, fields, wanted)
    if tail is not None:
        found = _first(found, [tail.cast(found.schema)], wanted)
    if query is not None:
        record_query(query, "ok", started)
    return found


def fit_together(engine: Engine, scan: Scan, flt: TickFilter) -> bool:
    """Whether the held ticks of every file `flt` may read fit in the budget at once (a file not
    yet held estimated from its row count): a read that does not stop early (an export) is only
    worth starting then (`_Reading`)."""
    store = engine.held_ticks
    if store is None or scan.time_bounds is None:
        return False
    window = _Window(flt, None)
    files = [file for file, (low, high) in zip(scan.files, scan.time_bounds, strict=True) if window.may_hold(low, high)]
    held = [store.held(scan.pin, file) for file in files]
    known = [one for one in held if one is not None]
    row_bytes = _row_bytes(sum(one.nbytes for one in known), sum(one.rows.num_rows for one in known))
    need = sum(one.nbytes if one is not None else file.record_count * row_bytes
               for file, one in zip(files, held, strict=True))
    return need <= store.budget


def _row_bytes(nbytes: int, rows: int) -> float:
    return nbytes / rows if rows else _ROW_BYTES


class _Reading:
    """The held files one request reads, within the budget together. A request needing more would
    evict its own files as it went and, asked again, decode every one again (an export of one
    symbol over a streaming table's small files, polled, took a second a request in `bench_live`);
    it stops before the file that would not fit, and SQL answers it. Its files stay held, so asked
    again it decodes nothing."""

    def __init__(self, engine: Engine, pin: Pin) -> None:
        assert engine.held_ticks is not None
        self.engine, self.pin, self.store = engine, pin, engine.held_ticks
        self.nbytes = self.rows = 0

    def held(self, file: DataFile) -> _HeldFile | None:
        """The file's held ticks; None when it is too large, alone (the store knows, once it has
        decoded it) or beside those read so far (estimated from its row count)."""
        if (self.nbytes and self.store.held(self.pin, file) is None
                and self.nbytes + file.record_count * _row_bytes(self.nbytes, self.rows) > self.store.budget):
            return None
        held = _held(self.engine, self.pin, file)
        if held is not None:
            self.nbytes, self.rows = self.nbytes + held.nbytes, self.rows + held.rows.num_rows
        return held


def with_prevailing_quotes(engine: Engine, scan: Scan, flt: TickFilter, trades: pa.Table,
                           trade_fields: tuple[str, ...], quote_fields: tuple[str, ...],
                           tolerance_us: int) -> pa.Table | None:
    """A page of held trades (`first_rows` of `trade_fields`) with the quote that prevailed at each,
    as `ticks.quoted_trades_relation` joins them: the last quote of the same symbol and exchange at
    or before the trade, the highest sequence number among quotes of one instant; its time as
    `quote_timestamp` and its `quote_fields` are null where there is none or it is older than
    `tolerance_us`. None when held quotes cannot answer exactly."""
    if not trades.num_rows or not _answerable(engine, scan, flt):
        return None
    assert scan.time_bounds is not None
    started = time.perf_counter()
    times = trades["__k2_ts"].to_numpy()
    oldest, newest = int(times.min()) - tolerance_us, int(times.max())
    # A file wholly older than the oldest trade's tolerance can only hold quotes too stale to show.
    held = [_held(engine, scan.pin, file) for file, (low, high) in zip(scan.files, scan.time_bounds, strict=True)
            if low <= newest and high >= oldest]
    sources = [source for source in held if source is not None]
    wanted = ["exchange_timestamp", *quote_fields]
    if not sources or len(sources) < len(held) or any(not s.columns.issuperset(wanted) for s in sources):
        return None  # a file too large to hold, or none to take column types from
    tail = _tail_held(scan.pin, trades)
    if tail is not None:
        sources.append(tail)
    best = _Prevailing(len(times))
    for symbol, at in _rows_by_symbol(trades):
        exchanges = trades["exchange"].take(at).unique()
        if len(exchanges) != 1 or not best.search(sources, symbol, exchanges[0].as_py(), at, times[at]):
            return None
    quotes = best.take(sources, wanted, fresh=times - best.times <= tolerance_us)
    record_query("held_quotes_page", "ok", started)
    return pa.table({**{f: trades[f] for f in trade_fields},
                     **dict(zip(["quote_timestamp", *quote_fields], quotes.columns, strict=True)),
                     **{k: trades[k] for k in KEY_COLUMNS}})


class _Prevailing:
    """Per trade, the latest (time, sequence) quote found so far: its source and row."""

    def __init__(self, n: int) -> None:
        self.times = np.full(n, np.iinfo(np.int64).min, np.int64)
        self.sequences = np.full(n, np.iinfo(np.int64).min, np.int64)
        self.sources = np.full(n, -1, np.int64)
        self.rows = np.zeros(n, np.int64)

    def search(self, sources: list[_HeldFile], symbol: str, exchange: str, at: np.ndarray,
               times: np.ndarray) -> bool:
        """Look for the quotes prevailing at trades `at` (all of `symbol` on `exchange`) in each
        source; False where a source's rows of the symbol mix exchanges (SQL answers those)."""
        for k, source in enumerate(sources):
            span = source.spans.get(symbol)
            if span is None or exchange not in source.exchanges[symbol]:
                continue
            if len(source.exchanges[symbol]) > 1:
                return False
            first, end = span
            found = np.searchsorted(source.times[first:end], times, "right") - 1
            hit = found >= 0
            rows, who = first + found[hit], at[hit]
            quote_times, quote_sequences = source.times[rows], source.sequences[rows]
            later = (quote_times > self.times[who]) | ((quote_times == self.times[who])
                                                       & (quote_sequences > self.sequences[who]))
            who, rows = who[later], rows[later]
            self.times[who], self.sequences[who] = source.times[rows], source.sequences[rows]
            self.sources[who], self.rows[who] = k, rows
        return True

    def take(self, sources: list[_HeldFile], columns: list[str], fresh: np.ndarray) -> pa.Table:
        """`columns` of each trade's quote, in trade order; nulls where none was found or not `fresh`."""
        found = fresh & (self.sources >= 0)
        if len(sources) == 1:  # the usual page, one day's file: one take, a null index where none is found
            return sources[0].rows.select(columns).take(pa.array(self.rows, mask=~found))
        schema = sources[0].rows.select(columns).schema
        parts, places = [], []
        for k, source in enumerate(sources):
            who = np.flatnonzero(found & (self.sources == k))
            if len(who):
                parts.append(source.rows.select(columns).take(self.rows[who]).cast(schema))
                places.append(who)
        missing = np.flatnonzero(~found)
        if len(missing):
            parts.append(pa.table([pa.nulls(len(missing), f.type) for f in schema], schema=schema))
            places.append(missing)
        return pa.concat_tables(parts).take(np.argsort(np.concatenate(places), kind="stable"))


def _rows_by_symbol(trades: pa.Table) -> list[tuple[str, np.ndarray]]:
    encoded = trades["__k2_symbol"].combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return [(name, np.flatnonzero(codes == i)) for i, name in enumerate(encoded.dictionary.to_pylist())]


def _tail_held(pin: Pin, trades: pa.Table) -> _HeldFile | None:
    """The live tail's quotes of the trades' symbols, indexed as a held file (per request: the tail moves)."""
    tail = pin.tail
    if tail is None or not tail.table.num_rows:
        return None
    rows = tail.table.filter(pc.is_in(tail.table["symbol"], trades["__k2_symbol"].unique()))
    if not rows.num_rows:
        return None
    return _index(rows.sort_by([("symbol", "ascending"), ("exchange_timestamp", "ascending"),
                                ("sequence_number", "ascending")]))


def _answerable(engine: Engine, scan: Scan, flt: TickFilter) -> bool:
    if engine.held_ticks is None or not flt.symbols or scan.has_deletes or scan.pin.since is not None:
        return False
    if scan.time_bounds is None or scan.pin.kind not in ("trades", "quotes"):
        return False
    scope = scan.scope
    # The named symbols are entitled (the filter checked them); the exchange must be too.
    return (scope is None or scope.exchanges is None
            or (flt.exchange is not None and flt.exchange in scope.exchanges))


def _first(found: pa.Table | None, chunks: list[pa.Table], wanted: int) -> pa.Table | None:
    """The first `wanted` rows of `found` and `chunks` together, in tick order (each is in it)."""
    tables = ([found] if found is not None else []) + chunks
    if len(tables) < 2:  # a page of one symbol in one file: already in order, nothing to sort
        return tables[0].slice(0, wanted) if tables else None
    return pa.concat_tables(tables).sort_by(_ORDER).slice(0, wanted)


class _Window:
    """Which rows of a symbol a page may take: the filter's range and exchange, after the cursor."""

    def __init__(self, flt: TickFilter, after: Position | None) -> None:
        self.flt, self.after = flt, after
        self.start_us = micros(flt.start) if flt.start else None
        self.end_us = micros(flt.end) if flt.end else None

    def may_hold(self, low: int, high: int) -> bool:
        """Whether a file of those least and greatest times may hold rows of the window."""
        return not ((self.after is not None and high < self.after.timestamp_us)
                    or (self.start_us is not None and high < self.start_us)
                    or (self.end_us is not None and low >= self.end_us))

    def rows(self, held: _HeldFile, symbol: str, fields: tuple[str, ...], wanted: int) -> pa.Table | None:
        """Up to `wanted` of the symbol's rows in `held`, in tick order, with the key columns."""
        span = held.spans.get(symbol)
        exchange = self.flt.exchange
        if span is None or (exchange is not None and exchange not in held.exchanges[symbol]):
            return None
        first, end = span
        times = held.times[first:end]
        begin = self._begin(times, held.sequences[first:end], symbol)
        stop = len(times) if self.end_us is None else int(np.searchsorted(times, self.end_us, "left"))
        if begin >= stop:
            return None
        rows = held.rows.slice(first + begin, stop - begin)
        if exchange is not None and held.exchanges[symbol] != {exchange}:
            rows = rows.filter(pc.equal(rows["exchange"], exchange))
        return _keyed(rows.slice(0, wanted), fields)

    def _begin(self, times: np.ndarray, sequences: np.ndarray, symbol: str) -> int:
        """The index of the symbol's first row at or after the start and after the cursor."""
        begin = 0 if self.start_us is None else int(np.searchsorted(times, self.start_us, "left"))
        after = self.after
        if after is None:
            return begin
        at, past = (int(np.searchsorted(times, after.timestamp_us, side)) for side in ("left", "right"))
        if symbol < after.symbol:  # rows at the cursor's instant come before it
            return max(begin, past)
        if symbol > after.symbol:  # and after it
            return max(begin, at)
        return max(begin, at + int(np.searchsorted(sequences[at:past], after.sequence_number, "right")))

    def tail_rows(self, pin: Pin, fields: tuple[str, ...], wanted: int) -> pa.Table | None:
        """The window's rows of the live tail, first `wanted` in tick order, with the key columns."""
        tail = pin.tail
        if tail is None or not tail.table.num_rows:
            return None
        rows = tail.table
        symbol, stamp, sequence = rows["symbol"], rows["exchange_timestamp"].cast(pa.int64()), rows["sequence_number"]
        keep = pc.is_in(symbol, pa.array(sorted(set(self.flt.symbols)), pa.string()))
        if self.flt.exchange is not None:
            keep = pc.and_(keep, pc.equal(rows["exchange"], self.flt.exchange))
        if self.start_us is not None:
            keep = pc.and_(keep, pc.greater_equal(stamp, self.start_us))
        if self.end_us is not None:
            keep = pc.and_(keep, pc.less(stamp, self.end_us))
        if self.after is not None:
            a = self.after
            later = pc.or_(pc.greater(symbol, a.symbol),
                           pc.and_(pc.equal(symbol, a.symbol), pc.greater(sequence, a.sequence_number)))
            keep = pc.and_(keep, pc.or_(pc.greater(stamp, a.timestamp_us),
                                        pc.and_(pc.equal(stamp, a.timestamp_us), later)))
        rows = rows.filter(keep)
        if not rows.num_rows:
            return None
        return _keyed(rows, fields).sort_by(_ORDER).slice(0, wanted)


def _keyed(rows: pa.Table, fields: tuple[str, ...]) -> pa.Table:
    """`fields` of `rows`, then their places in tick order (`KEY_COLUMNS`)."""
    return (rows.select(list(fields)).append_column("__k2_ts", rows["exchange_timestamp"].cast(pa.int64()))
            .append_column("__k2_symbol", rows["symbol"]).append_column("__k2_seq", rows["sequence_number"]))


def _held(engine: Engine, pin: Pin, file: DataFile) -> _HeldFile | None:
    assert engine.held_ticks is not None
    return engine.held_ticks.get(pin, file, lambda one: _index(engine.run(
        "held_ticks_file", "SELECT * FROM {src} ORDER BY symbol, exchange_timestamp, sequence_number", {},
        {"src": one}, cacheable=False)))


def _index(rows: pa.Table) -> _HeldFile:
    symbols = rows["symbol"].combine_chunks().dictionary_encode()
    codes = symbols.indices.to_numpy(zero_copy_only=False)
    exchanges = rows["exchange"].combine_chunks().dictionary_encode()
    exchange_codes, exchange_names = exchanges.indices.to_numpy(zero_copy_only=False), exchanges.dictionary.to_pylist()
    bounds = [0, *(np.flatnonzero(np.diff(codes)) + 1).tolist(), len(codes)]
    names = symbols.dictionary.to_pylist()
    spans, of_symbol = {}, {}
    for first, end in itertools.pairwise(bounds):
        if first < end:
            symbol = names[codes[first]]
            spans[symbol] = (first, end)
            of_symbol[symbol] = frozenset(exchange_names[c] for c in np.unique(exchange_codes[first:end]))
    times = rows["exchange_timestamp"].cast(pa.int64()).to_numpy()
    sequences = rows["sequence_number"].to_numpy()
    return _HeldFile(rows, spans, of_symbol, times, sequences, rows.nbytes + times.nbytes + sequences.nbytes,
                     frozenset(rows.column_names))
