"""Fixtures of the query-stage tests: real Iceberg tables in a temporary embedded catalog (SQLite +
local warehouse) loaded from the ASX sample, the API over them, and an independent oracle that
computes expected figures from the CSV files in plain Python (`decimal`, `fractions`).

The ASX sample lives outside the repository; tests that need it skip when it is absent.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from starlette.testclient import TestClient

from k2.api.app import create_app
from k2.query.engine import Engine
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings
from k2_synthetic import generate

SYDNEY = ZoneInfo("Australia/Sydney")
ASX_ROWS = {"trades": 200_545, "quotes": 169_629}


def lakehouse_settings(root: Path, **overrides: object) -> Settings:
    """Settings for a private embedded lakehouse; everything a K2_* variable could change is explicit."""
    values: dict[str, object] = {
        "mode": "dev", "catalog_uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "warehouse"),
        "namespace": "market", "api_keys": "", "api_keys_file": None, "rate_limit": "100000/minute",
        "max_rows": 10_000, "s3_endpoint": None, "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def lakehouse_settings_for():
    """`lakehouse_settings` for tests that build their own (mutable) lakehouse."""
    return lakehouse_settings


@dataclass(frozen=True)
class AsxLakehouse:
    settings: Settings
    engine: Engine
    snapshots: dict[str, list[int]]  # per table, one per loaded day (trades, quotes) or one (reference)


@pytest.fixture(scope="session")
def asx_lakehouse(asx_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsxLakehouse]:
    """The whole ASX sample, one append per table and day; shared and never modified by tests."""
    settings = lakehouse_settings(tmp_path_factory.mktemp("asx-lakehouse"))
    snapshots = load_asx(settings, asx_root)
    engine = Engine(settings)
    yield AsxLakehouse(settings, engine, snapshots)
    engine.close()


@pytest.fixture(scope="session")
def synthetic_lakehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsxLakehouse]:
    """Four symbols over two days of synthetic ticks: for tests that need some data, not the ASX sample's."""
    root = tmp_path_factory.mktemp("synthetic-lakehouse")
    settings = lakehouse_settings(root)
    snapshots = load_asx(settings, generate(root / "ticks", symbols=4, days=2, seed=2014))
    engine = Engine(settings)
    yield AsxLakehouse(settings, engine, snapshots)
    engine.close()


@pytest.fixture(scope="session")
def asx_api(asx_lakehouse: AsxLakehouse) -> Iterator[TestClient]:
    """The API over the shared lakehouse, sending the dev key by default."""
    app = create_app(asx_lakehouse.settings, engine=asx_lakehouse.engine)
    with TestClient(app, headers={"X-API-Key": DEV_API_KEY}) as client:
        yield client


# the oracle ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OracleTrade:
    symbol: str
    local: dt.datetime  # aware, Australia/Sydney
    sequence_number: int
    price: Decimal
    volume: int

    @property
    def ts_us(self) -> int:
        return _micros(self.local)


@dataclass(frozen=True)
class OracleQuote:
    symbol: str
    local: dt.datetime
    sequence_number: int
    bid: Decimal
    ask: Decimal
    bid_size: int
    ask_size: int


def exact(numerator: Fraction | Decimal | int, denominator: int) -> str:
    """numerator / denominator rounded half-to-even to 6 places, as the API prints it."""
    micro = round(Fraction(numerator) * 1_000_000 / denominator)  # round() on a Fraction is half-even
    return f"{Decimal(micro).scaleb(-6):.6f}"


class AsxOracle:
    """Expected figures straight from the CSV files, by a route independent of K2's code."""

    def __init__(self, root: Path) -> None:
        with (root / "reference-data" / "company_info.csv").open(newline="") as fh:
            symbols = {row["company_id"]: row["symbol"] for row in csv.DictReader(fh)}
        self.trades: dict[tuple[str, dt.date], list[OracleTrade]] = defaultdict(list)
        self.quotes: dict[str, list[OracleQuote]] = defaultdict(list)
        for path in sorted((root / "trades").glob("*.csv")):
            symbol = symbols[path.stem]
            for local, seq, row in self._rows(path):
                self.trades[symbol, local.date()].append(
                    OracleTrade(symbol, local, seq, Decimal(row[2]), int(Decimal(row[3]))))
        for path in sorted((root / "quotes").glob("*.csv")):
            symbol = symbols[path.stem]
            for local, seq, row in self._rows(path):
                self.quotes[symbol].append(OracleQuote(symbol, local, seq, Decimal(row[2]), Decimal(row[3]),
                                                       int(Decimal(row[4])), int(Decimal(row[5]))))
        for trades in self.trades.values():
            trades.sort(key=lambda t: (t.local, t.sequence_number))
        for quotes in self.quotes.values():
            quotes.sort(key=lambda q: (q.local, q.sequence_number))

    @staticmethod
    def _rows(path: Path) -> Iterator[tuple[dt.datetime, int, list[str]]]:
        sequence: dict[dt.date, int] = defaultdict(int)
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                local = dt.datetime.strptime(f"{row[0]} {row[1]}", "%m/%d/%Y %H:%M:%S.%f").replace(tzinfo=SYDNEY)
                sequence[local.date()] += 1
                yield local, sequence[local.date()], row

    def symbol_days(self) -> list[tuple[str, dt.date]]:
        return sorted(self.trades)

    def summary(self, symbol: str, day: dt.date) -> dict[str, object]:
        trades = self.trades[symbol, day]
        volume = sum(t.volume for t in trades)
        return {"symbol": symbol, "exchange": "ASX", "date": day.isoformat(),
                "open": f"{trades[0].price:.6f}", "high": f"{max(t.price for t in trades):.6f}",
                "low": f"{min(t.price for t in trades):.6f}", "close": f"{trades[-1].price:.6f}",
                "volume": volume, "trade_count": len(trades),
                "vwap": exact(sum(t.price * t.volume for t in trades), volume)}

    def bars(self, symbol: str, day: dt.date, minutes: int) -> list[dict[str, object]]:
        """Bars of `minutes` over one local day: OHLCV, VWAP and TWAP (see k2.query.bars)."""
        buckets: dict[dt.datetime, list[OracleTrade]] = defaultdict(list)
        for t in self.trades[symbol, day]:
            start = t.local.replace(minute=t.local.minute - t.local.minute % minutes, second=0, microsecond=0)
            buckets[start].append(t)
        bars = []
        for start, trades in sorted(buckets.items()):
            end = start + dt.timedelta(minutes=minutes)
            end_us = _micros(end)
            held = [(nxt.ts_us if nxt else end_us) - t.ts_us
                    for t, nxt in zip(trades, [*trades[1:], None], strict=True)]
            volume = sum(t.volume for t in trades)
            bars.append({
                "symbol": symbol, "bucket_start": _utc(start), "bucket_end": _utc(end),
                "open": f"{trades[0].price:.6f}", "high": f"{max(t.price for t in trades):.6f}",
                "low": f"{min(t.price for t in trades):.6f}", "close": f"{trades[-1].price:.6f}",
                "volume": volume, "trade_count": len(trades),
                "vwap": exact(sum(t.price * t.volume for t in trades), volume),
                "twap": exact(sum(t.price * h for t, h in zip(trades, held, strict=True)), sum(held)),
            })
        return bars

    def prevailing_quote(self, symbol: str, at: dt.datetime) -> OracleQuote | None:
        """The last quote at or before `at` (the highest sequence number among equal times)."""
        found = None
        for quote in self.quotes[symbol]:
            if quote.local > at:
                break
            found = quote
        return found


def _micros(instant: dt.datetime) -> int:
    return (instant - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def _utc(local: dt.datetime) -> str:
    return local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="session")
def asx_oracle(asx_root: Path) -> AsxOracle:
    return AsxOracle(asx_root)
