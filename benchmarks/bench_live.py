"""Freshness and push latency under a sustained feed, with each process's peak memory.

A producer sends trades at `--rate` messages/s for `--seconds` to the trades topic of a private
embedded lakehouse, while `k2 stream run` (commits every `--batch-seconds`) and `k2 api` run as
their own processes. Measured, per produced probe tick (one every 50 ms, on a symbol of its own):
- push: produce → received by a WebSocket subscriber of /v1/stream/trades;
- fresh: produce → first returned by REST (POST /v1/trades/query polled back to back);
- baseline, same run: produce → received by a bare Kafka consumer of the topic.
Peak memory is each process's VmHWM from /proc at the end.

    python benchmarks/bench_live.py --rate 20000 --seconds 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from websockets.sync.client import connect

from k2 import topics
from k2.ingest.pipeline import register_schemas
from k2.kafka import PRODUCER_DEFAULTS, consume_available
from k2.settings import DEV_API_KEY, Settings
from k2.sources.asx import unscaled_bytes

K2 = str(Path(sys.executable).with_name("k2"))
PROBE = "ZPROBE"
DAY = dt.date(2026, 1, 5)
EPOCH_DAY = (DAY - dt.date(1970, 1, 1)).days


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _record(symbol: str, seq: int) -> dict:
    now_us = time.time_ns() // 1000
    return {"symbol": symbol, "exchange": "ASX", "exchange_timestamp": now_us, "exchange_date": EPOCH_DAY,
            "sequence_number": seq, "price": unscaled_bytes(36_700_000), "volume": 100, "qualifiers": None,
            "venue": None, "buyer_id": None, "ingest_timestamp": now_us, "source_id": "bench"}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--batch-seconds", type=float, default=0.2)
    parser.add_argument("--symbols", type=int, default=50)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="k2-bench-live-"))
    settings = Settings(asset_class=f"bench{os.getpid()}", catalog_uri=f"sqlite:///{home}/catalog.db",
                        warehouse=str(home / "warehouse"), batch_seconds=args.batch_seconds)
    topics.ensure_pipeline_topics(settings, ("trades",))
    encoder = register_schemas(settings, ("trades",))["trades"]
    topic = settings.topic("trades")
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "WARNING", "K2_RATE_LIMIT": "1000000/minute"}
    port = _free_port()
    stream = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
    api = subprocess.Popen([K2, "api", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    produced: dict[int, float] = {}  # probe seq → produce time
    pushed: dict[int, float] = {}
    fresh: dict[int, float] = {}
    bare: dict[int, float] = {}
    stop = threading.Event()
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)

        def subscriber() -> None:
            with connect(base.replace("http", "ws") + f"/v1/stream/trades?symbols={PROBE}",
                         additional_headers={"X-API-Key": DEV_API_KEY}) as ws:
                ready.set()
                while not stop.is_set():
                    try:
                        tick = json.loads(ws.recv(timeout=0.5))
                    except TimeoutError:
                        continue
                    pushed.setdefault(tick["sequence_number"], time.time())

        def poller() -> None:
            try:
                poll()
            except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not hide
                print(f"poller failed: {exc!r}", file=sys.stderr)

        def poll() -> None:
            client = httpx.Client(base_url=base, headers={"X-API-Key": DEV_API_KEY}, timeout=30)
            last = 0
            while not stop.is_set():
                rows = client.post("/v1/trades/query", json={"symbols": [PROBE], "fields": ["sequence_number"]})
                now = time.time()
                if rows.status_code != 200:  # no table yet, before the first commit
                    time.sleep(0.05)
                    continue
                for row in rows.json()["data"]:
                    if row["sequence_number"] > last:
                        fresh.setdefault(row["sequence_number"], now)
                last = max(fresh, default=0)

        def bare_consumer() -> None:
            consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-{os.getpid()}",
                                 "enable.auto.commit": False})
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            consumer.assign([TopicPartition(topic, p, consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10)[1]) for p in meta.partitions])
            while not stop.is_set():
                for msg in consume_available(consumer, 1000, timeout=0.2):
                    if msg.key() == PROBE.encode():
                        bare.setdefault(int.from_bytes(msg.headers()[0][1], "big"), time.time())
            consumer.close()

        ready = threading.Event()
        threads = [threading.Thread(target=f, daemon=True) for f in (subscriber, poller, bare_consumer)]
        for t in threads:
            t.start()
        ready.wait(30)
        time.sleep(2)  # the hub has assigned its partitions
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS, "linger.ms": 1})
        seqs = [0] * args.symbols
        probe_seq, started, sent = 0, time.monotonic(), 0
        next_probe = started
        while time.monotonic() - started < args.seconds:
            due = int((time.monotonic() - started) * args.rate)
            while sent < due:
                i = sent % args.symbols
                seqs[i] += 1
                symbol = f"S{i:03d}"
                producer.produce(topic, encoder.encode(_record(symbol, seqs[i])), symbol.encode())
                sent += 1
            if time.monotonic() >= next_probe:
                probe_seq += 1
                produced[probe_seq] = time.time()
                producer.produce(topic, encoder.encode(_record(PROBE, probe_seq)), PROBE.encode(),
                                 headers=[("seq", probe_seq.to_bytes(8, "big"))])
                next_probe += 0.05
            producer.poll(0)
            time.sleep(0.0005)
        producer.flush(60)
        time.sleep(max(3.0, args.batch_seconds * 5))  # the last probes arrive
        stop.set()
        for t in threads:
            t.join(10)
        peaks = {"k2 stream run": _peak_mb(stream.pid), "k2 api": _peak_mb(api.pid)}
    finally:
        for proc in (api, stream):
            proc.send_signal(signal.SIGTERM)
        for proc in (api, stream):
            proc.wait(60)

    def latencies(seen: dict[int, float]) -> list[float]:
        return [seen[s] - produced[s] for s in produced if s in seen]

    print(f"\n### Freshness and push latency ({sent / args.seconds:,.0f} msg/s for {args.seconds:.0f} s, "
          f"commits every {args.batch_seconds} s, {len(produced)} probes)\n")
    print("| path | probes seen | p50 ms | p99 ms | p99 ÷ bare Kafka p99 |")
    print("|---|---:|---:|---:|---:|")
    base_p99 = _pct(latencies(bare), 99)
    for name, seen in (("bare Kafka consumer (baseline)", bare), ("WebSocket push", pushed),
                       ("REST visible (freshness)", fresh)):
        values = latencies(seen)
        print(f"| {name} | {len(values)}/{len(produced)} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} | "
              f"{_pct(values, 99) / base_p99:.1f}× |")
    print("\n| process | peak memory MB |\n|---|---:|")
    for name, mb in peaks.items():
        print(f"| {name} | {mb:.0f} |")


if __name__ == "__main__":
    main()
