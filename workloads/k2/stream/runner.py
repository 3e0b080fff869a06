"""`k2 stream run`: one writer per table, polled in turn by one loop; their full batches are
decoded and committed on one thread of their own while the loop goes on consuming.

Long-running by default. With `until_idle` it returns once every table has committed everything
up to the log end and nothing new arrived for that many seconds (demo, batch jobs, tests); a
writer that has read everything commits at once rather than after its batch's time bound.
SIGTERM flushes and commits the open batches, then returns.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from k2 import observability, tables, topics
from k2.dlq import DeadLetterSink, open_sink
from k2.kafka import table_group
from k2.settings import Settings, TableKind
from k2.stopping import StopFlag
from k2.stream import maintenance
from k2.stream.writer import TableWriter

log = structlog.get_logger("k2.stream")

# Behind the log end yet nothing fetched for this long: the partitions are sought again from the
# offsets the table records. librdkafka can leave a partition's fetcher waiting after its leader
# comes back (a broker restart; librdkafka issues 4492, 3396); a restarted consumer recovers, and
# seeking again is that restart for the partitions alone. Nothing is lost or doubled: the table's
# offsets are where every writer resumes anyway. When seeking did not help, or the writer has held
# no partition for REJOIN_SECONDS while nobody writes its table and the log is ahead of it (its
# group membership is what stalled), the writer gets a new consumer.
FETCH_STALL_SECONDS = 20.0
REJOIN_SECONDS = 60.0
# How long one turn of the poll loop waits for a message when no writer has any. Only then: a
# writer with nothing to read waited its share on every turn, so once one table had caught up the
# other was read 10,000 messages per 0.1 s.
IDLE_WAIT = 0.1


@dataclass
class StreamResult:
    rows_written: dict[str, int]
    dead_letters: int
    seconds: float
    # The first assignment and the last commit (time.monotonic(), one clock for every process of
    # the machine), or None.
    first_assigned_at: float | None = None
    last_committed_at: float | None = None

    @property
    def consuming_seconds(self) -> float:
        """From the first assignment to the last commit: no start-up, and with `until_idle` no idle
        wait (a writer that has read everything commits at once)."""
        if self.first_assigned_at is None or self.last_committed_at is None:
            return 0.0
        return max(self.last_committed_at - self.first_assigned_at, 0.0)

    @classmethod
    def of(cls, writers: list[TableWriter], dead_letters: int, seconds: float) -> StreamResult:
        return cls._spanning({w.table_name: w.rows_committed for w in writers}, dead_letters, seconds,
                             [w.first_assigned_at for w in writers], [w.last_committed_at for w in writers])

    @classmethod
    def combined(cls, results: list[StreamResult], seconds: float) -> StreamResult:
        """The results of runs side by side (a process per table) as one run's."""
        return cls._spanning({t: n for r in results for t, n in r.rows_written.items()},
                             sum(r.dead_letters for r in results), seconds,
                             [r.first_assigned_at for r in results], [r.last_committed_at for r in results])

    @classmethod
    def _spanning(cls, rows_written: dict[str, int], dead_letters: int, seconds: float,
                  assigned_at: list[float | None], committed_at: list[float | None]) -> StreamResult:
        assigned = [t for t in assigned_at if t is not None]
        committed = [t for t in committed_at if t is not None]
        return cls(rows_written, dead_letters, seconds, min(assigned, default=None), max(committed, default=None))


def build_writers(settings: Settings, kinds: tuple[TableKind, ...], dlq: DeadLetterSink,
                  group_id: str | None = None, flusher: Executor | None = None) -> list[TableWriter]:
    cat = tables.catalog(settings)
    return [TableWriter(kind, settings, stream_table(cat, settings, kind), dlq, flusher=flusher,
                        group_id=table_group(group_id, kind) if group_id else None) for kind in kinds]


def stream_table(cat: Catalog, settings: Settings, kind: TableKind) -> Table:
    """The table `kind` is written to: made if missing, or with `create_resources` off (deployed by
    the operator, which makes it from its IcebergTable) only loaded, a missing one a clear error."""
    if settings.create_resources:
        return tables.ensure_table(cat, tables.builtin_definition(kind, settings))
    loaded = tables.load_table(cat, settings.table_identifier(kind))
    if loaded is None:
        raise topics.MissingResource(
            f"table {settings.table_identifier(kind)} does not exist; K2_CREATE_RESOURCES is off, so it "
            "must come from its IcebergTable (is it Ready?)")
    return loaded


def run(settings: Settings, kinds: tuple[TableKind, ...] = ("trades", "quotes", "reference"), *,
        until_idle: float | None = None, dlq_file: Path | None = None, group_id: str | None = None,
        heartbeat: Heartbeat | None = None) -> StreamResult:
    """Every table of `kinds` in this process. `heartbeat`: where the poll loop's progress is
    recorded, for a supervising process (`k2.stream.processes`) to read."""
    topics.ensure_pipeline_topics(settings, kinds)
    dlq = open_sink(settings, dlq_file)
    # One thread writes every table's full batches, one at a time as before (the DLQ and the catalog
    # see one batch at a time), while this one goes on consuming.
    flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-stream-write")
    writers = build_writers(settings, kinds, dlq, group_id, flusher)
    started = time.monotonic()
    progress = Progress(settings.stream_stall_seconds, heartbeat)
    with StopFlag("stream.stopping") as flag, observability.liveness(progress.check):
        try:
            _consume(writers, flag, until_idle, progress)
            dlq.flush()
        finally:
            for writer in writers:
                writer.close()
            flusher.shutdown()
    result = StreamResult.of(writers, getattr(dlq, "count", 0), time.monotonic() - started)
    log.info("stream.done", rows_written=result.rows_written, dead_letters=result.dead_letters,
             seconds=round(result.seconds, 2), consuming_seconds=round(result.consuming_seconds, 2))
    return result


class Compactor:
    """Small files compacted automatically, in the writing process: with commits every fraction of a
    second a partition (a trading day) gains thousands of files a day, and a query opens each one.
    Every `compact_interval_seconds` (10 s) like-sized files are merged once `compact_min_files`
    (8) of them gather (`k2.stream.maintenance.compact_tiers`): a day of 0.2 s commits stays at a few
    dozen files, each pass reads only what it merges, and the recorded offsets are carried forward.
    Done between polls, so it never races this process's own commits; another writer's commit makes
    it retry on a fresh read."""

    def __init__(self, writers: list[TableWriter]) -> None:
        self.writers = [w for w in writers if w.settings.compact_interval_seconds > 0]
        self.last = time.monotonic()

    def maybe_run(self) -> None:
        if not self.writers or time.monotonic() - self.last < self.writers[0].settings.compact_interval_seconds:
            return
        for writer in self.writers:
            writer.flush()  # the open batch first: compaction then sees every committed row
            writer.table, compacted = maintenance.compact_tiers(writer.table, writer.settings.compact_min_files,
                                                                 writer.settings.compact_max_bytes)
            if compacted:
                log.info("stream.compacted", table=writer.table_name, groups=compacted)
        self.last = time.monotonic()


class HistoryThinner:
    """Snapshots thinned as the stream writes (`k2.stream.maintenance.thin_history`): each commit
    reads and rewrites every kept snapshot (a commit took 9x as long with 1,000 kept as with 100),
    so between two passes at most twice `history_detail_seconds` of commits pile up. A pass runs
    every `history_detail_seconds`, at most once a second, between polls like compaction."""

    def __init__(self, writers: list[TableWriter]) -> None:
        self.writers = writers
        self.last = time.monotonic()

    def maybe_run(self) -> None:
        if not self.writers:
            return
        settings = self.writers[0].settings
        if time.monotonic() - self.last < max(settings.history_detail_seconds, 1.0):
            return
        for writer in self.writers:
            writer.settle()  # the table it thins is the one its last batch committed
            writer.table, expired = maintenance.thin_history(
                writer.table, detail=dt.timedelta(seconds=settings.history_detail_seconds),
                interval=dt.timedelta(seconds=settings.history_interval_seconds))
            if expired:
                log.info("stream.history_thinned", table=writer.table_name, snapshots_expired=expired)
        self.last = time.monotonic()


class Heartbeat(Protocol):
    """The monotonic time of the poll loop's last turn: a ctypes double, in shared memory when
    another process reads it (`multiprocessing.Value("d")`)."""

    value: float


class Progress:
    """The poll loop's heartbeat. `/livez` fails once the loop has not turned for `stall_seconds`
    (a hung commit, a wedged client): `/metrics` cannot tell, prometheus-client serves it from its
    own thread whatever the loop does."""

    def __init__(self, stall_seconds: float, heartbeat: Heartbeat | None = None) -> None:
        self.stall_seconds = stall_seconds
        self.heartbeat = heartbeat if heartbeat is not None else ctypes.c_double()
        self.beat()

    def beat(self) -> None:
        self.heartbeat.value = time.monotonic()

    def check(self) -> tuple[bool, str]:
        idle = time.monotonic() - self.heartbeat.value
        return idle < self.stall_seconds, (f"stream poll loop has not turned for {idle:.0f}s "
                                           f"(K2_STREAM_STALL_SECONDS={self.stall_seconds:g})")


class FetchStallWatch:
    """Unstalls a writer that fetches nothing while the log end is ahead of what its table holds
    (see FETCH_STALL_SECONDS): seeks its partitions again, and gives it a new consumer when that
    did not help or when its group gives it no partition for long."""

    def __init__(self, stall_seconds: float = FETCH_STALL_SECONDS, rejoin_seconds: float = REJOIN_SECONDS) -> None:
        self.stall_seconds = stall_seconds
        self.rejoin_seconds = rejoin_seconds
        self.last_check: dict[int, float] = {}
        self.reseeked_at: dict[int, float] = {}

    def check(self, writers: list[TableWriter]) -> None:
        now = time.monotonic()
        for writer in writers:
            quiet_since = max(writer.last_message_at, writer.assignment_changed_at,
                              self.last_check.get(id(writer), 0.0))
            if now - quiet_since < self.stall_seconds:
                continue
            if writer.assigned:
                self.last_check[id(writer)] = now
                self._unstall(writer)
            elif now - quiet_since >= self.rejoin_seconds:
                # its table and the broker asked once a period, not on every idle turn of the loop
                self.last_check[id(writer)] = now
                if writer.left_behind(self.rejoin_seconds):
                    self._remedy(writer, "rejoin", quiet_seconds=round(now - quiet_since))

    def _unstall(self, writer: TableWriter) -> None:
        writer.flush()  # an open batch is not a stall: commit it before measuring
        behind = writer.lag()
        if behind > 0:
            reseeked = self.reseeked_at.get(id(writer))
            reseek_failed = reseeked is not None and writer.last_message_at < reseeked
            self._remedy(writer, "rejoin" if reseek_failed else "reseek", behind=behind,
                         quiet_seconds=round(time.monotonic() - writer.last_message_at))

    def _remedy(self, writer: TableWriter, remedy: str, **figures: int) -> None:
        log.warning("stream.fetch_stalled", table=writer.table_name, remedy=remedy, **figures)
        observability.STREAM_STALLS.labels(writer.table_name, remedy).inc()
        if remedy == "reseek":
            self.reseeked_at[id(writer)] = time.monotonic()
            writer.reseek()
        else:
            self.reseeked_at.pop(id(writer), None)  # a new consumer's first stall is sought again first
            writer.rejoin()


def _consume(writers: list[TableWriter], flag: StopFlag, until_idle: float | None,
             progress: Progress | None = None) -> None:
    """Poll every writer in turn until stopped (or idle and caught up), then flush the open batches."""
    for writer in writers:
        writer.start()
    last_lag_check = 0.0
    compactor, thinner = Compactor(writers), HistoryThinner(writers)
    stalls = FetchStallWatch()
    while not flag.stop:
        if progress is not None:
            progress.beat()
        seen = sum(w.poll(timeout=0) for w in writers) or sum(w.poll(timeout=IDLE_WAIT / len(writers))
                                                               for w in writers)
        compactor.maybe_run()
        thinner.maybe_run()
        if seen:
            continue
        stalls.check(writers)
        if until_idle is None:
            continue
        for w in writers:  # a bounded run holds no batch once it has read everything: nothing more is coming
            if not w.batch.empty and w.read_everything():
                w.flush()
        now = time.monotonic()
        if now - max(w.last_message_at for w in writers) < until_idle or now - last_lag_check < 0.5:
            continue
        last_lag_check = now
        for w in writers:
            w.flush()
        if all(w.assigned for w in writers) and all(w.lag() == 0 for w in writers):
            break
    for writer in writers:
        writer.flush()
