"""A rolling update of the stream Deployment adds a writer to the group before it removes one. With
eager assignment every join revoked every partition of every writer, which dropped the batches
they were building and stopped them all, twice per replaced pod. With cooperative-sticky
assignment a writer keeps the partitions it is not asked to give up, and its batch for them."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from k2 import tables, topics
from k2.dlq import DeadLetterSink, open_sink
from k2.ingest.pipeline import ingest_files
from k2.observability import REGISTRY
from k2.settings import Settings
from k2.stream.runner import build_writers
from k2.stream.writer import TableWriter
from k2_synthetic import generate

pytestmark = pytest.mark.integration


def _poll_until(writers: list[TableWriter], condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for writer in writers:
            writer.poll(0.05)
        if condition():
            return
    raise AssertionError(f"timed out waiting for {what}: {[sorted(w.assigned) for w in writers]}")


def _catch_up_and_close(writers: list[TableWriter], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.batch.empty and w.lag() == 0 for w in writers):
        assert time.monotonic() < deadline, f"the writers did not catch up: lag {[w.lag() for w in writers]}"
        for writer in writers:
            writer.poll(0.05)
            writer.flush()
    for writer in writers:
        writer.close()


def _recording_revocations(writer: TableWriter) -> list[int]:
    revoked: list[int] = []
    handler = writer._on_revoke

    def recording(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked.extend(tp.partition for tp in partitions)
        handler(consumer, partitions)

    writer._on_revoke = recording  # type: ignore[method-assign]  # start() subscribes with it
    return revoked


def _trades_held_in_batches(tmp_path: Path, embedded_settings: Settings, **ticks: int,
                            ) -> tuple[Settings, int, DeadLetterSink]:
    """Synthetic trades produced, settings whose batches close only when flushed, and a DLQ."""
    summary = ingest_files(generate(tmp_path / "ticks", **ticks), embedded_settings, kinds=("trades",),
                           with_reference=False)
    settings = embedded_settings.model_copy(update={"batch_rows": 10**9, "batch_seconds": 3600.0})
    topics.ensure_pipeline_topics(settings, ("trades",))
    return settings, summary.produced[settings.topic("trades")], open_sink(settings, tmp_path / "dlq.jsonl")


def _assert_each_trade_stored_once(settings: Settings, n_trades: int) -> None:
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    keys = table.scan(selected_fields=("symbol", "exchange_date", "sequence_number")).to_arrow()
    assert keys.num_rows == n_trades
    assert keys.group_by(["symbol", "exchange_date", "sequence_number"]).aggregate([]).num_rows == n_trades


def test_a_joining_writer_takes_partitions_without_stopping_the_others(tmp_path: Path,
                                                                       embedded_settings: Settings) -> None:
    # Batches only close when the test flushes them, so what a revocation drops is visible.
    settings, n_trades, dlq = _trades_held_in_batches(tmp_path, embedded_settings, symbols=12, days=2, seed=3)
    every = set(range(settings.topic_partitions))

    first, = build_writers(settings, ("trades",), dlq)
    revoked_from_first = _recording_revocations(first)
    first.start()
    _poll_until([first], lambda: first.assigned == every and first.batch.messages == n_trades,
                "the first writer to own every partition and buffer every trade")
    buffered = set(first.batch.start)

    second, = build_writers(settings, ("trades",), dlq)
    second.start()
    writers = [first, second]
    _poll_until(writers, lambda: bool(second.assigned) and first.assigned | second.assigned == every
                and not first.assigned & second.assigned, "the partitions to be shared")

    kept = first.assigned
    assert kept and not set(revoked_from_first) & kept, \
        f"partitions {sorted(set(revoked_from_first) & kept)} were revoked from the writer that kept them"
    assert kept & buffered and set(first.batch.start) == kept & buffered, \
        "the batch for the partitions it kept was dropped"
    assert set(revoked_from_first) == every - kept

    _catch_up_and_close(writers)
    _assert_each_trade_stored_once(settings, n_trades)


def test_writers_rolled_in_over_an_eager_group_take_over_once_its_members_leave(
        tmp_path: Path, embedded_settings: Settings) -> None:
    """Kafka does not mix eager and cooperative assignment in one group: a pod of this release
    rolled in beside one of an earlier release (eager `range`) waits, then takes every partition."""
    summary = ingest_files(generate(tmp_path / "ticks", symbols=4, days=1, seed=5), embedded_settings,
                           kinds=("trades",), with_reference=False)
    n_trades = summary.produced[embedded_settings.topic("trades")]
    dlq = open_sink(embedded_settings, tmp_path / "dlq.jsonl")
    new, = build_writers(embedded_settings, ("trades",), dlq)
    old = Consumer({"bootstrap.servers": embedded_settings.kafka_bootstrap, "group.id": new.consumer_group,
                    "partition.assignment.strategy": "range", "enable.auto.commit": False})
    old.subscribe([new.topic])
    deadline = time.monotonic() + 60
    while not old.assignment():
        assert time.monotonic() < deadline, "the earlier release's consumer got no partitions"
        old.poll(0.2)

    new.start()
    waited = time.monotonic() + 10
    while time.monotonic() < waited:
        new.poll(0.2)
        old.poll(0.05)
    assert not new.assigned, "a cooperative member was let into an eager group"

    old.close()
    every = set(range(embedded_settings.topic_partitions))
    _poll_until([new], lambda: new.assigned == every, "the new writer to take every partition")
    _catch_up_and_close([new])
    table = tables.catalog(embedded_settings).load_table(embedded_settings.table_identifier("trades"))
    assert table.scan().count() == n_trades


def test_a_killed_writers_partitions_are_taken_over_within_seconds(tmp_path: Path,
                                                                    embedded_settings: Settings) -> None:
    """A writer that dies without leaving its group (SIGKILL, the OOM killer, a lost node) holds its
    partitions until the coordinator stops hearing its heartbeats: session.timeout.ms, 45 s by
    Kafka's default, in which its share of every table stands still."""
    summary = ingest_files(generate(tmp_path / "ticks", symbols=6, days=1, seed=8), embedded_settings,
                           kinds=("trades",), with_reference=False)
    n_trades = summary.produced[embedded_settings.topic("trades")]
    dlq = open_sink(embedded_settings, tmp_path / "dlq.jsonl")
    every = set(range(embedded_settings.topic_partitions))
    dying = subprocess.Popen([str(Path(sys.executable).with_name("k2")), "stream", "run", "--tables", "trades"],
                             env={**os.environ, **embedded_settings.to_env(), "K2_LOG_LEVEL": "WARNING"})
    try:
        survivor, = build_writers(embedded_settings, ("trades",), dlq)
        survivor.start()
        _poll_until([survivor], lambda: bool(survivor.assigned) and survivor.assigned != every,
                    "the dying writer and the survivor to share the partitions")
    finally:
        dying.kill()
        dying.wait()
    killed = time.monotonic()
    _poll_until([survivor], lambda: survivor.assigned == every, "the survivor to take every partition")
    took = time.monotonic() - killed
    assert took < 20, f"the killed writer's partitions stood still for {took:.0f}s"
    _catch_up_and_close([survivor])
    table = tables.catalog(embedded_settings).load_table(embedded_settings.table_identifier("trades"))
    assert table.scan().count() == n_trades


def test_a_batch_fenced_on_the_write_thread_is_reread_by_the_polling_thread(tmp_path: Path,
                                                                          embedded_settings: Settings) -> None:
    """`k2 stream run` writes full batches on a thread of their own while it goes on consuming. A
    batch found fenced there (another writer committed its offsets first) is dropped, and the
    writer seeks again from the table's offsets on the polling thread, which owns the consumer."""
    settings, n_trades, dlq = _trades_held_in_batches(tmp_path, embedded_settings, symbols=4, days=1, seed=5)
    fenced_before = REGISTRY.get_sample_value("k2_commits_total",
                                              {"table": settings.table_identifier("trades"), "outcome": "fenced"}) or 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-test-write") as flusher:
        late, = build_writers(settings, ("trades",), dlq, flusher=flusher)
        threads: dict[str, list[str]] = {"write": [], "reseek": []}
        for name in threads:
            method = getattr(late, f"_{name}" if name == "write" else name)

            def recording(*args, _method=method, _name=name):
                threads[_name].append(threading.current_thread().name)
                return _method(*args)

            setattr(late, f"_{name}" if name == "write" else name, recording)
        late.start()
        _poll_until([late], lambda: late.batch.messages == n_trades, "the late writer to buffer every trade")

        early, = build_writers(settings, ("trades",), dlq, group_id="k2-test-early")
        early.start()
        _poll_until([early], lambda: early.batch.messages == n_trades, "the early writer to buffer every trade")
        assert early.flush() == n_trades
        early.close()

        late.settings = settings.model_copy(update={"batch_seconds": 0.0})  # its batch is due now
        late.poll(0)
        assert late.batch.empty and threads["write"] == ["k2-test-write_0"], "handed to the write thread"
        # Later trades arrive: the next batch is due before the fenced one's fate is known, and the
        # reseek drops it too.
        later = ingest_files(generate(tmp_path / "later", symbols=4, days=1, seed=5, start=dt.date(2014, 3, 11)),
                             settings, kinds=("trades",), with_reference=False)
        _poll_until([late], lambda: bool(threads["reseek"]), "the fenced batch to be seen")
        late.settle()
        assert threads["reseek"] == [threading.current_thread().name]
        _catch_up_and_close([late])
    fenced = REGISTRY.get_sample_value("k2_commits_total",
                                       {"table": settings.table_identifier("trades"), "outcome": "fenced"})
    assert fenced == fenced_before + 1
    _assert_each_trade_stored_once(settings, n_trades + later.produced[settings.topic("trades")])
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    empty = [s.snapshot_id for s in table.snapshots() if not int(s.summary.get("added-records", 0) or 0)]
    assert not empty, "a batch the reseek dropped was committed empty"


def test_a_writer_given_a_new_consumer_leaves_its_group_and_resumes_from_the_table_exactly(
        tmp_path: Path, embedded_settings: Settings) -> None:
    """The fetch-stall watch's last remedy (`FetchStallWatch`): a consumer its group or its fetchers
    left stuck is closed and a new one joins; what the old one had buffered is read again."""
    settings, n_trades, dlq = _trades_held_in_batches(tmp_path, embedded_settings, symbols=6, days=1, seed=9)
    every = set(range(settings.topic_partitions))
    writer, = build_writers(settings, ("trades",), dlq)
    writer.start()
    _poll_until([writer], lambda: writer.assigned == every and writer.batch.messages == n_trades,
                "the writer to buffer every trade")
    assert writer.left_behind(3600), "nothing committed yet: every trade is past the table's offsets"
    stuck = writer.consumer
    rejoined = time.monotonic()
    writer.rejoin()
    assert writer.consumer is not stuck and writer.batch.empty and not writer.assigned
    _poll_until([writer], lambda: writer.assigned == every, "the new consumer to be given every partition")
    # a member that had not left would hold its partitions until its session timed out (10 s)
    took = time.monotonic() - rejoined
    assert took < 8, f"the new consumer waited {took:.0f}s for the old one's partitions"
    _poll_until([writer], lambda: writer.batch.messages == n_trades, "the new consumer to buffer every trade again")
    writer.flush()
    assert writer.lag() == 0 and not writer.left_behind(0)
    writer.close()
    _assert_each_trade_stored_once(settings, n_trades)


def test_a_rebalance_while_the_write_thread_commits_a_batch_does_not_deadlock(tmp_path: Path,
                                                                            embedded_settings: Settings) -> None:
    """A revocation waits for the batch being written (it must not commit past the revocation),
    served inside the consumer's poll; confluent-kafka lets one thread at a time into a consumer,
    so anything the write thread asked of the consumer then waited for that poll: a deadlock, seen
    when a broker came back. The write thread asks nothing of the consumer."""
    settings, n_trades, dlq = _trades_held_in_batches(tmp_path, embedded_settings, symbols=12, days=1, seed=4)
    every = set(range(settings.topic_partitions))
    first, = build_writers(settings, ("trades",), dlq, flusher=_DaemonThreads())
    commit = first._commit

    def slow_commit(*args):  # still writing when the rebalance comes
        time.sleep(5)
        return commit(*args)

    first._commit = slow_commit  # type: ignore[method-assign]
    first.start()
    _poll_until([first], lambda: first.assigned == every and first.batch.messages == n_trades,
                "the first writer to buffer every trade")
    first._write_batch()
    second, = build_writers(settings, ("trades",), dlq)
    second.start()
    gave_up = threading.Event()
    threading.Thread(target=lambda: (_poll_until([first], lambda: first.assigned != every, "a revocation"),
                                     gave_up.set()), daemon=True).start()
    deadline = time.monotonic() + 60
    while not gave_up.is_set() and time.monotonic() < deadline:
        second.poll(0.05)
    assert gave_up.is_set(), "the first writer's poll and its write thread wait for each other"
    _catch_up_and_close([first, second])
    _assert_each_trade_stored_once(settings, n_trades)


class _DaemonThreads(Executor):
    """Each batch written on a daemon thread of its own: a deadlocked one fails its test instead of
    hanging the run, as a ThreadPoolExecutor's worker would at exit."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001  # the writer's settle() raises it
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True, name="k2-test-write").start()
        return future
