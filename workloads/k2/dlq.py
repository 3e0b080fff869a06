"""Dead-letter queue: whatever a stage cannot accept goes here with the reason, never silently away.

Records are JSON so that a person can read them with any Kafka tool; the original line (ingest) or
the original payload, base64 (stream), is kept so that a fixed record can be replayed.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from k2.faults import Transient
from k2.kafka import PRODUCER_DEFAULTS
from k2.observability import ROWS_REJECTED
from k2.settings import Settings

# JSON escapes a character in up to 12 bytes, so 64 Ki characters stay below Kafka's 1 MB message limit.
KEEP_CHARS = 65_536


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
        """The letter as JSON, with at most `KEEP_CHARS` of its line and payload (their full
        sizes then in `line_bytes` / `payload_bytes`): a letter must fit one Kafka message."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        line = fields.get("line")
        if line is not None and len(line) > KEEP_CHARS:
            fields["line_bytes"] = len(line.encode(errors="surrogateescape"))
            fields["line"] = line[:KEEP_CHARS]
        payload = fields.get("payload_b64")
        if payload is not None and len(payload) > KEEP_CHARS:
            fields["payload_bytes"] = len(base64.b64decode(payload))
            fields["payload_b64"] = payload[:KEEP_CHARS]  # a multiple of 4: still base64, of the first bytes
        return json.dumps(fields).encode()


class DeadLetterSink(Protocol):
    def send(self, letter: DeadLetter) -> None:
        """Hand a letter over; it is durable only once `flush` has returned."""

    def flush(self) -> None:
        """Return once every letter handed over is durable, or raise (`Transient` if retrying helps)."""

    def recorded(self, source: str, since_ms: int) -> set[tuple[int, int]]:
        """(partition, offset) of the stream's letters for `source` written since `since_ms`."""
        ...


def _stream_letter_position(raw: bytes, source: str, since_ms: int = 0) -> tuple[int, int] | None:
    try:
        letter = json.loads(raw)
    except ValueError:  # a line cut short by a crash
        return None
    if letter.get("stage") != "stream" or letter.get("source") != source or letter["rejected_at_ms"] < since_ms:
        return None
    return letter.get("partition"), letter.get("offset")


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
        os.fsync(self._file.fileno())

    def recorded(self, source: str, since_ms: int) -> set[tuple[int, int]]:
        with self.path.open("rb") as fh:
            return {position for line in fh if (position := _stream_letter_position(line, source, since_ms))}


class KafkaDeadLetters:
    """The DLQ topic, produced with the same idempotent producer settings as the data. A letter
    Kafka refuses (its delivery timed out while the broker was away) is sent again at `flush`."""

    def __init__(self, producer: Producer, topic: str, bootstrap: str) -> None:
        self.producer = producer
        self.topic = topic
        self.bootstrap = bootstrap
        self.count = 0
        self._refused: list[DeadLetter] = []

    def send(self, letter: DeadLetter) -> None:
        self._produce(letter)
        self.count += 1
        ROWS_REJECTED.labels(letter.stage, letter.reason).inc()

    def _produce(self, letter: DeadLetter) -> None:
        def delivered(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                self._refused.append(letter)

        while True:
            try:
                self.producer.produce(self.topic, key=letter.reason.encode(), value=letter.to_json(),
                                      on_delivery=delivered)
                return
            except BufferError:  # the local queue is full while the broker is away: let it drain
                self.producer.poll(0.1)

    def flush(self) -> None:
        refused, self._refused = self._refused, []
        for letter in refused:
            self._produce(letter)
        remaining = self.producer.flush(30)
        if remaining or self._refused:
            raise Transient("kafka", f"{remaining + len(self._refused)} dead letters not acknowledged yet")

    def recorded(self, source: str, since_ms: int) -> set[tuple[int, int]]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"k2-dlq-reader-{uuid.uuid4().hex}",
                             "enable.auto.commit": False})
        try:
            partitions = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            starts = consumer.offsets_for_times([TopicPartition(self.topic, p, since_ms) for p in partitions],
                                                timeout=10)
            ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in starts}
            todo = [tp for tp in starts if 0 <= tp.offset < ends[tp.partition]]
            consumer.assign(todo)
            found, left = set(), {tp.partition for tp in todo}
            deadline = time.monotonic() + 60
            while left:
                if time.monotonic() > deadline:
                    raise Transient("kafka", f"could not read {self.topic} to its end within 60s")
                for msg in consumer.consume(10_000, timeout=1.0):
                    partition, offset, value = msg.partition(), msg.offset(), msg.value()
                    if msg.error() or partition is None or offset is None:
                        continue
                    position = _stream_letter_position(value, source) if value else None
                    if position:
                        found.add(position)
                    if offset + 1 >= ends[partition]:
                        left.discard(partition)
            return found
        finally:
            consumer.close()


def open_sink(settings: Settings, dlq_file: Path | None, producer: Producer | None = None) -> DeadLetterSink:
    """The file when one is given (local mode), else the DLQ topic through `producer` (by default an
    idempotent one of its own)."""
    if dlq_file:
        return FileDeadLetters(dlq_file)
    if producer is None:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS})
    return KafkaDeadLetters(producer, settings.dlq_topic, settings.kafka_bootstrap)
