"""Kafka client settings shared by every K2 process that produces (ingest, the stream's DLQ, feeds)
or reads a backlog (the stream, the API's catch-up), and the consumer group names the stream and
the operator agree on."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Message

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # implies acks=all, bounded in-flight, ordered retries per partition
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "batch.num.messages": 100_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "message.timeout.ms": 120_000,
}

# How librdkafka paces its fetches, for the consumers that read a backlog (the stream, the API's
# catch-up). With its defaults the stream's consumer read the ASX sample's trades at 124k msg/s,
# which bounded the stream's rows/s; with these at 0.5-1.0M (benchmarks/bench_consume.py).
# - `fetch.queue.backoff.ms` (1 s) is how long it waits to fetch again once a partition's local
#   queue held its fill (`queued.min.messages`), however soon the consumer drains it.
# - `fetch.wait.max.ms` (500 ms) is how long the broker holds a fetch of partitions with nothing
#   new. A fresh assignment's first fetch is of the partitions whose start offsets resolved first,
#   often the empty ones, so the first message came 0.5 s after every assignment.
# An idle consumer asks the broker 20 times a second instead of twice.
FETCH_PACING: dict[str, Any] = {"fetch.queue.backoff.ms": 50, "fetch.wait.max.ms": 50}


def coordinates(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message: only error events lack them."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"an error event, not a message: {msg.error()}")
    return topic, partition, offset


def consume_available(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """What the consumer holds now, up to `max_messages`; only when it holds nothing, wait up to
    `timeout` for a first message. `consume(n, timeout)` alone waits until it has n messages or
    the timeout passed, which at a low rate delays every message by the whole timeout."""
    messages = consumer.consume(num_messages=max_messages, timeout=0)
    if not messages:
        messages = consumer.consume(num_messages=1, timeout=timeout)
        if messages and max_messages > 1:
            messages += consumer.consume(num_messages=max_messages - 1, timeout=0)
    return messages


def table_group(prefix: str, table: str) -> str:
    """The consumer group of one table's writer under `k2 stream run --group-id <prefix>`: the
    operator reads its committed offsets to tell how far the table lags."""
    return f"{prefix}-{table}"
