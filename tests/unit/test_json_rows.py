"""Arrow rows to JSON column at a time: byte for byte what pydantic writes for the same rows."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from k2.api.jsonrows import rows_text
from k2.rows import to_rows

_TEXT = st.text(alphabet=st.sampled_from(['a', 'Z', '"', '\\', '\n', '\x01', '/', 'é', '€', ' ']), max_size=6)
_INSTANT = st.datetimes(min_value=dt.datetime(1000, 1, 1), max_value=dt.datetime(9999, 12, 31),
                        timezones=st.just(dt.UTC))
_PRICE = st.decimals(min_value=Decimal("-999999999999.999999"), max_value=Decimal("999999999999.999999"), places=6)
_VALUES = {"symbol": _TEXT, "ts": _INSTANT, "day": st.dates(), "price": _PRICE,
           "volume": st.integers(-(2**63), 2**63 - 1), "flag": st.booleans()}
# Columns of nulls and values, and columns without a null (which take their own path).
_ROWS = st.booleans().flatmap(lambda nulls: st.lists(st.fixed_dictionaries(
    {k: st.one_of(st.none(), v) if nulls else v for k, v in _VALUES.items()}), max_size=60))
_SCHEMA = pa.schema([("symbol", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("day", pa.date32()),
                     ("price", pa.decimal128(18, 6)), ("volume", pa.int64()), ("flag", pa.bool_())])


def rows_json(data: pa.Table | pa.RecordBatch) -> bytes:
    return b"[" + bytes(rows_text(data)) + b"]"


@settings(max_examples=150, deadline=None)
@given(rows=_ROWS, cut=st.integers(0, 60))
def test_rows_json_writes_what_pydantic_writes_for_whole_and_sliced_tables(rows, cut):
    table = pa.Table.from_pylist(rows, _SCHEMA)
    middle = table.slice(min(cut // 2, table.num_rows), 20)  # its neighbours' strings on both sides
    tail = table.slice(min(cut, table.num_rows))
    for data in (table, middle, tail, *tail.to_batches()):
        assert rows_json(data) == to_json(to_rows(data))


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries(_VALUES), min_size=20, max_size=40), null_at=st.integers(0, 19))
def test_a_single_null_in_a_column_of_values_is_written_as_null(rows, null_at):
    table = pa.Table.from_pylist([{k: None if i == null_at else v for k, v in row.items()}
                                  for i, row in enumerate(rows)], _SCHEMA)
    assert rows_json(table) == to_json(to_rows(table))
