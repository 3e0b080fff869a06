"""`k2 stream run` over several tables: a process per table, supervised by this one.

A process writes at most one core's worth of Python: its poll loop and its writing thread share the
GIL (consuming a message costs about 1 µs of it, decoding and committing its row about 1.5 µs).
Tables are independent (each has its consumer group, its offsets and its commits), so each gets a
process of its own: on the ASX sample's backlog two tables were written at 1.5 times the rows/s of
one process on 2 cores (docs/benchmarks.md). Each is the one-table `k2.stream.runner.run`, spawned
afresh: librdkafka's threads do not survive a fork.

This process makes the topics and the tables first, once, so the table processes do not race to
create them and an unreachable dependency is reported here as one process reports it. Then it
supervises:
- SIGTERM or SIGINT reaches every table's process, which flushes and commits its open batch;
- a table's process that fails stops the others and fails the run (it logs its own error);
- a table's process whose supervisor is gone stops itself: none keeps writing after a SIGKILL;
- the metrics port serves every process's metrics (prometheus-client's multiprocess mode: a gauge
  gains a `pid` label), and `/livez` fails while any table's poll loop has stopped turning.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection, wait

import structlog

from k2 import observability, tables, topics
from k2.settings import Settings, TableKind
from k2.stopping import StopFlag
from k2.stream import runner

log = structlog.get_logger("k2.stream")

_spawn = multiprocessing.get_context("spawn")


class TableProcessFailed(RuntimeError):
    """A table's process exited with an error (its log says which)."""


def run(settings: Settings, kinds: tuple[TableKind, ...], *, until_idle: float | None = None,
        group_id: str | None = None) -> runner.StreamResult:
    """Every table of `kinds` written by a process of its own, until stopped (or, with `until_idle`,
    until each has committed everything and is idle); the tables' results as one."""
    topics.ensure_pipeline_topics(settings, kinds)
    catalog = tables.catalog(settings)
    for kind in kinds:
        runner.stream_table(catalog, settings, kind)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="k2-stream-metrics-") as metrics_dir, ExitStack() as stack:
        children = {kind: _TableProcess(settings, kind, until_idle, group_id) for kind in kinds}
        with _environment(PROMETHEUS_MULTIPROC_DIR=metrics_dir):
            for child in children.values():
                child.start()
        stack.enter_context(observability.serving(observability.processes_registry(metrics_dir)))
        for child in children.values():
            stack.enter_context(observability.liveness(child.progress.check))
        with StopFlag("stream.stopping") as flag:
            _supervise(list(children.values()), flag)
        failed = [kind for kind, child in children.items() if child.process.exitcode != 0]
        if failed:
            raise TableProcessFailed(f"the stream of {', '.join(failed)} exited with an error (see its log)")
        result = runner.StreamResult.combined([child.result() for child in children.values()],
                                              time.monotonic() - started)
    log.info("stream.done", rows_written=result.rows_written, dead_letters=result.dead_letters,
             seconds=round(result.seconds, 2), consuming_seconds=round(result.consuming_seconds, 2))
    return result


class _TableProcess:
    """One table's `k2.stream.runner.run` in a spawned process, its heartbeat and its result."""

    def __init__(self, settings: Settings, kind: TableKind, until_idle: float | None, group_id: str | None) -> None:
        self.kind = kind
        heartbeat = _spawn.Value("d", time.monotonic(), lock=False)
        self.progress = runner.Progress(settings.stream_stall_seconds, heartbeat)
        self._results, sender = _spawn.Pipe(duplex=False)
        self.process = _spawn.Process(target=_table_main, name=f"k2-stream-{kind}",
                                      args=(settings, kind, until_idle, group_id, heartbeat, sender, os.getpid()))

    def start(self) -> None:
        self.progress.beat()  # its start-up (imports, assignment) is not a stall
        self.process.start()

    def result(self) -> runner.StreamResult:
        return self._results.recv()


def _supervise(children: list[_TableProcess], flag: StopFlag) -> None:
    """Until every table's process has exited; stopped (a signal) or one failing, stop the others."""
    stopping = False
    while running := [c.process for c in children if c.process.exitcode is None]:
        failed = [c.kind for c in children if c.process.exitcode not in (None, 0)]
        if (flag.stop or failed) and not stopping:
            if failed:
                log.error("stream.table_process_failed", tables=failed, stopping=[p.name for p in running])
            for process in running:
                process.terminate()  # SIGTERM: it commits its open batch and exits
            stopping = True
        wait([p.sentinel for p in running], timeout=0.2)


def _table_main(settings: Settings, kind: TableKind, until_idle: float | None, group_id: str | None,
                heartbeat: runner.Heartbeat, results: Connection, supervisor: int) -> None:
    observability.configure_logging(settings.log_level)
    threading.Thread(target=_stop_when_orphaned, args=(supervisor,), name="k2-orphan-watch", daemon=True).start()
    try:
        result = runner.run(settings, (kind,), until_idle=until_idle, group_id=group_id, heartbeat=heartbeat)
    except Exception:
        log.exception("stream.table_failed", table=kind)
        raise SystemExit(1) from None
    results.send(result)


def _stop_when_orphaned(supervisor: int) -> None:
    """SIGTERM to this process once its supervisor is gone (killed without passing a signal on)."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    log.warning("stream.supervisor_gone", supervisor=supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`values` in this process's environment while inside: what a process spawned then inherits."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
