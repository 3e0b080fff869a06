"""A new source is its module and one registration: a toy venue (JSON lines of BTC-USD trades),
defined and registered here and nowhere else, runs through the real ingest path (`k2 ingest`'s
`ingest_files` → Kafka → `k2 stream run` → Iceberg), its bad lines to the DLQ with a reason, and
through the sample loader; and the IngestionPipeline CRD, generated from the registry, goes
stale until regenerated."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2 import exchanges, tables
from k2.ingest.pipeline import ingest_files
from k2.query.sample import load_asx
from k2.settings import Settings, TableKind
from k2.sources import SOURCES, register
from k2.sources.asx import parse_price, unscaled_bytes
from k2.sources.base import RowError, TickFile
from k2.stream.runner import run as stream_run

pytestmark = pytest.mark.integration
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
CRYPTO = exchanges.get("CRYPTO")


class _ToyReader:
    """`{"time": ISO-8601 with offset, "price": "decimal", "volume": int}` per line."""

    def __init__(self, tick_file: TickFile, ingest_us: int) -> None:
        self.file, self.ingest_us = tick_file, ingest_us
        self.sequences: dict[int, int] = {}

    def build(self, line: str) -> dict:
        try:
            message = json.loads(line)
            instant = dt.datetime.fromisoformat(message["time"])
            price = parse_price(str(message["price"]), "price")  # RowError: refused with its reason
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, RowError):
                raise
            raise RowError("toy_unreadable", f"not a toy trade: {exc}") from None
        day = (CRYPTO.local_date(instant) - _EPOCH.date()).days
        self.sequences[day] = seq = self.sequences.get(day, 0) + 1
        return {"symbol": self.file.symbol, "exchange": CRYPTO.code,
                "exchange_timestamp": (instant - _EPOCH) // dt.timedelta(microseconds=1), "exchange_date": day,
                "sequence_number": seq, "price": unscaled_bytes(price), "volume": int(message["volume"]),
                "qualifiers": None, "venue": None, "buyer_id": None, "ingest_timestamp": self.ingest_us,
                "source_id": self.file.source_id}


class ToyVenue:
    name = "toy-jsonl"
    command: tuple[str, ...] = ("ingest", "toy")
    continuous = False
    description = "a toy venue: trades/<SYMBOL>.jsonl"
    columnar = False

    def discover(self, root: Path, symbols: set[str] | None = None,
                 kinds: tuple[TableKind, ...] = ("trades", "quotes")) -> list[TickFile]:
        return [TickFile("trades", path, path.stem) for path in sorted((root / "trades").glob("*.jsonl"))
                if "trades" in kinds and (symbols is None or path.stem in symbols)]

    def reference_records(self, root: Path, ingest_us: int, symbols: set[str] | None = None) -> Iterator[dict]:
        return iter(())

    def reader(self, tick_file: TickFile, ingest_us: int) -> _ToyReader:
        return _ToyReader(tick_file, ingest_us)


@pytest.fixture
def toy_venue(tmp_path: Path) -> Iterator[Path]:
    register(ToyVenue())
    root = tmp_path / "toy"
    (root / "trades").mkdir(parents=True)
    lines = [json.dumps({"time": "2026-01-05T23:59:59.5+00:00", "price": "93000.5", "volume": 2}),
             "{not json",
             json.dumps({"time": "2026-01-06T00:00:00.25+00:00", "price": "93001", "volume": 1}),
             json.dumps({"time": "2026-01-06T00:00:01+00:00", "price": "93002.25", "volume": 3})]
    (root / "trades" / "BTC-USD.jsonl").write_text("\n".join(lines) + "\n")
    yield root
    del SOURCES["toy-jsonl"]


EXPECTED = [("BTC-USD", "CRYPTO", dt.date(2026, 1, 5), 1, 2), ("BTC-USD", "CRYPTO", dt.date(2026, 1, 6), 1, 1),
            ("BTC-USD", "CRYPTO", dt.date(2026, 1, 6), 2, 3)]


def _stored(settings: Settings) -> list[tuple]:
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    rows = table.scan(selected_fields=("symbol", "exchange", "exchange_date", "sequence_number", "volume")).to_arrow()
    return sorted(tuple(r.values()) for r in rows.to_pylist())


def test_a_registered_toy_source_runs_through_the_real_ingest_path(toy_venue: Path, embedded_settings: Settings,
                                                                    drain) -> None:
    settings = embedded_settings.model_copy(update={"exchange": "crypto"})
    summary = ingest_files(toy_venue, settings, source="toy-jsonl", kinds=("trades",), with_reference=False)
    assert (summary.rows_read, summary.produced_total, dict(summary.rejected)) == (4, 3, {"toy_unreadable": 1})
    stream_run(settings, ("trades",), until_idle=1.0)
    assert _stored(settings) == EXPECTED
    letters = [json.loads(m.value()) for m in drain(settings.kafka_bootstrap, settings.dlq_topic)]
    assert [(x["stage"], x["reason"], x["line_number"]) for x in letters] == [("ingest", "toy_unreadable", 2)]


def test_the_sample_loader_reads_a_registered_source(toy_venue: Path, tmp_path: Path) -> None:
    (toy_venue / "trades" / "BTC-USD.jsonl").write_text(
        "\n".join(x for x in (toy_venue / "trades" / "BTC-USD.jsonl").read_text().splitlines() if x != "{not json"))
    settings = Settings(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "warehouse"))
    load_asx(settings, toy_venue, kinds=("trades",), source="toy-jsonl")
    assert _stored(settings) == EXPECTED


def test_a_registered_source_makes_the_committed_crds_stale() -> None:
    """The operator's `source.type` enum is the registry's names: a new source with CRDs not
    regenerated is caught by the sync check (`python -m k2_operator.crds --check`)."""
    check = ("import sys; from k2.sources import register; from tests.integration.test_source_seam import ToyVenue; "
             "register(ToyVenue()); from k2_operator import crds; sys.exit(crds.main(['--check']))")
    root = Path(__file__).resolve().parents[2]
    stale = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1, stale.stderr
    assert {line.split()[1] for line in stale.stderr.splitlines()} == {
        "manifests/base/crds/k2.io_ingestionpipelines.yaml", "charts/k2/crds/k2.io_ingestionpipelines.yaml"}
    fresh = subprocess.run([sys.executable, "-m", "k2_operator.crds", "--check"], cwd=root, capture_output=True,
                           text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
