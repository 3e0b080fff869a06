"""Live ticks for WebSocket subscribers: one Kafka consumer per API process, fanned out in memory.

The hub's thread reads the trades and quotes topics from their end (partitions that appear later,
from their beginning; with live tails, from the offsets of the tables' snapshots), decodes each
poll's messages of the symbols subscribed to, and hands every subscriber the ticks of its symbols
on the event loop. Each subscriber has a bounded queue: one that falls behind is cut off with the
reason, so it can neither slow the others nor grow memory. The live tails (`k2.query.tail`) get
every tick from a second thread, which decodes the polls gathered while it worked: a push never
waits for that decode.

`subscribe` returns, atomically with joining, the offset from which the hub will deliver on each
partition: a catch-up reads Iceberg up to the offsets its snapshot recorded and Kafka from there up
to these, so the three parts meet exactly (`k2.api.routers.stream`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pyarrow as pa
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic_core import to_json

from k2 import schemas, tables
from k2.faults import Transient
from k2.kafka import FETCH_PACING, consume_available, coordinates
from k2.observability import STREAM_DISCONNECTS, STREAM_PUSH_DELAY, STREAM_SUBSCRIBERS, STREAM_TICKS
from k2.quality import StoredSequences
from k2.query.filters import TICK_KINDS, TickKind
from k2.query.scope import Scope
from k2.query.tail import KindTail
from k2.rows import to_rows
from k2.schemas import columnar
from k2.schemas.registry import client as registry_client
from k2.schemas.wire import AvroDecoder, PoisonMessage
from k2.settings import Settings

log = structlog.get_logger("k2.api.hub")
Partition = tuple[str, int]  # (topic, partition)
_REFRESH_SECONDS = 5.0  # how often new topics and partitions are looked for
_EPOCH = dt.date(1970, 1, 1)
# Up to this many messages are decoded one by one, as a push usually needs (columnar.decode_rows).
_FEW = 64
# Polls waiting for the live tails' decode; beyond that the hub waits for it (bounded memory).
_TAIL_BACKLOG = 256
# The tails decode at most this often: a poll is often a few messages, and a decode's cost is
# mostly per call, so decoding each poll at once would spend a core on a quiet feed.
_TAIL_PACE_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class LiveTick:
    symbol: str
    exchange: str
    exchange_date: int  # epoch day
    sequence_number: int
    partition: Partition
    offset: int
    json: str  # the tick as the REST API writes it
    produced: float | None = None  # the Kafka record's timestamp, Unix seconds, where it has one


class SlowConsumer(RuntimeError):
    pass


@dataclass(eq=False)
class Subscription:
    kind: TickKind
    symbols: frozenset[str]  # empty: every symbol
    buffer: int
    loop: asyncio.AbstractEventLoop
    scope: Scope | None = None  # the key's entitlements
    queue: asyncio.Queue[LiveTick] = field(init=False)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.buffer)

    def wants(self, tick: LiveTick) -> bool:
        return ((not self.symbols or tick.symbol in self.symbols)
                and (self.scope is None or self.scope.allows(tick.symbol, tick.exchange)))

    def push(self, ticks: list[LiveTick]) -> None:
        """On the event loop: queue the ticks, or give up on a subscriber that is too far behind."""
        if self.overflowed.is_set():
            return
        for tick in ticks:
            try:
                self.queue.put_nowait(tick)
            except asyncio.QueueFull:
                STREAM_DISCONNECTS.labels(self.kind, "slow_consumer").inc()
                self.overflowed.set()
                return


def decode_ticks(decoder: AvroDecoder, kind: TickKind, messages: list[Message]) -> Iterator[LiveTick]:
    """Confluent-Avro messages of one topic → ticks in message order (undecodable ones are skipped:
    the stream dead-letters them, and a live view must not show what the table never will)."""
    if len(messages) <= _FEW and (few := _decode_few(decoder, kind, messages)) is not None:
        return live_ticks(messages, *few)
    positions, table = decode_table(decoder, kind, messages)
    return live_ticks(messages, positions.tolist(), to_rows(table))


def _decode_few(decoder: AvroDecoder, kind: TickKind, messages: list[Message]) -> tuple[list[int], list[dict]] | None:
    """A handful of messages one by one (`columnar.decode_rows`), the push's usual case; None
    where a writer schema is not a subset of the table's (`decode_table` conforms those)."""
    target = schemas.arrow_schema(kind)
    payloads = [m.value() for m in messages]
    by_id: dict[int, list[int]] = {}
    for i, payload in enumerate(payloads):
        if (schema_id := _schema_id(payload)) is not None:
            by_id.setdefault(schema_id, []).append(i)
    found: list[tuple[int, dict]] = []
    for schema_id, where in by_id.items():
        try:
            writer = decoder.writer_schema_json(schema_id)
        except PoisonMessage:
            continue
        if any(f.name not in target.names or target.field(f.name).type != f.type
               for f in schemas.arrow_schema_from_avro(writer)):
            return None
        rows = columnar.decode_rows([cast(bytes, payloads[i]) for i in where], writer, skip=5,
                                    physical=decoder.physical_writer_schema(schema_id))
        found.extend((where[j], {name: row.get(name) for name in target.names}) for j, row in rows)
    found.sort(key=lambda pair: pair[0])
    return [i for i, _ in found], [row for _, row in found]


def resolve_writer_schemas(decoder: AvroDecoder, schema_ids: Iterable[int]) -> None:
    """Fetch (once; the decoder caches them) the writer schema of each id; raises `Transient`
    while the registry cannot say, ids it does not know are passed."""
    for schema_id in schema_ids:
        try:
            decoder.writer_schema_json(schema_id)
        except PoisonMessage:
            continue


def _schema_id(payload: bytes | None) -> int | None:
    """The schema id in a Confluent header (magic 0, 4-byte big-endian id), None without one; one
    payload at a time (`columnar.confluent_schema_ids` does many at once)."""
    if payload is None or len(payload) < 5 or payload[0] != 0:
        return None
    return int.from_bytes(payload[1:5], "big")


def decode_table(decoder: AvroDecoder, kind: TickKind, messages: list[Message]) -> tuple[np.ndarray, pa.Table]:
    """The decodable messages as one table in the kind's schema, in message order, with the
    position in `messages` of each row."""
    joined = columnar.Joined.of([m.value() for m in messages])
    target = schemas.arrow_schema(kind)
    decoded: list[tuple[np.ndarray, pa.Table]] = []
    for schema_id, where in columnar.by_schema_id(joined)[1]:
        try:
            writer = decoder.writer_schema_json(schema_id)
        except PoisonMessage:
            continue
        result = columnar.decode(joined.take(where), writer, skip=5)
        good = where[~result.bad]
        table = result.table.filter(pa.array(~result.bad)) if result.bad.any() else result.table
        decoded.append((good, columnar.conform(table, target)))
    if not decoded:
        return np.zeros(0, np.int64), target.empty_table()
    if len(decoded) == 1:
        return decoded[0]
    positions = np.concatenate([p for p, _ in decoded])
    order = np.argsort(positions, kind="stable")
    return positions[order], pa.concat_tables([t for _, t in decoded]).take(pa.array(order))


def live_ticks(messages: list[Message], positions: list[int], rows: list[dict]) -> Iterator[LiveTick]:
    for i, row in zip(positions, rows, strict=True):
        topic, partition, offset = coordinates(messages[i])
        millis = messages[i].timestamp()[1]
        yield LiveTick(row["symbol"], row["exchange"], (row["exchange_date"] - _EPOCH).days, row["sequence_number"],
                       (topic, partition), offset, to_json(row).decode(), millis / 1000 if millis > 0 else None)


@dataclass(slots=True)
class _TopicPoll:
    """One topic's messages of a poll, with the next offset per partition and the schema ids."""
    messages: list[Message] = field(default_factory=list)
    reach: dict[int, int] = field(default_factory=dict)
    schema_ids: set[int] = field(default_factory=set)


def _by_topic(messages: list[Message]) -> dict[str, _TopicPoll]:
    """A poll's messages per topic, in one pass: at 20k msg/s each pass over a poll in Python is
    time the hub's thread holds the interpreter while a push waits."""
    polls: dict[str, _TopicPoll] = {}
    for msg in messages:
        if msg.error() is not None:
            continue
        poll = polls.get(topic := cast(str, msg.topic()))
        if poll is None:
            poll = polls[topic] = _TopicPoll()
        poll.messages.append(msg)
        poll.reach[cast(int, msg.partition())] = cast(int, msg.offset()) + 1  # offsets rise within a partition
        if (schema_id := _schema_id(msg.value())) is not None:
            poll.schema_ids.add(schema_id)
    return polls


class TickHub:
    def __init__(self, settings: Settings, kinds: Iterable[TickKind] = TICK_KINDS) -> None:
        self.settings = settings
        self.topics = {settings.topic(k): k for k in kinds}
        self.decoder = AvroDecoder(registry_client(settings.registry_url))
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()
        self._positions: dict[Partition, int] = {}  # next offset the hub delivers, per partition
        self._unopened = set(self.topics)  # topics whose partitions at start are still to be read from their end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tail_thread: threading.Thread | None = None
        self._tail_polls: queue.Queue[tuple[TickKind, list[Message], dict[int, int]]] = queue.Queue(_TAIL_BACKLOG)
        self._consumer: Consumer | None = None
        self._started = threading.Event()
        # kind → its live tail (k2.query.tail), made when its topic is first opened
        self.tails: dict[TickKind, KindTail] = {}

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="k2-tick-hub", daemon=True)
        self._tail_thread = threading.Thread(target=self._feed_tails, name="k2-live-tail", daemon=True)
        self._thread.start()
        self._tail_thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._tail_thread):
            if thread is not None:
                thread.join(10)

    def wait_started(self, timeout: float) -> bool:
        return self._started.wait(timeout)

    def consumer_config(self) -> dict:
        # No group: every API process reads every partition; offsets are never committed.
        return {"bootstrap.servers": self.settings.kafka_bootstrap, "group.id": "k2-api-hub",
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "isolation.level": "read_committed", "enable.partition.eof": False,
                # The broker answers a fetch after 5 ms rather than at each new message: on a busy
                # feed that is a few hundred fetches a second, not thousands, each a full poll of
                # the hub's loop (a push waits at most those 5 ms more).
                "fetch.wait.max.ms": 5, "fetch.min.bytes": 1_000_000}

    def _run(self) -> None:
        consumer = Consumer(self.consumer_config())
        self._consumer = consumer
        refreshed = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() - refreshed > _REFRESH_SECONDS:
                    self._assign_new(consumer)
                    refreshed = time.monotonic()
                    self._started.set()
                messages = consume_available(consumer, 2000, timeout=0.1)
                if messages:
                    self._dispatch_when_possible(messages)
        except Exception:
            log.exception("hub.failed")
            raise
        finally:
            consumer.close()

    def _assign_new(self, consumer: Consumer) -> None:
        """Partitions not yet read: those there when the hub started at their end, those created
        later from their beginning (they hold only new ticks). A topic whose metadata or
        watermarks the cluster cannot give now (no leader during an election, broker away) is
        tried again at the next refresh, still as one that was there at the start."""
        added = []
        for topic in self.topics:
            try:
                found = self._new_partitions(consumer, topic)
            except KafkaException as exc:
                log.warning("hub.metadata_unavailable", topic=topic, error=str(exc))
                continue
            if found is not None:
                self._unopened.discard(topic)
                added.extend(found)
        if not added:
            return
        with self._lock:
            for tp in added:
                # the position of a partition read from its beginning is its low watermark, 0 until compacted
                self._positions[(tp.topic, tp.partition)] = max(tp.offset, 0)
        consumer.incremental_assign(added)
        log.info("hub.assigned", partitions={f"{tp.topic}/{tp.partition}": tp.offset for tp in added})

    def _new_partitions(self, consumer: Consumer, topic: str) -> list[TopicPartition] | None:
        """The topic's partitions the hub does not read yet, at their start offsets; None while
        the topic's metadata is in error."""
        meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
        absent = meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART)
        if absent:
            return []
        if meta.error is not None:
            return None
        new = [p for p in meta.partitions if (topic, p) not in self._positions]
        kind = self.topics[topic]
        if topic not in self._unopened:
            if kind in self.tails:
                for p in new:
                    self.tails[kind].open_partition(p, None)
            return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in new]
        if self.settings.live_tail_rows and (recorded := self._open_tail(kind)) is not None:
            # from where the table's snapshot stops, as the stream goes on (from the beginning
            # where it recorded nothing)
            for p in new:
                self.tails[kind].open_partition(p, recorded.get(p))
            return [TopicPartition(topic, p, recorded.get(p, OFFSET_BEGINNING)) for p in new]
        return [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1])
                for p in new]

    def _open_tail(self, kind: TickKind) -> dict[int, int] | None:
        """Start the kind's live tail at the table's current snapshot: the offsets it records per
        partition, or None (no tail; the hub reads from the end) when the catalog cannot say."""
        try:
            table = tables.load_table(tables.catalog(self.settings), self.settings.table_identifier(kind))
            snapshot = table.current_snapshot() if table is not None else None
            recorded: dict[int, int] = {}
            marks = StoredSequences(lambda day: {})  # nothing stored yet
            if table is not None and snapshot is not None:
                recorded = tables.recorded_offsets(table, snapshot).get(self.settings.topic(kind), {})
                # Read a day at a time as ticks of that day arrive, from this snapshot (the tail's
                # start): a whole-table read here grew the API's start-up time and memory with the data.
                marks = StoredSequences(functools.partial(tables.day_sequence_marks, table, snapshot.snapshot_id))
        except Exception as exc:  # noqa: BLE001 - any failure: the push goes on without a tail, REST reads snapshots
            log.warning("hub.live_tail_unavailable", kind=kind, error=str(exc))
            return None
        self.tails[kind] = KindTail(kind, schemas.arrow_schema(kind), marks, self.settings.live_tail_rows)
        log.info("hub.live_tail_started", kind=kind, snapshot_id=snapshot.snapshot_id if snapshot else None,
                 offsets=recorded)
        return recorded

    def _dispatch_when_possible(self, messages: list[Message]) -> None:
        """A registry outage is waited out, not taken for poison: the messages are kept and
        decoded again, less those already delivered (their topic's batch went out before)."""
        delay = 0.5
        while True:
            try:
                self._dispatch(messages)
                return
            except Transient as exc:
                log.warning("hub.dependency_unavailable", error=str(exc), retry_in_seconds=delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 10.0)
                with self._lock:
                    messages = [m for m in messages if m.error() is None
                                and coordinates(m)[2] >= self._positions.get(coordinates(m)[:2], 0)]

    def _dispatch(self, messages: list[Message]) -> None:
        for topic, poll in _by_topic(messages).items():
            kind = self.topics[topic]
            STREAM_TICKS.labels(kind).inc(len(poll.messages))
            # Every writer schema is fetched first, so that a registry outage (Transient) stops
            # the batch before anything moved: subscribers and the tail then both get it whole.
            resolve_writer_schemas(self.decoder, poll.schema_ids)
            self._push(topic, kind, poll.messages, poll.reach)
            if kind in self.tails:
                self._queue_for_tail(kind, poll.messages, poll.reach)

    def _push(self, topic: str, kind: TickKind, batch: list[Message], reach: dict[int, int]) -> None:
        """Hand subscribers their ticks. Under the lock, so that positions move and subscribers
        (as they are now) get their ticks as one step: a subscriber joining later starts after
        this batch."""
        with self._lock:
            subscribers = [s for s in self._subscribers if s.kind == kind and not s.overflowed.is_set()]
            ticks = self._ticks_for(kind, batch, subscribers)
            self._positions.update({(topic, p): o for p, o in reach.items()})
            pushed = False
            for sub in subscribers:
                mine = [t for t in ticks if sub.wants(t)]
                if mine:
                    sub.loop.call_soon_threadsafe(sub.push, mine)
                    pushed = True
        if pushed and (produced := [t.produced for t in ticks if t.produced is not None]):
            STREAM_PUSH_DELAY.labels(kind).observe(max(time.time() - min(produced), 0.0))

    def _ticks_for(self, kind: TickKind, batch: list[Message], subscribers: list[Subscription]) -> list[LiveTick]:
        """The batch's ticks the subscribers may want. K2's producers key each tick by its symbol,
        so the key picks the ticks subscribers may want before the costly decode (unkeyed messages
        are decoded); with no subscriber nothing is decoded, with one of every symbol everything is."""
        if any(not s.symbols for s in subscribers):
            wanted = batch
        else:
            keys = {symbol.encode() for s in subscribers for symbol in s.symbols}
            wanted = [m for m in batch if m.key() is None or m.key() in keys]
        return list(decode_ticks(self.decoder, kind, wanted)) if wanted else []

    # live tails -----------------------------------------------------------------------------
    def _queue_for_tail(self, kind: TickKind, batch: list[Message], reach: dict[int, int]) -> None:
        while not self._stop.is_set() and kind in self.tails:  # tails are dropped if their thread fails
            try:
                self._tail_polls.put((kind, batch, reach), timeout=0.5)
                return
            except queue.Full:
                continue

    def _feed_tails(self) -> None:
        """The tails' decode runs here, apart from the hub's loop, so that a push never waits for
        a whole poll to be decoded. Polls that queued up are decoded as one: the decode costs
        mostly per call, not per message (and, in a busy process, per wait for the GIL), so they
        are gathered for `_TAIL_PACE_SECONDS` after the first, and a tail that fell behind catches
        up in larger steps. Should it fail, the tails are dropped: a tail missing polls would
        claim ticks it does not hold, while without one queries read their snapshot, exact but
        not live."""
        try:
            self._gather_for_tails()
        except Exception:
            log.exception("hub.live_tail_failed")
            self.tails.clear()  # the engine holds this mapping: its queries stop reading tails
            raise

    def _gather_for_tails(self) -> None:
        while not self._stop.is_set():
            try:
                polls = [self._tail_polls.get(timeout=0.2)]
            except queue.Empty:
                continue
            if self._stop.wait(_TAIL_PACE_SECONDS):
                return
            while len(polls) < _TAIL_BACKLOG:
                try:
                    polls.append(self._tail_polls.get_nowait())
                except queue.Empty:
                    break
            for kind in dict.fromkeys(k for k, _, _ in polls):
                batch = [m for k, messages, _ in polls if k == kind for m in messages]
                reach: dict[int, int] = {}
                for _, _, poll_reach in (p for p in polls if p[0] == kind):
                    reach.update(poll_reach)
                self._add_to_tail(kind, batch, reach)

    def _add_to_tail(self, kind: TickKind, batch: list[Message], reach: dict[int, int]) -> None:
        positions, table = decode_table(self.decoder, kind, batch)
        partitions = np.fromiter((batch[i].partition() for i in positions.tolist()), np.int64, len(positions))
        offsets = np.fromiter((batch[i].offset() for i in positions.tolist()), np.int64, len(positions))
        self.tails[kind].add(table, partitions, offsets, reach)

    # subscribers --------------------------------------------------------------------------
    def subscribe(self, sub: Subscription) -> dict[int, int]:
        """Join; returns the offset per partition of the sub's topic from which it gets ticks."""
        topic = self.settings.topic(sub.kind)
        with self._lock:
            self._subscribers.add(sub)
            STREAM_SUBSCRIBERS.labels(sub.kind).set(sum(s.kind == sub.kind for s in self._subscribers))
            return {p: o for (t, p), o in self._positions.items() if t == topic}

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)
            STREAM_SUBSCRIBERS.labels(sub.kind).set(sum(s.kind == sub.kind for s in self._subscribers))


def read_range(settings: Settings, topic: str, ranges: dict[int, tuple[int, int]],
               timeout: float = 30.0) -> Iterator[list[Message]]:
    """The messages of [start, end) per partition, in batches (blocking: run it in a thread)."""
    pending = {p: end for p, (start, end) in ranges.items() if end > start}
    if not pending:
        return
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "k2-api-catchup",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest", **FETCH_PACING})  # offset 0: a partition compacted past it
    try:
        consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in pending])
        deadline = time.monotonic() + timeout
        while pending:
            messages = consume_available(consumer, 2000, timeout=0.5)
            batch = []
            for msg in messages:
                if msg.error() is not None:
                    continue
                _, partition, offset = coordinates(msg)
                if partition not in pending:
                    continue
                if offset < pending[partition]:
                    batch.append(msg)
                if offset + 1 >= pending[partition]:
                    pending.pop(partition, None)
            # an offset that is no message (a transaction marker) is passed without being seen
            for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                if tp.offset >= pending.get(tp.partition, 0):
                    pending.pop(tp.partition, None)
            if batch:
                deadline = time.monotonic() + timeout
                yield batch
            elif pending and time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: offsets {pending} not reached within {timeout}s")
    finally:
        consumer.close()
