"""The columnar Avro codec against fastavro: same bytes out, same values in, garbage flagged."""

from __future__ import annotations

import datetime as dt
import io
import math
import struct
from decimal import Decimal

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2 import schemas
from k2.rows import to_rows
from k2.schemas import arrow_schema_from_avro, columnar, strip_logical_types
from k2.sources.asx import unscaled_bytes

pytestmark = pytest.mark.unit
HEADER = b"\x00\x00\x00\x01\x2a"
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# what Python's datetime and date hold, as Avro's timestamp-micros and date
MICROS = ((dt.datetime.min.replace(tzinfo=dt.UTC) - EPOCH) // dt.timedelta(microseconds=1),
          (dt.datetime.max.replace(tzinfo=dt.UTC) - EPOCH) // dt.timedelta(microseconds=1))
DAYS = (dt.date.min.toordinal() - EPOCH.date().toordinal(), dt.date.max.toordinal() - EPOCH.date().toordinal())

# field type → strategy of physical values (what fastavro writes for the stripped schema)
BASE_TYPES = {
    "long": INT64,
    "int": INT32,
    "boolean": st.booleans(),
    "double": st.floats(allow_nan=False),
    "float": st.floats(allow_nan=False, width=32),
    "string": st.text(max_size=40),
    "bytes": st.binary(max_size=40),
    "timestamp": st.integers(*MICROS),
    "date": st.integers(*DAYS),
}


def _avro_type(name: str, scale: int) -> object:
    if name == "timestamp":
        return {"type": "long", "logicalType": "timestamp-micros"}
    if name == "date":
        return {"type": "int", "logicalType": "date"}
    if name == "decimal":
        return {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": scale}
    return name


@st.composite
def schemas_and_records(draw, max_records: int = 12):
    specs = draw(st.lists(st.tuples(st.sampled_from([*BASE_TYPES, "decimal"]), st.integers(0, 6),
                                    st.sampled_from(["plain", "null_first", "null_last"])), min_size=1, max_size=8))
    fields, strategies = [], []
    for i, (name, scale, nullable) in enumerate(specs):
        ftype = _avro_type(name, scale)
        values = (st.integers(-(10**18) + 1, 10**18 - 1) if name == "decimal" else BASE_TYPES[name])
        if nullable != "plain":
            ftype = ["null", ftype] if nullable == "null_first" else [ftype, "null"]
            values = st.none() | values
        fields.append({"name": f"f{i}", "type": ftype})
        strategies.append(values)
    schema = {"type": "record", "name": "R", "namespace": "t", "fields": fields}
    records = draw(st.lists(st.tuples(*strategies), max_size=max_records))
    return schema, [dict(zip((f["name"] for f in fields), r, strict=True)) for r in records]


def _physical(schema: dict, record: dict) -> dict:
    """The record as fastavro writes it with the stripped schema: decimals as unscaled bytes."""
    out = {}
    for fld in schema["fields"]:
        value = record[fld["name"]]
        out[fld["name"]] = unscaled_bytes(value) if value is not None and _is_decimal(fld["type"]) else value
    return out


def _is_decimal(ftype: object) -> bool:
    types = ftype if isinstance(ftype, list) else [ftype]
    return any(isinstance(t, dict) and t.get("logicalType") == "decimal" for t in types)


def _fastavro_bytes(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(strip_logical_types(schema)), _physical(schema, record))
    return buf.getvalue()


def _table(schema: dict, records: list[dict]) -> pa.Table:
    arrow = arrow_schema_from_avro(schema)
    columns = []
    for fld in arrow:
        values = [r[fld.name] for r in records]
        if pa.types.is_decimal(fld.type):
            values = [None if v is None else Decimal(v).scaleb(-fld.type.scale) for v in values]
        elif pa.types.is_timestamp(fld.type):
            columns.append(pa.array(values, pa.int64()).view(fld.type))
            continue
        elif pa.types.is_date32(fld.type):
            columns.append(pa.array(values, pa.int32()).view(fld.type))
            continue
        columns.append(pa.array(values, fld.type))
    return pa.Table.from_arrays(columns, schema=arrow)


def _fastavro_read(schema: dict, payload: bytes) -> dict | None:
    """fastavro's verdict as K2's AvroDecoder applies it: the record, or None if it fails."""
    buf = io.BytesIO(payload)
    try:
        record = fastavro.schemaless_reader(buf, fastavro.parse_schema(strip_logical_types(schema)), None)
    except Exception:  # noqa: BLE001 - fastavro raises many types on garbage
        return None
    return record if buf.tell() == len(payload) else None


def _rows(table: pa.Table) -> list[dict]:
    """Decoded rows with fastavro's physical values: timestamps and dates as their ints (Python's
    datetime cannot hold all of them), decimals as unscaled ints."""
    columns = {}
    for fld in table.schema:
        column = table[fld.name].combine_chunks()
        if pa.types.is_timestamp(fld.type) or pa.types.is_date32(fld.type):
            column = column.view(pa.int64() if pa.types.is_timestamp(fld.type) else pa.int32())
        values = column.to_pylist()
        if pa.types.is_decimal(fld.type):
            values = [None if v is None else int(v.scaleb(fld.type.scale)) for v in values]
        columns[fld.name] = values
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _same(ours: dict, theirs: dict) -> bool:
    for name, value in theirs.items():
        if isinstance(value, bytes) and isinstance(ours[name], int):  # a decimal's unscaled bytes
            value = int.from_bytes(value, "big", signed=True)
        mine = ours[name]
        if isinstance(value, float) and math.isnan(value):
            if not (isinstance(mine, float) and math.isnan(mine)):
                return False
        elif mine != value or type(mine) is not type(value):
            return False
    return True


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_records())
def test_encode_is_fastavro_byte_for_byte(case):
    schema, records = case
    expected = [HEADER + _fastavro_bytes(schema, r) for r in records]
    assert columnar.encode(_table(schema, records), schema, HEADER) == expected


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_records())
def test_decode_equals_fastavro(case):
    schema, records = case
    payloads = [HEADER + _fastavro_bytes(schema, r) for r in records]
    decoded = columnar.decode(payloads, schema, skip=len(HEADER))
    assert not decoded.bad.any() and decoded.table.schema == arrow_schema_from_avro(schema)
    for ours, payload in zip(_rows(decoded.table), payloads, strict=True):
        assert _same(ours, _fastavro_read(schema, payload[len(HEADER):]))
    assert decoded.table.equals(_table(schema, records))


@given(st.lists(st.integers(-(10**18) + 1, 10**18 - 1), max_size=20), st.integers(0, 6))
def test_decimals_match_fastavros_own_decimal_writer(unscaled, scale):
    """With the logical schema fastavro encodes Decimal values itself: the same bytes."""
    schema = {"type": "record", "name": "D", "fields": [{"name": "p", "type": _avro_type("decimal", scale)}]}
    parsed = fastavro.parse_schema(schema)
    expected = []
    for v in unscaled:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, {"p": Decimal(v).scaleb(-scale)})
        expected.append(buf.getvalue())
    assert columnar.encode(_table(schema, [{"p": v} for v in unscaled]), schema) == expected


@st.composite
def damaged(draw):
    """Payloads of a schema: valid ones cut short, extended, with bytes overwritten, or pure noise."""
    schema, records = draw(schemas_and_records(max_records=8))
    payloads = []
    for record in records:
        payload = bytearray(_fastavro_bytes(schema, record))
        how = draw(st.sampled_from(["keep", "cut", "extend", "overwrite", "noise"]))
        if how == "cut" and payload:
            del payload[draw(st.integers(0, len(payload) - 1)):]
        elif how == "extend":
            payload += draw(st.binary(min_size=1, max_size=4))
        elif how == "overwrite" and payload:
            for _ in range(draw(st.integers(1, 3))):
                payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
        elif how == "noise":
            payload = bytearray(draw(st.binary(max_size=30)))
        payloads.append(bytes(payload))
    return schema, payloads


# What the codec flags although fastavro reads it (see the module docstring); anything else it
# flags must be something fastavro rejects too.
STRICTER = ("varint longer than 10 bytes", "union branch index out of range", "int out of range",
            "decimal wider than 8 bytes", "decimal beyond precision", "beyond the years 1–9999")


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_garbage_never_crashes_and_every_bad_message_is_flagged(case):
    schema, payloads = case
    decoded = columnar.decode([HEADER + p for p in payloads], schema, skip=len(HEADER))
    assert len(decoded.bad) == len(payloads) and decoded.table.num_rows == int((~decoded.bad).sum())
    assert set(decoded.errors) == set(np.flatnonzero(decoded.bad).tolist())
    good = iter(_rows(decoded.table))
    for i, payload in enumerate(payloads):
        theirs = _fastavro_read(schema, payload)
        if decoded.bad[i]:
            assert theirs is None or any(s in decoded.errors[i] for s in STRICTER), decoded.errors[i]
        else:
            assert theirs is not None and _same(next(good), theirs)


def test_short_payloads_and_a_schema_beyond_the_codec():
    schema = schemas.avro_schema("trades")
    decoded = columnar.decode([b"", b"\x00\x00"], schema, skip=5)
    assert decoded.bad.tolist() == [True, True] and decoded.table.num_rows == 0
    assert columnar.decode([], schema).table.num_rows == 0
    nested = {"type": "record", "name": "N", "fields": [{"name": "xs", "type": {"type": "array", "items": "long"}}]}
    with pytest.raises(columnar.Unsupported):
        columnar.decode([b"\x00"], nested)
    with pytest.raises(columnar.Unsupported):
        columnar.encode(pa.table({"xs": [[1]]}), nested)


def test_a_null_in_a_required_field_is_refused():
    schema = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}]}
    with pytest.raises(ValueError, match="not nullable"):
        columnar.encode(pa.table({"a": pa.array([1, None])}), schema)


def test_confluent_schema_ids():
    payloads = [b"\x00" + struct.pack(">I", 7) + b"x", None, b"\x00\x00", b"\x01\x00\x00\x00\x07",
                b"\x00\xff\xff\xff\xff"]
    assert columnar.confluent_schema_ids(payloads).tolist() == [7, -1, -1, -1, 2**32 - 1]
    assert columnar.confluent_schema_ids([b"\x00\x00\x00\x00\x03"]).tolist() == [3]


def _same_row(ours: dict, theirs: dict) -> bool:
    """Equal, NaN included (an overwritten float may read as one)."""
    return ours.keys() == theirs.keys() and all(
        a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        for a, b in zip(ours.values(), theirs.values(), strict=True))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_decode_rows_gives_decodes_verdicts_and_rows(case):
    """The push's path for a few messages, one at a time through fastavro, must refuse exactly
    what `decode` refuses and give the rows `to_rows` makes of `decode`'s table, whatever the bytes."""
    schema, payloads = case
    framed = [HEADER + p for p in payloads]
    decoded = columnar.decode(framed, schema, skip=len(HEADER))
    expected = list(zip(np.flatnonzero(~decoded.bad).tolist(), to_rows(decoded.table), strict=True))
    rows = columnar.decode_rows(framed, schema, skip=len(HEADER))
    assert [i for i, _ in rows] == [i for i, _ in expected]
    assert all(_same_row(ours, theirs) for (_, ours), (_, theirs) in zip(rows, expected, strict=True))


def test_decode_rows_leaves_encodings_fastavro_writes_otherwise_to_decode():
    """A varint padded with a 0x80 byte and a boolean byte of 2 are valid for `decode` but not
    what fastavro writes: they must still be read, and a union index of -1 still refused."""
    schema = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"},
                                                         {"name": "b", "type": "boolean"},
                                                         {"name": "o", "type": ["null", "long"]}]}
    padded, two, minus_one = b"\x82\x00\x01\x00", b"\x04\x02\x00", b"\x04\x01\x01\x06"
    rows = columnar.decode_rows([HEADER + p for p in (padded, two, minus_one)], schema, skip=len(HEADER))
    assert rows == [(0, {"n": 1, "b": True, "o": None}), (1, {"n": 2, "b": True, "o": None})]


@pytest.mark.parametrize(("field_type", "value"), [
    ({"type": "long", "logicalType": "timestamp-micros"}, MICROS[1] + 1),
    ({"type": "long", "logicalType": "timestamp-micros"}, MICROS[0] - 1),
    ({"type": "int", "logicalType": "date"}, DAYS[1] + 1),
])
def test_an_instant_or_date_beyond_the_years_1_to_9999_is_refused(field_type, value):
    """Nanoseconds sent as microseconds give an instant 44,000 years on: pyiceberg's statistics,
    the API's JSON and the push cannot hold it, so the stream stopped at its commit. It is now
    refused by the codec, and by its one-by-one path, with the reason."""
    schema = {"type": "record", "name": "R", "fields": [{"name": "t", "type": field_type}]}
    inside = {"t": MICROS[1] if field_type["type"] == "long" else DAYS[1]}
    framed = [HEADER + _fastavro_bytes(schema, {"t": value}), HEADER + _fastavro_bytes(schema, inside)]
    decoded = columnar.decode(framed, schema, skip=len(HEADER))
    assert decoded.bad.tolist() == [True, False] and "beyond the years 1–9999" in decoded.errors[0]
    assert [i for i, _ in columnar.decode_rows(framed, schema, skip=len(HEADER))] == [1]


def test_refusals_are_decodes_for_records_read_by_fastavro():
    """The stream reads a writer schema beyond the codec with fastavro, then builds its table
    itself: the values decode refuses must be refused there too, or the commit fails on them."""
    schema = pa.schema([("t", pa.timestamp("us", tz="UTC")), ("d", pa.date32()), ("i", pa.int32()),
                        ("x", pa.decimal128(38, 2)), ("s", pa.string())])
    fine = {"t": MICROS[1], "d": DAYS[0], "i": -(2**31), "x": (10**38 - 1).to_bytes(17, "big"), "s": "a"}
    records = [fine, {**fine, "t": MICROS[1] + 1}, {**fine, "d": DAYS[1] + 1}, {**fine, "i": 2**31},
               {**fine, "x": (-(10**38)).to_bytes(17, "big", signed=True)}, {"t": None, "s": None}]
    assert columnar.refusals(records, schema) == {1: "t: beyond the years 1–9999", 2: "d: beyond the years 1–9999",
                                                  3: "i: int out of range", 4: "x: decimal beyond precision 38"}


def test_decode_rows_leaves_an_int_fastavro_reads_but_will_not_write_to_decode():
    """Found by the property test: fastavro reads 2**31 for an int, then refuses to write it back."""
    schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": ["null", "int"]}]}
    payload = HEADER + b"\x02\x80\x80\x80\x80\x10"
    assert columnar.decode([payload], schema, skip=len(HEADER)).bad.tolist() == [True]
    assert columnar.decode_rows([payload], schema, skip=len(HEADER)) == []
