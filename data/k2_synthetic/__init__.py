"""A deterministic generator of realistic ASX-format ticks, so the demo runs anywhere.

Same layout and traps as the real sample (`trades/ID.csv`, `quotes/ID.csv`,
`reference-data/company_info.csv`, CRLF, no header, MM/DD/YYYY, local Sydney time): pre-open
quotes with a zero ask and crossed books, auction trades outside 10:00-16:00, bursts of fills
with identical timestamp, price and volume. Prices follow a random walk on the ASX tick grid,
spreads are one to a few ticks, sizes are log-normal round lots. Same seed, same bytes.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

__all__ = ["LISTINGS", "Listing", "generate"]


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


def _weekdays(start: dt.date, days: int) -> list[dt.date]:
    out: list[dt.date] = []
    day = start
    while len(out) < days:
        if day.weekday() < 5:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


def _clock(date: dt.date, seconds: float) -> tuple[str, str]:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000) % 1000
    return date.strftime("%m/%d/%Y"), f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}.{millis:03d}"


def _session(rng: random.Random, listing: Listing, date: dt.date, price: float,
             quotes: list[str], trades: list[str]) -> float:
    """One trading day; returns the closing price."""
    # Pre-open (07:00-10:00): indicative books, some one-sided (zero ask), some crossed.
    t = 7 * 3600 + rng.uniform(0, 600)
    while t < 10 * 3600:
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
    t = 10 * 3600 + rng.uniform(0, 90)
    open_px, open_size = _on_grid(price), _lot(rng, price)
    for _ in range(rng.randint(2, 6)):
        trades.append(",".join([*_clock(date, t), _fmt_price(open_px), str(open_size), "0", "", ""]))
    # Continuous trading (10:00-16:00): random walk, quotes and trades interleaved.
    mean_gap = 6.0 / max(listing.activity, 0.005)
    sigma = 0.0004
    while t < 16 * 3600:
        t += rng.expovariate(1 / mean_gap)
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
    # Closing auction trades after 16:00.
    t = 16 * 3600 + 600 + rng.uniform(0, 60)
    close_px = _on_grid(price)
    for _ in range(rng.randint(1, 4)):
        trades.append(",".join([*_clock(date, t), _fmt_price(close_px), str(_lot(rng, price)), "0", "", ""]))
    return float(close_px)


def generate(out: Path, *, symbols: int = 4, days: int = 2, seed: int = 42,
             start: dt.date = dt.date(2014, 3, 10)) -> Path:
    """Write an ASX-format folder under `out`; returns `out`. Deterministic in all arguments."""
    if not 1 <= symbols <= len(LISTINGS):
        raise ValueError(f"symbols must be between 1 and {len(LISTINGS)}")
    if days < 1:
        raise ValueError("days must be at least 1")
    for folder in ("trades", "quotes", "reference-data"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    chosen = LISTINGS[:symbols]
    dates = _weekdays(start, days)
    for listing in chosen:
        rng = random.Random(f"{seed}:{listing.symbol}")
        quotes: list[str] = []
        trades: list[str] = []
        price = listing.price
        for date in dates:
            price = _session(rng, listing, date, price, quotes, trades)
        for folder, rows in (("trades", trades), ("quotes", quotes)):
            (out / folder / f"{listing.company_id}.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    first, last = dates[0] - dt.timedelta(days=3650), dates[-1] + dt.timedelta(days=30)
    info = ["company_id,symbol,company_name,ISIN,start_date,end_date"] + [
        f"{x.company_id},{x.symbol},{x.name},AU000000{x.symbol}0,{first:%m/%d/%Y},{last:%m/%d/%Y}" for x in chosen]
    (out / "reference-data" / "company_info.csv").write_text("\n".join(info) + "\n")
    return out
