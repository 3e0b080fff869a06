"""Kafka → Iceberg with exactly-once commits.

The source of truth for "how far have we written" is the Iceberg table, not the consumer group:
every commit stores the next Kafka offset of each partition in the snapshot summary, in the same
atomic metadata swap as the data. On start and on every assignment the writer seeks to those
offsets. Before committing, it re-reads them and checks that each partition of the batch starts
exactly where the table says (fencing): a writer that lost its partitions while it was batching
finds the table moved on and drops its stale batch instead of writing it twice. Group offsets are
committed afterwards, only so that lag shows in the usual tools.

De-duplication keys on (symbol, exchange_date, sequence_number): within a batch, and across
batches through a per-(symbol, date) watermark of stored sequence numbers, which is exact because
sequence numbers are contiguous per (symbol, date) and one symbol's records share a partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table

from k2 import schemas, tables
from k2.dlq import DeadLetter, DeadLetterSink
from k2.observability import (
    BATCH_ROWS,
    COMMIT_DURATION,
    COMMITS,
    CONSUMER_LAG,
    DUPLICATES_DROPPED,
    FILES_WRITTEN,
    ROWS_WRITTEN,
    SNAPSHOTS,
)
from k2.quality import GapDetector
from k2.schemas.wire import AvroDecoder, PoisonMessage
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.stream")
MAX_COMMIT_ATTEMPTS = 5


class StaleBatch(RuntimeError):
    """The table's recorded offsets moved past this batch: another writer owns these partitions."""


@dataclass
class Batch:
    rows: list[dict[str, Any]] = field(default_factory=list)
    schema_ids: set[int] = field(default_factory=set)
    start: dict[int, int] = field(default_factory=dict)  # partition → first offset of the batch
    end: dict[int, int] = field(default_factory=dict)  # partition → next offset after the batch
    nbytes: int = 0
    opened: float = field(default_factory=time.monotonic)

    def add_offset(self, partition: int, offset: int) -> None:
        self.start.setdefault(partition, offset)
        self.end[partition] = offset + 1

    @property
    def empty(self) -> bool:
        return not self.end


def _decimal_column(values: list[bytes | None], arrow_type: pa.Decimal128Type) -> pa.Array:
    """Avro decimal bytes (big-endian unscaled) → Arrow decimal128 without Python Decimals.

    Precision ≤ 18 fits int64, so the 16-byte little-endian value is the int64 and its sign."""
    mask = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    unscaled = np.fromiter((int.from_bytes(v, "big", signed=True) if v is not None else 0 for v in values),
                           dtype=np.int64, count=len(values))
    pairs = np.empty((len(values), 2), dtype=np.int64)
    pairs[:, 0] = unscaled
    pairs[:, 1] = unscaled >> 63
    validity = pa.array(~mask).buffers()[1] if mask.any() else None
    return pa.Array.from_buffers(arrow_type, len(values), [validity, pa.py_buffer(pairs.tobytes())],
                                 null_count=int(mask.sum()))


def rows_to_arrow(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Decoded physical records (ints, bytes) → an Arrow table of the table's schema."""
    columns = []
    for fld in schema:
        values = [r.get(fld.name) for r in rows]
        if pa.types.is_decimal(fld.type):
            columns.append(_decimal_column(values, fld.type))
        elif pa.types.is_timestamp(fld.type):
            columns.append(pa.array(values, pa.int64()).cast(fld.type))
        elif pa.types.is_date32(fld.type):
            columns.append(pa.array(values, pa.int32()).cast(fld.type))
        else:
            columns.append(pa.array(values, fld.type))
    return pa.Table.from_arrays(columns, schema=schema)


class TableWriter:
    """Consumes one topic into one Iceberg table."""

    def __init__(self, kind: TableKind, settings: Settings, table: Table, dlq: DeadLetterSink,
                 *, group_id: str | None = None, consumer_config: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.settings = settings
        self.table = table
        self.topic = settings.topic(kind)
        self.table_name = settings.table_identifier(kind)
        self.dlq = dlq
        self.decoder = AvroDecoder(_registry(settings))
        self.keys = tables.KEY_COLUMNS[kind]
        self.sequenced = "sequence_number" in self.keys
        self.detector = GapDetector("stream", settings.gap_alert, settings.gap_halt)
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group_id or f"k2-stream-{self.table_name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "partition.assignment.strategy": "range",
            **(consumer_config or {}),
        })
        self.assigned: set[int] = set()
        self.unrecorded: set[int] = set()
        self.batch = Batch()
        self.watermarks: dict[tuple[str, int], int] = {}
        self.known_columns = {f.name for f in table.schema().fields}
        self.last_message_at = time.monotonic()
        self.rows_committed = 0

    # assignment ---------------------------------------------------------------------------
    def start(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.table = self.table.refresh()
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        for tp in partitions:
            tp.offset = recorded.get(tp.partition, OFFSET_BEGINNING)
        self.assigned = {tp.partition for tp in partitions}
        self.unrecorded = {tp.partition for tp in partitions if tp.partition not in recorded}
        self.batch = Batch()
        self._load_watermarks()
        log.info("stream.assigned", table=self.table_name, topic=self.topic,
                 offsets={tp.partition: tp.offset for tp in partitions})
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Work in flight for revoked partitions is dropped; whoever gets them next resumes from
        # the offsets recorded in the table, so nothing is lost or doubled.
        log.info("stream.revoked", table=self.table_name, partitions=[tp.partition for tp in partitions],
                 dropped_rows=len(self.batch.rows))
        self.batch = Batch()
        self.assigned -= {tp.partition for tp in partitions}
        consumer.unassign()

    def _load_watermarks(self) -> None:
        """Highest stored sequence number per (symbol, exchange_date), read from the table."""
        self.watermarks = {}
        if not self.sequenced or self.table.current_snapshot() is None:
            self.detector.last_seen = {}
            return
        stored = self.table.scan(selected_fields=("symbol", "exchange_date", "sequence_number")).to_arrow()
        if stored.num_rows:
            stored = stored.set_column(1, "exchange_date", stored["exchange_date"].cast(pa.int32()))
            grouped = stored.group_by(["symbol", "exchange_date"]).aggregate([("sequence_number", "max")])
            self.watermarks = {(s, d): m for s, d, m in zip(grouped["symbol"].to_pylist(),
                                                            grouped["exchange_date"].to_pylist(),
                                                            grouped["sequence_number_max"].to_pylist(), strict=True)}
        self.detector.last_seen = dict(self.watermarks)

    # consuming ----------------------------------------------------------------------------
    def poll(self, timeout: float = 0.2) -> int:
        """Consume what is available (bounded), flush the batch when due; returns messages seen."""
        messages = self.consumer.consume(num_messages=10_000, timeout=timeout)
        for msg in messages:
            self._accept(msg)
            if len(self.batch.rows) >= self.settings.batch_rows or self.batch.nbytes >= self.settings.batch_bytes:
                self.flush()
        if messages:
            self.last_message_at = time.monotonic()
        if self._batch_due():
            self.flush()
        return len(messages)

    def _accept(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("stream.consumer_error", table=self.table_name, error=err.str())
            return
        partition, offset, payload = msg.partition(), msg.offset(), msg.value()
        if partition not in self.assigned:
            return
        self.batch.add_offset(partition, offset)
        try:
            schema_id, record = self.decoder.decode(payload)
        except PoisonMessage as exc:
            self.dlq.send(DeadLetter.for_payload(stage="stream", reason=exc.reason, detail=str(exc),
                                                 topic=self.topic, partition=partition, offset=offset,
                                                 payload=payload))
            return
        missing = [k for k in self.keys if record.get(k) is None]
        if missing:
            self.dlq.send(DeadLetter.for_payload(stage="stream", reason="missing_key",
                                                 detail=f"record lacks key fields {missing}", topic=self.topic,
                                                 partition=partition, offset=offset, payload=payload))
            return
        self.batch.schema_ids.add(schema_id)
        self.batch.rows.append(record)
        self.batch.nbytes += len(payload)

    def _batch_due(self) -> bool:
        b = self.batch
        if b.empty:
            return False
        return (len(b.rows) >= self.settings.batch_rows or b.nbytes >= self.settings.batch_bytes
                or time.monotonic() - b.opened >= self.settings.batch_seconds)

    # committing ---------------------------------------------------------------------------
    def _dedupe(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.sequenced:
            seen: dict[tuple, dict] = {}
            for r in rows:
                seen[tuple(r[k] for k in self.keys)] = r  # reference data: last write wins
            return list(seen.values())
        fresh = []
        batch_marks: dict[tuple[str, int], int] = {}
        for r in rows:
            key = (r["symbol"], r["exchange_date"])
            seq = r["sequence_number"]
            if seq <= batch_marks.get(key, self.watermarks.get(key, 0)):
                continue
            batch_marks[key] = seq
            fresh.append(r)
        return fresh

    def _evolve_for(self, schema_ids: set[int]) -> None:
        """A newer writer schema with extra fields adds them as optional columns, no restart."""
        for schema_id in schema_ids:
            writer = self.decoder.writer_schema_json(schema_id)
            if {f["name"] for f in writer["fields"]} <= self.known_columns:
                continue
            self.table = self.table.refresh()
            tables.evolve_schema(self.table, schemas.iceberg_schema_from_avro(writer))
            self.table = self.table.refresh()
            self.known_columns = {f.name for f in self.table.schema().fields}

    def flush(self) -> int:
        """Commit the batch (data + offsets) atomically; returns rows written."""
        batch = self.batch
        if batch.empty:
            return 0
        self.batch = Batch()
        rows = self._dedupe(batch.rows)
        dropped = len(batch.rows) - len(rows)
        if dropped:
            DUPLICATES_DROPPED.labels(self.table_name).inc(dropped)
        if self.sequenced:
            for r in rows:
                self.detector.observe(r["symbol"], r["exchange_date"], r["sequence_number"])
        self._evolve_for(batch.schema_ids)
        arrow_schema = self.table.schema().as_arrow()
        data = rows_to_arrow(rows, arrow_schema)
        sort_keys = [k for k in ("symbol", "exchange_timestamp", "sequence_number") if k in arrow_schema.names]
        if sort_keys and data.num_rows:
            data = data.take(pc.sort_indices(data, sort_keys=[(k, "ascending") for k in sort_keys]))
        written = self._commit(data, batch)
        BATCH_ROWS.labels(self.table_name).observe(len(batch.rows))
        self._commit_group_offsets(batch)
        if self.sequenced:
            for r in rows:
                key = (r["symbol"], r["exchange_date"])
                if r["sequence_number"] > self.watermarks.get(key, 0):
                    self.watermarks[key] = r["sequence_number"]
        return written

    def _commit(self, data: pa.Table, batch: Batch) -> int:
        for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
            self.table = self.table.refresh()
            all_recorded = tables.recorded_offsets(self.table)
            recorded = all_recorded.get(self.topic, {})
            # A partition with no recorded offset was read from its beginning after our
            # assignment; it stays ours only while nobody else has recorded one for it.
            stale = {p: (recorded.get(p), start) for p, start in batch.start.items()
                     if recorded.get(p) != start and not (p not in recorded and p in self.unrecorded)}
            if stale:
                COMMITS.labels(self.table_name, "fenced").inc()
                log.warning("stream.batch_fenced", table=self.table_name, partitions=stale)
                self._reseek()
                return 0
            offsets = {**all_recorded, self.topic: {**recorded, **batch.end}}
            started = time.perf_counter()
            try:
                with self.table.transaction() as tx:
                    if data.num_rows:
                        tx.append(data, snapshot_properties={tables.OFFSETS_PROPERTY: tables.encode_offsets(offsets)})
                    else:  # nothing new (all duplicates/poison), but the offsets still advance
                        with tx.update_snapshot(snapshot_properties={
                                tables.OFFSETS_PROPERTY: tables.encode_offsets(offsets)}).fast_append():
                            pass
            except CommitFailedException as exc:
                COMMITS.labels(self.table_name, "conflict").inc()
                log.warning("stream.commit_conflict", table=self.table_name, attempt=attempt, error=str(exc))
                continue  # reload and re-check the fence before trying again
            elapsed = time.perf_counter() - started
            self.table = self.table.refresh()
            snapshot = self.table.current_snapshot()
            COMMIT_DURATION.labels(self.table_name).observe(elapsed)
            COMMITS.labels(self.table_name, "ok").inc()
            ROWS_WRITTEN.labels(self.table_name).inc(data.num_rows)
            added_files = int(snapshot.summary.additional_properties.get("added-data-files", 0)) if snapshot else 0
            FILES_WRITTEN.labels(self.table_name).inc(added_files)
            SNAPSHOTS.labels(self.table_name).set(len(self.table.snapshots()))
            self.rows_committed += data.num_rows
            log.info("stream.committed", table=self.table_name, rows=data.num_rows, files=added_files,
                     snapshot_id=snapshot.snapshot_id if snapshot else None, offsets=batch.end,
                     seconds=round(elapsed, 3))
            return data.num_rows
        raise RuntimeError(f"{self.table_name}: commit kept conflicting after {MAX_COMMIT_ATTEMPTS} attempts")

    def _reseek(self) -> None:
        self._on_assign(self.consumer, [TopicPartition(self.topic, p) for p in sorted(self.assigned)])

    def _commit_group_offsets(self, batch: Batch) -> None:
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in batch.end.items()],
                                 asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - group offsets only feed lag monitoring
            log.warning("stream.group_commit_failed", table=self.table_name, error=str(exc))

    # lag ----------------------------------------------------------------------------------
    def lag(self) -> int:
        """Messages between what is committed to the table and the log end, summed."""
        total = 0
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        for partition in sorted(self.assigned):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10,
                                                                cached=False)
            except KafkaException as exc:  # broker away: unknown lag is not "caught up"
                log.warning("stream.lag_unknown", table=self.table_name, partition=partition, error=str(exc))
                return -1
            behind = max(0, high - max(recorded.get(partition, low), low))
            CONSUMER_LAG.labels(self.table_name, self.topic, str(partition)).set(behind)
            total += behind
        return total

    def close(self) -> None:
        self.consumer.close()


def _registry(settings: Settings):
    from k2.schemas.registry import client

    return client(settings.registry_url)

