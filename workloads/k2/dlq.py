"""Dead-letter queue: whatever a stage cannot accept goes here with the reason, never silently away.

Records are JSON so that a person can read them with any Kafka tool; the original line (ingest) or
the original payload, base64 (stream), is kept so that a fixed record can be replayed.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from confluent_kafka import Producer

from k2.kafka import PRODUCER_DEFAULTS
from k2.observability import ROWS_REJECTED
from k2.settings import Settings


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stage: str
    reason: str
    detail: str
    source: str  # file path, or topic
    line_number: int | None = None
    line: str | None = None
    partition: int | None = None
    offset: int | None = None
    payload_b64: str | None = None
    rejected_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @classmethod
    def for_payload(cls, *, stage: str, reason: str, detail: str, topic: str, partition: int, offset: int,
                    payload: bytes | None) -> DeadLetter:
        encoded = base64.b64encode(payload).decode() if payload is not None else None
        return cls(stage=stage, reason=reason, detail=detail, source=topic, partition=partition, offset=offset,
                   payload_b64=encoded)

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}).encode()


class DeadLetterSink(Protocol):
    def send(self, letter: DeadLetter) -> None: ...
    def flush(self) -> None: ...


class FileDeadLetters:
    """JSON lines in a local file (local mode)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("ab")
        self.count = 0

    def send(self, letter: DeadLetter) -> None:
        self._file.write(letter.to_json() + b"\n")
        self.count += 1
        ROWS_REJECTED.labels(letter.stage, letter.reason).inc()

    def flush(self) -> None:
        self._file.flush()


class KafkaDeadLetters:
    """The DLQ topic, produced with the same idempotent producer settings as the data."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.count = 0

    def send(self, letter: DeadLetter) -> None:
        self.producer.produce(self.topic, key=letter.reason.encode(), value=letter.to_json())
        self.count += 1
        ROWS_REJECTED.labels(letter.stage, letter.reason).inc()

    def flush(self) -> None:
        remaining = self.producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} dead letters not acknowledged by Kafka within 30s")


def open_sink(settings: Settings, dlq_file: Path | None, producer: Producer | None = None) -> DeadLetterSink:
    """The file when one is given (local mode), else the DLQ topic through `producer` (by default an
    idempotent one of its own)."""
    if dlq_file:
        return FileDeadLetters(dlq_file)
    if producer is None:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS})
    return KafkaDeadLetters(producer, settings.dlq_topic)
