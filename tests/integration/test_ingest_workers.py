"""Ingest workers (`k2.ingest.ahead`) on the real Kafka + registry: a folder ingested with its chunks
parsed and encoded in worker processes gives exactly what the in-process path gives (the same
message bytes in the same order per partition, the same dead letters), a stop stays balanced at the
same checkpoint, and a worker that dies fails the run instead of losing its chunks."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from k2.ingest import ahead, columnar, pipeline
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.asx]
BAD_TRADES = [b"03/11/2014,10:00:01.000,0.665,100,0,\r\n",  # column count
              b"03/11/2014,10:00:01.000,zero,100,0,,\r\n",  # unparsable price
              b"03/11/2014,10:00:01.000,0.665,100,\xff\xfe,,\r\n"]  # not UTF-8: its chunk takes the row path
BAD_QUOTES = [b"02/30/2014,10:00:01.000,0.66,0.67,100,100\r\n",  # impossible date
              b"03/14/2014,16:00:00.000,0.66,abc,100,100\r\n"]  # unparsable price


def _folder(asx_root: Path, asx_companies, root: Path) -> Path:
    """Two companies' files, cut into many chunks below, with bad lines spread through them."""
    asx_companies(asx_root, root, ("7181", "3153"))
    for path, bad in ((root / "trades" / "7181.csv", BAD_TRADES), (root / "quotes" / "7181.csv", BAD_QUOTES)):
        lines = path.read_bytes().splitlines(keepends=True)
        for i, line in enumerate(bad):
            lines.insert(20 + i * (len(lines) // len(bad)), line)
        path.write_bytes(b"".join(lines))
    return root


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2 KiB (a few dozen lines: each file many chunks) and one ingest timestamp for
    every run, so that runs give the same bytes."""
    monkeypatch.setattr(columnar, "CHUNK_BYTES", 2048)
    fixed = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: fixed)


def _run(root: Path, settings: Settings, workers: int) -> tuple[Settings, pipeline.IngestSummary]:
    settings = settings.model_copy(update={"asset_class": f"{settings.asset_class}w{workers}",
                                           "ingest_workers": workers})
    summary = ingest_files(root, settings, with_reference=False)
    assert not multiprocessing.active_children(), "the ingest left worker processes behind"
    return settings, summary


def _messages(settings: Settings, drain) -> dict[str, dict[int, list]]:
    """Per kind (and the DLQ), per partition, (key, value) in offset order; dead letters without
    the time they were written."""
    topics = {"trades": settings.topic("trades"), "quotes": settings.topic("quotes"), "dlq": settings.dlq_topic}
    out: dict[str, dict[int, list]] = {}
    for name, topic in topics.items():
        by_partition: dict[int, list] = defaultdict(list)
        for msg in sorted(drain(settings.kafka_bootstrap, topic), key=lambda m: (m.partition(), m.offset())):
            value = msg.value()
            if name == "dlq":
                letter = json.loads(value)
                letter.pop("rejected_at_ms")
                value = letter
            by_partition[msg.partition()].append((msg.key(), value))
        out[name] = dict(by_partition)
    return out


def test_workers_produce_exactly_what_the_in_process_path_produces(asx_root, asx_companies, tmp_path,
                                                                   embedded_settings, drain, chunked):
    root = _folder(asx_root, asx_companies, tmp_path / "asx")
    in_process, summary = _run(root, embedded_settings, 0)
    assert summary.balanced and summary.rejected == {"column_count": 1, "bad_number": 2, "bad_encoding": 1,
                                                     "bad_date": 1}
    expected = _messages(in_process, drain)
    for workers in (1, 2):
        settings, with_workers = _run(root, embedded_settings, workers)
        assert (with_workers.rows_read, with_workers.rejected) == (summary.rows_read, summary.rejected)
        assert _messages(settings, drain) == expected, f"{workers} workers: other messages or order"


class _StopAt:
    """In place of the crash points: SIGTERM to this process at the n-th checkpoint, as a
    `kill` would send it, so that the ingest stops there."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, _settings: Settings) -> _StopAt:
        return self

    def reach(self, point: str) -> None:
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_mid_ingest_is_balanced_and_where_the_in_process_path_stops(
        asx_root, asx_companies, tmp_path, embedded_settings, drain, chunked, monkeypatch):
    root = _folder(asx_root, asx_companies, tmp_path / "asx")
    runs = []
    for workers in (0, 2):
        monkeypatch.setattr(pipeline, "CrashPoints", _StopAt(7))
        settings, summary = _run(root, embedded_settings, workers)
        assert summary.interrupted and summary.balanced
        runs.append((summary.rows_read, summary.produced_total, summary.rejected, _messages(settings, drain)))
    assert 0 < runs[0][0] < sum(len(p.read_bytes().splitlines()) for p in root.glob("[tq]*/*.csv"))
    assert runs[1] == runs[0]


def test_a_worker_that_dies_fails_the_ingest(asx_root, asx_companies, tmp_path, embedded_settings, chunked,
                                             monkeypatch):
    root = _folder(asx_root, asx_companies, tmp_path / "asx")

    class KillWorkers(_StopAt):
        def reach(self, point: str) -> None:
            self.left -= 1
            if self.left == 0:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)

    monkeypatch.setattr(pipeline, "CrashPoints", KillWorkers(1))
    with pytest.raises(ahead.WorkerDied, match=r"ended with exit code -9 while preparing .*\.csv"):
        _run(root, embedded_settings, 1)
    assert not multiprocessing.active_children()
