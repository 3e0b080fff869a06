"""ASX CSV → Arrow a chunk of lines at a time, with exactly `RecordBuilder`'s records and rejections.

`RecordBuilder` stays the reference: this parser is only a faster way to the same answer. Lines
are split with numpy over the raw bytes, cut as Python's universal newlines cut them (so line
numbers agree), and every field is converted for all lines at once by a deliberately strict fast
path: HH:MM:SS[.ffffff] times, plain digits for prices and sizes, and dates (few distinct per file)
judged by the reference's own parser once per distinct text. A line the fast path
does not take (wrong column count, anything unusual in a field) is handed to `RecordBuilder`
itself, which either rejects it (its RowError, reason and message go to the DLQ) or accepts it
(an unusual but valid spelling such as " 36.5" or "10:00:01"), in which case its values replace
the fast path's. Sequence numbers are then assigned per exchange date over the accepted lines in
file order, as `RecordBuilder.build` does, continuing across chunks.
"""

from __future__ import annotations

import codecs
import datetime as dt
import io
import locale
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2 import schemas
from k2.schemas.columnar import byte_ranges, decimal_from_unscaled, unscaled_int64
from k2.sources.asx import (
    EXCHANGE,
    QUOTE_COLUMNS,
    TRADE_COLUMNS,
    RecordBuilder,
    RowError,
    TickFile,
    _parse_date,
    _utc_offset_us,
)

# 1 MiB (about 22k lines). The producer waits for the first chunk of a file before it sends
# anything: with 8 MiB chunks a 4 MB file was one chunk, and the ASX sample's ingest 11 % slower
# (alternating runs, 2026-12-05). Each process that prepares chunks (`k2.ingest.ahead`) also peaks
# with the chunk's size (431 MiB in all with 8 MiB chunks, 845 MiB with 32 MiB).
CHUNK_BYTES = 1024 * 1024
_MICROS_PER_DAY = 86_400_000_000
_PRICE_TYPE = pa.decimal128(schemas.PRICE_PRECISION, schemas.PRICE_SCALE)
_SIZE_TYPE = pa.decimal128(18, 0)


def available() -> bool:
    """The row path reads files in the locale's encoding; this one assumes UTF-8, so it only
    stands in for the row path where that is the same thing."""
    return codecs.lookup(locale.getpreferredencoding(False)).name == "utf-8"


@dataclass(frozen=True, slots=True)
class Rejected:
    line_number: int
    line: str  # without its line ending, as the row path puts it in the DLQ
    error: RowError


@dataclass
class ParsedChunk:
    first_line: int  # 1-based number of the chunk's first line
    line_ends: np.ndarray  # per line, the byte offset after it (and its line ending) in the chunk
    table: pa.Table  # the accepted lines in file order, as records of `schemas.arrow_schema(kind)`
    line_numbers: np.ndarray  # per table row
    rejected: list[Rejected]

    @property
    def lines(self) -> int:
        return len(self.line_ends)


class NotColumnar(ValueError):
    """A chunk this parser does not take (not UTF-8, 2 GiB or more): the caller runs it through
    `RecordBuilder` instead."""


def read_chunks(path: Path, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The file in chunks that end right after a \\n, so that no line ending (a \\r\\n pair in
    particular) and no UTF-8 character is ever split between two chunks."""
    carry = b""
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk_bytes or CHUNK_BYTES)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            chunk, carry = data[:cut], data[cut:]
            if chunk:
                yield chunk
            if not block:
                return


def split_lines(data: bytes) -> list[str]:
    """The lines of a chunk exactly as iterating over the file opened with newline="" (and
    errors="surrogateescape") gives them."""
    return list(io.StringIO(data.decode(errors="surrogateescape"), newline=""))


def _lines(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end of content, start of the next line) per line, for \\n, \\r\\n and lone \\r
    endings: what iterating over a file opened with newline="" yields."""
    n = len(buf)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    cr = buf == 13
    lf = buf == 10
    after_cr = np.zeros(n, bool)
    after_cr[1:] = cr[:-1]
    ends = np.flatnonzero(cr | (lf & ~after_cr))
    crlf = np.zeros(len(ends), bool)
    inside = ends + 1 < n
    crlf[inside] = cr[ends[inside]] & lf[ends[inside] + 1]
    nexts = ends + 1 + crlf
    if not len(nexts) or nexts[-1] < n:  # a last line without a line ending
        ends, nexts = np.append(ends, n), np.append(nexts, n)
    return np.concatenate([[0], nexts[:-1]]).astype(np.int64), ends, nexts


def _strings(data: pa.Buffer, start: np.ndarray, end: np.ndarray, nullable: bool = False) -> pa.Array:
    """The byte ranges [start, end) of `data` as a string array (the chunk is valid UTF-8 and below 2 GiB)."""
    m = len(start)
    taken = byte_ranges(data, start, end, pa.string())
    if not nullable or (end > start).all():
        return taken
    validity = pa.py_buffer(np.packbits(end > start, bitorder="little"))  # "" → None, as `fields[i] or None`
    return pa.Array.from_buffers(pa.string(), m, [validity, *taken.buffers()[1:]])


# Strict spellings for the fast path; Arrow's decimal cast is exact for what they admit. Prices
# have at most 12 whole digits so that they fit decimal128(18, 6); sizes may be written 300.0.
_PRICE = r"^[0-9]{1,12}(\.[0-9]{0,6})?$"
_SIZE = r"^[0-9]{1,18}(\.0*)?$"
_FRACTION_WEIGHTS = 10 ** np.arange(5, -1, -1, dtype=np.int64)


def _number(strings: pa.Array, pattern: str, arrow_type: pa.Decimal128Type) -> tuple[np.ndarray, np.ndarray]:
    """(value × 10**scale as int64, ok) for the strings that match `pattern`."""
    ok = pc.match_substring_regex(strings, pattern)
    decimals = pc.cast(pc.if_else(ok, strings, "0"), arrow_type)
    return unscaled_int64(decimals), ok.to_numpy(zero_copy_only=False)


def _time(windows: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strictly HH:MM:SS[.f to ffffff] → (µs since local midnight, hour, ok), from the 16 bytes
    at each start (`windows` is a sliding-window view of the zero-padded chunk)."""
    length = end - start
    chars = windows[start]
    digit = chars - np.uint8(ord("0"))  # anything below "0" wraps above 9
    in_fraction = np.arange(9, 15) < length[:, None]
    ok = ((length == 8) | ((length >= 10) & (length <= 15))) & (digit[:, [0, 1, 3, 4, 6, 7]] <= 9).all(axis=1) \
        & (chars[:, 2] == ord(":")) & (chars[:, 5] == ord(":")) \
        & ((length == 8) | ((chars[:, 8] == ord(".")) & ((digit[:, 9:15] <= 9) | ~in_fraction).all(axis=1)))
    hour, minute, second = (digit[:, i].astype(np.int64) * 10 + digit[:, i + 1] for i in (0, 3, 6))
    ok &= (hour < 24) & (minute < 60) & (second < 60)
    micros = np.where(in_fraction, digit[:, 9:15], 0).astype(np.int64) @ _FRACTION_WEIGHTS
    return ((hour * 60 + minute) * 60 + second) * 1_000_000 + micros, hour, ok


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id per value, the distinct values ascending): np.unique's answer in O(n) for values
    within a small range, such as epoch days."""
    if not len(values):
        return np.zeros(0, np.int64), values
    low = int(values.min())
    span = int(values.max()) - low + 1
    if span > 4 * len(values) + 4096:
        unique, inverse = np.unique(values, return_inverse=True)
        return inverse.reshape(-1), unique
    seen = np.zeros(span, bool)
    seen[values - low] = True
    return (np.cumsum(seen) - 1)[values - low], np.flatnonzero(seen) + low


class ChunkParser:
    """Parses the chunks of one file in order; sequence numbers continue from chunk to chunk."""

    def __init__(self, tick_file: TickFile, ingest_us: int) -> None:
        self.file = tick_file
        self.ingest_us = ingest_us
        self.kind = tick_file.kind
        self.columns = TRADE_COLUMNS if self.kind == "trades" else QUOTE_COLUMNS
        self.schema = schemas.arrow_schema(self.kind)
        self.sequences: dict[int, int] = {}  # epoch day → last number used, as RecordBuilder.sequences
        self.reference = RecordBuilder(tick_file, ingest_us)  # the judge of every line off the fast path

    def parse(self, first_line: int, data: bytes) -> ParsedChunk:
        if len(data) >= 2**31:  # string offsets below are int32
            raise NotColumnar("chunk of 2 GiB or more")
        buf = np.frombuffer(data, np.uint8)
        if buf.max(initial=0) >= 0x80:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:  # rare: the reference dead-letters just those lines
                raise NotColumnar(f"not UTF-8 at byte {exc.start}") from exc
        starts, ends, nexts = _lines(buf)
        commas = np.flatnonzero(buf == ord(","))
        first_comma = np.searchsorted(commas, starts)
        fitting = np.flatnonzero(np.searchsorted(commas, ends) - first_comma == self.columns - 1)
        # field j of fitting line i is [bounds[i, j], bounds[i, j + 1] - 1), the -1 being its comma
        bounds = np.empty((len(fitting), self.columns + 1), np.int64)
        bounds[:, 0] = starts[fitting]
        bounds[:, 1:-1] = commas[first_comma[fitting, None] + np.arange(self.columns - 1)] + 1
        bounds[:, -1] = ends[fitting] + 1
        field_start, field_end = bounds[:, :-1], bounds[:, 1:] - 1

        values, ok = self._fast(buf, pa.py_buffer(data), field_start, field_end)
        accepted = np.zeros(len(starts), bool)
        accepted[fitting[ok]] = True
        at_fitting = np.full(len(starts), -1)
        at_fitting[fitting] = np.arange(len(fitting))
        rejected = []
        for line in np.flatnonzero(~accepted).tolist():  # few: judged one by one
            text = data[starts[line]:nexts[line]].decode()
            try:
                record = self.reference.build(text)
            except RowError as exc:
                rejected.append(Rejected(first_line + int(line), text.rstrip("\r\n"), exc))
                continue
            if at_fitting[line] < 0:
                raise AssertionError(f"line {first_line + line}: accepted with a wrong column count")
            self._patch(values, at_fitting[line], record)
            accepted[line] = True

        rows = at_fitting[accepted]
        table = self._table({name: v[rows] if isinstance(v, np.ndarray) else v.take(pa.array(rows))
                             for name, v in values.items()}, len(rows))
        return ParsedChunk(first_line, nexts, table, first_line + np.flatnonzero(accepted), rejected)

    def _fast(self, buf: np.ndarray, data: pa.Buffer, start: np.ndarray,
              end: np.ndarray) -> tuple[dict[str, np.ndarray | pa.Array], np.ndarray]:
        """Every field of every line with the right column count, vectorized; `ok` marks the lines
        whose fields all took the strict fast path."""
        # Dates: few distinct per file, so the reference parser judges each distinct text.
        dates = pc.dictionary_encode(_strings(data, start[:, 0], end[:, 0]))
        parsed: list[tuple[dt.date, int] | None] = []
        for text in dates.dictionary.to_pylist():
            try:
                parsed.append(_parse_date(text))
            except RowError:
                parsed.append(None)
        which = dates.indices.to_numpy(zero_copy_only=False)
        day = np.array([p[1] if p else 0 for p in parsed], np.int64)[which]
        windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([buf, np.zeros(16, np.uint8)]), 16)
        local_us, hour, ok = _time(windows, start[:, 1], end[:, 1])
        ok &= np.array([p is not None for p in parsed], bool)[which]
        # Sydney's UTC offset per (date, hour) in use: DST changes at 2-3 am, so per hour
        slot = which * 24 + np.where(ok, hour, 0)
        offsets = np.zeros(len(parsed) * 24, np.int64)
        for s in np.flatnonzero(np.bincount(slot, minlength=len(offsets))).tolist():
            date = parsed[s // 24]
            if date is not None:
                offsets[s] = _utc_offset_us(date[0], s % 24)
        values: dict[str, np.ndarray | pa.Array] = {
            "exchange_timestamp": day * _MICROS_PER_DAY + local_us - offsets[slot],
            "exchange_date": day,
        }
        text = {i: _strings(data, start[:, i], end[:, i]) for i in range(2, 6 if self.kind == "quotes" else 4)}
        if self.kind == "trades":
            values["price"], price_ok = _number(text[2], _PRICE, _PRICE_TYPE)
            values["volume"], volume_ok = _number(text[3], _SIZE, _SIZE_TYPE)
            ok &= price_ok & volume_ok
            for i, name in enumerate(("qualifiers", "venue", "buyer_id"), start=4):
                values[name] = _strings(data, start[:, i], end[:, i], nullable=True)
        else:
            for i, name in enumerate(("bid_price", "ask_price", "bid_size", "ask_size"), start=2):
                values[name], number_ok = _number(text[i], *((_PRICE, _PRICE_TYPE) if i < 4 else (_SIZE, _SIZE_TYPE)))
                ok &= number_ok
        return values, ok

    def _patch(self, values: dict[str, np.ndarray | pa.Array], row: int, record: dict) -> None:
        """A line only the reference accepted: its values replace the fast path's."""
        for name, column in values.items():
            if not isinstance(column, np.ndarray):
                continue  # text fields are the line's own text either way
            value = record[name]  # within int64 and decimal(18, 6): the reference checks both
            column[row] = int.from_bytes(value, "big", signed=True) if isinstance(value, bytes) else value

    def _table(self, values: dict[str, np.ndarray | pa.Array], m: int) -> pa.Table:
        """Accepted rows (file order) → the kind's Arrow records, sequence numbers included."""
        group, unique = _dense(values["exchange_date"])
        counts = np.bincount(group, minlength=len(unique))
        order = np.argsort(group.astype(np.int16) if len(unique) < 2**15 else group, kind="stable")  # radix
        rank = np.empty(m, np.int64)
        rank[order] = np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts)
        base = np.array([self.sequences.get(d, 0) for d in unique.tolist()], np.int64)
        for d, last in zip(unique.tolist(), (base + counts).tolist(), strict=True):
            self.sequences[d] = last
        columns = {
            "symbol": pa.repeat(self.file.symbol, m),
            "exchange": pa.repeat(EXCHANGE, m),
            "sequence_number": pa.array(base[group] + rank + 1),
            "ingest_timestamp": pa.array(np.full(m, self.ingest_us, np.int64)),
            "source_id": pa.repeat(self.file.source_id, m),
        }
        for name, v in values.items():
            columns[name] = v if isinstance(v, pa.Array) else pa.array(v)
        if self.kind == "quotes":
            bid, ask = values["bid_price"], values["ask_price"]
            columns["is_one_sided"] = pa.array((bid == 0) | (ask == 0))
            columns["is_crossed"] = pa.array((bid > ask) & (ask > 0))
        arrays = []
        for fld in self.schema:
            column = columns[fld.name]
            if pa.types.is_decimal(fld.type):
                column = decimal_from_unscaled(values[fld.name], fld.type)
            elif pa.types.is_date32(fld.type):
                column = pa.array(values[fld.name].astype(np.int32)).view(fld.type)
            elif column.type != fld.type:
                column = column.view(fld.type) if pa.types.is_timestamp(fld.type) else column.cast(fld.type)
            arrays.append(column)
        return pa.Table.from_arrays(arrays, schema=self.schema)

