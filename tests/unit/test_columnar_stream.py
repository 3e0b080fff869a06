"""The stream writer's batch decoding: per schema id, poison to the DLQ with its offset, good
records in arrival order across writer schemas."""

from __future__ import annotations

import copy
import types

import fastavro
import pytest

from k2 import exchanges, schemas
from k2.schemas.wire import AvroEncoder, PoisonMessage
from k2.stream.writer import Batch, TableWriter

pytestmark = pytest.mark.unit
V1 = schemas.avro_schema("trades")
V2 = copy.deepcopy(V1)
V2["fields"].append({"name": "trade_id", "type": ["null", "string"], "default": None})
V3 = copy.deepcopy(V1)  # a schema that lets the key be null
V3["fields"][4]["type"] = ["null", "long"]


class _Registry:
    def writer_schema_json(self, schema_id: int) -> dict:
        if schema_id not in (1, 2, 3):
            raise PoisonMessage("unknown_schema_id", f"schema id {schema_id}: not found")
        return {1: V1, 2: V2, 3: V3}[schema_id]


def _trade(seq: int | None, **extra) -> dict:
    return {"symbol": "BHP", "exchange": "ASX", "exchange_timestamp": 1_394_406_000_000_000 + (seq or 0),
            "exchange_date": 16139, "sequence_number": seq, "price": (36_500_000).to_bytes(4, "big"),
            "volume": 100, "qualifiers": None, "venue": None, "buyer_id": None, "ingest_timestamp": 0,
            "source_id": "t", **extra}


def _encode(schema_id: int, schema: dict, record: dict) -> bytes:
    return AvroEncoder(schema_id, fastavro.parse_schema(schemas.strip_logical_types(schema))).encode(record)


def test_batch_decoding_routes_poison_and_keeps_arrival_order():
    good_v1 = _encode(1, V1, _trade(1))
    truncated = good_v1[:-3]
    payloads = [good_v1, b"not avro at all", _encode(2, V2, _trade(2, trade_id="T-2")), None,
                b"\x00\x7f\xff\xff\xf0garbage", truncated, _encode(3, V3, _trade(None)), _encode(1, V1, _trade(3)),
                _encode(2, V2, _trade(4)), b"\x00\x00\x00\x00\x01\x06abc"]
    batch = Batch()
    batch.extend([offset % 2 for offset in range(len(payloads))], [100 + offset for offset in range(len(payloads))],
                 payloads)
    writer = types.SimpleNamespace(decoder=_Registry(), keys=("symbol", "exchange_date", "sequence_number"),
                                   topic="t.trades", exchange=exchanges.get("ASX"))
    writer._decode_group = lambda *args: TableWriter._decode_group(writer, *args)
    data, schema_ids, letters = TableWriter._decode(writer, batch)

    assert data["sequence_number"].to_pylist() == [1, 2, 3, 4]  # arrival order across schema ids 1 and 2
    assert data["trade_id"].to_pylist() == [None, "T-2", None, None]
    assert schema_ids == {1, 2}
    reasons = [(x.offset, x.partition, x.reason) for x in letters]
    assert reasons == [(101, 1, "not_confluent_avro"), (103, 1, "not_confluent_avro"), (104, 0, "unknown_schema_id"),
                       (105, 1, "undecodable"), (106, 0, "missing_key"), (109, 1, "undecodable")]
    assert letters[3].payload_b64 and "sequence_number" in letters[4].detail
