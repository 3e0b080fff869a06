"""The ingest producer's accounting on the real Kafka: what it calls delivered is what Kafka
acknowledged, whether it is told of every delivery (live feeds) or only of refusals (bulk loads)."""

from __future__ import annotations

import os

import pytest

from k2 import topics
from k2.ingest import producer as producer_module
from k2.ingest.producer import DeliveryFailed, TickProducer
from k2.observability import MESSAGES_PRODUCED

pytestmark = pytest.mark.integration


@pytest.fixture
def small_topics(kafka, unique: str) -> tuple[str, str]:
    """Two topics; the second refuses batches over 1,000 bytes."""
    admin = topics.admin_client(kafka.bootstrap)
    names = (f"producer.{unique}.a", f"producer.{unique}.b")
    topics.ensure_topic(admin, topics.TopicSpec(names[0], 3))
    topics.ensure_topic(admin, topics.TopicSpec(names[1], 3, config={"max.message.bytes": "1000"}))
    return names


def _produced_metric(topic: str) -> float:
    return MESSAGES_PRODUCED.labels(topic)._value.get()


@pytest.mark.parametrize("bulk", [False, True], ids=["each-delivery", "bulk"])
def test_delivered_counts_what_kafka_acknowledged_and_not_what_it_refused(kafka, small_topics, bulk, monkeypatch):
    monkeypatch.setattr(producer_module, "_BULK_DRAIN_EVERY", 1_000)
    a, b = small_topics
    tick = TickProducer(kafka.bootstrap, bulk=bulk)
    tick.produce_many(a, b"K", [b"x" * 50] * 2_000)
    for _ in range(500):
        tick.produce(a, b"K", b"x" * 50)
    for _ in range(4):
        tick.produce(b, b"K", os.urandom(2_000))  # incompressible: too large for topic b
    with pytest.raises(DeliveryFailed, match="refused 4 messages"):
        tick.flush()
    assert tick.delivered == {a: 2_500}
    assert tick.delivered_bytes == {a: 2_500 * 50}
    assert tick.failed == {b: 4}
    assert (_produced_metric(a), _produced_metric(b)) == (2_500, 0)


def test_a_bulk_load_keeps_its_metrics_current_before_the_end(kafka, small_topics, monkeypatch):
    monkeypatch.setattr(producer_module, "_BULK_DRAIN_EVERY", 1_000)
    a, _ = small_topics
    tick = TickProducer(kafka.bootstrap, bulk=True)
    for _ in range(5):
        tick.produce_many(a, b"K", [b"x" * 50] * 500)
    assert tick.delivered[a] == 2_000 and _produced_metric(a) == 2_000  # drained at 1,000 and 2,000
    tick.flush()
    assert tick.delivered[a] == 2_500 and _produced_metric(a) == 2_500
