"""Hostile CSV input: every value is range-checked against its Avro and Iceberg types before it is
encoded, so a line either becomes a message every reader can decode or a dead letter with a
reason; the rest of the file is never affected. Lines read = messages + dead letters, exactly."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2 import schemas
from k2.ingest import columnar, pipeline
from k2.quality import GapDetector
from k2.schemas import columnar as codec
from k2.schemas.wire import AvroEncoder
from k2.sources import folder_source
from k2.sources.asx import RecordBuilder, RowError, TickFile
from k2.stopping import StopFlag

pytestmark = pytest.mark.unit
GOOD = {"trades": b"03/11/2014,10:00:01.000,36.5,100,0,,\r\n",
        "quotes": b"03/11/2014,10:00:01.000,36.5,36.6,100,200\r\n"}
# (line, reason): each value is one past what Avro long, decimal(18, 6), date/timestamp or UTF-8 allow
HOSTILE = {
    "trades": [
        (b"03/11/2014,10:00:01.000,36.5,99999999999999999999,0,,", "out_of_range"),  # volume > int64
        (b"03/11/2014,10:00:01.000,36.5,9223372036854775808,0,,", "out_of_range"),  # 2**63
        (b"03/11/2014,10:00:01.000,1000000000000,1,0,,", "out_of_range"),  # 13 whole digits > decimal(18, 6)
        (b"03/11/2014,10:00:01.000,99999999999999999999999.5,1,0,,", "out_of_range"),
        (b"01/01/0001,00:00:00.000,36.5,1,0,,", "out_of_range"),  # before the supported timestamp range
        (b"12/31/9999,23:59:59.999,36.5,1,0,,", "out_of_range"),  # after it
        (b"03/11/2014,10:00:01.000,36.5,1,\xff\xfe,,", "bad_encoding"),  # not UTF-8
        (b"03/11/2014,10:00:01.000,36.5,1,0,\xc3,B1", "bad_encoding"),  # a truncated UTF-8 sequence
    ],
    "quotes": [
        (b"03/11/2014,10:00:01.000,36.5,36.6,18446744073709551616,1", "out_of_range"),
        (b"03/11/2014,10:00:01.000,36.5,1234567890123.1,1,1", "out_of_range"),
        (b"01/01/1800,10:00:01.000,36.5,36.6,1,1", "out_of_range"),
        (b"03/11/2014,10:00:01.000,36.5,36.6,1,\xed\xa0\x80", "bad_encoding"),  # an encoded surrogate
    ],
}
# Still valid: the extremes of each range
EDGES = {"trades": [b"03/11/2014,10:00:01.000,999999999999.999999,9223372036854775807,X,\xc3\x84,B1"],
         "quotes": [b"01/01/1900,10:00:01.000,0,999999999999.999999,0,9223372036854775807"]}


class _Producer:
    """Collects what the pipeline produces (the unit under test is the parser, not Kafka)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append(value)

    def produce_many(self, topic: str, key: bytes, values: list[bytes]) -> None:
        self.sent.extend(values)


class _Letters:
    def __init__(self) -> None:
        self.letters: list = []

    def send(self, letter) -> None:
        self.letters.append(letter)
        letter.to_json()  # a dead letter must always be serialisable, whatever the line held

    def flush(self) -> None:
        pass


def _run(tmp_path: Path, kind: str, data: bytes, *, use_columnar: bool, monkeypatch) -> tuple:
    path = tmp_path / kind / "7078.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    monkeypatch.setattr(columnar, "available", lambda: use_columnar)
    producer, letters, summary = _Producer(), _Letters(), pipeline.IngestSummary()
    pipeline._ingest_file(folder_source("asx-csv"), TickFile(kind, path, "BHP"), kind,
                          AvroEncoder(7, schemas.physical_schema(kind)), producer, letters, GapDetector("ingest"),
                          summary, 1_394_000_000_000_000, StopFlag("test.stopping"), lambda _n: None)
    return producer.sent, letters.letters, summary


def _assert_every_message_fits_its_types(kind: str, messages: list[bytes]) -> None:
    """Each message decodes with fastavro and with the stream's strict codec (which refuses
    decimals beyond their precision and ints beyond int32), into the table's Arrow schema."""
    physical = schemas.physical_schema(kind)
    for message in messages:
        fastavro.schemaless_reader(io.BytesIO(message[5:]), physical, None)
    decoded = codec.decode(messages, schemas.avro_schema(kind), skip=5)
    assert not decoded.bad.any(), decoded.errors
    decoded.table.cast(schemas.arrow_schema(kind))


@pytest.mark.parametrize("use_columnar", [True, False], ids=["columnar", "rows"])
@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_values_beyond_their_types_are_dead_lettered_and_the_rest_is_produced(tmp_path, monkeypatch, kind,
                                                                               use_columnar):
    hostile = HOSTILE[kind]
    data = b"".join(GOOD[kind] + line + b"\r\n" for line, _ in hostile) + b"".join(e + b"\r\n" for e in EDGES[kind])
    data += GOOD[kind]
    messages, letters, summary = _run(tmp_path, kind, data, use_columnar=use_columnar, monkeypatch=monkeypatch)
    assert [(letter.line_number, letter.reason) for letter in letters] == [
        (2 * i + 2, reason) for i, (_, reason) in enumerate(hostile)]
    assert len(messages) == len(hostile) + len(EDGES[kind]) + 1
    assert summary.rows_read == len(messages) + len(letters) and summary.rejected_total == len(letters)
    _assert_every_message_fits_its_types(kind, messages)
    undecodable = [letter for letter in letters if letter.reason == "bad_encoding"]
    assert all("\\udc" in letter.to_json().decode() for letter in undecodable), "the raw bytes are kept, escaped"


def test_the_reference_parser_names_the_limit_it_enforces():
    builder = RecordBuilder(TickFile("trades", Path("t/trades/1.csv"), "BHP"), 1)
    with pytest.raises(RowError, match="decimal") as exc:
        builder.build("03/11/2014,10:00:01.000,1000000000000,1,0,,")
    assert exc.value.reason == "out_of_range"
    with pytest.raises(RowError, match="int64"):
        builder.build("03/11/2014,10:00:01.000,1,9223372036854775808,0,,")
    with pytest.raises(RowError, match="1900"):
        builder.build("12/31/1899,10:00:01.000,1,1,0,,")


_FIELD = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"", b"0", b"36.5", b"-1", b"9" * 19, b"9" * 25, b"1" * 13 + b".5", b"03/11/2014",
                     b"01/01/0001", b"12/31/9999", b"10:00:01.000", b"25:00:00", b"\xff", b"\xc3\x84", b"1e5"]),
)
_LINE = st.one_of(
    st.lists(_FIELD, min_size=5, max_size=8).map(b",".join),
    st.binary(max_size=60),
    st.sampled_from(list(GOOD.values())),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=25), ending=st.sampled_from([b"\r\n", b"\n", b"\r"]),
       kind=st.sampled_from(["trades", "quotes"]), use_columnar=st.booleans())
def test_arbitrary_bytes_never_crash_and_every_line_is_produced_or_dead_lettered(tmp_path, monkeypatch, lines,
                                                                                  ending, kind, use_columnar):
    data = ending.join(lines)
    messages, letters, summary = _run(tmp_path, kind, data, use_columnar=use_columnar, monkeypatch=monkeypatch)
    assert summary.rows_read == len(messages) + len(letters) == len(columnar.split_lines(data))
    assert summary.rejected_total == len(letters)
    assert all(letter.reason and letter.detail for letter in letters)
    _assert_every_message_fits_its_types(kind, messages)
    if use_columnar:  # the fast path and the reference agree on every line
        theirs = _run(tmp_path, kind, data, use_columnar=False, monkeypatch=monkeypatch)
        assert theirs[0] == messages
        assert [dataclasses.replace(x, rejected_at_ms=0) for x in theirs[1]] == \
            [dataclasses.replace(x, rejected_at_ms=0) for x in letters]
