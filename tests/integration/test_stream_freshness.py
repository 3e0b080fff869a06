"""A running `k2 stream` says how fresh each table is, and how the process itself is doing.

The stream runs as its own process on the real Kafka + registry, with a metrics port; its
`/metrics` is scraped as Prometheus would. After each commit the newest-tick gauge equals the
newest `exchange_timestamp` the table really holds (read back from Iceberg), and the commit-time
gauge lies between the ingest and the scrape. The same scrape carries the process and platform
collectors' series, which the dashboard's and alerts' process panels rely on.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from k2 import tables
from k2.dlq import open_sink
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings
from k2.stack.base import free_port
from k2.stream.runner import build_writers
from k2_synthetic import generate

pytestmark = pytest.mark.integration
K2 = str(Path(sys.executable).with_name("k2"))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def newest_in_file(records: dict[tuple, dict]) -> float:
    return max(r["exchange_timestamp"] for r in records.values()) / 1e6


def newest_stored_tick(settings: Settings) -> float:
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    stamps = table.scan(selected_fields=("exchange_timestamp",)).to_arrow()["exchange_timestamp"]
    return pc.max(stamps).as_py().timestamp()


def wait_for_gauge(port: int, name: str, labels: tuple, expected: float, proc: subprocess.Popen,
                   timeout: float = 180) -> dict[tuple[str, tuple], float]:
    """The scrape in which the gauge first reads `expected`."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"k2 stream exited with {proc.returncode}"
        try:
            metrics = scrape(port)
        except OSError:  # the metrics server is not up yet
            time.sleep(0.5)
            continue
        value = metrics.get((name, labels))
        if value is not None and value == pytest.approx(expected, abs=1e-6):
            return metrics
        time.sleep(0.5)
    raise AssertionError(f"{name}{dict(labels)} is {value}, never {expected}")


def test_stream_sets_freshness_gauges_on_each_commit_and_serves_process_metrics(embedded_settings: Settings,
                                                                                 file_records, tmp_path: Path):
    port = free_port()
    labels = (("table", embedded_settings.table_identifier("trades")),)
    env = {**os.environ, **embedded_settings.to_env(), "K2_METRICS_PORT": str(port), "K2_LOG_LEVEL": "WARNING"}
    day1 = generate(tmp_path / "day1", symbols=2, days=1, seed=12)
    day2 = generate(tmp_path / "day2", symbols=2, days=1, seed=12, start=dt.date(2014, 3, 11))
    before = time.time()
    ingest_files(day1, embedded_settings, kinds=("trades",))
    proc = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
    try:
        first = newest_in_file(file_records(day1, ("trades",)))
        metrics = wait_for_gauge(port, "k2_table_newest_tick_timestamp_seconds", labels, first, proc)
        assert newest_stored_tick(embedded_settings) == pytest.approx(first, abs=1e-6)
        committed_at = metrics[("k2_table_last_commit_timestamp_seconds", labels)]
        assert before <= committed_at <= time.time()

        # the writer's own process, as the process and platform collectors report it
        assert metrics[("process_start_time_seconds", ())] == pytest.approx(psutil.Process(proc.pid).create_time(),
                                                                            abs=2)
        assert metrics[("process_resident_memory_bytes", ())] > 10_000_000
        assert 0 < metrics[("process_open_fds", ())] < metrics[("process_max_fds", ())]
        assert metrics[("process_cpu_seconds_total", ())] > 0
        assert any(name == "python_info" for name, _ in metrics)

        # the next day's ticks: their commits move both gauges on
        ingest_files(day2, embedded_settings, kinds=("trades",))
        second = newest_in_file(file_records(day2, ("trades",)))
        metrics = wait_for_gauge(port, "k2_table_newest_tick_timestamp_seconds", labels, second, proc)
        assert second - first > 3600
        assert newest_stored_tick(embedded_settings) == pytest.approx(second, abs=1e-6)
        assert metrics[("k2_table_last_commit_timestamp_seconds", labels)] > committed_at
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_restarted_stream_reports_its_tables_newest_tick_before_anything_new(embedded_settings: Settings,
                                                                             file_records, tmp_path: Path):
    """The gauge is the table's (recorded in each commit's snapshot summary), not the process's:
    a writer restarted with nothing new to commit, as after a rollout on a quiet market, still
    reports it, so the freshness panel and K2TableStale keep a series to read."""
    port = free_port()
    labels = (("table", embedded_settings.table_identifier("trades")),)
    env = {**os.environ, **embedded_settings.to_env(), "K2_METRICS_PORT": str(port), "K2_LOG_LEVEL": "WARNING"}
    day = generate(tmp_path / "day", symbols=2, days=1, seed=13)
    ingest_files(day, embedded_settings, kinds=("trades",))
    newest = newest_in_file(file_records(day, ("trades",)))
    snapshots = []
    for _ in range(2):  # the first run commits the day; the second finds nothing new to commit
        proc = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
        try:
            wait_for_gauge(port, "k2_table_newest_tick_timestamp_seconds", labels, newest, proc)
        finally:
            proc.terminate()
            proc.wait(30)
        table = tables.catalog(embedded_settings).load_table(embedded_settings.table_identifier("trades"))
        snapshots.append(table.current_snapshot().snapshot_id)
    assert snapshots[0] == snapshots[1], "the second run committed something"


def test_a_sub_second_time_bound_commits_partial_batches_while_ticks_flow(embedded_settings: Settings, tmp_path: Path,
                                                                         trades_producer):
    """batch_seconds=0.3 with a size bound never reached: while ticks arrive (50 a second at most,
    for a few seconds) the writer commits what it holds each time the bound elapses, each commit
    a part of the flow and a snapshot of its own, not the whole at the end."""
    settings = embedded_settings.model_copy(update={"batch_seconds": 0.3, "batch_rows": 1_000_000})
    trades_producer(settings, [])  # the topic and subject
    (writer,) = build_writers(settings, ("trades",), open_sink(settings, tmp_path / "dlq.jsonl"))
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while not writer.assigned:
            assert time.monotonic() < deadline, "the writer was never assigned its partitions"
            writer.poll(timeout=0.1)
        total = 150
        feed = threading.Thread(target=trades_producer, args=(settings, [("BHP", s) for s in range(1, total + 1)]),
                                kwargs={"every": 0.02})
        feed.start()
        commits: list[tuple[float, int]] = []  # (when, rows committed so far)
        deadline = time.monotonic() + 60
        while writer.rows_committed < total:
            assert time.monotonic() < deadline, f"{writer.rows_committed} of {total} rows committed"
            writer.poll(timeout=0.05)
            if writer.rows_committed > (commits[-1][1] if commits else 0):
                commits.append((time.monotonic(), writer.rows_committed))
        feed.join(30)
    finally:
        writer.close()
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(commits))
    assert len(commits) >= 4, f"commits (when, rows so far): {commits}"
    assert gaps[len(gaps) // 2] < 1.5, f"a commit every {gaps} s, with a time bound of 0.3 s"
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    assert table.scan().count() == total and len(table.snapshots()) >= len(commits)
