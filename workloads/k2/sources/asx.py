"""Parsing the ASX tick CSV format into canonical K2 records.

The format (no header, CRLF, exchange-local time without zone) has traps the docstrings below
name. Rows are parsed by hand rather than with the csv module: the format has no quoting, and
this is the hot loop of ingestion. Prices become scaled integers (micro-units) straight from the
text, so no binary floating point ever touches a price.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from k2 import exchanges
from k2.schemas import PRICE_PRECISION, PRICE_SCALE
from k2.settings import TableKind
from k2.sources.base import RowError, TickFile

EXCHANGE = "ASX"
EXCHANGE_TZ = exchanges.get(EXCHANGE).timezone
_EPOCH = dt.date(1970, 1, 1)
_PRICE_FACTOR = 10**PRICE_SCALE
# The types every value must fit before it is encoded: Avro long / Iceberg long, decimal(18, 6),
# and dates whose instants every reader can hold (nanosecond timestamps, as pandas and Arrow's
# ns conversions use, end in April 2262).
_LONG_MAX = 2**63 - 1
_PRICE_MAX = 10**PRICE_PRECISION - 1
FIRST_DATE, END_DATE = dt.date(1900, 1, 1), dt.date(2262, 1, 1)
TRADE_COLUMNS = 7  # date, time, price, volume, qualifier, venue, buyer id
QUOTE_COLUMNS = 6  # date, time, bid, ask, bid volume, ask volume (in that order)


@lru_cache(maxsize=4096)
def _parse_date(text: str) -> tuple[dt.date, int]:
    """MM/DD/YYYY → (date, days since epoch)."""
    try:
        month, day, year = text.split("/")
        date = dt.date(int(year), int(month), int(day))
    except ValueError as exc:
        raise RowError("bad_date", f"unparsable date {text!r} (expected MM/DD/YYYY)") from exc
    if not FIRST_DATE <= date < END_DATE:
        raise RowError("out_of_range", f"date {text!r} outside {FIRST_DATE} to {END_DATE} (exclusive)")
    return date, (date - _EPOCH).days


@lru_cache(maxsize=65536)
def _utc_offset_us(date: dt.date, hour: int) -> int:
    """Sydney's UTC offset in µs for that local hour (AEDT/AEST changes at 2-3 am, so per hour)."""
    local = dt.datetime(date.year, date.month, date.day, hour, tzinfo=EXCHANGE_TZ)
    offset = local.utcoffset()
    assert offset is not None  # an aware datetime has one
    return int(offset.total_seconds()) * 1_000_000


def parse_timestamp(date_text: str, time_text: str) -> tuple[int, int, dt.date]:
    """Exchange-local date and HH:MM:SS.mmm → (UTC µs since epoch, epoch day, local date)."""
    date, epoch_day = _parse_date(date_text)
    try:
        hh, mm, rest = time_text.split(":")
        sec, _, frac = rest.partition(".")
        hour, minute, second = int(hh), int(mm), int(sec)
        micros = int(frac.ljust(6, "0")[:6]) if frac else 0
    except ValueError as exc:
        raise RowError("bad_time", f"unparsable time {time_text!r} (expected HH:MM:SS.mmm)") from exc
    if not (0 <= hour < 24 and 0 <= minute < 60 and 0 <= second < 60) or len(frac) > 6:
        raise RowError("bad_time", f"time out of range {time_text!r}")
    local_us = ((epoch_day * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros
    return local_us - _utc_offset_us(date, hour), epoch_day, date


def parse_price(text: str, column: str) -> int:
    """Decimal text → integer micro-units, exactly; rejects negatives and excess precision."""
    whole, dot, frac = text.strip().partition(".")
    if not whole and not frac:
        raise RowError("bad_number", f"{column} is empty")
    if not (whole or "0").isdigit() or (dot and frac and not frac.isdigit()):
        raise RowError("negative_value" if whole.startswith("-") else "bad_number",
                       f"{column} {text!r} is not a non-negative decimal number")
    frac = frac.rstrip("0")
    if len(frac) > PRICE_SCALE:
        raise RowError("bad_number", f"{column} {text!r} has more than {PRICE_SCALE} decimal places")
    value = int(whole or "0") * _PRICE_FACTOR + int(frac.ljust(PRICE_SCALE, "0"))
    if value > _PRICE_MAX:
        raise RowError("out_of_range", f"{column} {text!r} does not fit decimal({PRICE_PRECISION}, {PRICE_SCALE})")
    return value


def parse_size(text: str, column: str) -> int:
    """Sizes are whole units; the source writes some as `300.0`, which is accepted exactly."""
    stripped = text.strip()
    whole, _, frac = stripped.partition(".")
    if whole.startswith("-") and whole[1:].isdigit():
        raise RowError("negative_value", f"{column} {text!r} is negative")
    if not whole.isdigit() or (frac and frac.strip("0")):
        raise RowError("bad_number", f"{column} {text!r} is not a whole non-negative number")
    value = int(whole)
    if value > _LONG_MAX:
        raise RowError("out_of_range", f"{column} {text!r} does not fit int64")
    return value


def unscaled_bytes(value: int) -> bytes:
    """Avro decimal's physical form: big-endian two's-complement of the unscaled integer."""
    return value.to_bytes((value.bit_length() + 8) // 8 or 1, "big", signed=True)


def micros_to_decimal_str(value: int) -> str:
    whole, frac = divmod(value, _PRICE_FACTOR)
    return f"{whole}.{frac:0{PRICE_SCALE}d}".rstrip("0").rstrip(".")


def read_company_symbols(root: Path) -> dict[str, str]:
    """company id → symbol from reference-data/company_info.csv."""
    with (root / "reference-data" / "company_info.csv").open(newline="") as fh:
        return {row["company_id"]: row["symbol"] for row in csv.DictReader(fh)}


def discover(root: Path, symbols: set[str] | None = None,
             kinds: tuple[TableKind, ...] = ("trades", "quotes")) -> list[TickFile]:
    """The tick files of an ASX-format folder (trades/, quotes/, reference-data/)."""
    if not (root / "reference-data" / "company_info.csv").is_file():
        raise FileNotFoundError(f"{root} is not an ASX-format folder: reference-data/company_info.csv is missing")
    by_id = read_company_symbols(root)
    files = []
    for kind in kinds:
        for path in sorted((root / kind).glob("*.csv")):
            symbol = by_id.get(path.stem)
            if symbol is None:
                raise ValueError(f"{path}: company id {path.stem} is not in reference-data/company_info.csv")
            if symbols is None or symbol in symbols:
                files.append(TickFile(kind, path, symbol))
    return files


def reference_records(root: Path, ingest_us: int, symbols: set[str] | None = None) -> Iterator[dict]:
    path = root / "reference-data" / "company_info.csv"
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if symbols is not None and row["symbol"] not in symbols:
                continue
            listed = _parse_date(row["start_date"])[1] if row.get("start_date") else None
            delisted = _parse_date(row["end_date"])[1] if row.get("end_date") else None
            yield {"symbol": row["symbol"], "exchange": EXCHANGE, "company_id": row["company_id"],
                   "company_name": row["company_name"], "isin": row.get("ISIN") or None,
                   "listed_date": listed, "delisted_date": delisted, "ingest_timestamp": ingest_us,
                   "source_id": "reference-data/company_info.csv"}


class RecordBuilder:
    """Turns the rows of one file into records, assigning sequence numbers per (symbol, date).

    Numbers follow file order and only accepted rows consume one, so loading the same file twice
    yields the same numbers: that is what downstream de-duplication keys on, since rows with
    equal content are distinct fills.
    """

    def __init__(self, tick_file: TickFile, ingest_us: int) -> None:
        self.file = tick_file
        self.ingest_us = ingest_us
        self.sequences: dict[int, int] = {}
        self._parse = self._trade if tick_file.kind == "trades" else self._quote

    def build(self, line: str) -> dict:
        """One line (read as UTF-8 with surrogateescape, so undecodable bytes arrive as lone
        surrogates) → its record; RowError names why a line cannot be one."""
        if not line.isascii():
            try:
                line.encode()
            except UnicodeEncodeError as exc:
                raise RowError("bad_encoding", f"not UTF-8 at character {exc.start}") from exc
        fields = line.rstrip("\r\n").split(",")
        record = self._parse(fields)
        day = record["exchange_date"]
        seq = self.sequences.get(day, 0) + 1
        self.sequences[day] = seq
        record["sequence_number"] = seq
        return record

    def _common(self, fields: list[str]) -> dict:
        ts, epoch_day, _ = parse_timestamp(fields[0], fields[1])
        return {"symbol": self.file.symbol, "exchange": EXCHANGE, "exchange_timestamp": ts,
                "exchange_date": epoch_day, "ingest_timestamp": self.ingest_us,
                "source_id": self.file.source_id}

    def _trade(self, fields: list[str]) -> dict:
        if len(fields) != TRADE_COLUMNS:
            raise RowError("column_count", f"expected {TRADE_COLUMNS} columns, got {len(fields)}")
        record = self._common(fields)
        price = parse_price(fields[2], "price")
        record["price"] = unscaled_bytes(price)
        record["volume"] = parse_size(fields[3], "volume")
        record["qualifiers"] = fields[4] or None
        record["venue"] = fields[5] or None
        record["buyer_id"] = fields[6] or None
        return record

    def _quote(self, fields: list[str]) -> dict:
        if len(fields) != QUOTE_COLUMNS:
            raise RowError("column_count", f"expected {QUOTE_COLUMNS} columns, got {len(fields)}")
        record = self._common(fields)
        bid = parse_price(fields[2], "bid")
        ask = parse_price(fields[3], "ask")
        record["bid_price"] = unscaled_bytes(bid)
        record["ask_price"] = unscaled_bytes(ask)
        record["bid_size"] = parse_size(fields[4], "bid volume")
        record["ask_size"] = parse_size(fields[5], "ask volume")
        # Pre-open zero and crossed books are real market states: kept, and flagged.
        record["is_one_sided"] = bid == 0 or ask == 0
        record["is_crossed"] = bid > ask > 0
        return record


class AsxFolder:
    """ASX-format CSV folders (trades/, quotes/, reference-data/): `k2 ingest asx`."""

    name = "asx-csv"
    command: tuple[str, ...] = ("ingest", "asx")
    continuous = False
    description = "ASX-format CSV folders (trades/, quotes/, reference-data/)"
    columnar = True

    def discover(self, root: Path, symbols: set[str] | None = None,
                 kinds: tuple[TableKind, ...] = ("trades", "quotes")) -> list[TickFile]:
        return discover(root, symbols, kinds)

    def reference_records(self, root: Path, ingest_us: int, symbols: set[str] | None = None) -> Iterator[dict]:
        return reference_records(root, ingest_us, symbols)

    def reader(self, tick_file: TickFile, ingest_us: int) -> RecordBuilder:
        return RecordBuilder(tick_file, ingest_us)
