"""Candlestick charts with volume, drawn headless (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib.dates as mdates
from matplotlib.figure import Figure

UP, DOWN = "#26a69a", "#ef5350"


def candlestick(bars: Sequence[dict[str, Any]], *, title: str, interval: dt.timedelta, zone: ZoneInfo,
                path: Path) -> Path:
    """Draw OHLCV bars (the API's JSON rows) to a PNG, times on the exchange's local clock."""
    if not bars:
        raise ValueError("no bars to draw")
    # Candles sit in the middle of their buckets.
    x = mdates.date2num([dt.datetime.fromisoformat(b["bucket_start"]) + interval / 2 for b in bars])
    # Prices are exact strings in the API; floats are fine for drawing them.
    opens, highs, lows, closes = ([float(b[k]) for b in bars] for k in ("open", "high", "low", "close"))
    volumes = [b["volume"] for b in bars]
    colours = [UP if c >= o else DOWN for o, c in zip(opens, closes, strict=True)]
    width = interval / dt.timedelta(days=1) * 0.7  # date2num units are days

    figure = Figure(figsize=(12, 7), layout="constrained")
    price_ax, volume_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    price_ax.vlines(x, lows, highs, colors=colours, linewidth=0.8)
    # An unchanged bar still gets a visible body: a sliver of the chart's price span.
    sliver = ((max(highs) - min(lows)) or max(highs) or 1.0) * 0.002
    bodies = [max(abs(c - o), sliver) for o, c in zip(opens, closes, strict=True)]
    price_ax.bar(x, bodies, bottom=[min(o, c) for o, c in zip(opens, closes, strict=True)], width=width,
                 color=colours)
    price_ax.set_title(title)
    price_ax.set_ylabel("price")
    price_ax.grid(alpha=0.3)
    volume_ax.bar(x, volumes, width=width, color=colours)
    volume_ax.set_ylabel("volume")
    volume_ax.grid(alpha=0.3)
    volume_ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=zone))  # ticks on round local times
    volume_ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=zone))
    volume_ax.set_xlabel(f"local time ({zone.key})")
    figure.savefig(path, dpi=110)
    return path
