"""A deterministic generator of realistic ASX-format ticks, so the demo runs anywhere.

Same layout and traps as the real sample (`trades/ID.csv`, `quotes/ID.csv`,
`reference-data/company_info.csv`, CRLF, no header, MM/DD/YYYY, local Sydney time): pre-open
quotes with a zero ask and crossed books, auction trades outside the main session, bursts of fills
with identical timestamp, price and volume. Trading days and the session (10:00-16:00) are those of
ASX in the exchange registry (`k2.exchanges`). Prices follow a random walk on the ASX tick grid,
spreads are one to a few ticks, sizes are log-normal round lots. Same seed, same bytes.

Beyond the 12 fixed LISTINGS, `symbols` may ask for more: further listings are derived from their
index alone (3-letter codes, ids from 20000, log-uniform prices, log-normal activity), so the
first N listings are the same whatever else is asked. `intraday="u"` gives continuous trading the
U shape of real sessions (busiest after the open and before the close, quietest at lunch);
the default "flat" keeps the bytes earlier versions wrote. `plan_scale(rows)` picks symbols × days
for about that many rows, for the scale benchmark.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from k2 import exchanges

__all__ = ["LISTINGS", "MAX_SYMBOLS", "Listing", "expected_rows", "generate", "listings", "plan_scale"]

Intraday = Literal["flat", "u"]


@dataclass(frozen=True)
class Listing:
    company_id: int
    symbol: str
    name: str
    price: float  # opening reference price, AUD
    activity: float  # relative trade intensity


LISTINGS = (
    Listing(7078, "BHP", "BHP BILLITON LTD", 36.70, 1.0),
    Listing(7458, "RIO", "RIO TINTO LTD", 62.40, 0.9),
    Listing(1001, "CBA", "COMMONWEALTH BANK OF AUSTRALIA", 75.10, 0.8),
    Listing(1002, "WBC", "WESTPAC BANKING CORP", 33.20, 0.7),
    Listing(1003, "ANZ", "AUSTRALIA AND NEW ZEALAND BANKING GROUP", 31.90, 0.7),
    Listing(1004, "NAB", "NATIONAL AUSTRALIA BANK LTD", 35.40, 0.6),
    Listing(1005, "CSL", "CSL LTD", 70.80, 0.4),
    Listing(1006, "TLS", "TELSTRA CORPORATION LTD", 5.02, 0.9),
    Listing(1007, "WOW", "WOOLWORTHS LTD", 36.10, 0.4),
    Listing(1008, "FMG", "FORTESCUE METALS GROUP LTD", 5.35, 0.8),
    Listing(7181, "DVN", "DEVINE LTD", 0.665, 0.05),
    Listing(3153, "MWR", "MGM WIRELESS LTD", 0.120, 0.01),
)
_CODES = [code for code in ("".join(c) for c in itertools.product(string.ascii_uppercase, repeat=3))
          if code not in {x.symbol for x in LISTINGS}]
MAX_SYMBOLS = len(LISTINGS) + len(_CODES)
ASX = exchanges.get("ASX")  # the venue whose format, calendar and session the ticks follow


def _seconds(time: dt.time) -> int:
    return time.hour * 3600 + time.minute * 60 + time.second


# continuous trading, local seconds since midnight: the registry's main session
SESSION = (_seconds(ASX.calendar.session_open), _seconds(ASX.calendar.session_close))


def _derived_listing(index: int) -> Listing:
    """Listing number `index` (from len(LISTINGS)): a function of the index only, never of the seed."""
    rng = random.Random(f"listing:{index}")
    code = _CODES[index - len(LISTINGS)]
    price = round(math.exp(rng.uniform(math.log(0.05), math.log(100.0))), 3)
    activity = round(min(1.0, max(0.01, math.exp(rng.gauss(-1.2, 0.8)))), 3)
    return Listing(20000 + index, code, f"{code} SYNTHETIC LTD", price, activity)


def listings(symbols: int) -> tuple[Listing, ...]:
    """The first `symbols` listings: the fixed ones, then derived ones."""
    if not 1 <= symbols <= MAX_SYMBOLS:
        raise ValueError(f"symbols must be between 1 and {MAX_SYMBOLS}")
    return LISTINGS[:symbols] + tuple(_derived_listing(i) for i in range(len(LISTINGS), symbols))


def _flat(_seconds: float) -> float:
    return 1.0


def _u_shape(seconds: float) -> float:
    """Relative trading intensity: about 2.1 at the open and close, 0.4 at midday, mean 1."""
    x = (2 * seconds - SESSION[0] - SESSION[1]) / (SESSION[1] - SESSION[0])
    return (0.4 + 1.6 * min(x * x, 1.0)) / (0.4 + 1.6 / 3)


_SHAPES: dict[str, Callable[[float], float]] = {"flat": _flat, "u": _u_shape}


def tick_size(price: float) -> Decimal:
    """ASX equity price steps."""
    if price < 0.10:
        return Decimal("0.001")
    if price < 2.00:
        return Decimal("0.005")
    return Decimal("0.01")


def _on_grid(price: float) -> Decimal:
    step = tick_size(price)
    return (Decimal(str(price)) / step).quantize(Decimal(1)) * step


def _fmt_price(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def _lot(rng: random.Random, price: float) -> int:
    lot = 100 if price > 1 else 1000
    return max(1, round(math.exp(rng.gauss(1.5, 1.1)))) * lot


def _clock(date: dt.date, seconds: float) -> tuple[str, str]:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000) % 1000
    return date.strftime("%m/%d/%Y"), f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}.{millis:03d}"


def _session(rng: random.Random, listing: Listing, date: dt.date, price: float,
             quotes: list[str], trades: list[str], shape: Callable[[float], float] = _flat) -> float:
    """One trading day; returns the closing price."""
    # Pre-open (07:00 to the open): indicative books, some one-sided (zero ask), some crossed.
    t = 7 * 3600 + rng.uniform(0, 600)
    while t < SESSION[0]:
        mid = _on_grid(price)
        step = tick_size(price)
        bid, ask = mid - step, mid + step
        roll = rng.random()
        if roll < 0.15:
            ask = Decimal(0)
        elif roll < 0.35:
            bid, ask = mid + step, mid - step  # crossed before the open
        quotes.append(",".join([*_clock(date, t), _fmt_price(bid), _fmt_price(ask),
                                str(_lot(rng, price)), str(_lot(rng, price) if ask else 0)]))
        t += rng.expovariate(1 / 240)
    # Opening auction: a burst of identical fills at one timestamp and price.
    t = SESSION[0] + rng.uniform(0, 90)
    open_px, open_size = _on_grid(price), _lot(rng, price)
    for _ in range(rng.randint(2, 6)):
        trades.append(",".join([*_clock(date, t), _fmt_price(open_px), str(open_size), "0", "", ""]))
    # Continuous trading (the session): random walk, quotes and trades interleaved.
    mean_gap = 6.0 / max(listing.activity, 0.005)
    sigma = 0.0004
    while t < SESSION[1]:
        t += rng.expovariate(1 / mean_gap) / shape(t)  # flat: / 1.0, the exact bytes of before
        price = max(float(tick_size(price)), price * math.exp(rng.gauss(0, sigma)))
        mid = _on_grid(price)
        step = tick_size(price)
        spread = step * rng.choice((1, 1, 1, 2, 2, 3))
        bid, ask = mid, mid + spread
        quotes.append(",".join([*_clock(date, t), _fmt_price(bid), _fmt_price(ask),
                                str(_lot(rng, price)), str(_lot(rng, price))]))
        if rng.random() < 0.8:
            fill_px = ask if rng.random() < 0.5 else bid
            size = _lot(rng, price)
            qualifier = rng.choices(("0", "25", "2", "27", "5"), (80, 8, 6, 4, 2))[0]
            venue = "X" if rng.random() < 0.002 else ""
            for _ in range(1 if rng.random() < 0.9 else rng.randint(2, 4)):  # split fills
                trades.append(",".join([*_clock(date, t), _fmt_price(fill_px), str(size), qualifier, venue, ""]))
    # Closing auction trades after the close.
    t = SESSION[1] + 600 + rng.uniform(0, 60)
    close_px = _on_grid(price)
    for _ in range(rng.randint(1, 4)):
        trades.append(",".join([*_clock(date, t), _fmt_price(close_px), str(_lot(rng, price)), "0", "", ""]))
    return float(close_px)


def expected_rows(symbols: int, days: int) -> float:
    """About how many rows `generate` writes: pre-open quotes and auctions (~50 a day), then per
    continuous event a quote and, 80% of the time, 1.2 fills on average."""
    per_day = sum(50 + (SESSION[1] - SESSION[0]) / (6.0 / max(x.activity, 0.005)) * (1 + 0.8 * 1.2)
                  for x in listings(symbols))
    return per_day * days


def plan_scale(rows: float, *, base_days: int = 5, base_rows: float = 370_000) -> tuple[int, int]:
    """(symbols, days) for about `rows` rows: a week at the ASX sample's size, and both the
    trading days and the symbols growing as the square root of the scale."""
    days = max(1, round(base_days * math.sqrt(rows / base_rows)))
    low, high = 1, MAX_SYMBOLS
    while low < high:  # the fewest symbols that reach `rows`; expected_rows grows with symbols
        mid = (low + high) // 2
        low, high = (mid + 1, high) if expected_rows(mid, days) < rows else (low, mid)
    if low > 1 and rows - expected_rows(low - 1, days) < expected_rows(low, days) - rows:
        low -= 1  # one symbol fewer comes closer
    return low, days


def generate(out: Path, *, symbols: int = 4, days: int = 2, seed: int = 42,
             start: dt.date = dt.date(2014, 3, 10), intraday: Intraday = "flat") -> Path:
    """Write an ASX-format folder under `out`; returns `out`. Deterministic in all arguments."""
    chosen = listings(symbols)
    if days < 1:
        raise ValueError("days must be at least 1")
    if intraday not in _SHAPES:
        raise ValueError(f"intraday must be one of {', '.join(_SHAPES)}")
    for folder in ("trades", "quotes", "reference-data"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    dates = ASX.calendar.trading_days(start, days)
    for listing in chosen:
        rng = random.Random(f"{seed}:{listing.symbol}")
        quotes: list[str] = []
        trades: list[str] = []
        price = listing.price
        for date in dates:
            price = _session(rng, listing, date, price, quotes, trades, _SHAPES[intraday])
        for folder, rows in (("trades", trades), ("quotes", quotes)):
            (out / folder / f"{listing.company_id}.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    first, last = dates[0] - dt.timedelta(days=3650), dates[-1] + dt.timedelta(days=30)
    info = ["company_id,symbol,company_name,ISIN,start_date,end_date"] + [
        f"{x.company_id},{x.symbol},{x.name},AU000000{x.symbol}0,{first:%m/%d/%Y},{last:%m/%d/%Y}" for x in chosen]
    (out / "reference-data" / "company_info.csv").write_text("\n".join(info) + "\n")
    return out
