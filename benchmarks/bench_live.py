"""Freshness and push latency under a sustained feed, with each process's peak memory.

A producer sends trades at `--rate` messages/s for `--seconds` to the trades topic of a private
embedded lakehouse, while `k2 stream run` (commits every `--batch-seconds`) and `k2 api` run as
their own processes. Measured, per produced probe tick (one every 50 ms, on a symbol of its own):
- push: produce → received by a WebSocket subscriber of /v1/stream/trades;
- fresh: produce → first returned by REST (POST /v1/trades/query, polled every `--poll-ms`);
- baseline, same run: produce → received by a bare Kafka consumer of the topic.
Each observer is a process of its own, and the filler ticks are encoded before the clock starts,
so that the load generator's work and the observers' share of one interpreter do not show up as
latency. As in the OpenMessaging Benchmark, the feed runs `--warmup-seconds` before the first probe:
what happens once per process (the table's first commit, the first queries' planning, the tail's
opening) is not a sustained feed's latency. The stream commits as deployed (`batch_seconds`, 2 s);
the API's live tail, not the commit interval, is what makes a tick visible to REST within a second.
Peak memory is each K2 process's VmHWM from /proc at the end.

    python benchmarks/bench_live.py --rate 20000 --seconds 60 [--batch-seconds 0.2] [--live-tail-rows 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from k2 import tables, topics
from k2.ingest.pipeline import register_schemas
from k2.kafka import PRODUCER_DEFAULTS, consume_available
from k2.settings import DEV_API_KEY, Settings
from k2.sources.asx import unscaled_bytes
from k2.stack.base import free_port

K2 = str(Path(sys.executable).with_name("k2"))
PROBE = "ZPROBE"
DAY = dt.date(2026, 1, 5)
EPOCH_DAY = (DAY - dt.date(1970, 1, 1)).days


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record(symbol: str, seq: int) -> dict:
    now_us = time.time_ns() // 1000
    return {"symbol": symbol, "exchange": "ASX", "exchange_timestamp": now_us, "exchange_date": EPOCH_DAY,
            "sequence_number": seq, "price": unscaled_bytes(36_700_000), "volume": 100, "qualifiers": None,
            "venue": None, "buyer_id": None, "ingest_timestamp": now_us, "source_id": "bench"}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def watch_push(base: str, ready: Any, stop: Any, out: Any) -> None:
    seen: dict[int, float] = {}
    with connect(base.replace("http", "ws") + f"/v1/stream/trades?symbols={PROBE}",
                 additional_headers={"X-API-Key": DEV_API_KEY}) as ws:
        ready.set()
        while not stop.is_set():
            try:
                tick = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            seen.setdefault(tick["sequence_number"], time.time())
    out.put(("push", seen))


def watch_rest(base: str, poll_seconds: float, ready: Any, stop: Any, out: Any) -> None:
    seen: dict[int, float] = {}
    ready.set()
    with httpx.Client(base_url=base, headers={"X-API-Key": DEV_API_KEY}, timeout=30) as client:
        while not stop.is_set():
            asked = time.monotonic()
            rows = client.post("/v1/trades/query", json={"symbols": [PROBE], "fields": ["sequence_number"]})
            now = time.time()
            if rows.status_code == 200:  # else no table yet, before the first commit
                for row in rows.json()["data"]:
                    seen.setdefault(row["sequence_number"], now)
            time.sleep(max(0.0, poll_seconds - (time.monotonic() - asked)))
    out.put(("fresh", seen))


def watch_kafka(bootstrap: str, topic: str, ready: Any, stop: Any, out: Any) -> None:
    seen: dict[int, float] = {}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{os.getpid()}",
                         "enable.auto.commit": False})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, consumer.get_watermark_offsets(
        TopicPartition(topic, p), timeout=10)[1]) for p in meta.partitions])
    ready.set()
    while not stop.is_set():
        for msg in consume_available(consumer, 1000, timeout=0.2):
            if msg.key() == PROBE.encode():
                seen.setdefault(int.from_bytes(msg.headers()[0][1], "big"), time.time())
    consumer.close()
    out.put(("bare", seen))


def start_api(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`k2 api` on a free port with this environment, once it answers /health; and its base URL."""
    port = free_port()
    api = subprocess.Popen([K2, "api", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return api, base
        except httpx.HTTPError:
            time.sleep(0.3)
    api.kill()
    raise RuntimeError(f"k2 api did not answer /health on {base}")


def filler(encoder: Any, count: int, symbols: int) -> list[tuple[bytes, bytes]]:
    """(key, payload) of `count` ticks over `symbols` symbols, each with the next sequence number."""
    print(f"encoding {count:,} filler ticks…", file=sys.stderr)
    seqs = [0] * symbols
    out = []
    for n in range(count):
        i = n % symbols
        seqs[i] += 1
        symbol = f"S{i:03d}"
        out.append((symbol.encode(), encoder.encode(_record(symbol, seqs[i]))))
    return out


def _push_delay_within(base: str, seconds: float) -> tuple[float, float]:
    """(pushes, the share of them handed over within `seconds`) from the API's own histogram."""
    buckets = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        if family.name == "k2_stream_push_delay_seconds":
            buckets = {float(s.labels["le"]): s.value for s in family.samples
                       if s.name.endswith("_bucket") and s.labels.get("kind") == "trades"}
    total = buckets.get(float("inf"), 0.0)
    return total, (buckets.get(seconds, 0.0) / total if total else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--batch-seconds", type=float, default=Settings().batch_seconds,
                        help="the stream's commit interval (K2_BATCH_SECONDS)")
    parser.add_argument("--warmup-seconds", type=float, default=5, help="feed before the first probe")
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--compact-interval-seconds", type=float, default=Settings().compact_interval_seconds,
                        help="the stream's size-tiered compaction (K2_COMPACT_INTERVAL_SECONDS; 0: none)")
    parser.add_argument("--poll-ms", type=float, default=25, help="REST freshness poll interval")
    parser.add_argument("--live-tail-rows", type=int, default=500_000,
                        help="the API's live tail (K2_LIVE_TAIL_ROWS; 500,000 as the operator deploys, 0: none)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="k2-bench-live-"))
    settings = Settings(asset_class=f"bench{os.getpid()}", catalog_uri=f"sqlite:///{home}/catalog.db",
                        warehouse=str(home / "warehouse"), batch_seconds=args.batch_seconds,
                        compact_interval_seconds=args.compact_interval_seconds)
    topics.ensure_pipeline_topics(settings, ("trades",))
    encoder = register_schemas(settings, ("trades",))["trades"]
    topic = settings.topic("trades")
    ticks = filler(encoder, int(args.rate * (args.warmup_seconds + args.seconds)), args.symbols)
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "WARNING", "K2_RATE_LIMIT": "1000000/minute",
           "K2_LIVE_TAIL_ROWS": str(args.live_tail_rows)}
    stream = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
    api, base = start_api(env)
    produced: dict[int, float] = {}  # probe seq → produce time
    seen: dict[str, dict[int, float]] = {}
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    watchers = {"push": (watch_push, (base,)), "fresh": (watch_rest, (base, args.poll_ms / 1000)),
                "bare": (watch_kafka, (settings.kafka_bootstrap, topic))}
    try:
        readies = []
        for target, extra in watchers.values():
            readies.append(ctx.Event())
            ctx.Process(target=target, args=(*extra, readies[-1], stop, results), daemon=True).start()
        for ready in readies:
            ready.wait(60)
        time.sleep(2)  # the hub has assigned its partitions
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS, "linger.ms": 1})
        # The idempotent producer's first send waits for its producer id (half a second here): a
        # filler tick is sent first, so that no probe's latency includes that.
        producer.produce(topic, ticks[0][1], ticks[0][0])
        producer.flush(30)
        cpu_before = {proc.pid: _cpu_seconds(proc.pid) for proc in (stream, api)}
        probe_seq, started, sent = 0, time.monotonic(), 1
        next_probe = started + args.warmup_seconds
        while sent < len(ticks):
            due = min(len(ticks), int((time.monotonic() - started) * args.rate))
            for key, payload in ticks[sent:due]:
                producer.produce(topic, payload, key)
            sent = max(sent, due)
            if time.monotonic() >= next_probe:
                probe_seq += 1
                produced[probe_seq] = time.time()
                producer.produce(topic, encoder.encode(_record(PROBE, probe_seq)), PROBE.encode(),
                                 headers=[("seq", probe_seq.to_bytes(8, "big"))])
                next_probe += 0.05
            producer.poll(0)
            time.sleep(0.0005)
        elapsed = time.monotonic() - started  # the warm-up's feed included, as in `sent`
        cores = {proc.pid: (_cpu_seconds(proc.pid) - cpu_before[proc.pid]) / elapsed for proc in (stream, api)}
        producer.flush(60)
        time.sleep(max(3.0, args.batch_seconds * 5))  # the last probes arrive
        stop.set()
        for _ in watchers:
            name, times = results.get(timeout=60)
            seen[name] = times
        push_delay = _push_delay_within(base, 0.05)
        peaks = {"k2 stream run": (_peak_mb(stream.pid), cores[stream.pid]),
                 "k2 api": (_peak_mb(api.pid), cores[api.pid])}
    finally:
        stop.set()
        for proc in (api, stream):
            proc.send_signal(signal.SIGTERM)
        for proc in (api, stream):
            proc.wait(60)

    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    data_files = len(table.inspect.files())

    def latencies(times: dict[int, float]) -> list[float]:
        return [times[s] - produced[s] for s in produced if s in times]

    print(f"\n### Freshness and push latency ({sent / elapsed:,.0f} msg/s for {elapsed:.0f} s, "
          f"the first {args.warmup_seconds:g} s not probed, commits every {args.batch_seconds:g} s, "
          f"compaction every {args.compact_interval_seconds:g} s, "
          f"REST polled every {args.poll_ms:.0f} ms, {len(produced)} probes, "
          f"live tail {f'{args.live_tail_rows:,} rows' if args.live_tail_rows else 'off'})\n")
    print("| path | probes seen | p50 ms | p99 ms | p99 ÷ bare Kafka p99 |")
    print("|---|---:|---:|---:|---:|")
    base_p99 = _pct(latencies(seen["bare"]), 99)
    for name, key in (("bare Kafka consumer (baseline)", "bare"), ("WebSocket push", "push"),
                      ("REST visible (freshness)", "fresh")):
        values = latencies(seen[key])
        print(f"| {name} | {len(values)}/{len(produced)} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} | "
              f"{_pct(values, 99) / base_p99:.1f}× |")
    pushes, within = push_delay
    probe_push = latencies(seen["push"])
    print(f"\nThe API's own `k2_stream_push_delay_seconds` (produce → handed to the subscriber, one per push "
          f"here): {pushes:.0f} pushes, {within:.1%} within 50 ms; the subscriber's probes: "
          f"{sum(v <= 0.05 for v in probe_push) / max(len(probe_push), 1):.1%} within 50 ms.")
    print(f"\nData files in the table at the end: {data_files}.")
    print("\n| process | peak memory MB | CPU, cores (during the feed) |\n|---|---:|---:|")
    for name, (mb, cores) in peaks.items():
        print(f"| {name} | {mb:.0f} | {cores:.2f} |")


if __name__ == "__main__":
    main()
