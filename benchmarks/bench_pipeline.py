"""Ingest and stream throughput on the ASX sample, each against a bare baseline in the same run.

- ingest: parse + number + encode + produce every CSV row, vs. the bare confluent-kafka producer
  sending the same number of already-serialized payloads (the ceiling), alternating, `--rounds`
  times each (fresh topics every round), K2 ÷ bare per round and the median;
- stream: Kafka → Iceberg rows/s of `k2 stream run --until-idle 0.5` on the produced backlog, over
  the whole run (start-up and the 0.5 s idle wait before it returns included) and while consuming
  (first assignment to last commit: a writer commits as soon as it has read everything), and end-to-end wall time
  CSV → Kafka → Iceberg, vs. a bare pyarrow Parquet (zstd) write of the same rows; as deployed (a
  process per table) and with `--one-process`, in the same run;
- CSV → queryable as deployed: `k2 stream run` already running (its own process, joined) while
  the CSV is ingested, timed until both tables' current snapshots hold every produced row;
  `--rounds` times, each on tables and topics of its own, and the median.

Usage: python benchmarks/bench_pipeline.py --data ../shared/data/asx-2014-03  (needs Kafka + registry;
`k2 stack up --embedded` or `make bench`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from bench_live import K2
from confluent_kafka import ConsumerGroupState, Producer
from pyiceberg.catalog import Catalog

from k2 import tables, topics
from k2.ingest.pipeline import ingest_files, register_schemas
from k2.kafka import PRODUCER_DEFAULTS, table_group
from k2.settings import Settings, TableKind
from k2.sources.asx import RecordBuilder, RowError, discover
from k2.stream import processes, runner
from k2.stream.writer import rows_to_arrow

KINDS: tuple[TableKind, ...] = ("trades", "quotes")


def bench_settings(tmp: Path, tag: str) -> Settings:
    """A private embedded lakehouse under `tmp` and topics of their own (asset class bench<tag>)."""
    return Settings(asset_class=f"bench{tag}", catalog_uri=f"sqlite:///{tmp}/catalog.db",
                    warehouse=str(tmp / "warehouse"), log_level="WARNING")


def process_env(settings: Settings) -> dict[str, str]:
    """The environment of a K2 process with exactly these settings: none of the K2_* variables a
    stack run may have exported."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")}, **settings.to_env()}


def encoded(data: Path, settings: Settings) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, Confluent-Avro value) of every good row of the ASX folder, encoded as K2 does."""
    encoders = register_schemas(settings, KINDS)
    messages = []
    for tick_file in discover(data):
        builder = RecordBuilder(tick_file, 0)
        for line in tick_file.path.open(newline=""):
            try:
                messages.append((settings.topic(tick_file.kind), tick_file.symbol.encode(),
                                 encoders[tick_file.kind].encode(builder.build(line))))
            except RowError:
                pass
    return messages


def produce_all(settings: Settings, messages: list[tuple[str, bytes, bytes]]) -> None:
    """A bare idempotent producer sending `messages` as fast as it goes, until all are acknowledged."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS})
    for topic, key, value in messages:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def bench_ingest(data: Path, tmp: Path, rounds: int) -> list[dict[str, float]]:
    """K2's ingest and the bare producer in turn, `rounds` times: on 2 cores either one's rate moves
    with the machine's state, so each ratio is of two runs next to each other."""
    # ceiling: the same number of pre-serialized payloads through a bare producer, to a topic a round
    settings = bench_settings(tmp, "bare")
    payloads = [(key, value) for _topic, key, value in encoded(data, settings)]
    results = []
    for _ in range(rounds):
        summary = ingest_files(data, bench_settings(tmp, uuid.uuid4().hex[:6]), with_reference=False)
        k2_rate = summary.produced_total / summary.seconds
        bare_topic = f"bench.bare.{uuid.uuid4().hex[:6]}"
        topics.ensure_topic(topics.admin_client(settings.kafka_bootstrap), topics.TopicSpec(bare_topic, 6))
        messages = [(bare_topic, key, value) for key, value in payloads]
        started = time.perf_counter()
        produce_all(settings, messages)
        bare_rate = len(payloads) / (time.perf_counter() - started)
        results.append({"messages": summary.produced_total, "k2_msgs_per_s": k2_rate, "bare_msgs_per_s": bare_rate,
                        "ratio": k2_rate / bare_rate})
    return results


def bench_stream(data: Path, tmp: Path, *, per_table: bool) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    (tmp / tag).mkdir()
    settings = bench_settings(tmp / tag, tag)  # tables of its own: rows already stored would be dropped as duplicates
    started = time.perf_counter()
    summary = ingest_files(data, settings, with_reference=False)
    produced = time.perf_counter()
    result = (processes.run if per_table else runner.run)(settings, KINDS, until_idle=0.5)
    finished = time.perf_counter()
    rows = sum(result.rows_written.values())
    assert rows == summary.produced_total, (rows, summary.produced_total)

    # baseline: bare pyarrow Parquet (zstd) write of the same rows
    from k2.schemas import arrow_schema

    arrow_tables = []
    for kind in ("trades", "quotes"):
        records = []
        for tick_file in discover(data, kinds=(kind,)):
            builder = RecordBuilder(tick_file, 0)
            records.extend(builder.build(line) for line in tick_file.path.open(newline=""))
        arrow_tables.append(rows_to_arrow(records, arrow_schema(kind)))
    t0 = time.perf_counter()
    for i, table in enumerate(arrow_tables):
        pq.write_table(table, tmp / f"bare-{i}.parquet", compression="zstd")
    bare = time.perf_counter() - t0
    stream_seconds = finished - produced
    return {"rows": rows, "stream_rows_per_s": rows / stream_seconds, "stream_seconds": stream_seconds,
            "consuming_rows_per_s": rows / result.consuming_seconds,
            "end_to_end_seconds": finished - started, "bare_parquet_seconds": bare,
            "ratio_stream_to_bare_parquet": stream_seconds / bare}


def wait_joined(settings: Settings, groups: list[str], timeout: float = 60.0, members: int = 1) -> None:
    """Until every group is Stable with `members` members holding partitions: the stream is consuming."""
    admin = topics.admin_client(settings.kafka_bootstrap)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = [f.result(10) for f in admin.describe_consumer_groups(groups).values()]
        if all(g.state == ConsumerGroupState.STABLE
               and sum(bool(m.assignment.topic_partitions) for m in g.members) >= members for g in described):
            return
        time.sleep(0.1)
    raise TimeoutError(f"stream groups {groups} not joined within {timeout}s")


def committed_rows(catalog: Catalog, settings: Settings, kind: TableKind) -> int:
    table = tables.load_table(catalog, settings.table_identifier(kind))
    snapshot = table.current_snapshot() if table is not None else None
    return int(snapshot.summary["total-records"] or 0) if snapshot is not None and snapshot.summary else 0


def bench_overlapped(data: Path, tmp: Path, batch_seconds: float, *stream_options: str) -> dict[str, float]:
    """CSV → queryable with the stream already running, as in a deployment: the clock starts when
    ingest starts and stops when every produced row is in a committed snapshot."""
    settings = bench_settings(tmp, uuid.uuid4().hex[:6]).model_copy(update={"batch_seconds": batch_seconds})
    topics.ensure_pipeline_topics(settings, KINDS)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    stream = subprocess.Popen([K2, "stream", "run", "--tables", ",".join(KINDS), "--group-id", prefix, *stream_options],
                              env=process_env(settings))
    catalog = tables.catalog(settings)  # once: the polling below must not load the machine it measures
    try:
        wait_joined(settings, [table_group(prefix, kind) for kind in KINDS])
        started = time.perf_counter()
        summary = ingest_files(data, settings, with_reference=False)
        ingested = time.perf_counter()
        produced = {kind: summary.produced[settings.topic(kind)] for kind in KINDS}
        while any(committed_rows(catalog, settings, kind) < produced[kind] for kind in KINDS):
            time.sleep(0.02)
        queryable = time.perf_counter()
    finally:
        stream.terminate()
        stream.wait(60)
    assert {kind: committed_rows(catalog, settings, kind) for kind in KINDS} == produced, produced
    return {"rows": summary.produced_total, "ingest_seconds": ingested - started,
            "queryable_seconds": queryable - started, "rows_per_s": summary.produced_total / (queryable - started)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("K2_ASX_DATA", "../shared/data/asx-2014-03")))
    parser.add_argument("--batch-seconds", type=float, default=0.2,
                        help="the stream's commit interval in the overlapped run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the ingest pair and of CSV → queryable")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="k2-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ingest = bench_ingest(args.data, tmp, args.rounds)
        streams = {"a process per table": bench_stream(args.data, tmp, per_table=True),
                   "one process": bench_stream(args.data, tmp, per_table=False)}
        overlapped = [bench_overlapped(args.data, tmp, args.batch_seconds) for _ in range(args.rounds)]
    print(f"\n### Ingest (CSV → Kafka), ASX sample, K2 then the bare producer, {args.rounds} rounds\n")
    print("| round | messages | K2 msg/s | bare producer msg/s (ceiling) | K2 ÷ bare |")
    print("|---|---:|---:|---:|---:|")
    for i, one in enumerate(ingest, 1):
        print(f"| {i} | {one['messages']:,} | {one['k2_msgs_per_s']:,.0f} | {one['bare_msgs_per_s']:,.0f} | "
              f"{one['ratio']:.2f} |")
    print(f"| median | | | | **{statistics.median(one['ratio'] for one in ingest):.2f}** |")
    print("\n### Stream (Kafka → Iceberg) and end to end, ASX sample\n")
    print("| `k2 stream run` | rows | stream rows/s (whole run, the 0.5 s idle exit wait in it) | rows/s consuming "
          "(first assignment → last commit) | "
          "stream s | end-to-end s (CSV → Kafka → Iceberg) | bare Parquet write s | stream ÷ bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, stream in streams.items():
        print(f"| {mode} | {stream['rows']:,} | {stream['stream_rows_per_s']:,.0f} | "
              f"{stream['consuming_rows_per_s']:,.0f} | {stream['stream_seconds']:.2f} | "
              f"{stream['end_to_end_seconds']:.2f} | {stream['bare_parquet_seconds']:.2f} | "
              f"{stream['ratio_stream_to_bare_parquet']:.1f}× |")
    print(f"\n### CSV → queryable with the stream running (commits every {args.batch_seconds} s), ASX sample\n")
    print("| round | rows | ingest s | CSV → queryable s | rows/s |")
    print("|---|---:|---:|---:|---:|")
    for i, one in enumerate(overlapped, 1):
        print(f"| {i} | {one['rows']:,} | {one['ingest_seconds']:.2f} | {one['queryable_seconds']:.2f} | "
              f"{one['rows_per_s']:,.0f} |")
    print(f"| median | | | **{statistics.median(one['queryable_seconds'] for one in overlapped):.2f}** | |")


if __name__ == "__main__":
    main()
