"""A folder source's files → Kafka: parse, number, validate, encode, produce; rejects to the DLQ.

Any source registered in `k2.sources.SOURCES` that reads folders (`FolderSource`) goes this way;
ASX-format CSV files are parsed a chunk at a time by the columnar parser.

Invariant, checked at the end of every run: rows read = messages produced + rows rejected.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import structlog
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from k2 import schemas, topics
from k2.crash_points import CrashPoints
from k2.dlq import DeadLetter, DeadLetterSink, open_sink
from k2.ingest import columnar
from k2.ingest.ahead import Ahead, Fallback, FileJob, PreparedChunk
from k2.ingest.producer import TickProducer
from k2.quality import GapDetector
from k2.schemas import columnar as columnar_avro
from k2.schemas.registry import client as registry_client
from k2.schemas.registry import reachable, register, value_subject
from k2.schemas.wire import AvroEncoder
from k2.settings import Settings, TableKind
from k2.sources import folder_source
from k2.sources.base import FolderSource, RecordReader, RowError, TickFile
from k2.stopping import StopFlag

log = structlog.get_logger("k2.ingest")
_CHECKPOINT_LINES = 20_000  # progress and the stop flag are looked at this often


@dataclass
class IngestSummary:
    rows_read: int = 0
    produced: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def produced_total(self) -> int:
        return sum(self.produced.values())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def balanced(self) -> bool:
        return self.rows_read == self.produced_total + self.rejected_total

    @property
    def messages_per_second(self) -> float:
        return self.produced_total / self.seconds if self.seconds else 0.0


def register_schemas(settings: Settings, kinds: tuple[TableKind, ...]) -> dict[TableKind, AvroEncoder]:
    """Register (or find) each kind's schema; an incompatible one raises before anything is produced."""
    registry = registry_client(settings.registry_url)
    encoders = {}
    for kind in kinds:
        with reachable(settings.registry_url):
            reg = register(registry, value_subject(settings.topic(kind)), schemas.avro_schema(kind),
                           settings.compatibility)
        encoders[kind] = AvroEncoder(reg.schema_id, schemas.physical_schema(kind))
    return encoders


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not enabled)


def ingest_files(
    root: Path,
    settings: Settings,
    *,
    symbols: set[str] | None = None,
    kinds: tuple[TableKind, ...] = ("trades", "quotes"),
    with_reference: bool = True,
    dlq_file: Path | None = None,
    show_progress: bool = False,
    producer_config: dict | None = None,
    source: str = "asx-csv",
) -> IngestSummary:
    """Ingest a folder of the registered folder source `source` (by default an ASX-format folder:
    trades/, quotes/, reference-data/) into Kafka."""
    folder = folder_source(source)
    files = folder.discover(root, symbols, kinds)
    all_kinds = (*kinds, "reference") if with_reference else kinds
    topics.ensure_pipeline_topics(settings, all_kinds)
    encoders = register_schemas(settings, all_kinds)
    ingest_us = time.time_ns() // 1000
    started = time.perf_counter()
    total_bytes = sum(f.path.stat().st_size for f in files)
    jobs = [FileJob(f, schemas.avro_schema(f.kind), encoders[f.kind].header) for f in files] \
        if folder.columnar and columnar.available() else []
    # the workers are forked before the producer exists
    with Ahead(jobs, ingest_us, settings.ingest_workers) as ahead:
        producer = TickProducer(settings.kafka_bootstrap, producer_config, bulk=True)
        dlq = open_sink(settings, dlq_file, producer.producer)
        detector = GapDetector("ingest", settings.gap_alert, settings.gap_halt)
        crash = CrashPoints(settings)  # test-only; inert unless K2_TEST_CRASH_AT is set
        summary = IngestSummary()

        with StopFlag("ingest.stopping") as flag, _progress(show_progress) as progress:
            task = progress.add_task("ingest", total=total_bytes, rate="")

            def advance(nbytes: int) -> None:
                """At each checkpoint of a file's lines, handed to the producer."""
                rate = summary.rows_read / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=nbytes, rate=f"{rate:,.0f} rows/s")
                crash.reach("ingest_checkpoint")

            if with_reference:
                topic, encoder = settings.topic("reference"), encoders["reference"]
                for record in folder.reference_records(root, ingest_us, symbols):
                    summary.rows_read += 1
                    producer.produce(topic, record["symbol"].encode(), encoder.encode(record))
            for tick_file in files:
                if flag.stop:
                    summary.interrupted = True
                    break
                prepared = ahead.chunks(tick_file) if ahead.workers else None
                _ingest_file(folder, tick_file, settings.topic(tick_file.kind), encoders[tick_file.kind], producer,
                             dlq, detector, summary, ingest_us, flag, advance, prepared)
            producer.flush()
            dlq.flush()
    summary.produced = Counter(producer.delivered)
    summary.seconds = time.perf_counter() - started
    log.info("ingest.summary", rows_read=summary.rows_read, produced=summary.produced_total,
             rejected=summary.rejected_total, rejected_by_reason=dict(summary.rejected),
             messages_per_second=round(summary.messages_per_second), balanced=summary.balanced,
             interrupted=summary.interrupted)
    if not summary.balanced:
        raise RuntimeError(f"ingest lost rows: read {summary.rows_read}, produced {summary.produced_total}, "
                           f"rejected {summary.rejected_total}")
    return summary


def _ingest_file(source: FolderSource, tick_file: TickFile, topic: str, encoder: AvroEncoder,
                 producer: TickProducer, dlq: DeadLetterSink, detector: GapDetector, summary: IngestSummary,
                 ingest_us: int, flag: StopFlag, advance,
                 prepared: Iterator[PreparedChunk | Fallback] | None = None) -> None:
    """Parse an ASX-format file a chunk at a time into Arrow, encode each chunk at once, then produce
    (or produce the chunks `prepared` by an ingest worker, see `k2.ingest.ahead`).

    The source's reader (`RecordBuilder` for ASX) decides every line the columnar parser does not
    take itself, so records, sequence numbers, rejections and their line numbers are those of the
    row-by-row path, which still runs where the columnar one cannot (a locale that is not UTF-8,
    bytes that are not UTF-8) and for every source whose files are not ASX-format CSV."""
    builder = source.reader(tick_file, ingest_us)
    if not (source.columnar and columnar.available()):
        with tick_file.path.open(newline="", errors="surrogateescape") as fh:
            _ingest_rows(enumerate(fh, start=1), builder, tick_file, topic, encoder, producer, dlq, detector,
                         summary, flag, advance)
        return
    parser = columnar.ChunkParser(tick_file, ingest_us)
    avro_schema = schemas.avro_schema(tick_file.kind)
    first_line, skip = 1, 0
    for item in prepared or ():
        if isinstance(item, Fallback):  # the worker stopped there: on from it in process
            first_line, skip, parser.sequences = item.first_line, item.index, item.sequences
            break
        if _produce_chunk(item.chunk, item.payloads(), tick_file, topic, producer, dlq, detector, summary, flag,
                          advance):
            return
        first_line += item.chunk.lines
    else:
        if prepared is not None:
            return
    for data in islice(columnar.read_chunks(tick_file.path), skip, None):
        try:
            chunk = parser.parse(first_line, data)
        except columnar.NotColumnar:
            lines = columnar.split_lines(data)
            builder.sequences = parser.sequences  # the row path continues the numbering
            stopped = _ingest_rows(enumerate(lines, start=first_line), builder, tick_file, topic, encoder,
                                   producer, dlq, detector, summary, flag, advance)
            first_line += len(lines)
        else:
            payloads = columnar_avro.encode(chunk.table, avro_schema, encoder.header)
            stopped = _produce_chunk(chunk, payloads, tick_file, topic, producer, dlq, detector, summary, flag,
                                     advance)
            first_line += chunk.lines
        if stopped:
            return


def _produce_chunk(chunk: columnar.ParsedChunk, payloads: list[bytes], tick_file: TickFile, topic: str,
                   producer: TickProducer, dlq: DeadLetterSink, detector: GapDetector, summary: IngestSummary,
                   flag: StopFlag, advance) -> bool:
    """Dead letters and messages of a parsed chunk, in slices of lines that mirror the row path's
    checkpoints: progress and the stop flag every `_CHECKPOINT_LINES` lines. True if stopped."""
    key = tick_file.symbol.encode()
    produce_many = producer.produce_many
    symbols = chunk.table["symbol"]
    days = chunk.table["exchange_date"].combine_chunks().view(pa.int32()).to_numpy()
    seqs = chunk.table["sequence_number"].to_numpy()
    rejected = iter(chunk.rejected)
    letter = next(rejected, None)
    for lo in range(0, chunk.lines, _CHECKPOINT_LINES):
        hi = min(lo + _CHECKPOINT_LINES, chunk.lines)
        while letter is not None and letter.line_number < chunk.first_line + hi:
            summary.rejected[letter.error.reason] += 1
            dlq.send(DeadLetter(stage="ingest", reason=letter.error.reason, detail=str(letter.error),
                                source=str(tick_file.path), line_number=letter.line_number, line=letter.line))
            letter = next(rejected, None)
        a, b = np.searchsorted(chunk.line_numbers, [chunk.first_line + lo, chunk.first_line + hi])
        # Numbers are assigned contiguously here, so this finds no gap (let alone a halting one,
        # which would stop the slice before its first message rather than at the gap).
        detector.observe_many(symbols.slice(a, b - a), days[a:b], seqs[a:b])
        produce_many(topic, key, payloads[a:b])
        summary.rows_read += hi - lo
        advance(int(chunk.line_ends[hi - 1] - (chunk.line_ends[lo - 1] if lo else 0)))
        if flag.stop:
            return True
    return False


def _ingest_rows(lines, builder: RecordReader, tick_file: TickFile, topic: str, encoder: AvroEncoder,
                 producer: TickProducer, dlq: DeadLetterSink, detector: GapDetector, summary: IngestSummary,
                 flag: StopFlag, advance) -> bool:
    """The row-by-row path over (line number, line) pairs; True if stopped."""
    key = tick_file.symbol.encode()
    encode, produce, build = encoder.encode, producer.produce, builder.build
    pending_bytes = 0
    for line_number, line in lines:
        summary.rows_read += 1
        pending_bytes += len(line)
        try:
            record = build(line)
        except RowError as exc:
            summary.rejected[exc.reason] += 1
            dlq.send(DeadLetter(stage="ingest", reason=exc.reason, detail=str(exc),
                                source=str(tick_file.path), line_number=line_number,
                                line=line.rstrip("\r\n")))
            continue
        detector.observe(record["symbol"], record["exchange_date"], record["sequence_number"])
        produce(topic, key, encode(record))
        if line_number % _CHECKPOINT_LINES == 0:
            advance(pending_bytes)
            pending_bytes = 0
            if flag.stop:
                return True
    advance(pending_bytes)
    return False
