"""The exchanges K2 knows: one registry that ingest, stream, query, API and operator all read.

An exchange's facts decide how its ticks are read and queried: its time zone (trading dates and
bars are on the local clock), its trading calendar (which local days trade, the main session),
the shape of its symbols, and the currency its prices are in. A new venue is one entry in
`EXCHANGES`; nothing else needs to learn about it.
"""

from __future__ import annotations

import datetime as dt
import functools
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

    @functools.cached_property
    def _symbol_re(self) -> re.Pattern[str]:
        return re.compile(self.symbol_pattern)

    def valid_symbol(self, symbol: str) -> bool:
        return self._symbol_re.fullmatch(symbol) is not None

    def local_date(self, instant: dt.datetime) -> dt.date:
        return instant.astimezone(self.timezone).date()

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - exchanges live as long as the process; a feed checks every tick
    def day_bounds_us(self, epoch_day: int) -> tuple[int, int]:
        """The UTC instants (µs since epoch) from which and until which local day `epoch_day`
        (days since 1970-01-01) lasts: an instant is of that day iff start <= instant < end."""
        day = _EPOCH_DATE + dt.timedelta(days=epoch_day)
        start, end = (dt.datetime.combine(d, dt.time(), self.timezone) for d in (day, day + dt.timedelta(days=1)))
        return _micros(start), _micros(end)

    def misfit(self, code: str, symbol: str, instant_us: int, epoch_day: int) -> Misfit | None:
        """Why a tick that says it is of exchange `code` cannot be stored in this exchange's
        pipeline (its topics, `Settings.exchange`), or None: it is of another exchange, known or
        not, its symbol is not of this exchange's shape, or its date is not the local date of its
        instant. The one check the feed ingest and the stream share."""
        if code != self.code:
            if code not in EXCHANGES:
                return Misfit("unknown_exchange", str(UnknownExchange(code)))
            return Misfit("wrong_exchange", f"{code} tick in the {self.code} pipeline, whose topics hold "
                          f"{self.code} ticks only")
        if not self.valid_symbol(symbol):
            return Misfit("bad_symbol", f"{symbol!r} is not a {self.code} symbol ({self.symbol_pattern})")
        start, end = self.day_bounds_us(epoch_day)
        if not start <= instant_us < end:
            day = _EPOCH_DATE + dt.timedelta(days=epoch_day)
            instant = _EPOCH + dt.timedelta(microseconds=instant_us)
            return Misfit("wrong_exchange_date", f"date {day} is not {self.code}'s local date of "
                          f"{instant.isoformat()} ({self.timezone.key})")
        return None


@dataclass(frozen=True)
class Misfit:
    """A tick that does not fit its exchange; `reason` is the DLQ's short code."""

    reason: str
    detail: str


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = _EPOCH.date()


def _micros(instant: dt.datetime) -> int:
    return (instant - _EPOCH) // dt.timedelta(microseconds=1)


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
SLUGS: tuple[str, ...] = tuple(x.slug for x in _REGISTRY)  # what K2_EXCHANGE and the CRD accept
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
