"""Avro binary for many messages at once, column by column, for K2's flat record schemas.

fastavro walks one record at a time through Python objects, a few µs per record each way, which
was most of what ingest and stream spent. K2's records are flat, so each field of every message
sits at a per-message byte position that numpy can advance for all messages at once. Varints are
read eight bytes at a time per message (one unaligned uint64 gather; the first byte without the
continuation bit ends the varint) and written the same way; strings are cut out of the
concatenated payloads by an Arrow `take`, never byte by byte in Python.

Scope: a record of null/boolean/int/long/float/double/bytes/string fields, [null, T] unions of
those, and the logical types timestamp-micros, date and decimal on bytes with precision ≤ 18
(unscaled values then fit int64). Anything else raises `Unsupported`: use fastavro for it.

`encode` writes exactly fastavro's `schemaless_writer` bytes (zigzag varints, length-prefixed
strings and bytes, union branch index, decimals as minimal big-endian two's complement).
`decode` takes payloads that all start with a fixed-size prefix the caller has checked (`skip`,
5 for the Confluent header) and is at least as strict as fastavro: every payload fastavro
rejects is flagged, and every payload not flagged decodes to fastavro's values. It also flags a
few that fastavro reads but that are not valid Avro or do not fit the Arrow type: varints over
10 bytes, union indexes outside the union (fastavro indexes Python-style, so -1 is the last
branch), ints outside int32, decimals longer than 8 bytes or beyond their precision, and instants
and dates beyond the years 1–9999 (fastavro's physical read takes them; its logical read fails).
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import fastavro
import numpy as np
import pyarrow as pa

from k2.rows import to_rows
from k2.schemas import arrow_schema_from_avro, strip_logical_types

_PRIMITIVE = {"boolean", "int", "long", "float", "double", "bytes", "string"}
_WIDTH = {"boolean": 1, "float": 4, "double": 8}
_U64 = np.uint64
_HIGH_BITS = _U64(0x8080808080808080)
# A varint of n bytes is needed from 2**(7(n-1)) on.
_VARINT_STEPS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)
# A minimal two's-complement decimal of k bytes holds |v| < 2**(8k - 1).
_DECIMAL_STEPS = np.array([1 << (8 * k - 1) for k in range(1, 8)], np.uint64)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
# Instants and dates of the years 1–9999, the ones Python (pyiceberg's statistics, the API's JSON)
# can hold: one beyond them, e.g. nanoseconds sent as microseconds, would stop every reader.
_MICROS_SPAN = ((dt.datetime.min.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1),
                (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1))
_DAYS_SPAN = (dt.date.min.toordinal() - _EPOCH_ORDINAL, dt.date.max.toordinal() - _EPOCH_ORDINAL)


class Unsupported(ValueError):
    """The schema has a type this codec does not handle; fastavro does."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: str  # the physical Avro type, or "decimal"
    arrow_type: pa.DataType
    branches: tuple[int, int] | None = None  # (null branch, value branch) of a [null, T] union
    precision: int = 0


def _kind(avro_type: Any) -> str | None:
    """The wire kind of a field type, None if this codec cannot handle it."""
    if isinstance(avro_type, list):
        rest = [t for t in avro_type if t != "null"]
        return _kind(rest[0]) if len(avro_type) == 2 and len(rest) == 1 else None
    if isinstance(avro_type, str):
        return avro_type if avro_type in _PRIMITIVE else None
    if isinstance(avro_type, dict) and avro_type.get("type") in _PRIMITIVE:
        if avro_type.get("logicalType") == "decimal":
            fits = avro_type["type"] == "bytes" and avro_type.get("precision", 99) <= 18
            return "decimal" if fits else None
        return avro_type["type"]
    return None


def _compile(schema: dict[str, Any]) -> list[_Field]:
    if not isinstance(schema, dict) or schema.get("type") != "record" or \
            not all(_kind(f["type"]) for f in schema["fields"]):
        raise Unsupported(f"{schema.get('name') if isinstance(schema, dict) else schema}: "
                          "only flat records of primitive fields are supported")
    fields = []
    for spec, arrow_field in zip(schema["fields"], arrow_schema_from_avro(schema), strict=True):
        ftype, branches = spec["type"], None
        if isinstance(ftype, list):
            null = ftype.index("null")
            ftype, branches = ftype[1 - null], (null, 1 - null)
        kind = _kind(ftype)
        assert kind is not None  # checked above
        fields.append(_Field(spec["name"], kind, arrow_field.type, branches,
                             ftype["precision"] if kind == "decimal" else 0))
    return fields


def _zigzag(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64)
    return ((v << 1) ^ (v >> 63)).view(np.uint64)


def unscaled_int64(column: pa.Array) -> np.ndarray:
    """decimal128 of precision ≤ 18 → its unscaled values: the low halves of the 16-byte values."""
    words = np.frombuffer(column.buffers()[1], np.int64)
    return words[2 * column.offset:2 * (column.offset + len(column)):2]


def _validity(valid: np.ndarray | None) -> pa.Buffer | None:
    if valid is None or valid.all():
        return None
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def decimal_from_unscaled(unscaled: np.ndarray, arrow_type: pa.Decimal128Type,
                          valid: np.ndarray | None = None) -> pa.Array:
    """int64 unscaled values → decimal128: the 16-byte little-endian value is the int64 and its sign."""
    pairs = np.empty((len(unscaled), 2), np.int64)
    pairs[:, 0] = unscaled
    pairs[:, 1] = unscaled >> 63
    return pa.Array.from_buffers(arrow_type, len(unscaled), [_validity(valid), pa.py_buffer(pairs)])


def conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """Decoded columns as a table's own Arrow schema: its types, its order, and nulls for the
    columns an older writer schema did not have."""
    arrays = []
    for fld in schema:
        if fld.name in data.column_names:
            column = data[fld.name]
            arrays.append(column if column.type == fld.type else column.cast(fld.type))
        else:
            arrays.append(pa.nulls(data.num_rows, fld.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def byte_ranges(data: pa.Buffer, start: np.ndarray, end: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """The byte ranges [start, end) of `data`, in order and not overlapping, as a string or binary
    array copied out at once: the ranges with the gaps between them as extra values are valid
    offsets into `data`, and taking every other value copies out just the ranges."""
    m = len(start)
    if not m:
        return pa.array([], arrow_type)
    large = pa.types.is_large_binary(arrow_type) or pa.types.is_large_string(arrow_type)
    bounds = np.empty(2 * m, np.int64 if large else np.int32)
    bounds[0::2], bounds[1::2] = start, end
    spans = pa.Array.from_buffers(arrow_type, 2 * m - 1, [None, pa.py_buffer(bounds), data])
    return spans.take(pa.array(np.arange(0, 2 * m, 2)))


# --- encoding -----------------------------------------------------------------------------
# Each field becomes "bands": a (rows, width) byte matrix of which row i uses its first
# lengths[i] bytes (all of them when lengths is None). Laying the bands side by side and
# keeping the used bytes row by row is exactly the concatenation of every message's fields.

_Band = tuple[np.ndarray, np.ndarray | None]


def _varint_band(u: np.ndarray, present: np.ndarray | None = None) -> _Band:
    """Avro varints (unsigned LEB128 of the zigzagged value), eight bytes per uint64 word."""
    n = 1 + np.searchsorted(_VARINT_STEPS, u, side="right")
    width = int(n.max())
    word = u & _U64(0x7F)
    for k in range(1, min(width, 8)):  # 7-bit group k → byte k, as many as the longest value has
        word |= (u >> _U64(7 * k) & _U64(0x7F)) << _U64(8 * k)
    # continuation bit on every byte but the last (numpy shifts by ≥ 64 give 0, so -1 is all ones)
    word |= _HIGH_BITS & ((_U64(1) << (8 * (n - 1)).astype(np.uint64)) - _U64(1))
    band = word.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)[:, :width]
    if width > 8:  # values ≥ 2**56: the last one or two bytes
        band = np.concatenate([band, np.zeros((len(u), 2), np.uint8)], axis=1)
        band[:, 8] = (u >> _U64(56) & _U64(0x7F)).astype(np.uint8) | np.where(n > 9, 0x80, 0).astype(np.uint8)
        band[:, 9] = (u >> _U64(63)).astype(np.uint8)
        band = band[:, :width]
    uniform = present is None and width == n.min()
    return band, None if uniform else (n if present is None else np.where(present, n, 0))


def _numpy(column: pa.Array, kind: str) -> np.ndarray:
    """A column's physical values as numpy (timestamps and dates as their ints, nulls as 0)."""
    if kind in ("long", "int"):
        target = pa.int64() if kind == "long" else pa.int32()
        column = column.view(target) if column.type.bit_width == target.bit_width else column.cast(target)
    return column.fill_null(False if kind == "boolean" else 0).to_numpy(zero_copy_only=False)


def _bands(fld: _Field, column: pa.Array, present: np.ndarray | None) -> list[_Band]:
    kind, m = fld.kind, len(column)
    if kind in ("long", "int"):
        return [_varint_band(_zigzag(_numpy(column, kind)), present)]
    if kind in _WIDTH:
        values = np.ascontiguousarray(_numpy(column, kind))
        band = values.astype(np.uint8) if kind == "boolean" else values.view(np.uint8)
        return [(band.reshape(m, _WIDTH[kind]), None if present is None else present * _WIDTH[kind])]
    if kind == "decimal":
        unscaled = unscaled_int64(column)
        # Minimal big-endian two's complement, as int.to_bytes(signed) and fastavro: the fewest
        # k bytes with |v| < 2**(8k - 1); shifted so that they are the first k bytes.
        k = 1 + np.searchsorted(_DECIMAL_STEPS, np.abs(unscaled).view(np.uint64), side="right")
        left_aligned = (unscaled << (8 * (8 - k))).astype(">i8").view(np.uint8).reshape(m, 8)
        return [_varint_band(_zigzag(k), present), (left_aligned, k if present is None else np.where(present, k, 0))]
    # string / bytes: the length, then the UTF-8 / raw bytes
    large = column.cast(pa.large_binary())
    offsets = np.frombuffer(large.buffers()[1], np.int64)[large.offset:large.offset + m + 1]
    lengths = np.diff(offsets) if present is None else np.where(present, np.diff(offsets), 0)
    data = np.frombuffer(large.buffers()[2], np.uint8) if large.buffers()[2] is not None else np.zeros(1, np.uint8)
    width = int(lengths.max()) if m else 0
    bands = [_varint_band(_zigzag(lengths), present)]
    if width:
        first = data[offsets[0]:offsets[0] + width]
        if (lengths == width).all() and (data[offsets[0]:offsets[-1]].reshape(m, width) == first).all():
            bands.append((np.broadcast_to(first, (m, width)), None))  # one value in every row
        else:
            index = np.minimum(offsets[:-1, None] + np.arange(width), max(len(data) - 1, 0))
            bands.append((data[index], lengths))
    return bands


def encode(table: pa.Table, avro_schema: dict[str, Any], header: bytes = b"") -> list[bytes]:
    """`header` + the Avro binary of each row, byte for byte what fastavro writes for the record.

    Columns are matched by name and cast to the schema's Arrow type where they differ (e.g.
    large_string); a null in a field that is not a [null, T] union raises ValueError."""
    return split(*encode_joined(table, avro_schema, header))


def split(blob: bytes, bounds: np.ndarray) -> list[bytes]:
    """Concatenated messages → the messages; message i is blob[bounds[i]:bounds[i + 1]]."""
    return [blob[s:e] for s, e in itertools.pairwise(bounds.tolist())]


def encode_joined(table: pa.Table, avro_schema: dict[str, Any], header: bytes = b"") -> tuple[bytes, np.ndarray]:
    """`encode`'s messages concatenated, with their bounds (m + 1 offsets): one object to pickle
    instead of one per message."""
    fields = _compile(avro_schema)
    m = table.num_rows
    if not m:
        return b"", np.zeros(1, np.int64)
    bands: list[_Band] = []
    if header:
        bands.append((np.broadcast_to(np.frombuffer(header, np.uint8), (m, len(header))), None))
    for fld in fields:
        column = table.column(fld.name).combine_chunks()
        if column.type != fld.arrow_type:
            column = column.cast(fld.arrow_type)
        present = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
        if fld.branches is None and present is not None:
            raise ValueError(f"{fld.name}: null in a field that is not nullable")
        if fld.branches is not None:
            branch = np.full(m, fld.branches[1]) if present is None else np.where(present, *fld.branches[::-1])
            bands.append(_varint_band(_zigzag(branch)))
        bands.extend(_bands(fld, column, present))

    width = sum(band.shape[1] for band, _ in bands)
    rows = np.empty((m, width), np.uint8)
    used = np.ones((m, width), bool)
    row_lengths = np.zeros(m, np.int64)
    at = 0
    for band, lengths in bands:
        w = band.shape[1]
        rows[:, at:at + w] = band
        if lengths is None:
            row_lengths += w
        else:
            used[:, at:at + w] = np.arange(w) < lengths[:, None]
            row_lengths += lengths
        at += w
    blob = rows[used].tobytes()  # row-major: message after message
    return blob, np.concatenate([[0], np.cumsum(row_lengths)])


# --- decoding -----------------------------------------------------------------------------


@dataclass
class Decoded:
    """`table` holds the good payloads in input order; `bad[i]` flags payload i, `errors[i]` says why."""

    table: pa.Table
    bad: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


class _Cursor:
    """Per-message read positions in the concatenated payloads, and which messages failed."""

    def __init__(self, blob: bytes, starts: np.ndarray, ends: np.ndarray) -> None:
        self.blob = pa.py_buffer(blob)
        self.buf = np.frombuffer(blob + bytes(16), np.uint8)  # padded: 8-byte reads never leave it
        self.words = np.ndarray((len(blob) + 9,), "<u8", self.buf, 0, (1,))  # uint64 at every offset
        self.pos, self.end = np.minimum(starts, ends), ends
        self.bad = np.zeros(len(starts), bool)
        self.why = np.zeros(len(starts), np.int64)
        self.problems: list[str] = []

    def fail(self, mask: np.ndarray, problem: str) -> None:
        new = mask & ~self.bad
        if new.any():
            self.problems.append(problem)
            self.why[new] = len(self.problems)
            self.bad |= new

    def advance(self, rows: np.ndarray, n: np.ndarray | int, what: str) -> np.ndarray:
        """Move `rows` on by `n` bytes (checked against their message's end); returns where they were."""
        n = np.where(rows, n, 0)
        self.fail(rows & ((n < 0) | (self.pos + n > self.end)), f"{what}: past the end of the message")
        start = self.pos
        self.pos = self.pos + np.where(self.bad, 0, n)
        return start

    def varint(self, rows: np.ndarray, what: str) -> np.ndarray:
        """One zigzag varint at each of `rows` (a mask) → int64."""
        x = self.words[self.pos]
        stops = ~x & _HIGH_BITS  # high bit clear: that byte ends the varint
        first = stops & (~stops + _U64(1))  # the lowest such bit, 0 if none in these 8 bytes
        n = np.frexp(first.astype(np.float64))[1] // 8  # its bit 8k+7 → k + 1 bytes
        longer = np.flatnonzero(rows & (n == 0))
        # Only as many 7-bit groups as the longest varint here has: one for union branches and
        # most lengths, where all eight cost a millisecond per 50,000 messages.
        groups = 8 if len(longer) or not len(n) else int(np.where(rows, n, 0).max())
        u = x & _U64(0x7F)
        if groups > 1:
            x &= (first << _U64(1)) - _U64(1)
            for k in range(1, groups):
                u |= (x >> _U64(k)) & _U64(0x7F << (7 * k))
        if len(longer):  # 9 or 10 bytes (|value| ≥ 2**55): rare, read the tail bytes one by one
            b8, b9 = self.buf[self.pos[longer] + 8].astype(np.uint64), self.buf[self.pos[longer] + 9].astype(np.uint64)
            u[longer] |= (b8 & _U64(0x7F)) << _U64(56) | np.where(b8 >= 0x80, b9 << _U64(63), _U64(0))
            n[longer] = np.where(b8 < 0x80, 9, np.where(b9 < 0x80, 10, -1))
            over_long = np.zeros(len(x), bool)
            over_long[longer[n[longer] < 0]] = True
            self.fail(over_long, f"{what}: varint longer than 10 bytes")
        self.advance(rows & ~self.bad, n, what)
        return (u >> _U64(1)).view(np.int64) ^ -(u & _U64(1)).view(np.int64)


def _span(arrow_type: pa.DataType) -> tuple[int, int] | None:
    if pa.types.is_timestamp(arrow_type):
        return _MICROS_SPAN
    return _DAYS_SPAN if pa.types.is_date32(arrow_type) else None


def refusals(records: list[dict[str, Any]], schema: pa.Schema) -> dict[int, str]:
    """Physical records (read by fastavro, for writer schemas beyond this codec) that a table of
    `schema` cannot hold, by position, with the reasons `decode` gives: an int beyond int32, an
    instant or date beyond the years 1–9999 (pyiceberg's statistics, Python and JSON cannot
    represent them), a decimal beyond its precision."""
    refused: dict[int, str] = {}
    for fld in schema:
        for i, record in enumerate(records):
            value = record.get(fld.name)
            if value is not None and i not in refused and (reason := _refusal(fld.type, value)):
                refused[i] = f"{fld.name}: {reason}"
    return refused


def _refusal(arrow_type: pa.DataType, value: Any) -> str | None:
    if (span := _span(arrow_type)) is not None:
        return None if span[0] <= value <= span[1] else "beyond the years 1–9999"
    if pa.types.is_int32(arrow_type):
        return None if -(2**31) <= value < 2**31 else "int out of range"
    if pa.types.is_decimal(arrow_type):
        precision = cast(pa.Decimal128Type, arrow_type).precision
        fits = abs(int.from_bytes(value, "big", signed=True)) < 10**precision
        return None if fits else f"decimal beyond precision {precision}"
    return None


def _read(cur: _Cursor, fld: _Field, present: np.ndarray) -> pa.Array:
    m, kind, name = len(present), fld.kind, fld.name
    rows = present & ~cur.bad
    if kind in ("long", "int"):
        values = cur.varint(rows, name)
        if kind == "int":
            cur.fail(rows & ((values < -(2**31)) | (values >= 2**31)), f"{name}: int out of range")
            values = values.astype(np.int32)
        if (span := _span(fld.arrow_type)) is not None:
            cur.fail(rows & ((values < span[0]) | (values > span[1])), f"{name}: beyond the years 1–9999")
        return pa.Array.from_buffers(fld.arrow_type, m, [_validity(present), pa.py_buffer(values)])
    if kind in _WIDTH:
        x = cur.words[cur.advance(rows, _WIDTH[kind], name)]
        if kind == "boolean":  # as fastavro: any non-zero byte is true
            bits = np.packbits(x & _U64(0xFF) != 0, bitorder="little")
            return pa.Array.from_buffers(pa.bool_(), m, [_validity(present), pa.py_buffer(bits)])
        values = x.view(np.float64) if kind == "double" else (x & _U64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        return pa.Array.from_buffers(fld.arrow_type, m, [_validity(present), pa.py_buffer(values)])
    length = cur.varint(rows, name)
    start = cur.advance(rows & ~cur.bad, length, name)
    length = np.where(rows & ~cur.bad, length, 0)
    if kind == "decimal":
        cur.fail(length > 8, f"{name}: decimal wider than 8 bytes")
        # the first k bytes at start, big-endian, sign-extended by an arithmetic shift
        k = np.where(cur.bad, 0, length)
        unscaled = np.where(k > 0, cur.words[start].byteswap().view(np.int64) >> (8 * (8 - k)), 0)
        limit = 10**fld.precision
        cur.fail((unscaled >= limit) | (unscaled <= -limit), f"{name}: decimal beyond precision {fld.precision}")
        return decimal_from_unscaled(unscaled, fld.arrow_type, present)
    # Every message's bytes lie after the previous message's: the ranges are in order.
    taken = byte_ranges(cur.blob, start, start + length, pa.large_binary())
    binary = pa.Array.from_buffers(pa.large_binary(), m, [_validity(present), *taken.buffers()[1:]])
    if kind == "bytes":
        return binary.cast(fld.arrow_type)
    try:
        return binary.cast(fld.arrow_type)  # validates UTF-8 as fastavro's strict decode does
    except pa.ArrowInvalid:  # rare: find the messages
        values = binary.to_pylist()
        invalid = np.zeros(m, bool)
        for i, value in enumerate(values):
            try:
                value is None or value.decode()
            except UnicodeDecodeError:
                invalid[i] = True
        cur.fail(invalid, f"{name}: invalid UTF-8")
        return pa.array([None if v is None or bad else v.decode() for v, bad in zip(values, invalid, strict=True)],
                        fld.arrow_type)


@dataclass(frozen=True)
class Joined:
    """Messages, concatenated once, with their sizes (-1 for a None, a tombstone): the header read
    and the decode of one batch share them, as each join and size count cost a few ms per 50,000."""

    payloads: Sequence[bytes | None]
    blob: bytes
    sizes: np.ndarray

    @classmethod
    def of(cls, payloads: Sequence[bytes | None]) -> Joined:
        n = len(payloads)
        try:
            present = cast(list[bytes], payloads)  # a None raises TypeError below
            return cls(payloads, b"".join(present), np.fromiter(map(len, present), np.int64, n))
        except TypeError:  # a None (a tombstone) among them
            return cls(payloads, b"".join(p for p in payloads if p is not None),
                       np.fromiter((-1 if p is None else len(p) for p in payloads), np.int64, n))

    def take(self, where: np.ndarray) -> Joined:
        """The messages at `where` (ascending positions)."""
        if len(where) == len(self.payloads):
            return self
        return Joined.of([self.payloads[i] for i in where.tolist()])


def by_schema_id(joined: Joined) -> tuple[np.ndarray, Iterator[tuple[int, np.ndarray]]]:
    """Each message's Confluent schema id (`confluent_schema_ids`), and per id found (ascending)
    the positions of its messages."""
    ids = confluent_schema_ids(joined)
    return ids, ((schema_id, np.flatnonzero(ids == schema_id)) for schema_id in np.unique(ids[ids >= 0]).tolist())


def confluent_schema_ids(payloads: Sequence[bytes | None] | Joined) -> np.ndarray:
    """Per payload, the schema id in its Confluent header (magic 0, 4-byte big-endian id), or -1
    for a payload without one (None, shorter than 5 bytes, another magic byte)."""
    joined = payloads if isinstance(payloads, Joined) else Joined.of(payloads)
    blob, sizes = joined.blob, joined.sizes
    starts = np.cumsum(np.maximum(sizes, 0)) - np.maximum(sizes, 0)
    head = np.frombuffer(blob + bytes(5), np.uint8)[np.minimum(starts, len(blob))[:, None] + np.arange(5)]
    ids = np.ascontiguousarray(head[:, 1:]).view(">u4").ravel().astype(np.int64)
    return np.where((sizes >= 5) & (head[:, 0] == 0), ids, -1)


def decode(payloads: Sequence[bytes] | Joined, avro_schema: dict[str, Any], *, skip: int = 0) -> Decoded:
    """Decode many messages written with `avro_schema`, each after a `skip`-byte prefix, into
    Arrow columns of the types `arrow_schema_from_avro` gives. Bad messages never raise: they
    are flagged in `bad` and left out of `table`."""
    fields = _compile(avro_schema)
    joined = payloads if isinstance(payloads, Joined) else Joined.of(payloads)
    if not len(joined.sizes):
        return Decoded(arrow_schema_from_avro(avro_schema).empty_table(), np.zeros(0, bool))
    if (joined.sizes < 0).any():
        raise ValueError("decode takes messages, not tombstones (None)")
    sizes = joined.sizes
    ends = np.cumsum(sizes)
    cur = _Cursor(joined.blob, ends - sizes + skip, ends)
    cur.fail(sizes < skip, "shorter than its header")
    arrays = []
    for fld in fields:
        present = ~cur.bad
        if fld.branches is not None:
            branch = cur.varint(present, f"{fld.name} union branch")
            cur.fail(present & (branch != fld.branches[0]) & (branch != fld.branches[1]),
                     f"{fld.name}: union branch index out of range")
            present = ~cur.bad & (branch == fld.branches[1])
        arrays.append(_read(cur, fld, present))
    cur.fail(cur.pos != cur.end, "trailing bytes after the record")
    table = pa.Table.from_arrays(arrays, schema=arrow_schema_from_avro(avro_schema))
    if cur.bad.any():
        table = table.filter(pa.array(~cur.bad))
    errors = {int(i): cur.problems[cur.why[i] - 1] for i in np.flatnonzero(cur.bad)}
    return Decoded(table, cur.bad, errors)


def decode_rows(payloads: list[bytes], avro_schema: dict[str, Any], *, skip: int = 0,
                physical: dict[str, Any] | None = None) -> list[tuple[int, dict]]:
    """What `decode` gives, as (position, row) of the good payloads, each row the Python values
    that `k2.rows.to_rows` makes of `decode`'s table — through fastavro one message at a
    time. For a handful of messages: `decode` costs a millisecond or two per call whatever the
    count, and far more in a busy process, where each of its hundreds of Arrow calls gives up the
    GIL and waits to get it back.

    Its verdicts are `decode`'s own: fastavro reads some payloads `decode` refuses (overlong
    varints, union index -1) and `decode` reads some fastavro writes otherwise (varints padded
    with 0x80 bytes, booleans other than 0 and 1), so a payload that fastavro does not write back
    byte for byte, or holds an int or decimal `decode` may refuse, is left to `decode`.

    `physical`: the schema parsed by fastavro with its logical types stripped, if the caller holds
    it already (`AvroDecoder.physical_writer_schema` caches one per schema id)."""
    fields = _compile(avro_schema)
    if physical is None:
        physical = cast(dict[str, Any], fastavro.parse_schema(strip_logical_types(avro_schema)))  # a record
    rows: dict[int, dict] = {}
    doubtful = []
    for i, payload in enumerate(payloads):
        record = _canonical_record(payload[skip:], physical)
        row = None if record is None else _row(fields, record)
        if row is None:
            doubtful.append(i)
        else:
            rows[i] = row
    if doubtful:
        result = decode([payloads[i] for i in doubtful], avro_schema, skip=skip)
        good = [i for i, bad in zip(doubtful, result.bad.tolist(), strict=True) if not bad]
        rows.update(zip(good, to_rows(result.table), strict=True))
    return sorted(rows.items())


def _canonical_record(body: bytes, physical: Any) -> dict[str, Any] | None:
    """The record, if fastavro reads the whole body and writes it back the same."""
    buf = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buf, physical, None)
    except Exception:  # noqa: BLE001 - fastavro raises many types on bad bytes; `decode` says which
        return None
    if buf.tell() != len(body):
        return None
    again = io.BytesIO()
    try:
        fastavro.schemaless_writer(again, physical, record)
    except Exception:  # noqa: BLE001 - e.g. an int it read beyond int32, which it will not write
        return None
    return cast(dict[str, Any], record) if again.getvalue() == body else None


def _row(fields: list[_Field], record: dict[str, Any]) -> dict[str, Any] | None:
    """A canonical record's physical values as `to_rows` gives them; None where `decode` may
    refuse a value (an int beyond int32, an instant or date beyond the years 1–9999, a decimal
    wider than 8 bytes or beyond its precision)."""
    row: dict[str, Any] = {}
    for fld in fields:
        value = record[fld.name]
        if value is not None:
            # refused by the table's rules, or a decimal wider than this codec reads
            if _refusal(fld.arrow_type, value) is not None or (fld.kind == "decimal" and len(value) > 8):
                return None
            if fld.kind == "decimal":
                unscaled = int.from_bytes(value, "big", signed=True)
                value = Decimal(unscaled).scaleb(-cast(pa.Decimal128Type, fld.arrow_type).scale)
            elif pa.types.is_timestamp(fld.arrow_type):
                value = _EPOCH + dt.timedelta(microseconds=value)
            elif pa.types.is_date32(fld.arrow_type):
                value = dt.date.fromordinal(_EPOCH_ORDINAL + value)
        row[fld.name] = value
    return row
