"""`k2 stream run` over several tables runs a process per table (`k2.stream.processes`), on the real
Kafka + registry: every row lands, one metrics port serves every table's process, `/livez` follows
each table's poll loop, SIGTERM commits every open batch, and a table's process that dies takes the
run down with it rather than leaving a table unwritten, as a dead supervisor takes down its tables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from k2 import tables
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings
from k2.stack.base import free_port
from k2_synthetic import generate

pytestmark = pytest.mark.integration
K2 = str(Path(sys.executable).with_name("k2"))
KINDS = ("trades", "quotes")


def _start(settings: Settings, port: int, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([K2, "stream", "run", "--tables", ",".join(KINDS), *args],
                            env={**os.environ, **settings.to_env(), "K2_METRICS_PORT": str(port),
                                 "K2_LOG_LEVEL": "WARNING", **env})


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(port: int, name: str) -> dict[tuple, float]:
    _, text = _get(port, "/metrics")
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def _wait(what: str, condition: Callable[[], object], proc: subprocess.Popen, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except OSError:  # the metrics server is not up yet
            pass
        assert proc.poll() is None, f"k2 stream run exited with {proc.returncode} before {what}"
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout}s")


def _consumed(port: int, settings: Settings) -> dict[str, int]:
    read = {dict(labels)["table"]: n for labels, n in _samples(port, "k2_messages_consumed_total").items()}
    return {kind: int(read.get(settings.table_identifier(kind), 0)) for kind in KINDS}


def _committed(settings: Settings) -> dict[str, int]:
    catalog = tables.catalog(settings)
    counts = {}
    for kind in KINDS:
        table = tables.load_table(catalog, settings.table_identifier(kind))
        snapshot = table.current_snapshot() if table is not None else None
        counts[kind] = int(snapshot.summary["total-records"]) if snapshot and snapshot.summary else 0
    return counts


def _table_processes(proc: subprocess.Popen, n: int = len(KINDS)) -> list[psutil.Process]:
    """The run's table processes: forked by its forkserver (multiprocessing starts a resource tracker
    beside that)."""
    def forked() -> list[psutil.Process]:
        servers = [c for c in psutil.Process(proc.pid).children() if "forkserver" in " ".join(c.cmdline())]
        return servers[0].children() if servers else []

    return _wait(f"{n} table processes", lambda: len(c := forked()) == n and c, proc)


def _produce(settings: Settings, folder: Path) -> dict[str, int]:
    summary = ingest_files(generate(folder, symbols=3, days=1, seed=21), settings, kinds=KINDS, with_reference=False)
    return {kind: summary.produced[settings.topic(kind)] for kind in KINDS}


def test_each_table_is_written_by_a_process_of_its_own_behind_one_metrics_port(embedded_settings: Settings,
                                                                               tmp_path: Path):
    produced = _produce(embedded_settings, tmp_path / "ticks")
    port = free_port()
    proc = _start(embedded_settings, port)
    try:
        children = {p.pid for p in _table_processes(proc)}
        written = _wait("every row in the metrics", lambda: (
            rows := _samples(port, "k2_rows_written_total"),
            len(rows) == len(KINDS) and sum(rows.values()) == sum(produced.values()) and rows)[-1], proc)
        snapshots = _samples(port, "k2_table_snapshots")  # a gauge: each process's series carries its pid
        consumed = _consumed(port, embedded_settings)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert _committed(embedded_settings) == produced == consumed
    assert written == {(("table", embedded_settings.table_identifier(k)),): float(n) for k, n in produced.items()}
    assert {int(dict(labels)["pid"]) for labels in snapshots} == children
    assert proc.pid not in children


def test_a_bounded_run_reports_every_tables_rows(embedded_settings: Settings, tmp_path: Path):
    produced = _produce(embedded_settings, tmp_path / "ticks")
    proc = subprocess.run([K2, "stream", "run", "--tables", ",".join(KINDS), "--until-idle", "1"],
                          env={**os.environ, **embedded_settings.to_env(), "K2_LOG_LEVEL": "WARNING"},
                          capture_output=True, text=True, timeout=300, check=True)
    assert _committed(embedded_settings) == produced
    for kind, rows in produced.items():
        assert f"{embedded_settings.table_identifier(kind)}: {rows:,} rows committed" in proc.stdout + proc.stderr


def test_livez_fails_while_one_tables_loop_is_stuck_and_sigterm_commits_every_open_batch(
        embedded_settings: Settings, tmp_path: Path):
    produced = _produce(embedded_settings, tmp_path / "ticks")
    port = free_port()
    # batches that never fill nor time out: only the SIGTERM's flush commits them
    proc = _start(embedded_settings, port, K2_BATCH_SECONDS="3600", K2_BATCH_ROWS="10000000",
                  K2_STREAM_STALL_SECONDS="2")
    try:
        stuck, _ = _table_processes(proc)
        _wait("/livez to answer 200", lambda: _get(port, "/livez")[0] == 200, proc)
        stuck.suspend()
        _, reason = _wait("/livez to fail", lambda: (r := _get(port, "/livez"))[0] == 503 and r, proc)
        assert "poll loop has not turned" in reason
        stuck.resume()
        _wait("/livez to recover", lambda: _get(port, "/livez")[0] == 200, proc)
        # every message read before the SIGTERM: what it finds unread stays in Kafka, uncommitted
        _wait("every message read", lambda: _consumed(port, embedded_settings) == produced, proc)
        assert _committed(embedded_settings) == {kind: 0 for kind in KINDS}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert _committed(embedded_settings) == produced


def test_a_table_process_that_dies_stops_the_others_and_fails_the_run(embedded_settings: Settings):
    port = free_port()
    proc = _start(embedded_settings, port)
    try:
        victim, survivor = _table_processes(proc)
        victim.kill()
        assert proc.wait(60) != 0
        assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    finally:
        proc.kill()


def test_a_killed_supervisor_leaves_no_table_process_writing(embedded_settings: Settings):
    port = free_port()
    proc = _start(embedded_settings, port)
    try:
        children = _table_processes(proc)
        proc.kill()
        proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"table processes outlived their supervisor: {alive}"
    finally:
        proc.kill()
