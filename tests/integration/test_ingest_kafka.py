"""Ingest on the real Kafka + schema registry: exact counts, wire format, DLQ, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from k2 import schemas
from k2.ingest.pipeline import ingest_files, register_schemas
from k2.schemas.registry import SchemaIncompatible, client, register, value_subject
from k2.schemas.wire import AvroDecoder
from k2.sources.asx import discover

pytestmark = pytest.mark.integration
CSV_ROWS = {"trades": 200_545, "quotes": 169_629}


@pytest.mark.asx
def test_whole_asx_sample_is_produced_exactly_in_order_and_decodable(asx_root, embedded_settings, drain):
    summary = ingest_files(asx_root, embedded_settings)
    assert summary.balanced and summary.rejected_total == 0
    decoder = AvroDecoder(client(embedded_settings.registry_url))
    registry = client(embedded_settings.registry_url)
    for kind, rows in CSV_ROWS.items():
        topic = embedded_settings.topic(kind)
        messages = drain(embedded_settings.kafka_bootstrap, topic)
        assert summary.produced[topic] == rows == len(messages)
        confluent = AvroDeserializer(registry)
        last: dict[tuple[str, int], int] = {}
        partitions_of: dict[str, set[int]] = defaultdict(set)
        for i, msg in enumerate(messages):
            _, record = decoder.decode(msg.value())
            assert msg.key().decode() == record["symbol"]
            partitions_of[record["symbol"]].add(msg.partition())
            key = (record["symbol"], record["exchange_date"])
            assert record["sequence_number"] == last.get(key, 0) + 1, f"order broken at {key}"
            last[key] = record["sequence_number"]
            if i % 997 == 0:  # Confluent's own deserializer agrees on the bytes
                theirs = confluent(msg.value(), SerializationContext(topic, MessageField.VALUE))
                assert theirs["sequence_number"] == record["sequence_number"]
                assert theirs["symbol"] == record["symbol"]
        assert all(len(p) == 1 for p in partitions_of.values()), "a symbol must map to one partition"


def test_prices_survive_the_wire_exactly(tmp_path, embedded_settings, drain):
    root = tmp_path / "ticks"
    for folder in ("trades", "quotes", "reference-data"):
        (root / folder).mkdir(parents=True)
    (root / "reference-data" / "company_info.csv").write_text(
        "company_id,symbol,company_name,ISIN,start_date,end_date\n1,ABC,ABC LTD,AU0000000001,01/01/2000,\n")
    (root / "trades" / "1.csv").write_bytes(b"03/10/2014,10:00:00.001,0.001,1,0,,\r\n"
                                            b"03/10/2014,10:00:00.002,123456.123456,2,0,X,B1\r\n")
    (root / "quotes" / "1.csv").write_bytes(b"03/10/2014,05:00:00.000,0.665,0.0,24999,0\r\n")
    ingest_files(root, embedded_settings)
    registry = client(embedded_settings.registry_url)
    deserialize = AvroDeserializer(registry)
    topic = embedded_settings.topic("trades")
    trades = [deserialize(m.value(), SerializationContext(topic, MessageField.VALUE))
              for m in drain(embedded_settings.kafka_bootstrap, topic)]
    assert [str(t["price"].normalize()) for t in trades] == ["0.001", "123456.123456"]
    assert trades[1]["venue"] == "X" and trades[1]["buyer_id"] == "B1"
    assert trades[0]["exchange_timestamp"].isoformat() == "2014-03-09T23:00:00.001000+00:00"
    qtopic = embedded_settings.topic("quotes")
    quote = deserialize(drain(embedded_settings.kafka_bootstrap, qtopic)[0].value(),
                        SerializationContext(qtopic, MessageField.VALUE))
    assert quote["is_one_sided"] and str(quote["ask_price"].normalize()) == "0"


@pytest.mark.asx
def test_injected_bad_rows_go_to_the_dlq_and_nothing_else_is_lost(asx_root, asx_companies, tmp_path, embedded_settings,
                                                                  drain):
    root = asx_companies(asx_root, tmp_path / "bad", ("7181", "3153"))
    bad_rows = ["03/11/2014,10:00:01.000,0.665,100,0,\r\n",  # column count
                "03/11/2014,10:00:01.000,zero,100,0,,\r\n",  # unparsable price
                "02/30/2014,10:00:01.000,0.665,100,0,,\r\n",  # impossible date
                "03/11/2014,10:00:01.000,0.665,-100,0,,\r\n"]  # negative size
    path = root / "trades" / "7181.csv"
    lines = path.read_bytes().decode().splitlines(keepends=True)
    original = len(lines)
    for i, row in enumerate(bad_rows):
        lines.insert(10 + i * 37, row)
    path.write_text("".join(lines), newline="")
    qpath = root / "quotes" / "7181.csv"
    qpath.write_bytes(qpath.read_bytes() + b"03/14/2014,16:00:00.000,0.66,abc,100,100\r\n")

    summary = ingest_files(root, embedded_settings)
    assert summary.balanced
    assert summary.rejected == {"column_count": 1, "bad_number": 2, "bad_date": 1, "negative_value": 1}
    assert summary.produced[embedded_settings.topic("trades")] == original + 11  # DVN 232 + MWR 11 = 243
    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    assert len(letters) == 5
    assert {(letter["reason"], letter["line"] + "\r\n") for letter in letters if "7181" in letter["source"]
            and "trades" in letter["source"]} == {(r, row) for r, row in zip(
                ("column_count", "bad_number", "bad_date", "negative_value"), bad_rows, strict=True)}
    assert all(letter["line_number"] > 0 and letter["stage"] == "ingest" for letter in letters)


def test_dlq_file_in_local_mode(tmp_path, embedded_settings):
    root = tmp_path / "t"
    for folder in ("trades", "quotes", "reference-data"):
        (root / folder).mkdir(parents=True)
    (root / "reference-data" / "company_info.csv").write_text(
        "company_id,symbol,company_name,ISIN,start_date,end_date\n1,ABC,ABC LTD,,,\n")
    (root / "trades" / "1.csv").write_bytes(b"03/10/2014,10:00:00.001,1.5,1,0,,\r\nnot,a,row\r\n")
    dlq = tmp_path / "dlq.jsonl"
    summary = ingest_files(root, embedded_settings, dlq_file=dlq)
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert summary.balanced and len(letters) == 1 and letters[0]["line_number"] == 2
    assert letters[0]["reason"] == "column_count" and letters[0]["line"] == "not,a,row"


def test_incompatible_schema_fails_before_anything_is_produced(tmp_path, embedded_settings, drain):
    register_schemas(embedded_settings, ("trades",))
    registry = client(embedded_settings.registry_url)
    subject = value_subject(embedded_settings.topic("trades"))
    evolved = json.loads(json.dumps(schemas.avro_schema("trades")))
    evolved["fields"].append({"name": "trade_id", "type": ["null", "string"], "default": None})
    assert register(registry, subject, evolved).version == 2  # compatible: optional field

    broken = json.loads(json.dumps(schemas.avro_schema("trades")))
    broken["fields"].append({"name": "venue_code", "type": "string"})  # required, no default
    with pytest.raises(SchemaIncompatible, match="not BACKWARD-compatible"):
        register(registry, subject, broken)
    assert registry.get_versions(subject) == [1, 2]  # the refused schema left no version behind
    assert registry.get_compatibility(subject) == "BACKWARD"


@pytest.mark.asx
def test_a_killed_producer_rerun_yields_identical_sequence_numbers(asx_root, asx_companies, tmp_path,
                                                                   embedded_settings, drain):
    """SIGKILL with part of the messages delivered and part in flight, then a whole rerun: every
    message of the killed run is produced again under the same key with the same content.

    The run kills itself at its 7th checkpoint (`K2_TEST_CRASH_AT`), 7 x 20,000 lines in: a kill
    from outside cannot be timed, as the whole run can end before a watcher sees its first message.
    The producer drains its queue every 100,000 messages, so by then some are surely delivered, and
    the last slice was handed over microseconds before the kill, so some are surely not."""
    root = asx_companies(asx_root, tmp_path / "kill", ("7078", "7458"))
    total = 91_631 + 108_671
    env = {**os.environ, **embedded_settings.to_env(), "K2_LOG_LEVEL": "WARNING",
           "K2_TEST_CRASH_AT": "ingest_checkpoint@7"}
    k2 = str(Path(sys.executable).with_name("k2"))
    first = subprocess.run([k2, "ingest", "asx", str(root), "--topics", "trades", "--no-progress"], env=env,
                           timeout=300)
    assert first.returncode == -signal.SIGKILL, "the producer should have killed itself at its 7th checkpoint"
    topic = embedded_settings.topic("trades")
    partial = drain(embedded_settings.kafka_bootstrap, topic)
    assert 0 < len(partial) < total, "the producer should have been killed mid-run"

    ingest_files(root, embedded_settings, kinds=("trades",), with_reference=False)
    decoder = AvroDecoder(client(embedded_settings.registry_url))
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for msg in drain(embedded_settings.kafka_bootstrap, topic):
        record = decoder.decode(msg.value())[1]
        record.pop("ingest_timestamp")
        by_key[(record["symbol"], record["exchange_date"], record["sequence_number"])].append(record)
    assert len(by_key) == total
    # every key produced by the killed run was produced again with identical content
    assert all(len(v) in (1, 2) and all(r == v[0] for r in v) for v in by_key.values())
    assert sum(len(v) for v in by_key.values()) == len(partial) + total


def test_discover_rejects_a_folder_without_reference_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"company_info\.csv"):
        discover(tmp_path)
