"""The issue's case on the real stack: a copy of the real BHP files with malformed lines mixed in
(values beyond int64 and decimal(18, 6), impossible dates, bytes that are not UTF-8, garbage).
Every bad line lands in the DLQ with its reason, the rest of the file and the next file are
produced, a rerun goes through the same way, and the table ends with every symbol-day exact."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest

from k2 import tables
from k2.ingest.pipeline import ingest_files
from k2.stream.runner import run as stream_run

pytestmark = [pytest.mark.integration, pytest.mark.asx]
BHP = "7078"
# (line, reason); the first is the line that crashed ingestion with fastavro's OverflowError
HOSTILE = {
    "trades": [
        (b"03/11/2014,10:00:01.000,36.5,99999999999999999999,0,,", "out_of_range"),
        (b"03/11/2014,10:00:01.000,1000000000000.5,1,0,,", "out_of_range"),
        (b"12/31/9999,10:00:01.000,36.5,1,0,,", "out_of_range"),
        (b"03/11/2014,10:00:01.000,36.5,1,\xff\xfe,,", "bad_encoding"),
        (b"03/11/2014,10:00:01.000,36.5,-1,0,,", "negative_value"),
        (b"\x00\x01garbage", "column_count"),
        (b"03/11/2014,10:00:01.000,36.5,1e30,0,,", "bad_number"),
    ],
    "quotes": [
        (b"03/11/2014,10:00:01.000,36.5,36.6,18446744073709551616,1", "out_of_range"),
        (b"02/30/2014,10:00:01.000,36.5,36.6,1,1", "bad_date"),
        (b"03/11/2014,10:00:01.000,36.5,36.6,1,\xc3", "bad_encoding"),
    ],
}


def _hostile_copy(asx_root: Path, root: Path) -> dict[str, Counter]:
    """BHP's files with the hostile lines spread through them (one at the very end); returns the
    good lines per kind and exchange date."""
    (root / "reference-data").mkdir(parents=True)
    shutil.copy(asx_root / "reference-data" / "company_info.csv", root / "reference-data")
    expected = {}
    for kind, bad in HOSTILE.items():
        (root / kind).mkdir()
        lines = (asx_root / kind / f"{BHP}.csv").read_bytes().split(b"\r\n")[:-1]
        expected[kind] = Counter(dt.datetime.strptime(line.split(b",")[0].decode(), "%m/%d/%Y").date()
                                 for line in lines)
        step = len(lines) // len(bad)
        for i, (line, _) in enumerate(reversed(bad)):
            lines.insert(len(lines) - i * step, line)
        (root / kind / f"{BHP}.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
    return expected


def test_hostile_lines_in_the_real_bhp_files_are_dead_lettered_and_nothing_else_is_lost(
        asx_root, tmp_path, embedded_settings, drain):
    expected = _hostile_copy(asx_root, tmp_path / "asx")
    reasons = Counter(reason for bad in HOSTILE.values() for _, reason in bad)
    for _ in range(2):  # a rerun must not stop at the same line either
        summary = ingest_files(tmp_path / "asx", embedded_settings, symbols={"BHP"}, with_reference=False)
        assert summary.balanced and summary.rejected == reasons
        for kind in HOSTILE:
            assert summary.produced[embedded_settings.topic(kind)] == expected[kind].total()

    letters = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    assert Counter(letter["reason"] for letter in letters) == Counter({r: 2 * n for r, n in reasons.items()})
    assert all(letter["stage"] == "ingest" and letter["line_number"] > 0 and letter["detail"] for letter in letters)

    stream_run(embedded_settings, ("trades", "quotes"), until_idle=1.0)
    catalog = tables.catalog(embedded_settings)
    for kind, per_day in expected.items():
        stored = catalog.load_table(embedded_settings.table_identifier(kind)).scan(
            selected_fields=("symbol", "exchange_date")).to_arrow()
        assert pc.all(pc.equal(stored["symbol"], "BHP")).as_py()
        assert Counter(stored["exchange_date"].to_pylist()) == per_day, f"{kind}: a symbol-day is not exact"


def test_a_line_larger_than_a_kafka_message_is_dead_lettered_cut_short(tmp_path, embedded_settings, drain):
    """A dead letter keeps the line, but no more of it than fits a Kafka message (1 MB)."""
    root = tmp_path / "big"
    for folder in ("trades", "quotes", "reference-data"):
        (root / folder).mkdir(parents=True)
    (root / "reference-data" / "company_info.csv").write_text(
        "company_id,symbol,company_name,ISIN,start_date,end_date\n1,ABC,ABC LTD,,,\n")
    huge = b"x" * 3_000_000
    (root / "trades" / "1.csv").write_bytes(b"03/10/2014,10:00:00.001,1.5,1,0,,\r\n" + huge +
                                            b"\r\n03/10/2014,10:00:00.002,1.5,1,0,,\r\n")
    summary = ingest_files(root, embedded_settings, with_reference=False)
    assert summary.balanced and summary.rejected == {"column_count": 1}
    assert summary.produced[embedded_settings.topic("trades")] == 2
    (letter,) = [json.loads(m.value()) for m in drain(embedded_settings.kafka_bootstrap, embedded_settings.dlq_topic)]
    assert letter["line_number"] == 2 and letter["line_bytes"] == len(huge)
    assert 0 < len(letter["line"]) < len(huge) and huge.decode().startswith(letter["line"])
