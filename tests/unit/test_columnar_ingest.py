"""The columnar ingest path against the row-by-row one (`RecordBuilder` + fastavro), which stays
the reference: the same Kafka messages byte for byte, the same dead letters (reason, message,
line, line number), the same counts and sequence state, on the real ASX sample and on synthetic
files full of traps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2 import schemas
from k2.ingest import columnar, pipeline
from k2.quality import GapDetector
from k2.schemas.wire import AvroEncoder
from k2.sources import folder_source
from k2.sources.asx import RecordBuilder, RowError, TickFile, discover
from k2.stopping import StopFlag
from k2.stream.writer import rows_to_arrow
from k2_synthetic import generate

ASX = folder_source("asx-csv")

pytestmark = pytest.mark.unit
ENCODERS = {kind: AvroEncoder(40 + i, schemas.physical_schema(kind)) for i, kind in enumerate(("trades", "quotes"))}


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))

    def produce_many(self, topic: str, key: bytes, values: list[bytes]) -> None:
        self.sent.extend((topic, key, value) for value in values)


class _Letters:
    def __init__(self) -> None:
        self.letters: list[dict] = []

    def send(self, letter) -> None:
        self.letters.append({k: v for k, v in dataclasses.asdict(letter).items() if k != "rejected_at_ms"})

    def flush(self) -> None:
        pass


def _ingest(files: list[TickFile], *, use_columnar: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(columnar, "available", lambda: use_columnar)
    producer, letters = _Producer(), _Letters()
    detector, summary = GapDetector("ingest"), pipeline.IngestSummary()
    flag = StopFlag("test.stopping")
    for tick_file in files:
        pipeline._ingest_file(ASX, tick_file, f"topic.{tick_file.kind}", ENCODERS[tick_file.kind], producer,
                              letters, detector, summary, 1_394_000_000_000_000, flag, lambda _n: None)
    return producer.sent, letters.letters, summary.rows_read, summary.rejected, detector.last_seen, detector.counts


def _assert_same_as_row_path(files: list[TickFile], monkeypatch) -> tuple:
    ours = _ingest(files, use_columnar=True, monkeypatch=monkeypatch)
    reference = _ingest(files, use_columnar=False, monkeypatch=monkeypatch)
    for name, mine, theirs in zip(("messages", "dead letters", "rows read", "rejected", "last seen", "anomalies"),
                                  ours, reference, strict=True):
        assert mine == theirs, f"{name} differ"
    return ours


@pytest.mark.asx
def test_whole_asx_sample_gives_the_row_paths_messages_and_rejections(asx_root, monkeypatch):
    messages, letters, rows_read, *_ = _assert_same_as_row_path(discover(asx_root), monkeypatch)
    assert rows_read == len(messages) == 370_174 and not letters


@pytest.mark.asx
def test_asx_sample_in_small_chunks_gives_the_reference_records(asx_root):
    """Chunk boundaries (line endings split, numbering carried over) change nothing."""
    for tick_file in discover(asx_root, symbols={"DVN", "MWR"}):
        builder = RecordBuilder(tick_file, 7)
        expected = rows_to_arrow([builder.build(line) for line in tick_file.path.open(newline="")],
                                 schemas.arrow_schema(tick_file.kind))
        parser, first, tables = columnar.ChunkParser(tick_file, 7), 1, []
        for data in columnar.read_chunks(tick_file.path, chunk_bytes=997):
            chunk = parser.parse(first, data)
            first += chunk.lines
            tables.append(chunk.table)
        assert pa.concat_tables(tables).equals(expected)
        assert parser.sequences == builder.sequences


# Lines only the reference can judge: every field spelled in an unusual way, valid or not.
TRADE_TRAPS = [
    "", "03/11/2014,10:00:01.000,0.665,100,0,", "03/11/2014,10:00:01.000,0.665,100,0,,,",
    "03/11/2014,10:00:01.000,zero,100,0,,", "02/30/2014,10:00:01.000,0.665,100,0,,",
    "13/01/2014,10:00:01.000,0.665,100,0,,", "3/11/2014,10:00:01.000,0.665,100,0,,",  # accepted: int("3")
    "03/11/2014,10:00:01,0.665,100,0,,", "03/11/2014,10:00:01.,0.665,100,0,,", "03/11/2014,9:00:01.5,1,1,0,,",
    "03/11/2014,25:00:01.000,0.665,100,0,,", "03/11/2014,10:60:01.000,0.665,100,0,,",
    "03/11/2014,10:00:01.1234567,0.665,100,0,,", "03/11/2014,10:00:01.123456,0.665,100,0,,",
    "03/11/2014,10:00:01.000, 36.5,100,0,,", "03/11/2014,10:00:01.000,.5,100,0,,", "03/11/2014,10:00:01.000,5.,1,0,,",
    "03/11/2014,10:00:01.000,36.1234560,100,0,,", "03/11/2014,10:00:01.000,36.1234567,100,0,,",
    "03/11/2014,10:00:01.000,-1,100,0,,", "03/11/2014,10:00:01.000,-,100,0,,", "03/11/2014,10:00:01.000,1e5,100,0,,",
    "03/11/2014,10:00:01.000,,100,0,,", "03/11/2014,10:00:01.000,.,100,0,,", "03/11/2014,10:00:01.000,٣.5,100,0,,",
    "03/11/2014,10:00:01.000,1.5,300.0,0,,", "03/11/2014,10:00:01.000,1.5,300.,0,,",
    "03/11/2014,10:00:01.000,1.5,300.5,0,,", "03/11/2014,10:00:01.000,1.5,-5,0,,", "03/11/2014,10:00:01.000,1.5,+5,0,,",
    "03/11/2014,10:00:01.000,1.5, 7 ,0,,", "03/11/2014,10:00:01.000,1.5,5.00.0,0,,",
    "03/11/2014,10:00:01.000,999999999999.999999,1,XT,Ä,B1",
    # Sydney's daylight saving ends on 6 April 2014 (3 am → 2 am) and starts on 5 October (2 → 3 am)
    "04/06/2014,01:59:59.999,1,1,0,,", "04/06/2014,02:30:00.000,1,1,0,,", "04/06/2014,03:00:00.000,1,1,0,,",
    "10/05/2014,01:59:59.999,1,1,0,,", "10/05/2014,02:30:00.000,1,1,0,,", "10/05/2014,03:00:00.000,1,1,0,,",
]
QUOTE_TRAPS = ["03/14/2014,16:00:00.000,0.66,abc,100,100", "03/14/2014,16:00:00.000,0.66,0.67,100",
               "03/14/2014,16:00:00.000,0.66,0.0,100,0", "03/14/2014,16:00:00.000,0.68,0.67,1.0,2",
               "03/14/2014,16:00:00.000,0.66,0.67,1,-2"]


def _with_traps(root: Path) -> list[TickFile]:
    files = discover(root)
    for tick_file in files:
        lines = tick_file.path.read_bytes().decode().split("\r\n")[:-1]
        traps = TRADE_TRAPS if tick_file.kind == "trades" else QUOTE_TRAPS
        for i, trap in enumerate(traps):
            lines.insert(min(len(lines), 3 + i * 41), trap)
        # every line ending Python's universal newlines know, and no ending at the very end
        endings = ["\r\n", "\n", "\r"]
        text = "".join(line + endings[i % 7 == 0 and i % 3] for i, line in enumerate(lines))
        tick_file.path.write_bytes(text.rstrip("\r\n").encode())
    return files


def test_synthetic_files_with_traps_give_the_row_paths_results(tmp_path, monkeypatch):
    files = _with_traps(generate(tmp_path / "ticks", symbols=3, days=3, seed=5))
    _, letters, rows_read, rejected, *_ = _assert_same_as_row_path(files, monkeypatch)
    assert rows_read > 5_000
    assert {"column_count", "bad_date", "bad_time", "bad_number", "negative_value"} <= set(rejected)
    assert sum(rejected.values()) == len(letters)


def test_small_chunks_and_bytes_that_are_not_utf8_fall_back_per_chunk(tmp_path, monkeypatch):
    root = generate(tmp_path / "ticks", symbols=1, days=2, seed=9)
    files = _with_traps(root)
    trades = next(f for f in files if f.kind == "trades")
    # a byte that is not UTF-8: that chunk takes the row path, which dead-letters just that line
    huge = b"\r\n03/12/2014,10:30:00.000,12.5,1,\xff,,\r\n"
    trades.path.write_bytes(trades.path.read_bytes().replace(b"\r\n", huge, 1))
    monkeypatch.setattr(columnar, "CHUNK_BYTES", 4096)
    _assert_same_as_row_path(files, monkeypatch)
    parser = columnar.ChunkParser(trades, 1)
    with pytest.raises(columnar.NotColumnar):
        [parser.parse(1, data) for data in columnar.read_chunks(trades.path)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet="0123456789.,-:/ +eX\r\n٣", max_size=40), max_size=12),
       st.sampled_from(["trades", "quotes"]))
def test_arbitrary_lines_are_judged_as_the_reference_judges_them(tmp_path, lines, kind):
    tick_file = TickFile(kind, tmp_path / kind / "7078.csv", "BHP")
    data = "".join(lines).encode()
    builder = RecordBuilder(tick_file, 3)
    records, rejected = [], []
    for number, line in enumerate(columnar.split_lines(data), start=1):
        try:
            records.append(builder.build(line))
        except RowError as exc:
            rejected.append((number, line.rstrip("\r\n"), exc.reason, str(exc)))
    if not data:
        return
    try:
        chunk = columnar.ChunkParser(tick_file, 3).parse(1, data)
    except columnar.NotColumnar:
        return
    assert [(r.line_number, r.line, r.error.reason, str(r.error)) for r in chunk.rejected] == rejected
    assert chunk.table.equals(rows_to_arrow(records, schemas.arrow_schema(kind)))
    assert chunk.lines == len(records) + len(rejected)
