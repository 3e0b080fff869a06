"""K2's stream beside Apache Iceberg's Kafka Connect sink, the standard "Kafka into Iceberg", on the
same topics in one run.

    python benchmarks/bench_connect.py --data ../shared/data/asx-2014-03   (needs Kafka + registry)

Starts a Connect worker (k2.stack.iceberg_connect, K2_CONNECT_PORT; stopped again unless it was
already running) and sinks the same topics K2's stream reads into tables of a JDBC catalog on
SQLite, one file per sink (K2: pyiceberg's SQL catalog on SQLite), warehouse on local disk,
decoding K2's Avro with Apicurio's converter from the same registry.

1. Throughput. The ASX sample (or, without it, the synthetic week of the same size) is produced
   once. K2's stream (in-process, as bench_pipeline) drains the topics; then the sink's connectors
   (trades, quotes; commit interval `--tuned-ms`) are created and drain them too. Each: rows /
   (start → both tables' snapshots hold every row), and the steady rate from the snapshots'
   timestamps: the rows after the first commit / (first → last commit). The sink's start is slow:
   it starts its commit worker with its first record, and commit rounds before that worker's
   control consumer is assigned time out (30 s each).
   Both tables of each system are then checked equal (row count and a checksum of every tick's
   key and figures) before anything is compared.
2. Freshness. `k2 stream run --tables trades` (commits every `--batch-seconds`) runs beside the
   tuned connector and one at the sink's default interval (300 s, from the topic's end). A
   producer sends filler trades at `--rate` for `--warmup-seconds` (no probe: startup is not a
   sustained feed's latency), then for `--seconds` with a probe tick every 100 ms on a
   symbol of its own; one process per table polls it (a scan for the probe symbol after each new
   snapshot) and records when each probe first shows: produce → visible in a table scan. One more
   polls K2's API (`k2 api` with its live tail, as a QueryService deploys it) every 25 ms: produce
   → returned by REST, what K2's users see.
Prints markdown tables with the ratios K2 ÷ Connect. Percentiles are nearest-rank over every probe
sent, a probe an observer never saw counting as later than all it saw.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_live import K2, PROBE, _record, filler, start_api, watch_rest
from bench_pipeline import process_env
from bench_query import load_average, markdown
from confluent_kafka import Producer
from pyiceberg.catalog.sql import SqlCatalog

from k2 import tables, topics
from k2.ingest.pipeline import ingest_files, register_schemas
from k2.kafka import PRODUCER_DEFAULTS
from k2.settings import Settings
from k2.stack import connect_peer as peer
from k2.stack.iceberg_connect import (
    CATALOG_NAME,
    CONNECT_VERSION,
    DEFAULT_COMMIT_INTERVAL_MS,
    ICEBERG_VERSION,
    IcebergConnect,
    connector_config,
)
from k2.stream import processes

KINDS = ("trades", "quotes")
PROBE_EVERY = 0.1
API_POLL_SECONDS = 0.025  # K2's REST freshness observer, as bench_live's


def catalog_db(home: Path, table: str) -> Path:
    """One SQLite file per sink: two JdbcCatalogs committing to one file fail with SQLITE_BUSY."""
    return home / f"{table}.db"


def connect_args(home: Path, table: str) -> dict[str, str]:
    """A sink's JDBC catalog as pyiceberg's SQL catalog: the same tables, rows under the sink's catalog name."""
    return {"name": CATALOG_NAME, "uri": f"sqlite:///{catalog_db(home, table)}",
            "warehouse": (home / "connect-warehouse").as_uri()}


def connect_catalog(home: Path, table: str) -> SqlCatalog:
    catalog = SqlCatalog(**connect_args(home, table))
    catalog.create_namespace_if_not_exists("connect")
    return catalog


def sample(data: Path, tmp: Path) -> tuple[Path, str]:
    """The ASX folder when present, else the synthetic week of the same size (k2_synthetic)."""
    if (data / "trades").is_dir():
        return data, f"ASX sample {data.name}"
    from k2_synthetic import generate, plan_scale

    symbols, days = plan_scale(370_000)
    return generate(tmp / "csv", symbols=symbols, days=days, seed=42, intraday="u"), \
        f"synthetic ({symbols} symbols × {days} days; no ASX sample at {data})"


def watch(catalog_args: dict, identifier: str, ready: Any, stop: Any, out: Any, name: str) -> None:
    """First time each probe sequence number shows in a scan of `identifier` (a process of its own)."""
    catalog = SqlCatalog(**catalog_args)
    seen: dict[int, float] = {}
    last = None
    ready.set()
    while not stop.is_set():
        last, seqs = peer.probes_seen(catalog, identifier, PROBE, last)
        now = time.time()
        for seq in seqs:
            seen.setdefault(seq, now)
        time.sleep(0.05)
    out.put((name, seen))


class Run:
    """One benchmark run's private lakehouse, topics, worker and connectors."""

    def __init__(self, home: Path, args: argparse.Namespace) -> None:
        self.home, self.args = home, args
        self.tag = uuid.uuid4().hex[:6]
        self.settings = Settings(asset_class=f"benchc{self.tag}", catalog_uri=f"sqlite:///{home}/k2.db",
                                 warehouse=str(home / "k2-warehouse"), batch_seconds=args.batch_seconds,
                                 log_level="WARNING")
        self.connect = IcebergConnect()
        self.admin = topics.admin_client(self.settings.kafka_bootstrap)
        self.connectors: list[str] = []

    def sink(self, name: str, kind: str, table: str, interval_ms: int | None, offset_reset: str) -> str:
        control = f"bench.connect.{self.tag}.{name}.control"
        topics.ensure_topic(self.admin, topics.TopicSpec(control, 1))
        config = connector_config(topic=self.settings.topic(kind), table=table, control_topic=control,
                                  catalog_db=catalog_db(self.home, table), warehouse=self.home / "connect-warehouse",
                                  bootstrap=self.settings.kafka_bootstrap, registry_url=self.settings.registry_url,
                                  commit_interval_ms=interval_ms)
        config["consumer.override.auto.offset.reset"] = offset_reset
        connector = f"bench-{self.tag}-{name}"
        self.connect.create(connector, config)
        self.connectors.append(connector)
        return control

    def alive(self, connector: str) -> None:
        for task in self.connect.task_states(connector):
            if task["state"] == "FAILED":
                raise RuntimeError(f"{connector} failed:\n{task.get('trace', '')[:3000]}")

    def close(self) -> None:
        for connector in self.connectors:
            try:
                self.connect.delete(connector)
            except Exception as exc:  # noqa: BLE001 - the others are still removed
                print(f"could not delete connector {connector}: {exc}", file=sys.stderr)


def throughput(run: Run, data: Path) -> dict[str, Any]:
    """Rows/s of both sinks draining the same filled topics, one after the other."""
    summary = ingest_files(data, run.settings, with_reference=False)
    produced = {kind: summary.produced[run.settings.topic(kind)] for kind in KINDS}

    started = time.time()
    result = processes.run(run.settings, KINDS, until_idle=0.5)  # as deployed: a process per table
    k2_seconds = time.time() - started
    written = {kind: result.rows_written[run.settings.table_identifier(kind)] for kind in KINDS}
    assert written == produced, (written, produced)
    k2_catalog = tables.catalog(run.settings)
    k2_tables = [k2_catalog.load_table(run.settings.table_identifier(kind)) for kind in KINDS]

    catalogs = {kind: connect_catalog(run.home, f"connect.{kind}") for kind in KINDS}
    started = time.time()
    for kind in KINDS:
        run.sink(f"tuned-{kind}", kind, f"connect.{kind}", run.args.tuned_ms, "earliest")
    for kind, connector in zip(KINDS, run.connectors, strict=True):
        peer.wait_for_rows(catalogs[kind], f"connect.{kind}", produced[kind], run.args.timeout,
                           alive=lambda c=connector: run.alive(c))
    connect_seconds = time.time() - started
    connect_tables = [catalogs[kind].load_table(f"connect.{kind}") for kind in KINDS]

    for kind, ours, theirs in zip(KINDS, k2_tables, connect_tables, strict=True):
        a, b = peer.fingerprint(ours.scan().to_arrow(), kind), peer.fingerprint(theirs.scan().to_arrow(), kind)
        if a != b or a.rows != produced[kind]:
            raise AssertionError(f"{kind}: K2 {a} vs Connect {b}, {produced[kind]} produced")
    return {"rows": sum(produced.values()), "produced": produced, "k2_s": k2_seconds, "connect_s": connect_seconds,
            "k2_steady": peer.steady_rate(k2_tables), "connect_steady": peer.steady_rate(connect_tables),
            "connect_first_s": peer.first_commit(connect_tables) - started}


def freshness(run: Run) -> dict[str, list[float] | int]:
    args = run.args
    connect_catalog(run.home, "connect.trades_default")
    run.sink("default-trades", "trades", "connect.trades_default", None, "latest")
    env = {**process_env(run.settings), "K2_LOG_LEVEL": "WARNING"}
    stream = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
    # K2's users read it through its API, whose live tail adds the ticks not yet committed
    api, base = start_api({**env, "K2_RATE_LIMIT": "1000000/minute", "K2_LIVE_TAIL_ROWS": "500000"})
    encoder = register_schemas(run.settings, ("trades",))["trades"]
    ticks = filler(encoder, int(args.rate * (args.warmup_seconds + args.seconds)), 20)
    time.sleep(10)  # the default connector's consumer is assigned at the topic's end, the stream has joined
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    k2_catalog = {"name": "k2", "uri": run.settings.resolved_catalog_uri, "warehouse": run.settings.warehouse_uri}
    watched = {"k2": (k2_catalog, run.settings.table_identifier("trades")),
               "tuned": (connect_args(run.home, "connect.trades"), "connect.trades"),
               "default": (connect_args(run.home, "connect.trades_default"), "connect.trades_default")}
    readies = []
    for name, (catalog_args, identifier) in watched.items():
        readies.append(ctx.Event())
        ctx.Process(target=watch, args=(catalog_args, identifier, readies[-1], stop, results, name),
                    daemon=True).start()
    readies.append(ctx.Event())
    ctx.Process(target=watch_rest, args=(base, API_POLL_SECONDS, readies[-1], stop, results), daemon=True).start()
    for ready in readies:
        ready.wait(60)
    produced: dict[int, float] = {}
    topic = run.settings.topic("trades")
    producer = Producer({"bootstrap.servers": run.settings.kafka_bootstrap, **PRODUCER_DEFAULTS, "linger.ms": 1})
    try:
        started, sent = time.monotonic(), 0
        next_probe = started + args.warmup_seconds  # as bench_live: startup is not a sustained feed's latency
        while sent < len(ticks) or time.monotonic() - started < args.warmup_seconds + args.seconds:
            due = min(len(ticks), int((time.monotonic() - started) * args.rate))
            for key, payload in ticks[sent:due]:
                producer.produce(topic, payload, key)
            sent = max(sent, due)
            if time.monotonic() >= next_probe:
                seq = len(produced) + 1
                produced[seq] = time.time()
                producer.produce(topic, encoder.encode(_record(PROBE, seq)), PROBE.encode())
                next_probe += PROBE_EVERY
            producer.poll(0)
            time.sleep(0.0005)
        producer.flush(60)
        time.sleep(args.drain)
        stop.set()
        seen = dict(results.get(timeout=120) for _ in range(len(watched) + 1))
    finally:
        stop.set()
        for proc in (api, stream):
            proc.terminate()
            proc.wait(60)
    return {name: [times[s] - produced[s] for s in produced if s in times] for name, times in seen.items()} | \
        {"probes": len(produced)}


def pct(values: list[float], q: int, probes: int) -> float:
    """The q-th percentile over every probe sent, one never seen counting as later than any seen
    (inf): a sink that showed a third of them must not look fresh from the third it showed."""
    every = sorted(values) + [math.inf] * (probes - len(values))
    return every[max(0, math.ceil(q / 100 * len(every)) - 1)] if every else math.nan  # nearest rank


def seconds(value: float, window: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else f"> {window:.0f} (not seen)"


def report(t: dict[str, Any], f: dict[str, Any], args: argparse.Namespace, what: str, load: str) -> None:
    k2_rate, connect_rate = t["rows"] / t["k2_s"], t["rows"] / t["connect_s"]
    print(f"\n### Peers: Iceberg's Kafka Connect sink {ICEBERG_VERSION} (Kafka Connect {CONNECT_VERSION}) "
          f"vs K2's stream, {what}\n")
    print(f"{platform.node()}, {os.cpu_count()} cores; {load} at the start, {load_average()} at the end. "
          f"Equal rows: {t['produced']['trades']:,} trades and {t['produced']['quotes']:,} quotes in both systems "
          f"(count and checksum). Each drains the filled topics alone. Steady: rows after the first commit ÷ "
          f"first → last commit (snapshot timestamps). The sink's first commit came "
          f"{t['connect_first_s']:.1f} s after its connectors were created.\n")
    print(markdown(("sink", "rows", "start → all visible s", "rows/s", "steady rows/s"), [
        (f"K2 stream (batch {args.batch_seconds:g} s)", f"{t['rows']:,}", f"{t['k2_s']:.2f}", f"{k2_rate:,.0f}",
         f"{t['k2_steady']:,.0f}"),
        (f"Iceberg sink, commit every {args.tuned_ms} ms", f"{t['rows']:,}", f"{t['connect_s']:.2f}",
         f"{connect_rate:,.0f}", f"{t['connect_steady']:,.0f}"),
        ("K2 ÷ Iceberg sink", "", "", f"{k2_rate / connect_rate:.2f}×", f"{t['k2_steady'] / t['connect_steady']:.2f}×"),
    ]))
    print(f"\nFreshness, produce → visible in a table scan: {f['probes']} probes over {args.seconds:g} s "
          f"at {args.rate:,} trades/s after a {args.warmup_seconds:g} s warm-up feed, {args.drain:g} s drain after.\n")
    rows = []
    labels = {"fresh": "K2 API with its live tail (REST, polled every 25 ms)",
              "k2": f"K2 stream (batch {args.batch_seconds:g} s)",
              "tuned": f"Iceberg sink, commit every {args.tuned_ms} ms",
              "default": f"Iceberg sink, default commit ({DEFAULT_COMMIT_INTERVAL_MS // 1000} s)"}
    window, probes = args.seconds + args.drain, f["probes"]
    for name, label in labels.items():
        values = f[name]
        rows.append((label, f"{len(values)}/{probes}", seconds(pct(values, 50, probes), window),
                     seconds(pct(values, 99, probes), window)))
    for name, label in (("fresh", "K2 API"), ("k2", "K2 table")):
        pairs = [(pct(f[name], q, probes), pct(f["tuned"], q, probes)) for q in (50, 99)]
        rows.append((f"{label} ÷ Iceberg sink tuned (target ≤ 0.1)", "",
                     *(f"{ours / theirs:.2f}" if math.isfinite(ours) and math.isfinite(theirs)
                       else "n/a (probes not seen)" for ours, theirs in pairs)))
    print(markdown(("sink", "probes seen", "p50 s", "p99 s"), rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("K2_ASX_DATA", "../shared/data/asx-2014-03")))
    parser.add_argument("--tuned-ms", type=int, default=1000, help="the sink's tuned commit interval")
    parser.add_argument("--batch-seconds", type=float, default=Settings().batch_seconds,
                        help="K2 stream's commit interval (as deployed: 2 s)")
    parser.add_argument("--rate", type=int, default=2000, help="filler trades/s in the freshness run")
    parser.add_argument("--seconds", type=float, default=30, help="length of the freshness run")
    parser.add_argument("--warmup-seconds", type=float, default=5, help="feed before the first probe")
    parser.add_argument("--drain", type=float, default=15, help="wait after the last probe")
    parser.add_argument("--timeout", type=float, default=900, help="for the sink to hold every row")
    args = parser.parse_args()
    load = load_average()
    connect = IcebergConnect()
    started_here = connect.pid() is None
    connect.start()
    try:
        with tempfile.TemporaryDirectory(prefix="k2-bench-connect-") as tmp_name:
            home = Path(tmp_name)
            data, what = sample(args.data, home)
            run = Run(home, args)
            try:
                t = throughput(run, data)
                f = freshness(run)
            finally:
                run.close()
        report(t, f, args, what, load)
    finally:
        if started_here:
            connect.stop()


if __name__ == "__main__":
    main()
