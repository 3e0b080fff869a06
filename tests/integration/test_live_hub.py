"""The API's tick hub on the real Kafka: an API that starts while the broker is away must not,
once the broker is back, push the topic's history to live subscribers as if it were new ticks.
Partitions there when the hub started are read from their end, however long the cluster took to
answer; what is produced afterwards reaches the subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
import time

import pytest
from confluent_kafka import Consumer, TopicPartition
from starlette.testclient import TestClient

from k2 import schemas, tables, topics
from k2.api import hub as hub_module
from k2.api.app import create_app
from k2.api.hub import Subscription, TickHub
from k2.ingest.pipeline import ingest_files, register_schemas
from k2.kafka import consume_available
from k2.observability import REGISTRY
from k2.query.tail import KindTail
from k2.settings import DEV_API_KEY
from k2_synthetic import generate

pytestmark = pytest.mark.integration


@pytest.fixture
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _received(sub: Subscription, loop: asyncio.AbstractEventLoop) -> list:
    async def drain() -> list:
        ticks = []
        while not sub.queue.empty():
            ticks.append(sub.queue.get_nowait())
        return ticks
    return asyncio.run_coroutine_threadsafe(drain(), loop).result(10)


def test_a_hub_started_while_the_broker_is_away_pushes_only_new_ticks(tmp_path, embedded_settings, kafka,
                                                                     event_loop_thread):
    history = ingest_files(generate(tmp_path / "history", symbols=1, days=1, seed=3), embedded_settings)
    assert history.produced[embedded_settings.topic("trades")] > 0
    kafka.stop()
    hub = TickHub(embedded_settings, kinds=["trades"])
    sub = Subscription("trades", frozenset(), buffer=1_000_000, loop=event_loop_thread)
    try:
        hub.start()
        assert hub.wait_started(60), "the hub's first look at the cluster did not end"
        hub.subscribe(sub)
        kafka.start()
        deadline = time.monotonic() + 120
        while not hub.subscribe(sub) and time.monotonic() < deadline:  # no partition assigned yet
            time.sleep(0.5)
        assert hub.subscribe(sub), "the hub never read the topic after the broker came back"
        time.sleep(5)  # time for any history the hub wrongly reads to reach the subscriber
        assert _received(sub, event_loop_thread) == [], "history pushed as live ticks"

        later = generate(tmp_path / "later", symbols=1, days=1, seed=3, start=dt.date(2014, 3, 11))
        produced = ingest_files(later, embedded_settings).produced[embedded_settings.topic("trades")]
        ticks: list = []
        deadline = time.monotonic() + 60
        while len(ticks) < produced and time.monotonic() < deadline:
            ticks += _received(sub, event_loop_thread)
            time.sleep(0.2)
        assert len(ticks) == produced and {t.exchange_date for t in ticks} == {(dt.date(2014, 3, 11)
                                                                                - dt.date(1970, 1, 1)).days}
    finally:
        hub.close()
        kafka.start()  # no-op when it is back already


def _all_messages(settings, topic: str) -> list:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"read-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    messages: list = []
    try:
        while sum(ends.values()) > len(messages):
            messages += [m for m in consume_available(consumer, 10_000, timeout=10) if m.error() is None]
    finally:
        consumer.close()
    return messages


def test_the_hub_decodes_only_what_its_subscribers_may_want(tmp_path, embedded_settings, event_loop_thread):
    """The key (the symbol) picks the messages to decode: a subscriber of one symbol costs the hub
    that symbol's decoding, not the whole feed's, and still gets every tick of it."""
    ingest_files(generate(tmp_path / "ticks", symbols=3, days=1, seed=5), embedded_settings)
    messages = _all_messages(embedded_settings, embedded_settings.topic("trades"))
    symbols = sorted({m.key().decode() for m in messages})
    assert len(symbols) == 3
    one = Subscription("trades", frozenset({symbols[0]}), buffer=1_000_000, loop=event_loop_thread)
    every = Subscription("trades", frozenset(), buffer=1_000_000, loop=event_loop_thread)
    hub = TickHub(embedded_settings, kinds=["trades"])
    assert hub._ticks_for("trades", messages, []) == [], "decoded with no subscriber"
    decoded = hub._ticks_for("trades", messages, [one])
    assert {t.symbol for t in decoded} == {symbols[0]}
    assert len(decoded) == sum(m.key().decode() == symbols[0] for m in messages)
    assert len(hub._ticks_for("trades", messages, [one, every])) == len(messages)
    hub.subscribe(one)

    hub._dispatch(messages)
    received = _received(one, event_loop_thread)
    assert [t.offset for t in received] == [t.offset for t in decoded], "every tick of the symbol, in order"


def test_a_registry_outage_is_waited_out_and_every_tick_then_pushed_once(embedded_settings, registry,
                                                                        event_loop_thread, trades_producer):
    """The hub fetches a writer schema the first time it sees its id: with the registry away it
    keeps the messages and decodes them once it is back (it used to stop for good)."""
    topics.ensure_pipeline_topics(embedded_settings, ("trades",))
    encoder = register_schemas(embedded_settings, ("trades",))["trades"]
    hub = TickHub(embedded_settings, kinds=["trades"])
    sub = Subscription("trades", frozenset(), buffer=1_000_000, loop=event_loop_thread)
    try:
        hub.start()
        assert hub.wait_started(60)
        deadline = time.monotonic() + 60
        while not hub.subscribe(sub) and time.monotonic() < deadline:
            time.sleep(0.5)
        registry.stop()
        trades_producer(embedded_settings, [("BHP", seq) for seq in range(1, 51)], encoder)
        time.sleep(5)  # the hub meets the outage
        assert _received(sub, event_loop_thread) == []
        registry.start()
        ticks: list = []
        deadline = time.monotonic() + 120
        while len(ticks) < 50 and time.monotonic() < deadline:
            ticks += _received(sub, event_loop_thread)
            time.sleep(0.5)
        time.sleep(2)  # nothing more may follow: no tick twice
        ticks += _received(sub, event_loop_thread)
        assert [t.sequence_number for t in ticks] == list(range(1, 51))
    finally:
        hub.close()
        registry.start()


def test_a_push_does_not_wait_for_the_tails_decode(tmp_path, embedded_settings, event_loop_thread, monkeypatch):
    """With a live tail, the hub used to decode each poll whole before any subscriber got a tick:
    at 20k msg/s pushes came seconds late. Now the poll's subscribers get their ticks from their
    own symbols' messages, and the whole poll goes to the tail's thread, which adds every tick."""
    ingest_files(generate(tmp_path / "ticks", symbols=3, days=1, seed=5), embedded_settings)
    messages = _all_messages(embedded_settings, embedded_settings.topic("trades"))
    symbol = sorted({m.key().decode() for m in messages})[0]
    hub = TickHub(embedded_settings, kinds=["trades"])
    hub.tails["trades"] = tail = KindTail("trades", schemas.arrow_schema("trades"), {}, max_rows=1_000_000)
    for partition in {m.partition() for m in messages}:
        tail.open_partition(partition, None)
    one = Subscription("trades", frozenset({symbol}), buffer=1_000_000, loop=event_loop_thread)
    hub.subscribe(one)
    whole_decodes = []
    decode_table = hub_module.decode_table
    monkeypatch.setattr(hub_module, "decode_table", lambda decoder, kind, batch: (
        whole_decodes.append(len(batch)), decode_table(decoder, kind, batch))[1])

    hub._dispatch(messages)
    assert len(messages) not in whole_decodes, "the poll was decoded whole before the push"
    received = _received(one, event_loop_thread)
    assert len(received) == sum(m.key().decode() == symbol for m in messages) > 0

    kind, batch, reach = hub._tail_polls.get_nowait()
    hub._add_to_tail(kind, batch, reach)
    assert whole_decodes[-1] == len(messages)
    rows = tail.after({})
    assert rows is not None and rows.table.num_rows == len(messages)


def test_a_failed_tail_thread_drops_the_tails_and_never_blocks_the_push(tmp_path, embedded_settings, monkeypatch):
    """A tail that misses polls would claim ticks it does not hold: if its thread fails the tails
    are dropped (queries read snapshots, exact), and the hub no longer queues polls for them, so a
    full queue cannot stall the push."""
    ingest_files(generate(tmp_path / "ticks", symbols=1, days=1, seed=5), embedded_settings)
    messages = _all_messages(embedded_settings, embedded_settings.topic("trades"))
    hub = TickHub(embedded_settings, kinds=["trades"])
    hub.tails["trades"] = KindTail("trades", schemas.arrow_schema("trades"), {}, max_rows=1_000_000)
    hub._dispatch(messages)

    def broken(*_):
        raise RuntimeError("decode failed")
    monkeypatch.setattr(hub_module, "decode_table", broken)
    monkeypatch.setattr(hub_module, "_TAIL_PACE_SECONDS", 0)
    with pytest.raises(RuntimeError, match="decode failed"):
        hub._feed_tails()
    assert hub.tails == {}
    hub._queue_for_tail("trades", messages, {})  # returns at once: no tail to feed
    assert hub._tail_polls.qsize() == 0


def _push_delay() -> tuple[float, float]:
    labels = {"kind": "trades"}
    return (REGISTRY.get_sample_value("k2_stream_push_delay_seconds_count", labels) or 0.0,
            REGISTRY.get_sample_value("k2_stream_push_delay_seconds_sum", labels) or 0.0)


def test_each_push_records_the_delay_since_its_oldest_tick_was_produced(tmp_path, embedded_settings,
                                                                       event_loop_thread):
    """k2_stream_push_delay_seconds: the Kafka record's timestamp to the hand-off, once per push,
    and nothing where no subscriber gets a tick."""
    ingest_files(generate(tmp_path / "ticks", symbols=2, days=1, seed=7), embedded_settings)
    messages = _all_messages(embedded_settings, embedded_settings.topic("trades"))
    oldest = min(m.timestamp()[1] for m in messages) / 1000
    hub = TickHub(embedded_settings, kinds=["trades"])
    sub = Subscription("trades", frozenset(), buffer=1_000_000, loop=event_loop_thread)
    hub.subscribe(sub)
    count, total = _push_delay()
    before = time.time()
    hub._dispatch(messages)
    after = time.time()
    now_count, now_total = _push_delay()
    assert now_count == count + 1
    assert before - oldest <= now_total - total <= after - oldest

    hub.unsubscribe(sub)
    hub._dispatch(messages)
    assert _push_delay() == (now_count, now_total), "a poll nobody was pushed is no push"


@pytest.mark.timeout(180)
def test_one_consumer_feeds_every_subscriber_and_the_push_never_reads_iceberg(tmp_path, embedded_settings,
                                                                             monkeypatch, trades_producer):
    """Many WebSocket subscribers of one API process share the hub's one Kafka consumer, and the
    push reads Kafka only: with the catalog unreadable, subscribers without `from` get every live
    tick, and the catalog is never opened."""
    topics.ensure_pipeline_topics(embedded_settings, ("trades",))  # there at the start: read from its end
    gone = tmp_path / "a-file-not-a-folder"
    gone.write_text("")
    settings = embedded_settings.model_copy(update={"catalog_uri": f"sqlite:///{gone}/catalog.db",
                                                    "warehouse": str(gone / "warehouse")})
    consumers: list[Consumer] = []

    class Counted(Consumer):
        def __init__(self, config: dict) -> None:
            super().__init__(config)
            consumers.append(self)

    catalogs: list[object] = []
    opened = tables.catalog
    monkeypatch.setattr(hub_module, "Consumer", Counted)
    monkeypatch.setattr(tables, "catalog", lambda s: (catalogs.append(s), opened(s))[1])
    with pytest.raises(NotADirectoryError):
        opened(settings)  # unreadable indeed

    copies = {"symbols=BHP": 3, "symbols=BHP,RIO": 2, "": 1}  # subscribers per query
    with TestClient(create_app(settings), headers={"X-API-Key": DEV_API_KEY}) as client, \
            contextlib.ExitStack() as sockets:
        subscribers = [(sockets.enter_context(client.websocket_connect(f"/v1/stream/trades?{query}")), query)
                       for query, n in copies.items() for _ in range(n)]
        deadline = time.monotonic() + 60
        while REGISTRY.get_sample_value("k2_stream_subscribers", {"kind": "trades"}) != len(subscribers):
            assert len(consumers) <= 1, f"{len(consumers)} Kafka consumers for {len(subscribers)} subscribers"
            assert time.monotonic() < deadline, "the subscribers never all joined the hub"
            time.sleep(0.1)
        ticks = [(symbol, seq) for seq in range(1, 11) for symbol in ("BHP", "RIO", "WOW")]
        trades_producer(embedded_settings, ticks)
        for ws, query in subscribers:
            symbols = set(query.removeprefix("symbols=").split(",")) if query else {"BHP", "RIO", "WOW"}
            got = [json.loads(ws.receive_text()) for _ in range(10 * len(symbols))]
            assert sorted((t["symbol"], t["sequence_number"]) for t in got) == sorted(
                t for t in ticks if t[0] in symbols), query
    assert len(consumers) == 1, f"{len(consumers)} Kafka consumers for {len(subscribers)} subscribers"
    assert catalogs == [], "the push opened the Iceberg catalog"
