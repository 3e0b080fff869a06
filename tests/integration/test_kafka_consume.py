"""`k2.kafka.consume_available` on the real broker: a message that is there is returned at once,
not after the wait meant for an empty topic (the hub and the stream writer read with it)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from k2 import topics
from k2.kafka import consume_available

pytestmark = pytest.mark.integration


def test_returns_what_is_there_at_once_and_waits_only_when_nothing_is(embedded_settings):
    topics.ensure_pipeline_topics(embedded_settings, ("trades",))
    topic = embedded_settings.topic("trades")
    consumer = Consumer({"bootstrap.servers": embedded_settings.kafka_bootstrap, "group.id": topic,
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        started = time.monotonic()
        assert consume_available(consumer, 2000, timeout=1) == []
        assert time.monotonic() - started >= 0.9, "an empty topic is waited on for the timeout"

        producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
        producer.produce(topic, b"one", b"BHP")
        producer.flush(30)
        # consume(2000, timeout=20) would hold this single message for the whole 20 s
        started = time.monotonic()
        messages = consume_available(consumer, 2000, timeout=20)
        assert [m.value() for m in messages] == [b"one"]
        assert time.monotonic() - started < 10
    finally:
        consumer.close()
