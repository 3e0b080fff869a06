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

Messages are only collected while consuming; a batch is decoded at flush, all at once per writer
schema, by the columnar Avro codec straight into Arrow columns (`k2.schemas.columnar`), and
de-duplication and gap detection run over those columns.
"""

from __future__ import annotations

import contextvars
import functools
import time
import warnings
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from pyiceberg.expressions import AlwaysFalse, AlwaysTrue, And, BooleanExpression, EqualTo, Or
from pyiceberg.table import Table

from k2 import exchanges, faults, schemas, tables
from k2.crash_points import CrashPoints
from k2.dlq import DeadLetter, DeadLetterSink
from k2.kafka import FETCH_PACING, consume_available
from k2.observability import (
    BATCH_ROWS,
    COMMIT_DURATION,
    COMMITS,
    CONSUMER_LAG,
    DUPLICATES_DROPPED,
    FILES_WRITTEN,
    LAST_COMMIT,
    MESSAGES_CONSUMED,
    NEWEST_TICK,
    ROWS_WRITTEN,
    SNAPSHOTS,
)
from k2.quality import GapDetector, SequenceKey, StoredSequences, new_sequence_numbers, raise_marks, sequence_keys
from k2.schemas import columnar
from k2.schemas.wire import AvroDecoder, PoisonMessage
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.stream")
TICK_TIME = "exchange_timestamp"  # event time of trades and quotes (reference tables have none)
DLQ_CLOCK_SKEW_MS = 300_000  # dead letters are stamped by one host's clock, snapshots maybe by another's
# How much librdkafka fetches ahead. It keeps each fetched buffer while any of its messages is
# queued, so a consumer catching up on a backlog holds its buffers full: with 64 MiB fetches
# (16 MiB per partition) a `k2 stream run` behind by 3.7M messages peaked at 1.6 GB RSS, with
# these 0.6 GB, at the same rows/s (benchmarks/bench_scale.py, docs/benchmarks.md).
PREFETCH = {"fetch.max.bytes": 8 * 1024 * 1024, "max.partition.fetch.bytes": 1024 * 1024}


def _newest_tick_us(data: pa.Table) -> int:
    if not data.num_rows or TICK_TIME not in data.column_names:
        return 0
    return pc.max(data[TICK_TIME].cast(pa.timestamp("us", tz="UTC"))).value or 0


def stream_consumer_config(settings: Settings, group_id: str, overrides: dict[str, Any] | None = None
                           ) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        **PREFETCH,
        **FETCH_PACING,
        # A joining or leaving writer (a rolling update) moves only the partitions it must:
        # the others keep consuming and keep the batches they are building.
        "partition.assignment.strategy": "cooperative-sticky",
        # A writer killed without leaving the group (SIGKILL, the OOM killer, a lost node) holds its
        # partitions until the coordinator misses its heartbeats for this long: Kafka's default of
        # 45 s left its share of every table unwritten for 45 s. librdkafka heartbeats from its own
        # thread, so a long flush in Python does not count against it (max.poll.interval.ms does).
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        **(overrides or {}),
    }


@dataclass
class Batch:
    """The raw messages of one micro-batch; they are decoded only when it is flushed."""

    payloads: list[bytes | None] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    start: dict[int, int] = field(default_factory=dict)  # partition → first offset of the batch
    end: dict[int, int] = field(default_factory=dict)  # partition → next offset after the batch
    nbytes: int = 0
    opened: float = field(default_factory=time.monotonic)
    letters_handed: bool = False  # its dead letters went to the sink (a retried flush must not resend them)

    def extend(self, partitions: list[int], offsets: list[int], payloads: list[bytes | None]) -> None:
        """Messages in arrival order (each partition's offsets ascending), a poll's worth at once:
        per-message Python was a third of the stream's time."""
        # A poll holds a few partitions: finding each one's first and last message is a scan in C,
        # where a dict of every message's (partition, offset) cost 0.5 ms per 10,000.
        backwards = partitions[::-1]
        for partition in set(partitions):
            self.start.setdefault(partition, offsets[partitions.index(partition)])  # its first in this batch
            self.end[partition] = offsets[len(partitions) - 1 - backwards.index(partition)] + 1
        self.partitions.extend(partitions)
        self.offsets.extend(offsets)
        self.payloads.extend(payloads)
        self.nbytes += sum(map(len, filter(None, payloads)))

    def without(self, partitions: set[int]) -> Batch:
        """The same batch minus the messages of `partitions` (revoked from this writer)."""
        kept = Batch(opened=self.opened, letters_handed=self.letters_handed)
        keep = [i for i, partition in enumerate(self.partitions) if partition not in partitions]
        kept.extend([self.partitions[i] for i in keep], [self.offsets[i] for i in keep],
                    [self.payloads[i] for i in keep])
        return kept

    @property
    def messages(self) -> int:
        return len(self.payloads)

    @property
    def empty(self) -> bool:
        return not self.end


def _decimal_column(values: list[bytes | None], arrow_type: pa.Decimal128Type) -> pa.Array:
    """Avro decimal bytes (big-endian unscaled) → Arrow decimal128, without Python Decimals
    where every unscaled value fits int64 (a wide decimal's need not)."""
    unscaled = [int.from_bytes(v, "big", signed=True) if v is not None else None for v in values]
    if any(u is not None and not -(2**63) <= u < 2**63 for u in unscaled):
        return pa.array([None if u is None else Decimal(f"{u}e-{arrow_type.scale}") for u in unscaled], arrow_type)
    valid = np.fromiter((u is not None for u in unscaled), dtype=bool, count=len(unscaled))
    ints = np.fromiter((u or 0 for u in unscaled), dtype=np.int64, count=len(unscaled))
    return columnar.decimal_from_unscaled(ints, arrow_type, valid)


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


def _ints(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An integer or date column as int64 numpy (dates as epoch days, as Avro carries them)."""
    if pa.types.is_date32(column.type):
        column = column.cast(pa.int32())
    return column.to_numpy().astype(np.int64)


def _misfits(data: pa.Table, pipeline: exchanges.Exchange) -> dict[int, exchanges.Misfit]:
    """Ticks that cannot be stored in `pipeline`'s tables (`Exchange.misfit`: another exchange,
    known or not, a symbol not of its shape, an exchange_date that is not the local date of
    exchange_timestamp), by row.

    The check runs once per (exchange, symbol, date) at its earliest and latest instant: a local
    day is one interval of instants, so when both ends fit every row between does, and only a group
    that does not is looked at row by row."""
    if not {"exchange", "symbol", "exchange_date", TICK_TIME} <= set(data.column_names) or not data.num_rows:
        return {}
    stamps = data[TICK_TIME].cast(pa.int64())
    days = data["exchange_date"].cast(pa.int32()) if pa.types.is_date32(data["exchange_date"].type) \
        else data["exchange_date"]
    keyed = pa.table({"exchange": data["exchange"], "symbol": data["symbol"], "day": days, "at": stamps})
    groups = keyed.group_by(["exchange", "symbol", "day"]).aggregate([("at", "min"), ("at", "max")])
    unfit: dict[int, exchanges.Misfit] = {}
    for code, symbol, day, first, last in zip(*(groups[c].to_pylist() for c in
                                                ("exchange", "symbol", "day", "at_min", "at_max")), strict=True):
        if None in (code, symbol, day, first):
            continue  # an optional column of a custom table: nothing to check it against
        if pipeline.misfit(code, symbol, first, day) is None and pipeline.misfit(code, symbol, last, day) is None:
            continue
        rows = pc.and_(pc.and_(pc.equal(keyed["exchange"], code), pc.equal(keyed["symbol"], symbol)),
                       pc.equal(keyed["day"], day))
        for row in np.flatnonzero(rows.to_numpy(zero_copy_only=False)).tolist():
            if (misfit := pipeline.misfit(code, symbol, stamps[row].as_py(), day)) is not None:
                unfit[row] = misfit
    return unfit


class TableWriter:
    """Consumes one topic into one Iceberg table."""

    def __init__(self, kind: TableKind, settings: Settings, table: Table, dlq: DeadLetterSink,
                 *, group_id: str | None = None, consumer_config: dict[str, Any] | None = None,
                 flusher: Executor | None = None) -> None:
        self.kind = kind
        self.settings = settings
        self.table = table
        self.topic = settings.topic(kind)
        self.table_name = settings.table_identifier(kind)
        self.exchange = exchanges.get(settings.exchange)  # its topics hold this exchange's ticks only
        self.dlq = dlq
        self.decoder = AvroDecoder(_registry(settings))
        self.keys = tables.KEY_COLUMNS[kind]
        self.sequenced = "sequence_number" in self.keys
        self.detector = GapDetector("stream", settings.gap_alert, settings.gap_halt)
        self.consumer_group = group_id or f"k2-stream-{self.table_name}"
        self._consumer_config = {**stream_consumer_config(settings, self.consumer_group, consumer_config),
                                 "on_commit": self._group_committed}
        self.consumer = Consumer(self._consumer_config)
        self._group_offsets_due: dict[int, int] = {}
        self.assigned: set[int] = set()
        self.unrecorded: set[int] = set()
        self.batch = Batch()
        self.watermarks = StoredSequences(lambda day: {})  # `_load_watermarks` on assignment
        self.dead_lettered: set[tuple[int, int]] = set()  # (partition, offset) already in the DLQ
        self.known_columns = {f.name for f in table.schema().fields}
        self.last_message_at = time.monotonic()
        # A writer given partitions a moment ago has not stalled, however long ago its last message
        # came (the group rebalanced after a broker outage): FetchStallWatch measures from this too.
        self.assignment_changed_at = time.monotonic()
        self._consumed = MESSAGES_CONSUMED.labels(self.table_name)
        self.rows_committed = 0
        self.first_assigned_at: float | None = None  # monotonic: how long it took to consume (StreamResult)
        self.last_committed_at: float | None = None
        self.newest_tick = 0.0  # Unix seconds of the table's newest tick (k2_table_newest_tick_timestamp_seconds)
        self._publish_newest_tick()
        # Where a full batch is written: a thread the process's writers share (`k2 stream run`), so
        # consuming goes on while it is decoded and committed (docs/benchmarks.md, "2026-12-05 late
        # morning"); None writes it in `poll`. One batch at a time per writer, in order.
        self.flusher = flusher
        self._writing: Future[int] | None = None
        self._fenced = False  # the batch written was fenced: reseek, on the polling thread
        self.crash = CrashPoints(settings)  # test-only; inert unless K2_TEST_CRASH_AT is set

    # assignment ---------------------------------------------------------------------------
    def start(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions added to those the writer keeps (cooperative assignment is incremental)."""
        self._await_write()  # the table and the marks are read anew: a batch being written first
        faults.retry(lambda: self._resume(partitions), what=f"assign {self.table_name}")
        self.assignment_changed_at = time.monotonic()
        if partitions and self.first_assigned_at is None:
            self.first_assigned_at = self.assignment_changed_at
        log.info("stream.assigned", table=self.table_name, topic=self.topic,
                 offsets={tp.partition: tp.offset for tp in partitions})
        consumer.incremental_assign(partitions)

    def _resume(self, partitions: list[TopicPartition]) -> None:
        """Where the table says each added partition continues, what the table stores, and which
        messages past the offsets an earlier run already dead-lettered (it crashed before it could
        commit). The batch for partitions already held stays: the table has not moved for them."""
        self.table = self.table.refresh()
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        for tp in partitions:
            tp.offset = recorded.get(tp.partition, OFFSET_BEGINNING)
        added = {tp.partition for tp in partitions}
        self.assigned |= added
        self.unrecorded = (self.unrecorded - added) | {p for p in added if p not in recorded}
        self._load_watermarks()
        since = tables.offsets_held_since_ms(self.table, self.topic, self.assigned)
        self.dead_lettered = self.dlq.recorded(self.topic, max(0, since - DLQ_CLOCK_SKEW_MS) if since else 0)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Work in flight for the revoked partitions only is dropped; whoever gets them next resumes
        # from the offsets recorded in the table, so nothing is lost or doubled.
        self._await_write()  # it must not commit past the revocation with the fence as it was
        revoked = {tp.partition for tp in partitions}
        kept = self.batch.without(revoked)
        log.info("stream.revoked", table=self.table_name, partitions=sorted(revoked),
                 dropped_rows=self.batch.messages - kept.messages)
        self.batch = kept
        self.assigned -= revoked
        self.unrecorded -= revoked
        self.assignment_changed_at = time.monotonic()
        consumer.incremental_unassign(partitions)

    def _load_watermarks(self) -> None:
        """Highest stored sequence number per (symbol, exchange_date), from which dedup and the gap
        detector go on: read from the table a day at a time, once for both, for the days of the
        ticks that arrive (`_read_stored_days`). The table as it is then is right: a day's rows
        reach it only through this writer's dedup, which reads the day first, since a symbol's
        ticks are all in the partition (key = symbol) this writer holds."""
        read_day = functools.cache(self._stored_day)
        self.watermarks = StoredSequences(read_day)
        self.detector.last_seen = StoredSequences(read_day)

    def _stored_day(self, day: int) -> dict[SequenceKey, int]:
        snapshot = self.table.current_snapshot()
        return tables.day_sequence_marks(self.table, snapshot.snapshot_id, day) if snapshot is not None else {}

    def _read_stored_days(self, data: pa.Table) -> None:
        """Read the stored marks of the days `data` holds (storage is waited for, like any step)."""
        self.watermarks.load(np.unique(_ints(data["exchange_date"].drop_null())).tolist())

    # consuming ----------------------------------------------------------------------------
    def poll(self, timeout: float = 0.2) -> int:
        """Consume what is available (bounded), flush the batch when due; returns messages seen."""
        if self._writing is not None and self._writing.done():
            self._await_write()  # its error raised, its offsets committed to the group, without waiting
        messages = consume_available(self.consumer, 10_000, timeout)
        partitions, offsets, payloads = self._accepted(messages)
        while payloads:
            room = self._room(payloads)
            self.batch.extend(partitions[:room], offsets[:room], payloads[:room])
            partitions, offsets, payloads = partitions[room:], offsets[room:], payloads[room:]
            if self._batch_full():
                self._write_batch()
        if messages:
            self.last_message_at = time.monotonic()
            self._consumed.inc(len(messages))
        if self._batch_due():
            self._write_batch()
        return len(messages)

    def _write_batch(self) -> None:
        """The batch written: on the flusher once the one before it is committed, or here."""
        if self.flusher is None:
            self.flush()
            return
        self.settle()
        if self.batch.empty:  # the batch before it was fenced, and the reseek dropped this one too
            return
        batch, self.batch = self.batch, Batch()
        self._writing = self.flusher.submit(contextvars.copy_context().run, self._write, batch)

    def settle(self) -> None:
        """Wait until the batch being written is committed (its error is raised here); after a
        fenced one, reseek. Before anything that reads the table on the polling thread."""
        self._await_write()
        if self._fenced:
            self._fenced = False
            self.reseek()

    def _await_write(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()
        self._commit_group_offsets()

    def _accepted(self, messages: list[Message]) -> tuple[list[int], list[int], list[bytes | None]]:
        """(partitions, offsets, payloads) of the messages that are data of a partition this writer
        holds; error events are logged (end-of-partition ones are not errors)."""
        data = [m for m in messages if m.error() is None]
        if len(data) < len(messages):  # rare: a second pass only when there are error events
            for msg in messages:
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    log.warning("stream.consumer_error", table=self.table_name, error=err.str())
        partitions = cast(list[int], [m.partition() for m in data])  # never None on data messages
        if not self.assigned.issuperset(partitions):
            data = [m for m, p in zip(data, partitions, strict=True) if p in self.assigned]
            partitions = cast(list[int], [m.partition() for m in data])
        return partitions, cast(list[int], [m.offset() for m in data]), [m.value() for m in data]

    def _room(self, payloads: list[bytes | None]) -> int:
        """How many of `payloads` the batch takes before it is full by rows or by bytes (the one
        that reaches the byte bound included, as a flush follows it)."""
        room = max(1, self.settings.batch_rows - self.batch.messages)
        if self.batch.nbytes + sum(map(len, filter(None, payloads[:room]))) < self.settings.batch_bytes:
            return min(room, len(payloads))
        sizes = np.cumsum([len(v) if v is not None else 0 for v in payloads[:room]])
        return int(np.searchsorted(sizes, self.settings.batch_bytes - self.batch.nbytes)) + 1

    def _batch_full(self) -> bool:
        return self.batch.messages >= self.settings.batch_rows or self.batch.nbytes >= self.settings.batch_bytes

    def _batch_due(self) -> bool:
        if self.batch.empty:
            return False
        return self._batch_full() or time.monotonic() - self.batch.opened >= self.settings.batch_seconds

    # decoding ---------------------------------------------------------------------------
    def _decode(self, batch: Batch) -> tuple[pa.Table, set[int], list[DeadLetter]]:
        """The batch's good records as one table in arrival order, their writer schema ids, and a
        dead letter (partition, offset, reason) for every other message."""
        payloads = batch.payloads
        joined = columnar.Joined.of(payloads)
        ids, groups = columnar.by_schema_id(joined)
        letters: list[tuple[int, str, str]] = []  # (message index, reason, detail)
        for i in np.flatnonzero(ids < 0).tolist():
            payload = payloads[i]
            detail = ("payload shorter than the 5-byte header" if payload is None or len(payload) < 5
                      else f"magic byte {payload[0]}, expected 0")
            letters.append((i, "not_confluent_avro", f"not_confluent_avro: {detail}"))
        parts, positions, schema_ids = [], [], set()
        for schema_id, where in groups:
            try:
                writer = self.decoder.writer_schema_json(schema_id)
            except PoisonMessage as exc:
                letters.extend((i, exc.reason, str(exc)) for i in where.tolist())
                continue
            table, bad = self._decode_group(schema_id, writer, joined.take(where), letters, where)
            missing = np.zeros(table.num_rows, bool)
            lacking = [k for k in self.keys if k not in table.column_names]
            for k in self.keys:
                if k in table.column_names and table[k].null_count:
                    missing |= table[k].is_null().to_numpy(zero_copy_only=False)
            good = where[~bad]
            if lacking or missing.any():
                gone = np.ones(table.num_rows, bool) if lacking else missing
                for i in np.flatnonzero(gone).tolist():
                    row = {k: table[k][i].as_py() if k in table.column_names else None for k in self.keys}
                    absent = [k for k in self.keys if row[k] is None]
                    letters.append((int(good[i]), "missing_key", f"record lacks key fields {absent}"))
                table, good = table.filter(pa.array(~gone)), good[~gone]
            if unfit := _misfits(table, self.exchange):
                letters.extend((int(good[row]), m.reason, m.detail) for row, m in unfit.items())
                keep = np.ones(table.num_rows, bool)
                keep[list(unfit)] = False
                table, good = table.filter(pa.array(keep)), good[keep]
            if table.num_rows:
                parts.append(table)
                positions.append(good)
                schema_ids.add(schema_id)
        dead = [DeadLetter.for_payload(stage="stream", reason=reason, detail=detail, topic=self.topic,
                                       partition=batch.partitions[i], offset=batch.offsets[i], payload=payloads[i])
                for i, reason, detail in sorted(letters)]
        if not parts:
            return pa.table({}), schema_ids, dead
        if len(parts) == 1:
            return parts[0], schema_ids, dead
        data = pa.concat_tables(parts, promote_options="permissive")  # newer schemas may add columns
        return data.take(pa.array(np.argsort(np.concatenate(positions), kind="stable"))), schema_ids, dead

    def _decode_group(self, schema_id: int, writer: dict[str, Any], framed: columnar.Joined,
                      letters: list[tuple[int, str, str]], where: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Messages of one writer schema → (table of the good ones, bad mask); bad ones become letters."""
        try:
            decoded = columnar.decode(framed, writer, skip=5)
        except columnar.Unsupported:
            # A schema beyond the columnar codec (nested types, wide decimals): fastavro per
            # message, converted to the table's own columns as before the codec existed.
            self._evolve_for({schema_id})
            bad, records = np.zeros(len(framed.payloads), bool), []
            for i, payload in enumerate(cast(list[bytes], framed.payloads)):  # an id was read from each
                try:
                    records.append(self.decoder.decode(payload)[1])
                except PoisonMessage as exc:
                    bad[i] = True
                    letters.append((int(where[i]), exc.reason, str(exc)))
            target = self.table.schema().as_arrow()
            if refused := columnar.refusals(records, target):  # as the codec refuses them
                read = np.flatnonzero(~bad)
                for row, detail in refused.items():
                    bad[read[row]] = True
                    letters.append((int(where[read[row]]), "undecodable", f"undecodable: {detail}"))
                records = [record for row, record in enumerate(records) if row not in refused]
            return rows_to_arrow(records, target), bad
        letters.extend((int(where[i]), "undecodable", f"undecodable: {detail}") for i, detail in decoded.errors.items())
        return decoded.table, decoded.bad

    # committing ---------------------------------------------------------------------------
    def _sequence_groups(self, data: pa.Table) -> tuple[np.ndarray, list[tuple[str, int]], np.ndarray, np.ndarray]:
        """(group per row, (symbol, epoch day) per group, epoch days, sequence numbers)."""
        days = _ints(data["exchange_date"])
        seqs = _ints(data["sequence_number"])
        groups, keys = sequence_keys(data["symbol"], days)
        return groups, keys, days, seqs

    def _dedupe(self, data: pa.Table) -> pa.Table:
        if not data.num_rows:
            return data
        if not self.sequenced:
            # reference data: last write wins, kept where its key was first seen (as a dict does)
            latest: dict[tuple, int] = {}
            for i, key in enumerate(zip(*(data[k].to_pylist() for k in self.keys), strict=True)):
                latest[key] = i
            return data.take(pa.array(list(latest.values()), pa.int64()))
        # A record is new if its number is above the stored watermark and every earlier number
        # of its (symbol, date) in this batch: the running maximum the row-by-row version kept.
        groups, keys, _, seqs = self._sequence_groups(data)
        fresh = new_sequence_numbers(groups, keys, seqs, self.watermarks)
        return data if fresh.all() else data.filter(pa.array(fresh))

    def _changed_only(self, data: pa.Table) -> pa.Table:
        """Reference rows identical to the stored ones (but for when they were ingested) are not
        news: loading the same reference file again must leave the table as it was."""
        if not data.num_rows or self.table.current_snapshot() is None:
            return data
        columns = [c for c in data.column_names if c != "ingest_timestamp"]
        stored = self.table.scan(selected_fields=tuple(columns)).to_arrow()
        known = set(zip(*(stored[c].to_pylist() for c in columns), strict=True))
        fresh = [row not in known for row in zip(*(data[c].to_pylist() for c in columns), strict=True)]
        return data.filter(pa.array(fresh, pa.bool_()))

    def _replaced_keys(self, data: pa.Table) -> BooleanExpression:
        """The stored rows a reference batch supersedes: same key (last write wins)."""
        rows = zip(*(data[k].to_pylist() for k in self.keys), strict=True)
        matches = [functools.reduce(And, [EqualTo(k, v) for k, v in zip(self.keys, row, strict=True)],
                                    AlwaysTrue()) for row in rows]
        return functools.reduce(Or, matches, AlwaysFalse())

    def _evolve_for(self, schema_ids: set[int]) -> None:
        """A newer writer schema with extra fields adds them as optional columns, no restart."""
        for schema_id in schema_ids:
            writer = self.decoder.writer_schema_json(schema_id)
            if {f["name"] for f in writer["fields"]} <= self.known_columns:
                continue
            tables.evolve_schema(self.table, schemas.iceberg_schema_from_avro(writer))  # leaves self.table current
            self.known_columns = {f.name for f in self.table.schema().fields}

    def flush(self) -> int:
        """Commit the batch (data + offsets) atomically; returns rows written. Its dead letters
        are acknowledged by the DLQ first: the commit moves the offsets past them. A dependency
        that fails transiently (registry, catalog, storage, Kafka) is waited for, step by step."""
        self.settle()
        batch = self.batch
        if batch.empty:
            return 0
        self.batch = Batch()
        written = self._write(batch)
        self.settle()
        return written

    def _write(self, batch: Batch) -> int:
        what = f"flush {self.table_name}"
        decoded, schema_ids, letters = faults.retry(lambda: self._decode(batch), what=what)
        faults.retry(lambda: self._dead_letter(batch, letters), what=what)
        if self.sequenced and decoded.num_rows:
            faults.retry(lambda: self._read_stored_days(decoded), what=what)
        data = self._dedupe(decoded)
        dropped = decoded.num_rows - data.num_rows
        if dropped:
            DUPLICATES_DROPPED.labels(self.table_name).inc(dropped)
        if self.sequenced and data.num_rows:
            groups, keys, days, seqs = self._sequence_groups(data)
            self.detector.observe_many(data["symbol"], days, seqs)
        faults.retry(lambda: self._evolve_for(schema_ids), what=what)
        arrow_schema = self.table.schema().as_arrow()
        data = columnar.conform(data, arrow_schema)
        if not self.sequenced:
            conformed = data
            data = faults.retry(lambda: self._changed_only(conformed), what=what)
        sort_keys = [k for k in ("symbol", "exchange_timestamp", "sequence_number") if k in arrow_schema.names]
        if sort_keys and data.num_rows:
            data = data.take(pc.sort_indices(data, sort_keys=[(k, "ascending") for k in sort_keys]))
        self.crash.reach("before_files")
        written = faults.retry(lambda: self._commit(data, batch), what=what)
        BATCH_ROWS.labels(self.table_name).observe(decoded.num_rows)
        self.crash.reach("after_commit")
        self._group_offsets_due = batch.end  # committed to the group by the polling thread
        if self.sequenced and data.num_rows:
            raise_marks(self.watermarks, groups, keys, seqs)
        return written

    def _dead_letter(self, batch: Batch, letters: list[DeadLetter]) -> None:
        """Hand the batch's letters to the DLQ once (skipping those an earlier run already wrote)
        and wait until all of them are acknowledged."""
        if not batch.letters_handed:
            for letter in letters:
                if (letter.partition, letter.offset) not in self.dead_lettered:
                    self.dlq.send(letter)
            batch.letters_handed = True
        if letters:
            self.dlq.flush()

    def _commit(self, data: pa.Table, batch: Batch) -> int:
        fenced: dict[int, tuple[int | None, int]] = {}
        elapsed = 0.0

        def commit(table: Table) -> None:
            nonlocal elapsed
            all_recorded = tables.recorded_offsets(table)
            recorded = all_recorded.get(self.topic, {})
            # A partition with no recorded offset was read from its beginning after our
            # assignment; it stays ours only while nobody else has recorded one for it.
            fenced.clear()
            fenced.update({p: (recorded.get(p), start) for p, start in batch.start.items()
                           if recorded.get(p) != start and not (p not in recorded and p in self.unrecorded)})
            if fenced:
                return
            properties = {tables.OFFSETS_PROPERTY: tables.encode_offsets({**all_recorded,
                                                                          self.topic: {**recorded, **batch.end}})}
            newest = max(tables.recorded_newest_tick_us(table), _newest_tick_us(data))
            if newest:
                properties[tables.NEWEST_TICK_PROPERTY] = str(newest)
            started = time.perf_counter()
            with tables.transaction(table) as tx:
                if data.num_rows and not self.sequenced:
                    with warnings.catch_warnings():  # a brand-new key replaces nothing: not news
                        warnings.filterwarnings("ignore", "Delete operation did not match any records")
                        tx.delete(self._replaced_keys(data))
                if data.num_rows:
                    tx.append(data, snapshot_properties=properties)
                else:  # nothing new (all duplicates/poison), but the offsets still advance
                    with tx.update_snapshot(snapshot_properties=properties).fast_append():
                        pass
                self.crash.reach("after_files")  # the files are written; the catalog commit is on leaving
            elapsed = time.perf_counter() - started

        # each attempt re-reads the table and re-checks the fence; conflicts come from peers and compaction
        self.table = tables.commit_retrying_conflicts(
            self.table, f"commit to {self.table_name}", commit,
            on_conflict=COMMITS.labels(self.table_name, "conflict").inc)
        if fenced:
            COMMITS.labels(self.table_name, "fenced").inc()
            log.warning("stream.batch_fenced", table=self.table_name, partitions=fenced)
            self._fenced = True  # reseeking touches the consumer: the polling thread does it (`settle`)
            return 0
        snapshot = self.table.current_snapshot()  # the transaction updated self.table in place
        COMMIT_DURATION.labels(self.table_name).observe(elapsed)
        COMMITS.labels(self.table_name, "ok").inc()
        ROWS_WRITTEN.labels(self.table_name).inc(data.num_rows)
        summary = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
        added_files = int(summary.get("added-data-files", 0))
        FILES_WRITTEN.labels(self.table_name).inc(added_files)
        SNAPSHOTS.labels(self.table_name).set(len(self.table.snapshots()))
        LAST_COMMIT.labels(self.table_name).set_to_current_time()
        self._publish_newest_tick()
        self.rows_committed += data.num_rows
        self.last_committed_at = time.monotonic()
        log.info("stream.committed", table=self.table_name, rows=data.num_rows, files=added_files,
                 snapshot_id=snapshot.snapshot_id if snapshot else None, offsets=batch.end,
                 seconds=round(elapsed, 3))
        return data.num_rows

    def _publish_newest_tick(self) -> None:
        """The table's newest tick as its snapshot records it, whoever committed it: a writer
        restarted with nothing new to commit reports it too (a batch of older, late ticks never
        moves it back)."""
        newest = tables.recorded_newest_tick_us(self.table) / 1e6
        if newest > self.newest_tick:
            self.newest_tick = newest
            NEWEST_TICK.labels(self.table_name).set(newest)

    def reseek(self) -> None:
        """Every assigned partition sought again from the offsets the table records, its batch
        dropped (the table moved on, or the fetch stalled)."""
        self._await_write()
        held = [TopicPartition(self.topic, p) for p in sorted(self.assigned)]
        self.consumer.incremental_unassign(held)
        self.batch = Batch()
        self.assigned.clear()
        self._on_assign(self.consumer, held)

    def _commit_group_offsets(self) -> None:
        """The last written batch's offsets, committed to the consumer group on the polling thread.
        Group offsets only feed lag monitoring, so they are committed without waiting: a
        synchronous commit waits for librdkafka to find the group coordinator, which took 45 s a
        batch after a broker restart, with every table of the process stalled behind it. Never from
        the write thread: confluent-kafka lets one thread at a time into a consumer, and a
        revocation served inside a poll waits for the write thread (a deadlock)."""
        offsets, self._group_offsets_due = self._group_offsets_due, {}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                                 asynchronous=True)
        except KafkaException as exc:
            self._group_committed(exc.args[0], [])

    def _group_committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's report of an asynchronous group commit, served by the next poll."""
        failed = [tp.partition for tp in partitions if tp.error is not None]
        if error is not None or failed:
            log.warning("stream.group_commit_failed", table=self.table_name, error=str(error), partitions=failed)

    # lag ----------------------------------------------------------------------------------
    def read_everything(self) -> bool:
        """Whether this writer has read every message of its partitions up to the log end, by the
        watermarks its fetches carry (no request to the broker); False while any is unknown."""
        if not self.assigned:
            return False
        self.settle()
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        for tp in self.consumer.position([TopicPartition(self.topic, p) for p in sorted(self.assigned)]):
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            # No position yet: nothing fetched since the assignment, which starts where the table's
            # offsets say (or at the log start).
            following = tp.offset if tp.offset >= 0 else recorded.get(tp.partition, low)
            if high < 0 or following < high:
                return False
        return True

    def lag(self) -> int:
        """Messages between what is committed to the table and the log end, summed over the
        partitions this writer holds."""
        self.settle()
        total = 0
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        for partition in sorted(self.assigned):
            try:
                # The watermarks every fetch response carries are fresh while we consume; ask the
                # broker only before the first fetch has reported them.
                behind = self._behind(partition, recorded, cached=True)
            except KafkaException as exc:  # broker away: unknown lag is not "caught up"
                log.warning("stream.lag_unknown", table=self.table_name, partition=partition, error=str(exc))
                return -1
            CONSUMER_LAG.labels(self.table_name, self.topic, str(partition)).set(behind)
            total += behind
        return total

    def _behind(self, partition: int, recorded: dict[int, int], cached: bool) -> int:
        tp = TopicPartition(self.topic, partition)
        low, high = self.consumer.get_watermark_offsets(tp, cached=True) if cached else (-1, -1)
        if high < 0:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        return max(0, high - max(recorded.get(partition, low), low))

    def left_behind(self, quiet_seconds: float) -> bool:
        """Whether the topic holds messages past the table's offsets, in any partition, while
        nobody has committed to the table for `quiet_seconds`: whoever holds those partitions, if
        anyone, is not writing them. False while the catalog or the broker cannot say."""
        self.settle()
        try:
            return self._left_behind(quiet_seconds)
        except Exception as exc:
            if (dependency := faults.transient_dependency(exc)) is None:
                raise
            log.warning("stream.lag_unknown", table=self.table_name, dependency=dependency, error=str(exc))
            return False

    def _left_behind(self, quiet_seconds: float) -> bool:
        self.table = self.table.refresh()
        snapshot = self.table.current_snapshot()
        if snapshot is not None and time.time() - snapshot.timestamp_ms / 1000 < quiet_seconds:
            return False
        recorded = tables.recorded_offsets(self.table).get(self.topic, {})
        partitions = self.consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        return any(self._behind(p, recorded, cached=False) for p in partitions)

    def rejoin(self) -> None:
        """This consumer closed and a new one subscribed in its place. librdkafka can leave a
        consumer out of its group, or its fetchers idle, after the group coordinator comes back
        (librdkafka issues 3082, 2944, 4492): a new consumer joins afresh, and resumes from the
        table's offsets like any writer given partitions. Its open batch is dropped with them."""
        self.settle()
        self.consumer.close()  # leaves the group, revoking what it held (`_on_revoke`)
        self.batch = Batch()
        self.assigned.clear()
        self.unrecorded.clear()
        self.assignment_changed_at = time.monotonic()
        self.consumer = Consumer(self._consumer_config)
        self.start()

    def close(self) -> None:
        if self._writing is not None and (error := self._writing.exception()) is not None:
            log.error("stream.write_failed", table=self.table_name, error=repr(error))  # raised nowhere else
        self.consumer.close()


def _registry(settings: Settings):
    from k2.schemas.registry import client

    return client(settings.registry_url)

