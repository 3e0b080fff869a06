"""The API contract: request and response shapes.

Prices (and VWAP/TWAP) are exact decimals serialised as JSON strings with the stored scale, e.g.
"36.667000": a JSON number would be parsed through binary floating point by most clients.
Timestamps are ISO-8601 instants in UTC; `exchange_date` is the exchange-local trading date.

Trade and quote records are generated from the Avro schemas (`k2.schemas`), the single source of
truth for record shapes, so the contract cannot drift from what is stored.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

import pyarrow as pa
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, create_model

from k2 import schemas
from k2.exchanges import DEFAULT_EXCHANGE, EXCHANGES, SYMBOL_PATTERN
from k2.query.bars import Fill, Metric
from k2.query.filters import EARLIEST, LATEST, MAX_SYMBOLS, Interval, TickKind
from k2.query.metadata import SnapshotInfo, TableStats
from k2.settings import TableKind


def _in_range(value: dt.datetime) -> dt.datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"must be between {EARLIEST.year} and {LATEST.year}")
    return value


def _day_in_range(value: dt.date) -> dt.date:
    if not EARLIEST.date() <= value < LATEST.date():
        raise ValueError(f"must be between {EARLIEST.year} and {LATEST.year}")
    return value


Symbol = Annotated[str, StringConstraints(pattern=SYMBOL_PATTERN), Field(examples=["BHP"])]
Symbols = Annotated[list[Symbol], Field(min_length=1, max_length=MAX_SYMBOLS)]
Instant = Annotated[AwareDatetime, AfterValidator(_in_range),
                    Field(description="ISO-8601 instant with a UTC offset", examples=["2014-03-10T00:00:00+11:00"])]
Day = Annotated[dt.date, AfterValidator(_day_in_range), Field(description="exchange-local date")]
if TYPE_CHECKING:
    Exchange = str
else:  # the registered exchanges, an enum in the OpenAPI document; built at run time from k2.exchanges
    Exchange = Literal[tuple(EXCHANGES)]
SnapshotId = Annotated[int, Field(ge=0, le=2**63 - 1, description="Iceberg snapshot id")]
Format = Literal["json", "csv", "parquet"]
Mode = Literal["cold_start", "catch_up", "rewind"]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# records ----------------------------------------------------------------------------------------
def _python_type(arrow_type: pa.DataType) -> type:
    if pa.types.is_decimal(arrow_type):
        return Decimal
    if pa.types.is_timestamp(arrow_type):
        return dt.datetime
    if pa.types.is_date(arrow_type):
        return dt.date
    if pa.types.is_boolean(arrow_type):
        return bool
    if pa.types.is_integer(arrow_type):
        return int
    return str


def _record_model(kind: TableKind, name: str) -> type[BaseModel]:
    docs = {f["name"]: f.get("doc") for f in schemas.avro_schema(kind)["fields"]}
    fields: dict[str, Any] = {}
    for column in schemas.arrow_schema(kind):
        py_type = _python_type(column.type)
        if column.nullable:
            fields[column.name] = (py_type | None, Field(None, description=docs[column.name]))
        else:
            fields[column.name] = (py_type, Field(description=docs[column.name]))
    return create_model(name, __doc__=schemas.avro_schema(kind).get("doc"), **fields)


if TYPE_CHECKING:  # the fields come from the Avro schemas, at run time
    class Trade(BaseModel): ...
    class Quote(BaseModel): ...
else:
    Trade = _record_model("trades", "Trade")
    Quote = _record_model("quotes", "Quote")


class QuotedTrade(Trade):
    """A trade with the quote that prevailed when it printed (null when none within tolerance)."""

    quote_timestamp: dt.datetime | None = None
    bid_price: Decimal | None = None
    ask_price: Decimal | None = None
    bid_size: int | None = None
    ask_size: int | None = None


RowT = TypeVar("RowT")


class Page(BaseModel, Generic[RowT]):
    data: list[RowT]
    snapshot_id: int | None = Field(description="the table version every page of this cursor reads")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class TradePage(Page[Trade]):
    pass


class QuotePage(Page[Quote]):
    pass


class QuotedTradePage(Page[QuotedTrade]):
    quotes_snapshot_id: int | None


class LatestQuotes(BaseModel):
    as_of: dt.datetime
    snapshot_id: int | None
    data: list[Quote]


# summaries and bars -----------------------------------------------------------------------------
class Summary(BaseModel):
    """One symbol's exchange-local trading day."""

    symbol: str
    exchange: str
    date: dt.date
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: int
    trade_count: int
    vwap: Decimal


class Bar(BaseModel):
    """One bucket; only the fields of the requested metric are present."""

    symbol: str
    bucket_start: dt.datetime
    bucket_end: dt.datetime
    open: Decimal | None = None
    high: Decimal | None = None
    low: Decimal | None = None
    close: Decimal | None = None
    volume: int | None = None
    trade_count: int | None = None
    vwap: Decimal | None = None
    twap: Decimal | None = None


class AggregationRequest(Request):
    metric: Metric = "ohlcv"
    symbols: Symbols
    interval: Interval
    start: Instant
    end: Instant
    fill: Fill = "none"
    exchange: Exchange = DEFAULT_EXCHANGE


class Bars(BaseModel):
    metric: Metric
    interval: Interval
    fill: Fill
    timezone: str = Field(description="buckets are aligned to this (the exchange's) local clock")
    data: list[Bar]


# tick queries, exports and replay -----------------------------------------------------------------
class TickSelection(Request):
    symbols: Symbols
    exchange: Exchange | None = None
    start: Instant | None = None
    end: Instant | None = None
    fields: list[str] | None = Field(None, min_length=1, description="columns to return (default: all)")
    format: Format = "json"
    limit: int | None = Field(None, ge=1, description="default: every matching row, streamed")


class TickQuery(TickSelection):
    as_of: Instant | None = Field(None, description="read the table as it was at this time")


class SnapshotQuery(TickSelection):
    table: TickKind


class ReplayRequest(Request):
    """cold_start: the latest snapshot; catch_up: rows appended after `since_snapshot_id`;
    rewind: the table at `snapshot_id` or at time `as_of`. The first page pins the snapshot."""

    table: TickKind = "trades"
    mode: Mode = "cold_start"
    symbols: Annotated[list[Symbol], Field(max_length=MAX_SYMBOLS, description="default: all")] = []
    exchange: Exchange | None = None
    start: Instant | None = None
    end: Instant | None = None
    snapshot_id: SnapshotId | None = None
    as_of: Instant | None = None
    since_snapshot_id: SnapshotId | None = None
    fields: list[str] | None = Field(None, min_length=1)
    limit: int = Field(1000, ge=1)
    cursor: str | None = None


class ReplayPage(BaseModel):
    table: TickKind
    mode: Mode
    snapshot_id: int | None
    since_snapshot_id: int | None
    data: list[dict[str, Any]]
    next_cursor: str | None


# catalog ------------------------------------------------------------------------------------------
class SymbolInfo(BaseModel):
    symbol: str
    exchange: str
    company_name: str | None
    trades: int
    quotes: int
    first_date: dt.date | None
    last_date: dt.date | None


class SymbolList(BaseModel):
    data: list[SymbolInfo]


class Stats(BaseModel):
    data: list[TableStats]


LOCAL_TIME = r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?$"


class ExchangeInfo(BaseModel):
    """One exchange of K2's registry (`k2.exchanges`): how its ticks are dated, quoted and named."""

    code: str = Field(description="As in every record's `exchange` column and the `exchange` parameters")
    name: str
    timezone: str = Field(description="IANA zone of `exchange_date` and of bars' local days")
    currency: str = Field(description="ISO 4217 code of the prices")
    # Wall-clock times of the exchange's zone, not RFC 3339 times (which carry an offset, and an
    # offset is not fixed across DST): plain HH:MM:SS[.ffffff] strings.
    session_open: str = Field(pattern=LOCAL_TIME, description="Main session's local open (HH:MM:SS in `timezone`); "
                              "auctions may trade outside it")
    session_close: str = Field(pattern=LOCAL_TIME, description="Main session's local close (HH:MM:SS[.ffffff] in "
                               "`timezone`)")
    trading_weekdays: list[int] = Field(description="Local weekdays that trade (Monday = 0)")
    symbol_pattern: str = Field(description="Regular expression every symbol of the exchange matches")


class ExchangeList(BaseModel):
    data: list[ExchangeInfo]


class SnapshotList(BaseModel):
    data: list[SnapshotInfo]


# system and errors --------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None


class ErrorDetail(BaseModel):
    field: str | None = Field(description="the offending field, e.g. `limit` or `symbols.0`")
    location: str | None = Field(description="query, path, body or header; null when it spans inputs")
    message: str
    type: str | None = None


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    correlation_id: str | None
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    """Every error, of every route, has this shape."""

    error: ErrorBody
