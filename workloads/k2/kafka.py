"""Kafka client settings shared by every K2 process that produces (ingest, the stream's DLQ, feeds)."""

from __future__ import annotations

from typing import Any

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
