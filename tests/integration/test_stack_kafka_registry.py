"""Kafka and the schema registry of the local stack, driven by confluent-kafka's own clients.

The services run from a throwaway state folder on free ports, so a developer's running stack
is neither needed nor touched; the downloads in the cache are shared.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from k2.stack.base import free_port
from k2.stack.kafka import Kafka
from k2.stack.registry import SchemaRegistry

pytestmark = pytest.mark.integration

TRADE_V1 = {
    "type": "record", "name": "Trade", "namespace": "k2.test",
    "fields": [
        {"name": "symbol", "type": "string"},
        {"name": "price", "type": "double"},
        {"name": "qty", "type": "long"},
    ],
}
# A reader on V1 data cannot fill `venue`: BACKWARD must refuse it.
TRADE_REQUIRED_FIELD = {**TRADE_V1, "fields": [*TRADE_V1["fields"], {"name": "venue", "type": "string"}]}
# The same field, optional with a default: a BACKWARD-compatible evolution.
TRADE_OPTIONAL_FIELD = {**TRADE_V1, "fields": [*TRADE_V1["fields"],
                                               {"name": "venue", "type": ["null", "string"], "default": None}]}



@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kafka, SchemaRegistry]]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("K2_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        for var in ("K2_KAFKA_PORT", "K2_KAFKA_CONTROLLER_PORT", "K2_REGISTRY_PORT", "K2_REGISTRY_MANAGEMENT_PORT"):
            env.setenv(var, str(free_port()))
        kafka = Kafka()
        registry = SchemaRegistry(kafka=kafka)
        try:
            kafka.start()
            registry.start()
            yield kafka, registry
        finally:
            registry.stop()
            kafka.stop()
        assert registry.pid() is None and kafka.pid() is None


def _new_topic(kafka: Kafka) -> str:
    topic = f"test.trades.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    return topic


def _consume_one(kafka: Kafka, topic: str) -> bytes:
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"test-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            return msg.value()
        pytest.fail(f"no message arrived on {topic} within 60 s")
    finally:
        consumer.close()


def test_broker_is_a_single_kraft_node(stack: tuple[Kafka, SchemaRegistry]) -> None:
    kafka, _ = stack
    metadata = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10)
    assert [f"{b.host}:{b.port}" for b in metadata.brokers.values()] == [kafka.bootstrap]
    assert metadata.controller_id == 1


def test_avro_round_trip_through_registry(stack: tuple[Kafka, SchemaRegistry]) -> None:
    kafka, registry = stack
    topic = _new_topic(kafka)
    client = SchemaRegistryClient({"url": registry.url, "timeout": 30})
    trade = {"symbol": "BHP", "price": 37.12, "qty": 100}

    serializer = AvroSerializer(client, json.dumps(TRADE_V1))
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    producer.produce(topic, value=serializer(trade, SerializationContext(topic, MessageField.VALUE)))
    assert producer.flush(30) == 0

    raw = _consume_one(kafka, topic)
    magic, schema_id = struct.unpack(">bI", raw[:5])
    registered = client.get_latest_version(f"{topic}-value")
    assert (magic, schema_id) == (0, registered.schema_id)
    assert registered.version == 1
    assert json.loads(registered.schema.schema_str)["name"] == "Trade"

    # A fresh client, so the schema is fetched from the registry by id rather than from a cache.
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry.url, "timeout": 30}))
    assert deserializer(raw, SerializationContext(topic, MessageField.VALUE)) == trade


def test_backward_compatibility_is_enforced_per_subject(stack: tuple[Kafka, SchemaRegistry]) -> None:
    _, registry = stack
    client = SchemaRegistryClient({"url": registry.url, "timeout": 30})
    subject = f"compat-{uuid.uuid4().hex[:8]}-value"
    client.register_schema(subject, Schema(json.dumps(TRADE_V1), "AVRO"))
    client.set_compatibility(subject, "BACKWARD")
    assert client.get_compatibility(subject) == "BACKWARD"

    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, Schema(json.dumps(TRADE_REQUIRED_FIELD), "AVRO"))
    assert refused.value.http_status_code == 409
    assert client.get_versions(subject) == [1]

    client.register_schema(subject, Schema(json.dumps(TRADE_OPTIONAL_FIELD), "AVRO"))
    assert client.get_versions(subject) == [1, 2]
    latest = client.get_latest_version(subject)
    assert latest.version == 2
    assert json.loads(latest.schema.schema_str)["fields"][-1]["name"] == "venue"


def test_topics_are_not_auto_created(stack: tuple[Kafka, SchemaRegistry]) -> None:
    kafka, _ = stack
    topic = f"test.never-created.{uuid.uuid4().hex[:8]}"
    errors: list[KafkaError | None] = []
    # librdkafka waits this long for a missing topic to appear before failing the message with
    # the broker's own answer (default 30 s).
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "topic.metadata.propagation.max.ms": 1000})
    producer.produce(topic, value=b"x", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(30)

    assert len(errors) == 1 and errors[0] is not None, errors
    assert errors[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART, errors[0]
    assert topic not in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics


def test_schemas_survive_a_registry_restart(stack: tuple[Kafka, SchemaRegistry]) -> None:
    _, registry = stack
    subject = f"durable-{uuid.uuid4().hex[:8]}-value"
    client = SchemaRegistryClient({"url": registry.url, "timeout": 30})
    schema_id = client.register_schema(subject, Schema(json.dumps(TRADE_V1), "AVRO"))
    client.set_compatibility(subject, "FULL")

    registry.stop()
    assert registry.status() == "stopped"
    registry.start()

    # Fresh client: everything below comes from the restarted registry's replay of Kafka.
    client = SchemaRegistryClient({"url": registry.url, "timeout": 30})
    assert client.get_versions(subject) == [1]
    assert client.get_compatibility(subject) == "FULL"
    assert json.loads(client.get_schema(schema_id).schema_str) == json.loads(json.dumps(TRADE_V1))
