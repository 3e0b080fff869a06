"""Arrow results straight to JSON, column at a time, byte for byte what pydantic writes.

Building a Python object per value (`Decimal`, `datetime`) and serialising it costs tens of
microseconds a row; here each column is encoded to JSON text by Arrow kernels and the rows are
joined by Arrow, so Python only touches whole columns. The output is what
`pydantic_core.to_json(to_rows(data))` gives (and what the response models give):
- decimals as strings at their scale ("36.667000"), exactly: Arrow formats the unscaled integer;
- UTC instants as ISO-8601 with a `Z`, microseconds only when not zero
  ("2014-03-12T00:00:01.000120Z", "2014-03-12T00:00:01Z"); dates as "2014-03-12";
- strings escaped as serde_json escapes them (`"`, `\\` and control characters; nothing else).
A column of any other type, or one holding a string that needs escaping, is encoded value by value
by pydantic instead: slower, never different.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic_core import to_json

from k2.rows import to_rows

_YEAR_1000_US = -30_610_224_000_000_000  # 1000-01-01T00:00:00Z, microseconds since 1970
_YEAR_10000_US = 253_402_300_800_000_000  # 10000-01-01T00:00:00Z


_FEW = 16


@functools.lru_cache(maxsize=1024)
def _literal(text: str) -> pa.Scalar:
    """Text every row writes, as a kernel scalar. Kept: each one built costs microseconds, and a
    page's columns are the same every time."""
    return pa.scalar(text, pa.large_string())


_NULL, _EMPTY = _literal("null"), _literal("")


@functools.lru_cache(maxsize=1024)
def _key(name: str, *, first: bool) -> str:
    """A column's key as a row writes it, with the brace or comma before it."""
    return ("{" if first else ",") + to_json(name).decode() + ":"


def _slow(column: pa.Array) -> pa.Array:
    """Each value encoded on its own by pydantic (nulls stay null)."""
    values = to_rows(pa.table({"v": column}))
    return pa.array([None if row["v"] is None else to_json(row["v"]).decode() for row in values],
                    pa.large_string())


def _four_digit_years(column: pa.Array) -> bool:
    """Years 1000-9999, whose ISO form is the plain one (others take the exact, slow path). Read
    from the values buffer: a null's slot holds any value, which can only send it the slow way."""
    values = np.frombuffer(column.buffers()[1], np.int64, count=len(column), offset=column.offset * 8)
    return not len(values) or (values.min() >= _YEAR_1000_US and values.max() < _YEAR_10000_US)


def _may_need_escapes(strings: pa.Array) -> bool:
    """Whether a string of the column holds a character JSON escapes (a quote, a backslash, a
    control character: serde_json escapes exactly these). Only the column's own bytes are read, by
    numpy at once (a fourteenth of the time of a `re` search, measured on 100 kB): a page is a
    slice of a file's whole column."""
    data = strings.buffers()[2]
    if data is None or not len(strings):
        return False
    offsets = np.frombuffer(strings.buffers()[1], np.int64 if pa.types.is_large_string(strings.type) else np.int32)
    first, last = int(offsets[strings.offset]), int(offsets[strings.offset + len(strings)])
    octets = np.frombuffer(data, np.uint8, count=last - first, offset=first)
    return bool(octets.size and (octets.min() < 0x20 or np.count_nonzero((octets == 0x22) | (octets == 0x5C))))


def _encode(column: pa.Array) -> tuple[str, pa.Array, str]:
    """Each value of `column` as JSON text (null where the value is null) once written between the
    two literals returned with it: a quote and a quote for strings, nothing for numbers. The row
    writes the literals, so a column costs no kernel call for its quotes."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if _may_need_escapes(column):
            return "", _slow(column), ""
        return '"', column.cast(pa.large_string()), '"'
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):  # booleans: "true" / "false"
        return "", column.cast(pa.large_string()), ""
    if (pa.types.is_decimal(kind) and 0 <= kind.scale <= 6) or pa.types.is_date32(kind):
        # Python's Decimal writes these without an exponent too, so the texts agree.
        return '"', column.cast(pa.large_string()), '"'
    if pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz is not None and _four_digit_years(column):
        # Arrow's instants are UTC whatever the zone label: format the UTC wall clock, which Arrow
        # writes as "2014-03-12 00:00:01.000120" (four-digit years: the space is always the 11th
        # byte, replaced in place, a quarter of the time of a search; six decimals, the only ".").
        text = pc.binary_replace_slice(column.cast(pa.timestamp("us")).cast(pa.large_string()), 10, 11, "T")
        return '"', pc.replace_substring(text, ".000000", ""), 'Z"'
    return "", _slow(column), ""


def rows_text(data: pa.Table | pa.RecordBatch) -> bytes | memoryview:
    """The rows' JSON objects separated by commas, without the array's brackets (an export's chunk).
    A view of Arrow's buffer, not a copy: the caller's join into the response body is the one copy
    (an export's chunk is megabytes)."""
    if data.num_rows < _FEW:  # a handful of rows: fixed costs of the kernels would dominate
        return to_json(to_rows(data))[1:-1]
    table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
    parts: list[Any] = []
    literal = ""  # text between two columns' values, written once per row by the join
    for i, name in enumerate(table.column_names):
        column = table.column(i).combine_chunks() if table.column(i).num_chunks != 1 else table.column(i).chunk(0)
        before, text, after = _encode(column)
        literal += _key(name, first=i == 0)
        if column.null_count:  # a null is written bare: its column carries its own literals
            if before or after:
                text = pc.binary_join_element_wise(_literal(before), text, _literal(after), _EMPTY)
            parts += [_literal(literal), pc.fill_null(text, _NULL)]
            literal = ""
        else:
            parts += [_literal(literal + before), text]
            literal = after
    parts.append(_literal(literal + "},"))
    rows = pc.binary_join_element_wise(*parts, _EMPTY).cast(pa.large_string())  # int64 offsets, read below
    # A new array of rows that each end in "},": its data buffer is the rows joined, a comma too many.
    offsets = np.frombuffer(rows.buffers()[1], np.int64, count=len(rows) + 1, offset=rows.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    return memoryview(rows.buffers()[2])[start:end - 1]


def model_json(model: type[BaseModel], data: pa.Table | pa.RecordBatch, **fields: Any) -> bytes:
    """`model(data=rows, **fields)` as JSON, the rows encoded by `rows_text`.

    The other fields go through the model (validated and serialised as usual) with an empty
    `data`, whose text is then replaced: inside a JSON string a quote is always escaped, so
    `"data":[]` can only be the key itself.
    """
    head, tail = model(data=[], **fields).model_dump_json().encode().split(b'"data":[]', 1)
    return b"".join((head, b'"data":[', rows_text(data), b"]", tail))


def json_response(model: type[BaseModel], data: pa.Table | pa.RecordBatch, **fields: Any) -> Response:
    """A response with the body `model_json` writes. Routes returning it keep `response_model`
    for the OpenAPI document; FastAPI skips its own (slower, identical) validation and encoding."""
    return Response(model_json(model, data, **fields), media_type="application/json")
