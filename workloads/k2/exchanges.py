"""The exchanges K2 knows: one registry that ingest, stream, query, API and operator all read.

An exchange's facts decide how its ticks are read and queried: its time zone (trading dates and
bars are on the local clock), its trading calendar (which local days trade, the main session),
the shape of its symbols, and the currency its prices are in. A new venue is one entry in
`EXCHANGES`; nothing else needs to learn about it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

# Any symbol of any exchange: tickers (BHP), RICs (AAPL.O), currency pairs (BTC-USD). Each
# exchange narrows it; this is what a client may name before an exchange is known.
SYMBOL_PATTERN = r"^[A-Z0-9][A-Z0-9.\-]{0,15}$"
MAX_SYMBOL_LENGTH = 16


@dataclass(frozen=True)
class TradingCalendar:
    """Which local dates trade and the main session's local hours; auctions may fall outside it."""

    weekdays: frozenset[int] = frozenset(range(5))  # Monday = 0
    session_open: dt.time = dt.time(10, 0)
    session_close: dt.time = dt.time(16, 0)
    holidays: frozenset[dt.date] = frozenset()

    def is_trading_day(self, day: dt.date) -> bool:
        return day.weekday() in self.weekdays and day not in self.holidays

    def trading_days(self, first: dt.date, count: int) -> list[dt.date]:
        """`count` trading days from `first` on (inclusive)."""
        days: list[dt.date] = []
        day = first
        while len(days) < count:
            if self.is_trading_day(day):
                days.append(day)
            day += dt.timedelta(days=1)
        return days


@dataclass(frozen=True)
class Exchange:
    code: str  # as stored in every record's `exchange` column
    name: str
    timezone: ZoneInfo
    currency: str  # ISO 4217 of the prices
    symbol_pattern: str
    calendar: TradingCalendar = field(default_factory=TradingCalendar)

    @property
    def slug(self) -> str:
        """The lower-case form used in topic names (`K2_EXCHANGE`)."""
        return self.code.lower()

    def valid_symbol(self, symbol: str) -> bool:
        return re.fullmatch(self.symbol_pattern, symbol) is not None

    def local_date(self, instant: dt.datetime) -> dt.date:
        return instant.astimezone(self.timezone).date()


_REGISTRY: tuple[Exchange, ...] = (
    Exchange("ASX", "Australian Securities Exchange", ZoneInfo("Australia/Sydney"), "AUD",
             r"^[A-Z0-9][A-Z0-9.]{0,11}$"),
    # Reuters-style instrument codes: the ticker and a venue suffix (AAPL.O: Nasdaq).
    Exchange("NASDAQ", "Nasdaq Stock Market", ZoneInfo("America/New_York"), "USD",
             r"^[A-Z]{1,5}(\.[A-Z]{1,2})?$",
             TradingCalendar(session_open=dt.time(9, 30), session_close=dt.time(16, 0))),
    # Continuous venues: every day trades, dates are UTC dates.
    Exchange("CRYPTO", "Crypto spot (consolidated)", ZoneInfo("UTC"), "USD",
             r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$",
             TradingCalendar(weekdays=frozenset(range(7)), session_open=dt.time(0, 0),
                             session_close=dt.time(23, 59, 59, 999_999))),
)
EXCHANGES: dict[str, Exchange] = {x.code: x for x in _REGISTRY}
DEFAULT_EXCHANGE = "ASX"


class UnknownExchange(KeyError):
    def __str__(self) -> str:
        return f"unknown exchange {self.args[0]!r}; known: {', '.join(sorted(EXCHANGES))}"


def get(code: str) -> Exchange:
    """The exchange of a record's `exchange` code (ASX) or a topic slug (asx)."""
    try:
        return EXCHANGES[code.upper()]
    except KeyError:
        raise UnknownExchange(code) from None
