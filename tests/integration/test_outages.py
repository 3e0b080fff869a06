"""Outages are not poison: the schema registry, the catalog database, the S3 server or the Kafka
broker goes away for 20 s while `k2 stream run` works, and comes back (a broker restarted at once:
test_stream_iceberg.py). The writer waits and retries; afterwards the DLQ is empty and every
symbol-day of the ASX subset is stored exactly once. The services are the stack's own, stopped
and started by their `Service` objects."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from k2 import tables
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings
from k2.sources.asx import discover

pytestmark = [pytest.mark.integration, pytest.mark.asx]
K2 = str(Path(sys.executable).with_name("k2"))
OUTAGE_SECONDS = 20
FIRST, SECOND = ("7181", "3153"), ("7078",)  # DVN + MWR before the outage, BHP during or after it


def symbol_days(root: Path) -> dict[str, Counter]:
    """Per table, the lines of the CSV files per (symbol, exchange date): what must be stored."""
    counts: dict[str, Counter] = {"trades": Counter(), "quotes": Counter()}
    for tick_file in discover(root):
        for line in tick_file.path.read_bytes().split(b"\r\n")[:-1]:
            day = dt.datetime.strptime(line.split(b",", 1)[0].decode(), "%m/%d/%Y").date()
            counts[tick_file.kind][(tick_file.symbol, day)] += 1
    return counts


def stored_symbol_days(settings: Settings, kind: str) -> Counter:
    table = tables.load_table(tables.catalog(settings), settings.table_identifier(kind))
    if table is None:
        return Counter()
    rows = table.scan(selected_fields=("symbol", "exchange_date")).to_arrow()
    return Counter(zip(rows["symbol"].to_pylist(), rows["exchange_date"].to_pylist(), strict=True))


def _stream(settings: Settings, log: Path) -> subprocess.Popen:
    """`k2 stream run` logging to a file: librdkafka reports every failed reconnect while the broker
    is away, enough to fill a pipe nobody drains and block the writer on its next log line. At INFO:
    assignments and commits are what a failure needs explained."""
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": os.environ.get("K2_TEST_STREAM_LOG", "INFO")}
    with log.open("w") as out:
        return subprocess.Popen([K2, "stream", "run", "--tables", "trades,quotes"], env=env, stderr=out, text=True)


def _stream_letters(settings: Settings, drain) -> list[dict]:
    letters = [json.loads(m.value()) for m in drain(settings.kafka_bootstrap, settings.dlq_topic)]
    return [x for x in letters if x["stage"] == "stream"]


def _wait(condition, what: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the stream exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.5)


def _finish(proc: subprocess.Popen, settings: Settings, expected: dict[str, Counter], drain, log: Path) -> str:
    """Wait until both tables hold what the files hold (failing early on any dead letter), stop
    the stream with SIGTERM, check nothing more arrived; returns the stream's log."""
    def done() -> bool:
        assert not _stream_letters(settings, drain), "an outage sent messages to the DLQ"
        return all(stored_symbol_days(settings, kind).total() >= rows.total() for kind, rows in expected.items())

    try:
        _wait(done, "every row to be stored", 300, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{exc}\nstream log, reconnect attempts left out:\n{_events(log)[-100000:]}") from None
    finally:  # a hung writer must not outlive the test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    for kind, rows in expected.items():
        assert stored_symbol_days(settings, kind) == rows, f"{kind}: a symbol-day is not exact"
    assert not _stream_letters(settings, drain)
    return text


def _events(log: Path) -> str:
    return "\n".join(line for line in log.read_text().splitlines() if "Connection refused" not in line)


def _committed(settings: Settings) -> bool:
    return stored_symbol_days(settings, "trades").total() > 0


def test_registry_outage_while_the_stream_starts(asx_root, asx_companies, tmp_path, embedded_settings, registry, drain):
    root = asx_companies(asx_root, tmp_path / "asx", FIRST + SECOND)
    ingest_files(root, embedded_settings, with_reference=False)
    registry.stop()
    try:
        # every schema id is new to it: the first decode needs the registry
        proc = _stream(embedded_settings, tmp_path / "stream.log")
        time.sleep(OUTAGE_SECONDS)
        assert proc.poll() is None and stored_symbol_days(embedded_settings, "trades").total() == 0
    finally:
        registry.start()
    log = _finish(proc, embedded_settings, symbol_days(root), drain, tmp_path / "stream.log")
    assert "dependency.retrying" in log and '"registry"' in log


@pytest.mark.parametrize("outage", ["postgres", "s3", "kafka"])
def test_dependency_outage_while_the_stream_writes(outage, request, asx_root, asx_companies, tmp_path,
                                                   production_settings, drain):
    """The catalog database, the S3 server and the Kafka broker of the production configuration,
    each away for 20 s while the stream writes. New ticks arrive during the outage, or, with the
    broker away, right after it returns (the producer needs the broker too)."""
    settings = production_settings
    service = request.getfixturevalue(outage)
    first = asx_companies(asx_root, tmp_path / "first", FIRST)
    second = asx_companies(asx_root, tmp_path / "second", SECOND)
    ingest_files(first, settings, with_reference=False)
    proc = _stream(settings, tmp_path / "stream.log")
    _wait(lambda: _committed(settings), "a first commit", 120, proc)
    service.stop()
    try:
        if outage != "kafka":
            ingest_files(second, settings, with_reference=False)  # arrives while the dependency is away
        time.sleep(OUTAGE_SECONDS)
        assert proc.poll() is None, "the stream must wait for the dependency, not exit"
    finally:
        service.start()
    if outage == "kafka":
        ingest_files(second, settings, with_reference=False)
    expected = symbol_days(first)
    for kind, rows in symbol_days(second).items():
        expected[kind].update(rows)
    _finish(proc, settings, expected, drain, tmp_path / "stream.log")
