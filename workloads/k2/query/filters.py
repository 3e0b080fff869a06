"""The vocabulary of queries: which exchanges, symbols, fields and intervals exist, and the filter
every tick query starts from.

Whatever a client names that could reach SQL is checked here against a whitelist. Values are then
always bound as parameters; identifiers only ever come from the table schemas.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal
from zoneinfo import ZoneInfo

from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    EqualTo,
    GreaterThanOrEqual,
    In,
    LessThan,
    LessThanOrEqual,
)

from k2 import exchanges, schemas
from k2.query import scope as scopes
from k2.query.errors import InvalidQuery
from k2.settings import TableKind

MAX_SYMBOLS = 100

Interval = Literal["1m", "5m", "15m", "1h", "1d"]
INTERVALS: dict[str, dt.timedelta] = {
    "1m": dt.timedelta(minutes=1), "5m": dt.timedelta(minutes=5), "15m": dt.timedelta(minutes=15),
    "1h": dt.timedelta(hours=1), "1d": dt.timedelta(days=1),
}

TickKind = Literal["trades", "quotes"]
TICK_KINDS: tuple[TickKind, ...] = ("trades", "quotes")

# Instants outside this range are refused up front: they cannot be market data, and near the
# ends of the datetime range bucket arithmetic would overflow.
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


@cache
def columns(kind: TableKind) -> tuple[str, ...]:
    """The queryable columns of a table, in schema order."""
    return tuple(schemas.arrow_schema(kind).names)


def select_fields(kind: TableKind, fields: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a client's field selection (None or empty: every column), keeping its order."""
    if not fields:
        return columns(kind)
    unknown = sorted(set(fields) - set(columns(kind)))
    if unknown:
        raise InvalidQuery("fields", f"unknown {kind} fields {unknown}; choose from {', '.join(columns(kind))}")
    return tuple(dict.fromkeys(fields))


def exchange_zone(exchange: str) -> ZoneInfo:
    """Bars are aligned to the exchange's local clock, so an exchange is only queryable with its zone."""
    if exchange not in exchanges.EXCHANGES:  # codes are exact here: they are compared to stored values
        raise InvalidQuery("exchange", str(exchanges.UnknownExchange(exchange)))
    return exchanges.EXCHANGES[exchange].timezone


def local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=zone)


@dataclass(frozen=True)
class TickFilter:
    """Which ticks a query reads: symbols (empty: all), one exchange or all, [start, end).

    Frozen and hashable: it is part of the key under which planned files are cached.
    """

    symbols: tuple[str, ...] = ()
    exchange: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    # What the caller may read (`k2.query.scope`): taken from the request, so no caller forgets it.
    scope: scopes.Scope | None = field(default_factory=scopes.current)

    def __post_init__(self) -> None:
        if self.exchange is not None:
            exchange_zone(self.exchange)
        if self.scope is not None:
            self.scope.check(symbols=self.symbols, exchange=self.exchange)
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise InvalidQuery("end", "end must be after start")
        # One canonical form per set of symbols, so equal filters share a cache entry.
        object.__setattr__(self, "symbols", tuple(sorted(set(self.symbols))))

    def _zones(self) -> list[ZoneInfo]:
        if self.exchange:
            return [exchange_zone(self.exchange)]
        return [x.timezone for x in exchanges.EXCHANGES.values()]

    def exchange_dates(self) -> tuple[dt.date | None, dt.date | None]:
        """Bounds on `exchange_date` implied by [start, end): the partition pruning key.

        The local date is monotonic in time, so rows at or after `start` have a date no earlier
        than start's local date, and rows before `end` none later than end's.
        """
        zones = self._zones()
        first = min(self.start.astimezone(z).date() for z in zones) if self.start else None
        last = max(self.end.astimezone(z).date() for z in zones) if self.end else None
        return first, last

    def iceberg_filter(self, *, timestamped: bool = True) -> BooleanExpression:
        """The pyiceberg row filter: prunes partitions (dates) and files (column bounds)."""
        terms: list[BooleanExpression] = []
        if self.symbols:
            terms.append(In("symbol", self.symbols) if len(self.symbols) > 1 else EqualTo("symbol", self.symbols[0]))
        if self.exchange:
            terms.append(EqualTo("exchange", self.exchange))
        if self.scope is not None:
            terms.extend(self.scope.iceberg_terms())
        if timestamped:
            if self.start:
                terms.append(GreaterThanOrEqual("exchange_timestamp", micros(self.start)))
            if self.end:
                terms.append(LessThan("exchange_timestamp", micros(self.end)))
            first, last = self.exchange_dates()
            if first:
                terms.append(GreaterThanOrEqual("exchange_date", first.isoformat()))
            if last:
                terms.append(LessThanOrEqual("exchange_date", last.isoformat()))
        if not terms:
            return AlwaysTrue()
        return terms[0] if len(terms) == 1 else And(*terms)


def micros(instant: dt.datetime) -> int:
    """Microseconds since the Unix epoch (Iceberg's and Parquet's timestamp unit), exactly."""
    return (instant - EARLIEST) // dt.timedelta(microseconds=1)
