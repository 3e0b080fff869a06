"""`k2 stream run` over several tables: a process per table, supervised by this one.

A process writes at most one core's worth of Python: its poll loop and its writing thread share the
GIL (consuming a message costs about 1 µs of it, decoding and committing its row about 1.5 µs).
Tables are independent (each has its consumer group, its offsets and its commits), so each gets a
process of its own: on the ASX sample's backlog two tables were written at 1.5 times the rows/s of
one process on 2 cores (docs/benchmarks.md). Each is the one-table `k2.stream.runner.run`, forked
from a fresh server process that imported it (multiprocessing's forkserver): this process's own
threads (librdkafka's) would not survive a fork, and importing it anew in each table's process
took a second of CPU apiece.

This process makes the topics and the tables first, once, so the table processes do not race to
create them and an unreachable dependency is reported here as one process reports it. Then it
supervises:
- SIGTERM or SIGINT reaches every table's process, which flushes and commits its open batch;
  one still running `STOP_GRACE_SECONDS` later is killed, and the run fails: a process wedged in
  librdkafka or a catalog call never runs its signal handler, and a stop must not wait forever
  (what it had not committed is read again by the next run);
- a table's process that fails stops the others and fails the run (it logs its own error);
- a table's process whose supervisor is gone stops itself (within the same grace, wedged or not):
  none keeps writing, or holds its partitions in the group, after a SIGKILL;
- the metrics port serves every process's metrics (prometheus-client's multiprocess mode: a gauge
  gains a `pid` label), and `/livez` fails while any table's poll loop has stopped turning.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from pathlib import Path

import structlog

from k2 import observability, tables, topics
from k2.settings import Settings, TableKind
from k2.stopping import StopFlag
from k2.stream import runner

log = structlog.get_logger("k2.stream")

_forked = multiprocessing.get_context("forkserver")
_forked.set_forkserver_preload([runner.__name__])


# Under the consumer pod's termination grace (60 s, `k2_operator.render.pipeline`): the kill and
# its log line come from here, not from the kubelet.
STOP_GRACE_SECONDS = 45.0


class TableProcessFailed(RuntimeError):
    """A table's process exited with an error (its log says which)."""


def run(settings: Settings, kinds: tuple[TableKind, ...], *, until_idle: float | None = None,
        group_id: str | None = None) -> runner.StreamResult:
    """Every table of `kinds` written by a process of its own, until stopped (or, with `until_idle`,
    until each has committed everything and is idle); the tables' results as one."""
    started = time.monotonic()
    topics.ensure_pipeline_topics(settings, kinds)
    catalog = tables.catalog(settings)
    for kind in kinds:
        runner.stream_table(catalog, settings, kind)
    # Only now: a forkserver still importing when this process exits (a dependency away) would
    # report the metrics folder gone, a traceback after the one clear line.
    metrics_dir = _start_forkserver()
    with ExitStack() as stack:
        children = {kind: _TableProcess(settings, kind, until_idle, group_id) for kind in kinds}
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


def _start_forkserver() -> str:
    """The forkserver running, and the folder where the table processes forked from it record their
    metrics, emptied of an earlier run's files (their processes have exited)."""
    metrics_dir = _metrics_dir()
    for stale in Path(metrics_dir).iterdir():
        stale.unlink()
    with _environment(PROMETHEUS_MULTIPROC_DIR=metrics_dir):
        forkserver.ensure_running()
    return metrics_dir


@functools.cache
def _metrics_dir() -> str:
    """One folder for as long as this process lives, like the forkserver (which imported
    prometheus-client with it in its environment)."""
    path = tempfile.mkdtemp(prefix="k2-stream-metrics-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class _TableProcess:
    """One table's `k2.stream.runner.run` in a process forked from the forkserver, its heartbeat and
    its result."""

    def __init__(self, settings: Settings, kind: TableKind, until_idle: float | None, group_id: str | None) -> None:
        self.kind = kind
        heartbeat = _forked.Value("d", time.monotonic(), lock=False)
        self.progress = runner.Progress(settings.stream_stall_seconds, heartbeat)
        self._results, sender = _forked.Pipe(duplex=False)
        self.process = _forked.Process(target=_table_main, name=f"k2-stream-{kind}",
                                       args=(settings, kind, until_idle, group_id, heartbeat, sender))

    def start(self) -> None:
        self.progress.beat()  # its start-up (imports, assignment) is not a stall
        self.process.start()

    def result(self) -> runner.StreamResult:
        return self._results.recv()


def _supervise(children: list[_TableProcess], flag: StopFlag, grace: float = STOP_GRACE_SECONDS) -> None:
    """Until every table's process has exited; stopped (a signal) or one failing, stop the others,
    killing any still running `grace` seconds later."""
    stopping_since: float | None = None
    while running := [c.process for c in children if c.process.exitcode is None]:
        failed = [c.kind for c in children if c.process.exitcode not in (None, 0)]
        if (flag.stop or failed) and stopping_since is None:
            if failed:
                log.error("stream.table_process_failed", tables=failed, stopping=[p.name for p in running])
            for process in running:
                process.terminate()  # SIGTERM: it commits its open batch and exits
            stopping_since = time.monotonic()
        elif stopping_since is not None and time.monotonic() - stopping_since > grace:
            log.error("stream.table_process_killed", tables=[p.name for p in running], grace_seconds=grace,
                      reason="still running after SIGTERM; its open batch is read again by the next run")
            for process in running:
                process.kill()
            stopping_since = float("inf")  # killed: only their exits are left to wait for
        wait([p.sentinel for p in running], timeout=0.2)


def _table_main(settings: Settings, kind: TableKind, until_idle: float | None, group_id: str | None,
                heartbeat: runner.Heartbeat, results: Connection) -> None:
    # Stopped before its loop has begun (a sibling failed at once): nothing is read, nothing to commit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    observability.configure_logging(settings.log_level)
    threading.Thread(target=_stop_when_orphaned, name="k2-orphan-watch", daemon=True).start()
    try:
        result = runner.run(settings, (kind,), until_idle=until_idle, group_id=group_id, heartbeat=heartbeat)
    except Exception:
        log.exception("stream.table_failed", table=kind)
        raise SystemExit(1) from None
    results.send(result)


def _stop_when_orphaned(grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to this process once its supervisor is gone (killed without passing a signal on);
    an exit `grace` seconds later if that did not end it (its loop wedged, the handler never run)."""
    supervisor = multiprocessing.parent_process()
    if supervisor is None:
        return
    supervisor.join()  # its sentinel: the supervisor's end of a pipe, closed when it dies
    log.warning("stream.supervisor_gone", supervisor=supervisor.pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error("stream.table_process_exiting", reason="still running after SIGTERM with its supervisor gone",
              grace_seconds=grace)
    os._exit(1)


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
