"""Record shapes: the `.avsc` files beside this module are the single source of truth.

The Arrow schema (stream decoding, query columns) and the Iceberg schema (tables, the operator's
`fromSubject`) are derived from the Avro schema here, never written out a second time.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any, cast

import fastavro
import pyarrow as pa
from pyiceberg.schema import Schema as IcebergSchema
from pyiceberg.utils.schema_conversion import AvroSchemaConversion

from k2.settings import TableKind

_AVSC = {"trades": "trade.avsc", "quotes": "quote.avsc", "reference": "reference.avsc"}
PRICE_PRECISION, PRICE_SCALE = 18, 6


@cache
def avro_schema(kind: TableKind) -> dict[str, Any]:
    """The Avro schema as a dict (the text registered in the Schema Registry)."""
    text = resources.files("k2.schemas").joinpath("avro", _AVSC[kind]).read_text()
    return json.loads(text)


def strip_logical_types(avro_type: Any) -> Any:
    """The physical schema: same binary encoding, but fastavro reads and writes plain ints and
    bytes instead of Decimal/datetime objects, which costs several µs per record each way."""
    if isinstance(avro_type, list):
        return [strip_logical_types(t) for t in avro_type]
    if isinstance(avro_type, dict):
        if "logicalType" in avro_type:
            return avro_type["type"]
        if avro_type.get("type") == "record":
            return {**avro_type, "fields": [{**f, "type": strip_logical_types(f["type"])}
                                            for f in avro_type["fields"]]}
    return avro_type


@cache
def physical_schema(kind: TableKind) -> dict[str, Any]:
    return cast(dict[str, Any], fastavro.parse_schema(strip_logical_types(avro_schema(kind))))  # a record


def _arrow_type(avro_type: Any) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) for a flat Avro field type."""
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        if len(non_null) != 1:
            raise ValueError(f"only [null, T] unions are supported, got {avro_type}")
        return _arrow_type(non_null[0])[0], "null" in avro_type
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical == "timestamp-micros":
            return pa.timestamp("us", tz="UTC"), False
        if logical == "date":
            return pa.date32(), False
        if logical == "decimal":
            return pa.decimal128(avro_type["precision"], avro_type.get("scale", 0)), False
        return _arrow_type(avro_type["type"])
    primitive = {"string": pa.string(), "long": pa.int64(), "int": pa.int32(), "boolean": pa.bool_(),
                 "double": pa.float64(), "float": pa.float32(), "bytes": pa.binary()}
    return primitive[avro_type], False


def arrow_schema_from_avro(schema: dict[str, Any]) -> pa.Schema:
    fields = []
    for field in schema["fields"]:
        arrow_type, nullable = _arrow_type(field["type"])
        fields.append(pa.field(field["name"], arrow_type, nullable=nullable))
    return pa.schema(fields)


def arrow_schema(kind: TableKind) -> pa.Schema:
    return arrow_schema_from_avro(avro_schema(kind))


def iceberg_schema_from_avro(schema: dict[str, Any]) -> IcebergSchema:
    """Iceberg schema for a flat Avro record; field ids are positional (the catalog reassigns)."""
    with_ids = copy.deepcopy(schema)
    for position, field in enumerate(with_ids["fields"], start=1):
        field["field-id"] = position
        # Avro timestamp-micros is an instant (UTC) in K2: Iceberg's timestamptz.
        ftype = field["type"]
        for candidate in ftype if isinstance(ftype, list) else [ftype]:
            if isinstance(candidate, dict) and candidate.get("logicalType") == "timestamp-micros":
                candidate["adjust-to-utc"] = True
    return AvroSchemaConversion().avro_to_iceberg(with_ids)


def iceberg_schema(kind: TableKind) -> IcebergSchema:
    return iceberg_schema_from_avro(avro_schema(kind))
