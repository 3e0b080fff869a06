"""Freshness and push latency under a sustained feed, with each process's peak memory.

A sustained feed of `--rate` messages/s runs for `--seconds` into a private embedded lakehouse,
while `k2 stream run` (commits every `--batch-seconds`) and `k2 api` run as their own processes.
The feed is either (`--source`)
- `feed`: K2's own live path, `k2 feed serve` (synthetic trades and quotes, paced to `--rate`) →
  `k2 ingest feed` → Kafka, each a process of its own, so their CPU and peak memory are measured
  too; the rate reached is what `k2 ingest feed` counted (`k2_feed_messages_total`);
- `producer`: trades produced by this script at exactly `--rate`, encoded before the clock starts
  (the path from Kafka on, without the feed processes' share of the 2 cores).
Measured, per produced probe tick (one every 50 ms, on a symbol of its own):
- push: produce → received by a WebSocket subscriber of /v1/stream/trades;
- fresh: produce → first returned by REST (POST /v1/trades/query, polled every `--poll-ms`);
- baseline, same run: produce → received by a bare Kafka consumer of the topic.
Each observer is a process of its own, and the filler ticks are encoded before the clock starts,
so that the load generator's work and the observers' share of one interpreter do not show up as
latency. As in the OpenMessaging Benchmark, the feed runs `--warmup-seconds` before the first probe:
what happens once per process (the table's first commit, the first queries' planning, the tail's
opening) is not a sustained feed's latency. The stream commits as deployed (`batch_seconds`, 2 s);
the API's live tail, not the commit interval, is what makes a tick visible to REST within a second.
Peak memory is each K2 command's VmHWM from /proc at the end, and its CPU the time used
during the feed, each summed over the command's process and its children (the stream's table
processes).

    python benchmarks/bench_live.py --rate 20000 --seconds 60 [--source producer] [--batch-seconds 0.2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import math
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
import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from k2 import exchanges, tables, topics
from k2.feed.server import ticks
from k2.ingest.pipeline import register_schemas
from k2.kafka import PRODUCER_DEFAULTS, consume_available
from k2.settings import DEV_API_KEY, Settings
from k2.sources.asx import unscaled_bytes
from k2.stack.base import free_port, port_in_use
from k2_synthetic import expected_rows, generate

K2 = str(Path(sys.executable).with_name("k2"))
PROBE = "ZPROBE"
ASX = exchanges.get("ASX")


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """The process and every process it started: a K2 command's work may be in its children (the
    stream's table processes, the ingest's workers)."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:  # exiting
        return [pid]


def _tree_cpu_seconds(pid: int) -> float:
    return sum(_cpu_seconds(one) for one in process_tree(pid))


def _tree_peak_mb(pid: int) -> float:
    """The peaks of the process and its children, summed: an upper bound where a forked child shares
    pages with its parent."""
    return sum(_peak_mb(one) for one in process_tree(pid))


def _record(symbol: str, seq: int) -> dict:
    now_us = time.time_ns() // 1000
    # The exchange's local date of the instant: the stream refuses any other (wrong_exchange_date).
    day = (ASX.local_date(dt.datetime.fromtimestamp(now_us / 1e6, dt.UTC)) - dt.date(1970, 1, 1)).days
    return {"symbol": symbol, "exchange": ASX.code, "exchange_timestamp": now_us, "exchange_date": day,
            "sequence_number": seq, "price": unscaled_bytes(36_700_000), "volume": 100, "qualifiers": None,
            "venue": None, "buyer_id": None, "ingest_timestamp": now_us, "source_id": "bench"}


def _without_collector_pauses() -> None:
    """For an observer's process: its own cyclic garbage collections (up to 170 ms each, measured
    in the observers of a 20k msg/s run) would land between a tick's arrival and its timestamp and
    count as K2's latency. An observer lives a minute and makes next to no cycles, so it does without."""
    gc.freeze()
    gc.disable()


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def watch_push(base: str, ready: Any, stop: Any, out: Any) -> None:
    _without_collector_pauses()
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
    _without_collector_pauses()
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
    _without_collector_pauses()
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


def _metric_total(url: str, name: str) -> float:
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return sum(s.value for f in families if f.name == name for s in f.samples if s.name == f"{name}_total")


class ProducerLoad:
    """Trades produced by this process at exactly `rate`, encoded before the clock starts."""

    def __init__(self, settings: Settings, encoder: Any, rate: int, count: int, symbols: int) -> None:
        self.rate, self.topic = rate, settings.topic("trades")
        self.ticks = filler(encoder, count, symbols)
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS,
                                  "linger.ms": 1})
        self.processes: dict[str, subprocess.Popen] = {}
        self.started, self.produced = 0.0, 0

    def start(self) -> None:
        # a filler tick first, for the same reason as the first probe
        self.producer.produce(self.topic, self.ticks[0][1], self.ticks[0][0])
        self.producer.flush(30)
        self.started, self.produced = time.monotonic(), 1

    def pump(self) -> bool:
        """Produce what is due by now; False once every tick is sent."""
        due = min(len(self.ticks), int((time.monotonic() - self.started) * self.rate))
        for key, payload in self.ticks[self.produced:due]:
            self.producer.produce(self.topic, payload, key)
        self.produced = max(self.produced, due)
        self.producer.poll(0)
        return self.produced < len(self.ticks)

    def sent(self) -> float:
        return self.produced

    def stop(self) -> None:
        self.producer.flush(60)


class FeedLoad:
    """`k2 feed serve` (synthetic trades and quotes paced to `rate`) → `k2 ingest feed` → Kafka."""

    MAX_IDLE = 0.01  # wall seconds: nights, pre-open and quiet spells pass at once

    def __init__(self, env: dict[str, str], rate: int, seconds: float, symbols: int) -> None:
        self.env, self.rate, self.seconds = env, rate, seconds
        self.symbols = min(symbols, 12)
        per_day = expected_rows(self.symbols, 1)
        self.days = min(60, math.ceil(rate * seconds * 1.3 / per_day) + 1)  # never runs dry
        self.speed = self._speed_for(rate)
        self.metrics = f"http://127.0.0.1:{free_port()}/metrics"
        self.processes: dict[str, subprocess.Popen] = {}
        self.started = 0.0

    def _speed_for(self, rate: int) -> float:
        """The simulator's speed at which a synthetic day's ticks arrive at `rate` on average, as
        it paces them: each gap between ticks is gap ÷ speed wall seconds, at most MAX_IDLE."""
        with tempfile.TemporaryDirectory() as tmp:
            stamps = [r["exchange_timestamp"] / 1e6 for _, r in ticks(generate(Path(tmp), symbols=self.symbols,
                                                                                   days=1))]
        gaps = [b - a for a, b in itertools.pairwise(stamps) if b > a]
        low, high = 1.0, 1e7
        while high / low > 1.001:
            speed = math.sqrt(low * high)
            wall = sum(min(gap / speed, self.MAX_IDLE) for gap in gaps)
            low, high = (speed, high) if len(stamps) / wall < rate else (low, speed)
        return high

    def start(self) -> None:
        port = free_port()
        print(f"k2 feed serve: {self.symbols} symbols × {self.days} days at speed {self.speed:,.0f}…", file=sys.stderr)
        self.processes["k2 feed serve"] = subprocess.Popen(
            [K2, "feed", "serve", "--port", str(port), "--speed", f"{self.speed:.1f}", "--max-idle", str(self.MAX_IDLE),
             "--symbols", str(self.symbols), "--days", str(self.days), "--buffer", "200000"],
            env=self.env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # it generates its days first
        while not port_in_use(port):
            if time.monotonic() > deadline or self.processes["k2 feed serve"].poll() is not None:
                raise RuntimeError("k2 feed serve did not listen")
            time.sleep(0.2)
        metrics_port = self.metrics.rsplit(":", 1)[1].split("/")[0]
        self.processes["k2 ingest feed"] = subprocess.Popen(
            [K2, "ingest", "feed", f"ws://127.0.0.1:{port}"], env={**self.env, "K2_METRICS_PORT": metrics_port})
        while self._sent_or_zero() == 0:  # the market opens on the first subscription
            if time.monotonic() > deadline or self.processes["k2 ingest feed"].poll() is not None:
                raise RuntimeError("k2 ingest feed received nothing")
            time.sleep(0.2)
        self.started = time.monotonic()

    def _sent_or_zero(self) -> float:
        try:
            return self.sent()
        except httpx.HTTPError:
            return 0.0

    def pump(self) -> bool:
        return time.monotonic() - self.started < self.seconds

    def sent(self) -> float:
        return _metric_total(self.metrics, "k2_feed_messages")

    def stop(self) -> None:
        for name in ("k2 feed serve", "k2 ingest feed"):
            self.processes[name].send_signal(signal.SIGTERM)


def _push_delay_within(base: str, seconds: float) -> tuple[float, float]:
    """(pushes, the share of them handed over within `seconds`) from the API's own histogram."""
    buckets = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        if family.name == "k2_stream_push_delay_seconds":
            buckets = {float(s.labels["le"]): s.value for s in family.samples
                       if s.name.endswith("_bucket") and s.labels.get("kind") == "trades"}
    total = buckets.get(float("inf"), 0.0)
    return total, (buckets.get(seconds, 0.0) / total if total else float("nan"))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--source", choices=("feed", "producer"), default="feed",
                        help="feed: k2 feed serve → k2 ingest feed; producer: trades produced by this script")
    parser.add_argument("--batch-seconds", type=float, default=Settings().batch_seconds,
                        help="the stream's commit interval (K2_BATCH_SECONDS)")
    parser.add_argument("--warmup-seconds", type=float, default=5, help="feed before the first probe")
    parser.add_argument("--symbols", type=int, default=50, help="producer: filler symbols (feed: at most 12)")
    parser.add_argument("--compact-interval-seconds", type=float, default=Settings().compact_interval_seconds,
                        help="the stream's size-tiered compaction (K2_COMPACT_INTERVAL_SECONDS; 0: none)")
    parser.add_argument("--poll-ms", type=float, default=25, help="REST freshness poll interval")
    parser.add_argument("--live-tail-rows", type=int, default=500_000,
                        help="the API's live tail (K2_LIVE_TAIL_ROWS; 500,000 as the operator deploys, 0: none)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    home = Path(tempfile.mkdtemp(prefix="k2-bench-live-"))
    settings = Settings(asset_class=f"bench{os.getpid()}", catalog_uri=f"sqlite:///{home}/catalog.db",
                        warehouse=str(home / "warehouse"), batch_seconds=args.batch_seconds,
                        compact_interval_seconds=args.compact_interval_seconds)
    kinds = ("trades", "quotes") if args.source == "feed" else ("trades",)
    topics.ensure_pipeline_topics(settings, kinds)
    encoder = register_schemas(settings, kinds)["trades"]
    topic = settings.topic("trades")
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "WARNING", "K2_RATE_LIMIT": "1000000/minute",
           "K2_LIVE_TAIL_ROWS": str(args.live_tail_rows)}
    load: ProducerLoad | FeedLoad = (
        FeedLoad(env, args.rate, args.warmup_seconds + args.seconds, args.symbols) if args.source == "feed"
        else ProducerLoad(settings, encoder, args.rate, int(args.rate * (args.warmup_seconds + args.seconds)),
                          args.symbols))
    stream = subprocess.Popen([K2, "stream", "run", "--tables", ",".join(kinds)], env=env)
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
        prober = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS, "linger.ms": 1})
        # The idempotent producer's first send waits for its producer id (half a second here): probe 1
        # is sent first and not timed, so that no probe's latency includes that.
        prober.produce(topic, encoder.encode(_record(PROBE, 1)), PROBE.encode(),
                       headers=[("seq", (1).to_bytes(8, "big"))])
        prober.flush(30)
        load.start()
        measured = {"k2 stream run": stream, "k2 api": api, **load.processes}
        cpu_before = {name: _tree_cpu_seconds(proc.pid) for name, proc in measured.items()}
        probe_seq, started, sent_before = 1, time.monotonic(), load.sent()
        next_probe = started + args.warmup_seconds
        while load.pump():
            if time.monotonic() >= next_probe:
                probe_seq += 1
                probe = encoder.encode(_record(PROBE, probe_seq))  # encoded before its clock starts, as the filler
                produced[probe_seq] = time.time()
                prober.produce(topic, probe, PROBE.encode(), headers=[("seq", probe_seq.to_bytes(8, "big"))])
                next_probe += 0.05
            prober.poll(0)
            time.sleep(0.0005)
        elapsed = time.monotonic() - started  # the warm-up's feed included, as in `sent`
        sent = load.sent() - sent_before
        cores = {name: (_tree_cpu_seconds(proc.pid) - cpu_before[name]) / elapsed for name, proc in measured.items()}
        peaks = {name: (_tree_peak_mb(proc.pid), cores[name]) for name, proc in measured.items()}
        load.stop()
        prober.flush(60)
        time.sleep(max(3.0, args.batch_seconds * 5))  # the last probes arrive
        stop.set()
        for _ in watchers:
            name, times = results.get(timeout=60)
            seen[name] = times
        push_delay = _push_delay_within(base, 0.05)
    finally:
        stop.set()
        for proc in (api, stream, *load.processes.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (api, stream, *load.processes.values()):
            proc.wait(60)

    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    data_files = len(table.inspect.files())

    def latencies(times: dict[int, float]) -> list[float]:
        return [times[s] - produced[s] for s in produced if s in times]

    feed = "k2 feed serve → k2 ingest feed" if args.source == "feed" else "produced by the benchmark"
    print(f"\n### Freshness and push latency ({sent / elapsed:,.0f} msg/s {feed}, for {elapsed:.0f} s, "
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
