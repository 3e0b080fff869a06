"""A dead letter is acknowledged by Kafka before the Iceberg commit that moves the offsets past its
message, and written once even when the writer dies between the two.

The writer is held between the two steps without any hook in the code: the test takes an
exclusive lock on the (SQLite) catalog, so the commit cannot happen (the writer retries it,
the catalog being transiently unavailable); once the letter is in the DLQ the writer is killed
with SIGKILL. A new writer then re-reads the poison message and must not dead-letter it again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from k2 import tables
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings
from k2.stream.runner import run as stream_run
from k2_synthetic import generate

pytestmark = pytest.mark.integration
K2 = str(Path(sys.executable).with_name("k2"))


def _count(settings: Settings) -> int:
    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    return table.scan().count() if table is not None and table.current_snapshot() is not None else 0


def _stream_letters(settings: Settings, drain) -> list[dict]:
    letters = [json.loads(m.value()) for m in drain(settings.kafka_bootstrap, settings.dlq_topic)]
    return [x for x in letters if x["stage"] == "stream"]


def _wait(condition, what: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the stream exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.3)


def test_writer_killed_between_the_dlq_ack_and_the_commit_leaves_the_letter_exactly_once(
        tmp_path, embedded_settings, drain):
    n_trades = ingest_files(generate(tmp_path / "ticks", symbols=2, days=1, seed=4), embedded_settings,
                            kinds=("trades",), with_reference=False).produced[embedded_settings.topic("trades")]
    env = {**os.environ, **embedded_settings.to_env(), "K2_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([K2, "stream", "run", "--tables", "trades"], env=env)
    try:
        _wait(lambda: _count(embedded_settings) == n_trades, "the good rows to be committed", proc)
        lock = sqlite3.connect(embedded_settings.resolved_catalog_uri.removeprefix("sqlite:///"),
                               isolation_level=None, timeout=30)
        lock.execute("BEGIN EXCLUSIVE")  # from here on the writer cannot commit
        try:
            producer = Producer({"bootstrap.servers": embedded_settings.kafka_bootstrap})
            producer.produce(embedded_settings.topic("trades"), b"not avro at all", b"BHP")
            assert producer.flush(10) == 0
            _wait(lambda: _stream_letters(embedded_settings, drain), "the dead letter to be acknowledged", proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            lock.rollback()
            lock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    stream_run(embedded_settings, ("trades",), until_idle=1.0)  # re-reads the poison message
    letters = _stream_letters(embedded_settings, drain)
    assert len(letters) == 1, f"the poison message was dead-lettered {len(letters)} times"
    assert letters[0]["reason"] == "not_confluent_avro"
    table = tables.load_table(tables.catalog(embedded_settings), embedded_settings.table_identifier("trades"))
    assert table.scan().count() == n_trades
    recorded = tables.recorded_offsets(table)[embedded_settings.topic("trades")]
    assert recorded[letters[0]["partition"]] == letters[0]["offset"] + 1, "the offsets moved past the poison"
