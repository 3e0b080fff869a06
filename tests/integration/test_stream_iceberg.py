"""Stream on the real stack: exact counts, de-duplication, faults (kill -9 at each step of a commit),
poison, evolution, maintenance (compaction, expiry, orphan files)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from pyarrow.fs import FileSelector, FileType
from pyiceberg.io.pyarrow import PyArrowFileIO

from k2 import schemas, tables, topics
from k2.dlq import open_sink
from k2.ingest.pipeline import ingest_files, register_schemas
from k2.observability import REGISTRY
from k2.schemas.registry import client, register, value_subject
from k2.schemas.wire import AvroEncoder
from k2.settings import Settings
from k2.stream.maintenance import file_stats, files_per_partition, maintain
from k2.stream.runner import build_writers
from k2.stream.runner import run as stream_run
from k2_synthetic import generate

pytestmark = pytest.mark.integration
K2 = str(Path(sys.executable).with_name("k2"))


def _table(settings: Settings, kind: str):
    return tables.catalog(settings).load_table(settings.table_identifier(kind))


def _keys_unique(table) -> None:
    keys = table.scan(selected_fields=("symbol", "exchange_date", "sequence_number")).to_arrow()
    grouped = keys.group_by(["symbol", "exchange_date", "sequence_number"]).aggregate([])
    assert grouped.num_rows == keys.num_rows, "duplicate (symbol, exchange_date, sequence_number)"


def _wait_for_first_commit(settings: Settings, kind: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        table = tables.load_table(tables.catalog(settings), settings.table_identifier(kind))
        if table is not None and table.current_snapshot() is not None:
            return
        time.sleep(0.2)
    raise AssertionError(f"no commit to {kind} (stream exit code {proc.poll()})")


def _stream_cli(settings: Settings, *args: str, env_extra: dict[str, str] | None = None,
                **popen) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "WARNING", **(env_extra or {})}
    return subprocess.Popen([K2, "stream", "run", *args], env=env, **popen)


@pytest.mark.asx
def test_asx_sample_end_to_end_exact_and_idempotent(asx_root, catalog_settings):
    ingest_files(asx_root, catalog_settings)
    result = stream_run(catalog_settings, until_idle=1.0)
    trades, quotes = _table(catalog_settings, "trades"), _table(catalog_settings, "quotes")
    assert trades.scan().count() == 200_545 and quotes.scan().count() == 169_629
    assert result.rows_written[catalog_settings.table_identifier("trades")] == 200_545
    # consuming is timed from the first assignment to the last commit: within the run, less its start-up
    assert 0 < result.consuming_seconds < result.seconds
    _keys_unique(trades)
    _keys_unique(quotes)

    # per symbol, rows are stored in (exchange_timestamp, sequence_number) order within each file
    data = trades.scan(selected_fields=("symbol", "exchange_date", "exchange_timestamp", "sequence_number",
                                        "price")).to_arrow()
    for symbol in ("BHP", "DVN"):
        one = data.filter(pc.equal(data["symbol"], symbol)).sort_by(
            [("exchange_date", "ascending"), ("sequence_number", "ascending")])
        ts = one["exchange_timestamp"].to_pylist()
        days = one["exchange_date"].to_pylist()
        assert all(days[i] != days[i + 1] or ts[i] <= ts[i + 1] for i in range(len(ts) - 1))
    assert str(data["price"].type) == "decimal128(18, 6)"

    snapshot = trades.current_snapshot().snapshot_id
    ingest_files(asx_root, catalog_settings)  # the same files again
    stream_run(catalog_settings, until_idle=1.0)
    trades = _table(catalog_settings, "trades")
    assert trades.scan().count() == 200_545 and _table(catalog_settings, "quotes").scan().count() == 169_629
    assert trades.current_snapshot().snapshot_id != snapshot  # offsets advanced, rows did not


def _synthetic(tmp_path: Path, settings: Settings, days: int = 2) -> tuple[int, int]:
    root = generate(tmp_path / "ticks", symbols=3, days=days, seed=11)
    summary = ingest_files(root, settings)
    return summary.produced[settings.topic("trades")], summary.produced[settings.topic("quotes")]


def test_writer_killed_mid_batch_restarts_to_exact_counts(tmp_path, embedded_settings):
    n_trades, _ = _synthetic(tmp_path, embedded_settings)
    slow = embedded_settings.model_copy(update={"batch_rows": 4000, "batch_seconds": 30.0})
    proc = _stream_cli(slow, "--tables", "trades")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill after the first commits, while a batch is open
        table = tables.load_table(tables.catalog(slow), slow.table_identifier("trades"))
        if table is not None and table.current_snapshot() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _table(embedded_settings, "trades").scan().count()
    assert 0 < committed < n_trades
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    table = _table(embedded_settings, "trades")
    assert table.scan().count() == n_trades
    _keys_unique(table)


def test_group_offsets_lost_after_iceberg_commit_changes_nothing(tmp_path, embedded_settings):
    """State (a) of a crash between the Iceberg commit and the group-offset commit: the table
    has the batch, the group does not. Rewinding the group to 0 reproduces it exactly."""
    n_trades, _ = _synthetic(tmp_path, embedded_settings)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    table = _table(embedded_settings, "trades")
    before = table.current_snapshot().snapshot_id
    topic = embedded_settings.topic("trades")
    group = Consumer({"bootstrap.servers": embedded_settings.kafka_bootstrap,
                      "group.id": f"k2-stream-{embedded_settings.table_identifier('trades')}"})
    parts = group.list_topics(topic, timeout=10).topics[topic].partitions
    group.commit(offsets=[TopicPartition(topic, p, 0) for p in parts], asynchronous=False)
    group.close()
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    table = _table(embedded_settings, "trades")
    assert table.scan().count() == n_trades
    assert table.current_snapshot().snapshot_id == before  # nothing re-read, nothing committed


@pytest.mark.parametrize(("configuration", "n_writers"), [("embedded_settings", 2), ("production_settings", 3)],
                         ids=["sqlite-local-2", "postgres-s3-3"])
def test_writers_in_one_group_store_each_row_once(configuration, n_writers, request, tmp_path):
    """Concurrent commits are where catalogs differ: also three writers on the Postgres catalog
    with the S3 warehouse, as the chart deploys them."""
    settings = request.getfixturevalue(configuration)
    n_trades, _ = _synthetic(tmp_path, settings, days=3)
    small = settings.model_copy(update={"batch_rows": 3000})
    writers = [_stream_cli(small, "--tables", "trades", "--until-idle", "3") for _ in range(n_writers)]
    for w in writers:
        assert w.wait(timeout=180) == 0
    table = _table(settings, "trades")
    assert table.scan().count() == n_trades
    _keys_unique(table)


def test_kafka_broker_restart_while_writing(tmp_path, embedded_settings, kafka, drain):
    n_trades, n_quotes = _synthetic(tmp_path, embedded_settings, days=3)
    slow = embedded_settings.model_copy(update={"batch_rows": 2000})
    stream_log = tmp_path / "stream.log"
    with stream_log.open("wb") as log_file:
        proc = _stream_cli(slow, "--tables", "trades,quotes", "--until-idle", "5", stderr=log_file)
    _wait_for_first_commit(embedded_settings, "trades", proc)  # the broker goes away mid-stream, not at start
    kafka.stop()
    time.sleep(2)
    kafka.start()
    try:
        code = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # a hung writer must not outlive the test (it would keep running after make test)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, f"stream exit code {code}; its log ends:\n{stream_log.read_text()[-6000:]}"
    assert _table(embedded_settings, "trades").scan().count() == n_trades
    assert _table(embedded_settings, "quotes").scan().count() == n_quotes
    _keys_unique(_table(embedded_settings, "trades"))
    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    assert not [x for x in letters if x["stage"] == "stream"], "a broker restart is not poison"


def test_a_table_commit_does_not_wait_for_the_group_coordinator(tmp_path, embedded_settings, kafka):
    """Group offsets only feed lag monitoring. A synchronous group commit waited for librdkafka to
    find the coordinator again (45 s a batch after a broker restart, in the poll loop), and so
    stalled every table behind it while the broker was away or the group was being reloaded."""
    n_trades, _ = _synthetic(tmp_path, embedded_settings)
    held = embedded_settings.model_copy(update={"batch_rows": 10**9, "batch_seconds": 3600.0})
    writer, = build_writers(held, ("trades",), open_sink(held, tmp_path / "dlq.jsonl"))
    writer.start()
    deadline = time.monotonic() + 90
    while writer.batch.messages < n_trades and time.monotonic() < deadline:
        writer.poll(0.1)
    assert writer.batch.messages == n_trades
    kafka.stop()
    try:
        flushing = threading.Thread(target=writer.flush, daemon=True)
        flushing.start()
        flushing.join(timeout=20)
        assert not flushing.is_alive(), "the batch waited for the broker to commit group offsets"
    finally:
        kafka.start()
    assert _table(embedded_settings, "trades").scan().count() == n_trades
    writer.close()


def test_a_bounded_run_commits_as_soon_as_it_has_read_everything(tmp_path, embedded_settings):
    """`--until-idle` waits out its idle period before it returns, but there is nothing to wait for
    before committing: the last rows are queryable once read, not an idle period later."""
    n_trades, n_quotes = _synthetic(tmp_path, embedded_settings)
    idle = 4.0
    result = stream_run(embedded_settings.model_copy(update={"batch_seconds": 3600.0}), ("trades", "quotes"),
                        until_idle=idle, dlq_file=tmp_path / "dlq.jsonl")
    returned = time.time()
    assert result.rows_written == {embedded_settings.table_identifier("trades"): n_trades,
                                   embedded_settings.table_identifier("quotes"): n_quotes}
    for kind in ("trades", "quotes"):
        committed = _table(embedded_settings, kind).current_snapshot().timestamp_ms / 1000
        # The idle period runs after the last commit, not before it (an hour's batch bound otherwise).
        assert returned - committed >= idle - 1.0, (kind, returned - committed)


def test_poison_messages_go_to_the_dlq_and_never_block(tmp_path, embedded_settings, drain):
    n_trades, _ = _synthetic(tmp_path, embedded_settings)
    topic = embedded_settings.topic("trades")
    producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
    poison = {b"not avro at all": "not_confluent_avro", b"\x00\x7f\xff\xff\xf0garbage": "unknown_schema_id"}
    encoder = register_schemas(embedded_settings, ("trades",))["trades"]
    poison[encoder.header + b"\x01"] = "undecodable"
    # nanoseconds where microseconds belong: an instant some 44,000 years on, which no reader of
    # the table (Python, the API's JSON, the push) can represent
    poison[encoder.encode({"symbol": "ZZZ", "exchange": "ASX", "exchange_timestamp": 1_394_406_000_000_000_000,
                           "exchange_date": 16139, "sequence_number": 1, "price": (1).to_bytes(1, "big"),
                           "volume": 1, "qualifiers": None, "venue": None, "buyer_id": None,
                           "ingest_timestamp": 0, "source_id": "test"})] = "undecodable"
    for payload in poison:
        producer.produce(topic, payload, b"BHP")
    producer.flush(10)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    assert _table(embedded_settings, "trades").scan().count() == n_trades
    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    stream_letters = [x for x in letters if x["stage"] == "stream"]
    assert sorted(x["reason"] for x in stream_letters) == sorted(poison.values())
    assert all(x["source"] == topic and x["offset"] >= 0 and "partition" in x for x in stream_letters)


def test_ticks_that_do_not_fit_their_exchange_go_to_the_dlq_counted(embedded_settings, drain):
    """The registry's facts are checked where every source's ticks meet: a date that is not the
    exchange's local date of the instant, a symbol not of the exchange's shape, an exchange the
    registry does not know, and a known exchange that is not the pipeline's own (Settings.exchange:
    these are the asx topics). The ticks beside them in the batch are stored."""
    encoder = register_schemas(embedded_settings, ("trades",))["trades"]
    at = 1_394_406_000_000_000  # 2014-03-09 23:00 UTC: 10 March in Sydney, 9 March in UTC

    def tick(symbol: str, exchange: str, day: int) -> bytes:
        return encoder.encode({"symbol": symbol, "exchange": exchange, "exchange_timestamp": at,
                               "exchange_date": day, "sequence_number": 1, "price": (1).to_bytes(1, "big"),
                               "volume": 1, "qualifiers": None, "venue": None, "buyer_id": None,
                               "ingest_timestamp": 0, "source_id": "test"})

    assert embedded_settings.exchange == "asx"
    unfit = {tick("BHP", "ASX", 16138): "wrong_exchange_date", tick("BTC-USD", "ASX", 16139): "bad_symbol",
             tick("RIO", "LSE", 16139): "unknown_exchange", tick("AAPL", "NASDAQ", 16138): "wrong_exchange",
             tick("BTC-USD", "CRYPTO", 16138): "wrong_exchange"}
    fits = [tick("BHP", "ASX", 16139), tick("RIO", "ASX", 16139)]
    counted = {reason: REGISTRY.get_sample_value("k2_rows_rejected_total", {"stage": "stream", "reason": reason})
               or 0.0 for reason in unfit.values()}
    producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
    for payload in [*fits[:1], *unfit, *fits[1:]]:
        producer.produce(embedded_settings.topic("trades"), payload, b"one-partition")
    producer.flush(10)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)

    stored = _table(embedded_settings, "trades").scan(selected_fields=("symbol", "exchange")).to_arrow()
    assert sorted(zip(stored["symbol"].to_pylist(), stored["exchange"].to_pylist(), strict=True)) == [
        ("BHP", "ASX"), ("RIO", "ASX")]
    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    rejected = [x for x in letters if x["stage"] == "stream"]
    assert sorted(x["reason"] for x in rejected) == sorted(unfit.values())
    assert len(fits) + len(unfit) == stored.num_rows + len(rejected), "counts in = stored + rejected"
    assert any("is not ASX's local date of 2014-03-09T23:00:00+00:00" in x["detail"] for x in letters)
    wrong = sorted(x["detail"] for x in rejected if x["reason"] == "wrong_exchange")
    assert [("CRYPTO" in d, "NASDAQ" in d, "ASX" in d) for d in wrong] == [(True, False, True), (False, True, True)]
    for reason in set(unfit.values()):
        after = REGISTRY.get_sample_value("k2_rows_rejected_total", {"stage": "stream", "reason": reason})
        assert after == counted[reason] + list(unfit.values()).count(reason), reason


def test_a_poison_tick_of_a_schema_beyond_the_codec_goes_to_the_dlq(embedded_settings, drain):
    """A writer schema the columnar codec cannot read (a decimal wider than 18 digits) is read by
    fastavro one message at a time: a nanosecond timestamp there must be refused as it is by the
    codec, not stop every later commit (pyiceberg's statistics cannot hold such an instant)."""
    register_schemas(embedded_settings, ("trades",))
    wide = json.loads(json.dumps(schemas.avro_schema("trades")))
    wide["fields"].append({"name": "notional", "default": None, "type": [
        "null", {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 2}]})
    topic = embedded_settings.topic("trades")
    reg = register(client(embedded_settings.registry_url), value_subject(topic), wide)
    encoder = AvroEncoder(reg.schema_id, __import__("fastavro").parse_schema(schemas.strip_logical_types(wide)))

    def tick(symbol: str, timestamp: int, notional: int) -> bytes:
        return encoder.encode({"symbol": symbol, "exchange": "ASX", "exchange_timestamp": timestamp,
                               "exchange_date": 16139, "sequence_number": 1, "price": (1).to_bytes(1, "big"),
                               "volume": 1, "qualifiers": None, "venue": None, "buyer_id": None,
                               "ingest_timestamp": 0, "source_id": "test",
                               "notional": notional.to_bytes(17, "big", signed=True)})

    producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
    producer.produce(topic, tick("ZZZ", 1_394_406_000_000_000_000, 1), b"ZZZ")  # nanoseconds
    producer.produce(topic, tick("ZZY", 1_394_406_000_000_000, 10**38), b"ZZY")  # 39 digits
    producer.produce(topic, tick("BHP", 1_394_406_000_000_000, 10**20), b"BHP")  # beyond int64: valid
    producer.flush(10)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    data = _table(embedded_settings, "trades").scan(selected_fields=("symbol", "notional")).to_arrow()
    assert data.to_pylist() == [{"symbol": "BHP", "notional": Decimal("1000000000000000000.00")}]
    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    stream_letters = sorted((x["reason"], x["detail"]) for x in letters if x["stage"] == "stream")
    assert stream_letters == [("undecodable", "undecodable: exchange_timestamp: beyond the years 1–9999"),
                              ("undecodable", "undecodable: notional: decimal beyond precision 38")]


def test_compatible_schema_evolution_adds_a_column_without_restart(tmp_path, embedded_settings):
    n_trades, _ = _synthetic(tmp_path, embedded_settings)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    evolved = json.loads(json.dumps(schemas.avro_schema("trades")))
    evolved["fields"].append({"name": "trade_id", "type": ["null", "string"], "default": None})
    topic = embedded_settings.topic("trades")
    reg = register(client(embedded_settings.registry_url), value_subject(topic), evolved)
    encoder = AvroEncoder(reg.schema_id, __import__("fastavro").parse_schema(schemas.strip_logical_types(evolved)))
    record = {"symbol": "ZZZ", "exchange": "ASX", "exchange_timestamp": 1_394_406_000_000_000,
              "exchange_date": 16139, "sequence_number": 1, "price": (1_500_000).to_bytes(4, "big", signed=True),
              "volume": 10, "qualifiers": None, "venue": None, "buyer_id": None, "ingest_timestamp": 0,
              "source_id": "test", "trade_id": "T-1"}
    producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
    producer.produce(topic, encoder.encode(record), b"ZZZ")
    producer.flush(10)
    stream_run(embedded_settings, ("trades",), until_idle=1.0)
    data = _table(embedded_settings, "trades").scan(selected_fields=("symbol", "trade_id")).to_arrow()
    assert data.num_rows == n_trades + 1
    ids = dict(zip(data["symbol"].to_pylist(), data["trade_id"].to_pylist(), strict=True))
    assert ids["ZZZ"] == "T-1" and ids["BHP"] is None


def test_time_travel_and_maintenance(tmp_path, catalog_settings):
    root = generate(tmp_path / "ticks", symbols=2, days=1, seed=5)
    small = catalog_settings.model_copy(update={"batch_rows": 500})
    ingest_files(root, small, kinds=("trades",), with_reference=False)
    stream_run(small, ("trades",), until_idle=1.0)
    table = _table(small, "trades")
    first_snapshot, first_count = table.current_snapshot().snapshot_id, table.scan().count()

    more = generate(tmp_path / "more", symbols=2, days=2, seed=5)  # same day 1 + a new day 2
    shutil.rmtree(more / "quotes")
    (more / "quotes").mkdir()
    ingest_files(more, small, kinds=("trades",), with_reference=False)
    stream_run(small, ("trades",), until_idle=1.0)
    table = _table(small, "trades")
    total = table.scan().count()
    assert total > first_count
    assert table.scan(snapshot_id=first_snapshot).count() == first_count

    busiest = max(files_per_partition(table).values())
    assert busiest >= 4, "the small batches should have left several files in a partition"
    before = file_stats(table)
    (report,) = maintain(small, ("trades",), retention_hours=24, min_files=2)
    table = _table(small, "trades")
    assert report.after.files < before.files and max(files_per_partition(table).values()) == 1
    assert table.scan().count() == total and report.after.rows == total
    assert table.scan(snapshot_id=first_snapshot).count() == first_count  # inside retention
    assert tables.recorded_offsets(table), "compaction must carry the Kafka offsets forward"
    stream_run(small, ("trades",), until_idle=1.0)  # writer resumes after compaction
    assert _table(small, "trades").scan().count() == total


def test_reference_rows_are_upserted_by_key(tmp_path, embedded_settings):
    root = generate(tmp_path / "ticks", symbols=2, days=1, seed=3)
    ingest_files(root, embedded_settings, kinds=("trades",))
    stream_run(embedded_settings, ("reference",), until_idle=1.0)
    ingest_files(root, embedded_settings, kinds=("trades",))  # the same reference file again
    result = stream_run(embedded_settings, ("reference",), until_idle=1.0)
    assert result.rows_written[embedded_settings.table_identifier("reference")] == 0
    info = root / "reference-data" / "company_info.csv"
    info.write_text(info.read_text().replace("BHP BILLITON LTD", "BHP GROUP LTD"))
    ingest_files(root, embedded_settings, kinds=("trades",))
    stream_run(embedded_settings, ("reference",), until_idle=1.0)
    rows = _table(embedded_settings, "reference").scan().to_arrow().to_pylist()
    assert sorted((r["symbol"], r["company_name"]) for r in rows) == [("BHP", "BHP GROUP LTD"),
                                                                      ("RIO", "RIO TINTO LTD")]


def test_maintenance_while_a_writer_commits_loses_and_doubles_nothing(tmp_path, embedded_settings):
    small = embedded_settings.model_copy(update={"batch_rows": 100, "batch_seconds": 0.2})
    root = generate(tmp_path / "ticks", symbols=2, days=2, seed=9)
    writer = _stream_cli(small, "--tables", "trades")
    try:
        summary = ingest_files(root, small, kinds=("trades",), with_reference=False)
        expected = summary.produced[small.topic("trades")]
        compacted = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            table = tables.load_table(tables.catalog(small), small.table_identifier("trades"))
            if table is not None and table.current_snapshot() is not None:
                compacted += sum(r.partitions_compacted for r in maintain(small, ("trades",), retention_hours=24,
                                                                            min_files=2))
                if table.refresh().scan().count() == expected and compacted:
                    break
            time.sleep(0.3)
    finally:
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(timeout=60) == 0
    table = _table(small, "trades")
    assert compacted > 0
    assert table.scan().count() == expected
    _keys_unique(table)


def test_workloads_deployed_by_the_operator_only_check_for_topics_and_tables(tmp_path, embedded_settings):
    """K2_CREATE_RESOURCES=false (what the operator renders): nothing is created, a missing topic or
    table is a clear error, and once they exist (made by the operator) the workloads run as usual."""
    managed = embedded_settings.model_copy(update={"create_resources": False})
    root = generate(tmp_path / "ticks", symbols=1, days=1, seed=4)
    with pytest.raises(topics.MissingResource, match=rf"{managed.topic('trades')}.*IngestionPipeline"):
        ingest_files(root, managed, kinds=("trades",), with_reference=False)
    admin = topics.admin_client(managed.kafka_bootstrap)
    assert topics.describe_partitions(admin, [managed.topic("trades"), managed.dlq_topic]) == {}

    produced = ingest_files(root, embedded_settings, kinds=("trades",), with_reference=False)  # standalone: creates
    with pytest.raises(topics.MissingResource, match=r"market\.trades does not exist.*IcebergTable"):
        stream_run(managed, ("trades",), until_idle=1.0)
    assert tables.load_table(tables.catalog(managed), managed.table_identifier("trades")) is None

    tables.ensure_table(tables.catalog(managed), tables.builtin_definition("trades", managed))  # the operator's part
    result = stream_run(managed, ("trades",), until_idle=1.0)
    assert result.rows_written[managed.table_identifier("trades")] == produced.produced[managed.topic("trades")] > 0


# kill -9 at each step of a commit ------------------------------------------------------------
def _killed_at(settings: Settings, point: str) -> None:
    """`k2 stream run` made to SIGKILL itself at its second arrival at `point` (the first commit
    is whole, so the table holds some rows), see k2.crash_points."""
    small = settings.model_copy(update={"batch_rows": 2000})
    proc = _stream_cli(small, "--tables", "trades", env_extra={"K2_TEST_CRASH_AT": f"{point}@2"})
    try:
        assert proc.wait(timeout=180) == -signal.SIGKILL, f"the writer did not die at {point}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stored_files(table) -> dict[str, int]:
    """Every file under the table's location, as its file system names it → size."""
    scheme, netloc, root = PyArrowFileIO.parse_location(table.location(), table.io.properties)
    fs = table.io.fs_by_scheme(scheme, netloc)
    return {info.path: info.size for info in fs.get_file_info(FileSelector(root, recursive=True))
            if info.type == FileType.File}


def _rows_in_parquet_files(table) -> int:
    """Rows of every Parquet file under the table's location, whether the table references it or not."""
    scheme, netloc, _ = PyArrowFileIO.parse_location(table.location(), table.io.properties)
    fs = table.io.fs_by_scheme(scheme, netloc)
    return sum(pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
               for path in _stored_files(table) if path.endswith(".parquet"))


def _group_offsets(settings: Settings) -> dict[int, int]:
    topic = settings.topic("trades")
    group = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                      "group.id": f"k2-stream-{settings.table_identifier('trades')}"})
    try:
        parts = group.list_topics(topic, timeout=10).topics[topic].partitions
        committed = group.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    finally:
        group.close()
    return {tp.partition: tp.offset for tp in committed if tp.offset >= 0}


@pytest.mark.parametrize("point", ["before_files", "after_commit"])
def test_writer_killed_at_a_step_of_a_commit_restarts_to_exact_counts(point, catalog_settings, tmp_path):
    """SIGKILL before the batch's files are written, or after the catalog commit but before the
    consumer-group offsets: the restarted writer ends with every row once. (Killed between the
    files and the catalog commit: the orphan test below.)"""
    settings = catalog_settings
    n_trades, _ = _synthetic(tmp_path, settings)
    _killed_at(settings, point)
    table = _table(settings, "trades")
    committed = table.scan().count()
    assert 0 < committed < n_trades
    if point == "before_files":
        assert _rows_in_parquet_files(table) == committed, "no file of the killed batch was written"
    else:
        recorded = tables.recorded_offsets(table)[settings.topic("trades")]
        group = _group_offsets(settings)
        assert all(group.get(p, 0) <= o for p, o in recorded.items())
        assert sum(group.values()) < sum(recorded.values()), "the group should lag the table's offsets"

    stream_run(settings, ("trades",), until_idle=1.0)
    table = _table(settings, "trades")
    assert table.scan().count() == n_trades
    _keys_unique(table)


def _maintain_cli(settings: Settings, *args: str) -> str:
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "WARNING"}
    done = subprocess.run([K2, "maintain", "--table", "trades", "--min-files", "1000000", *args], env=env,
                          capture_output=True, text=True, timeout=180, check=True)
    return done.stderr


def _referenced_by_pyiceberg(table) -> set[str]:
    """What the table's metadata reaches, by pyiceberg's own inspection tables."""
    locations = {table.metadata_location, *table.inspect.metadata_log_entries()["file"].to_pylist(),
                 *(s.manifest_list for s in table.snapshots()), *table.inspect.all_manifests()["path"].to_pylist(),
                 *table.inspect.all_files()["file_path"].to_pylist()}
    return {PyArrowFileIO.parse_location(x, table.io.properties)[2] for x in locations}


def test_orphans_of_a_killed_commit_are_never_read_and_k2_maintain_removes_exactly_them(catalog_settings, tmp_path):
    """SIGKILL after the batch's files are written, before the catalog commit: they are orphans,
    never read; the restarted writer stores their rows once; `k2 maintain` removes exactly them
    once they are older than the safety age, and the table reads exact."""
    settings = catalog_settings
    n_trades, _ = _synthetic(tmp_path, settings)
    _killed_at(settings, "after_files")
    table = _table(settings, "trades")
    committed = table.scan().count()
    orphans = set(_stored_files(table)) - _referenced_by_pyiceberg(table)
    orphan_rows = _rows_in_parquet_files(table) - committed
    assert {Path(x).suffix for x in orphans} == {".parquet", ".avro"}  # data files, manifest, manifest list
    assert 0 < orphan_rows < n_trades

    stream_run(settings, ("trades",), until_idle=1.0)
    table = _table(settings, "trades")
    assert table.scan().count() == n_trades  # the orphans' rows are stored again, once, by the restart
    assert _rows_in_parquet_files(table) == n_trades + orphan_rows
    files = _stored_files(table)
    assert orphans <= set(files) and orphans == set(files) - _referenced_by_pyiceberg(table)

    assert "0 orphan files removed" in _maintain_cli(settings), "younger than the safety age: kept"
    files = _stored_files(table)
    assert orphans <= set(files)

    assert f"{len(orphans)} orphan files removed" in _maintain_cli(settings, "--orphan-age-hours", "0")
    table = _table(settings, "trades")
    left = set(_stored_files(table))
    assert set(files) - left == orphans and left == _referenced_by_pyiceberg(table)
    assert _rows_in_parquet_files(table) == n_trades
    keys = table.scan(selected_fields=("symbol", "exchange_date", "sequence_number")).to_arrow()
    assert keys.num_rows == n_trades  # reads every remaining data file
    _keys_unique(table)
