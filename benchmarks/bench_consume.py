"""How fast the stream's Kafka consumer reads a backlog, against the same consumer with librdkafka's
fetch pacing (`fetch.queue.backoff.ms`, `fetch.wait.max.ms`) left at its defaults.

The ASX sample's trades are produced once; then each consumer, freshly assigned every partition
from the beginning, reads them all, in alternating rounds. The clock runs from the assignment to
the last message in hand: the first message's delay is printed apart.

    python benchmarks/bench_consume.py --data ../shared/data/asx-2014-03 [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_pipeline import bench_settings, encoded, produce_all
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from k2 import topics
from k2.kafka import FETCH_PACING, consume_available
from k2.settings import Settings
from k2.stream.writer import stream_consumer_config


def read_all(settings: Settings, topic: str, config: dict[str, Any]) -> tuple[int, float, float]:
    """(messages, seconds to the first, seconds to the last) read by a consumer of `config`."""
    consumer = Consumer({**config, "group.id": f"bench-consume-{uuid.uuid4().hex[:6]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
        started = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        read, first = 0, 0.0
        while read < total:
            read += sum(1 for m in consume_available(consumer, 10_000, 0.1) if not m.error())
            first = first or (time.perf_counter() - started if read else 0.0)
        return read, first, time.perf_counter() - started
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("K2_ASX_DATA", "../shared/data/asx-2014-03")))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = bench_settings(Path(tempfile.mkdtemp()), uuid.uuid4().hex[:6])
    topics.ensure_pipeline_topics(settings, ("trades",))
    topic = settings.topic("trades")
    produce_all(settings, [m for m in encoded(args.data, settings) if m[0] == topic])
    k2 = stream_consumer_config(settings, "unused")
    defaults = {k: v for k, v in k2.items() if k not in FETCH_PACING}
    print("\n### The stream's consumer reading the ASX trades backlog\n")
    print("| consumer | messages | first message s | all s | msg/s | ÷ librdkafka's pacing |")
    print("|---|---:|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        n, first_d, all_d = read_all(settings, topic, defaults)
        print(f"| librdkafka's fetch pacing | {n:,} | {first_d:.3f} | {all_d:.3f} | {n / all_d:,.0f} | 1.00 |")
        n, first_k, all_k = read_all(settings, topic, k2)
        print(f"| K2's (`FETCH_PACING`) | {n:,} | {first_k:.3f} | {all_k:.3f} | {n / all_k:,.0f} | "
              f"{all_d / all_k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
