"""Stream throughput with one and with several `k2 stream run --one-process` processes of one
consumer group, or as deployed, a process per table (`--streams per-table`: `k2 stream run`, whose
table processes are `k2.stream.processes`).

The processes are started and joined first (every one holding partitions of its tables), then
the ASX sample's trades and quotes, encoded beforehand, are produced by a bare producer as fast as
it goes; the clock runs from the first message produced to both tables' snapshots holding every
row. Unlike `bench_pipeline.py`'s stream figure, no consumer start or join is in it.

    python benchmarks/bench_stream_scale.py --data ../shared/data/asx-2014-03 [--streams 1,2,per-table] \
        [--batch-seconds 0.2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench_live import K2
from bench_pipeline import KINDS, bench_settings, committed_rows, encoded, process_env, produce_all, wait_joined

from k2 import tables, topics
from k2.kafka import table_group

PER_TABLE = "per-table"


def run(data: Path, streams: str, batch_seconds: float) -> tuple[int, float]:
    """(rows, seconds from the first message produced to every row committed) with `streams`
    processes of both tables, or PER_TABLE: one process for each table."""
    settings = bench_settings(Path(tempfile.mkdtemp()), uuid.uuid4().hex[:6]).model_copy(
        update={"batch_seconds": batch_seconds})
    topics.ensure_pipeline_topics(settings, KINDS)
    messages = encoded(data, settings)
    wanted = {kind: sum(topic == settings.topic(kind) for topic, _, _ in messages) for kind in KINDS}
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    mode, count = ([], 1) if streams == PER_TABLE else (["--one-process"], int(streams))
    processes = [subprocess.Popen([K2, "stream", "run", "--tables", ",".join(KINDS), "--group-id", prefix, *mode],
                                  env=process_env(settings)) for _ in range(count)]
    catalog = tables.catalog(settings)
    try:
        wait_joined(settings, [table_group(prefix, kind) for kind in KINDS], members=count)
        started = time.perf_counter()
        produce_all(settings, messages)
        while any(committed_rows(catalog, settings, kind) < wanted[kind] for kind in KINDS):
            time.sleep(0.02)
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    assert {kind: committed_rows(catalog, settings, kind) for kind in KINDS} == wanted, wanted
    return sum(wanted.values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("K2_ASX_DATA", "../shared/data/asx-2014-03")))
    parser.add_argument("--streams", default="1,2", help=f"process counts or {PER_TABLE}, run in alternating rounds")
    parser.add_argument("--batch-seconds", type=float, default=0.2, help="the stream's commit interval")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    counts = args.streams.split(",")
    print(f"\n### Stream rows/s by processes of one group (commits every {args.batch_seconds:g} s), ASX sample\n")
    print("| processes | rows | produce → all committed s | rows/s |")
    print("|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        for streams in counts:
            rows, seconds = run(args.data, streams, args.batch_seconds)
            print(f"| {streams} | {rows:,} | {seconds:.2f} | {rows / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
