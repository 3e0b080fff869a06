"""`k2-query`: K2 market data from the command line.

Every command talks to the REST API (`--url`, key from K2_API_KEY, else the dev key) or, with
`--local`, reads the catalog configured by the K2_* settings through the same query engine.
Times without a UTC offset are read on the exchange's local clock (Australia/Sydney for ASX).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, overload

import typer
from rich.console import Console
from rich.table import Table as RichTable

from k2.exchanges import DEFAULT_EXCHANGE
from k2.query.bars import BarQuery, Fill, Metric
from k2.query.client import ApiSource, ClientError, LocalSource, Row, Source
from k2.query.filters import INTERVALS, Interval, TickKind, exchange_zone, local_midnight
from k2.settings import DEV_API_KEY, Settings, TableKind

app = typer.Typer(help="Query K2 market data through the REST API or straight from the catalog",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
stderr = Console(stderr=True)
ZONE = exchange_zone(DEFAULT_EXCHANGE)

Output = Literal["table", "json", "csv"]
UrlOption = Annotated[str, typer.Option("--url", envvar="K2_API_URL", help="API base URL")]
LocalOption = Annotated[bool, typer.Option("--local", help="read the catalog directly (K2_* settings), no API")]
FormatOption = Annotated[Output, typer.Option("--format", "-f", help="table, json or csv")]
StartOption = Annotated[str | None, typer.Option(help="ISO-8601 time or date; no offset: exchange-local")]
EndOption = Annotated[str | None, typer.Option(help="exclusive; ISO-8601 time or date")]
DEFAULT_URL = "http://127.0.0.1:8000"


@contextmanager
def _source(url: str, local: bool) -> Iterator[Source]:
    source: ApiSource | LocalSource = (LocalSource(Settings()) if local
                                       else ApiSource.connect(url, os.environ.get("K2_API_KEY", DEV_API_KEY)))
    try:
        if isinstance(source, LocalSource):
            source.check_not_empty()
        yield source
    except ClientError as exc:
        stderr.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        source.close()


@overload
def _instant(text: str, option: str) -> dt.datetime: ...
@overload
def _instant(text: str | None, option: str) -> dt.datetime | None: ...
def _instant(text: str | None, option: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO-8601 date or time", param_hint=option) from None
    return value if value.tzinfo else value.replace(tzinfo=ZONE)


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _emit(rows: Sequence[Row], output: Output) -> None:
    if output == "json":
        print(json.dumps(list(rows), indent=2))
        return
    header = list(dict.fromkeys(k for row in rows for k in row))
    if output == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    table = RichTable(*header)
    for row in rows:
        table.add_row(*("" if row.get(k) is None else str(row[k]) for k in header))
    # On a terminal rich fits the table to its width; into a pipe, values must not be cut.
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)


def _ticks(kind: TickKind, symbol: str | None, start: str | None, end: str | None, limit: int, url: str,
           local: bool, output: Output) -> None:
    with _source(url, local) as source:
        rows = source.ticks(kind, symbol=symbol, start=_instant(start, "--start"), end=_instant(end, "--end"),
                            limit=limit)
    _emit(rows, output)


@app.command()
def trades(symbol: Annotated[str | None, typer.Option(help="e.g. BHP")] = None, start: StartOption = None,
           end: EndOption = None, limit: Annotated[int, typer.Option(min=1)] = 10, url: UrlOption = DEFAULT_URL,
           local: LocalOption = False, output: FormatOption = "table") -> None:
    """Trades in time order."""
    _ticks("trades", symbol, start, end, limit, url, local, output)


@app.command()
def quotes(symbol: Annotated[str | None, typer.Option(help="e.g. BHP")] = None, start: StartOption = None,
           end: EndOption = None, limit: Annotated[int, typer.Option(min=1)] = 10, url: UrlOption = DEFAULT_URL,
           local: LocalOption = False, output: FormatOption = "table") -> None:
    """Quotes in time order."""
    _ticks("quotes", symbol, start, end, limit, url, local, output)


@app.command()
def summary(symbol: str, day: Annotated[str, typer.Argument(metavar="DATE", help="exchange-local YYYY-MM-DD")],
            url: UrlOption = DEFAULT_URL, local: LocalOption = False, output: FormatOption = "table") -> None:
    """Open, high, low, close, volume, trade count and VWAP of one trading day."""
    with _source(url, local) as source:
        row = source.summary(symbol, _day(day))
    _emit([row], output)


@app.command()
def symbols(url: UrlOption = DEFAULT_URL, local: LocalOption = False, output: FormatOption = "table") -> None:
    """Every symbol with data."""
    with _source(url, local) as source:
        rows = source.symbols()
    _emit(rows, output)


@app.command()
def snapshots(table: Annotated[TableKind | None, typer.Option(help="trades, quotes or reference")] = None,
              url: UrlOption = DEFAULT_URL, local: LocalOption = False, output: FormatOption = "table") -> None:
    """Table history (time-travel targets), newest first."""
    with _source(url, local) as source:
        rows = source.snapshots(table)
    _emit(rows, output)


@app.command()
def stats(url: UrlOption = DEFAULT_URL, local: LocalOption = False, output: FormatOption = "table") -> None:
    """Rows, files, bytes, partitions and freshness per table."""
    with _source(url, local) as source:
        rows = source.stats()
    _emit(rows, output)


@app.command("bars")
def bars_cmd(symbol: str, start: Annotated[str, typer.Option(help="ISO-8601; no offset: exchange-local")],
             end: Annotated[str, typer.Option(help="exclusive")], interval: Interval = "5m",
             metric: Metric = "ohlcv", fill: Fill = "none", url: UrlOption = DEFAULT_URL,
             local: LocalOption = False, output: FormatOption = "table") -> None:
    """OHLCV / VWAP / TWAP bars aligned to the exchange's local clock."""
    query = BarQuery((symbol,), interval, _instant(start, "--start"), _instant(end, "--end"), metric, fill)
    with _source(url, local) as source:
        rows = source.bars(query)
    _emit(rows, output)


@app.command()
def chart(symbol: str, day: Annotated[str, typer.Argument(metavar="DATE", help="exchange-local YYYY-MM-DD")],
          interval: Interval = "5m",
          out: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write")] = Path("chart.png"),
          url: UrlOption = DEFAULT_URL, local: LocalOption = False) -> None:
    """Candlestick chart with volume of one trading day."""
    from k2.query.chart import candlestick  # matplotlib is slow to import: only for this command

    date = _day(day)
    query = BarQuery((symbol,), interval, local_midnight(date, ZONE), local_midnight(date + dt.timedelta(days=1), ZONE))
    with _source(url, local) as source:
        rows: list[dict[str, Any]] = source.bars(query)
    if not rows:
        stderr.print(f"[red]error:[/] no {symbol} trades on {date.isoformat()}")
        raise typer.Exit(1)
    candlestick(rows, title=f"{symbol} {date.isoformat()} ({interval})", interval=INTERVALS[interval], zone=ZONE,
                path=out)
    stderr.print(f"wrote {out} ({len(rows)} bars)")


@app.command()
def tail(symbols: Annotated[list[str] | None, typer.Argument(help="e.g. BHP RIO (default: all)")] = None,
         kind: Annotated[TickKind, typer.Option(help="trades or quotes")] = "trades",
         since: Annotated[str | None, typer.Option("--from", help="catch up from this ISO-8601 time or date first")]
         = None,
         count: Annotated[int | None, typer.Option(min=1, help="exit after this many ticks")] = None,
         url: UrlOption = DEFAULT_URL, output: Annotated[Literal["line", "json"], typer.Option(
             "--format", "-f", help="line: one readable line per tick; json: the API's objects")] = "line") -> None:
    """Live ticks as they print (WebSocket /v1/stream/…), until Ctrl-C."""
    from urllib.parse import urlencode

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    params = {"symbols": ",".join(symbols)} if symbols else {}
    if since is not None:
        params["from"] = _instant(since, "--from").isoformat()
    query = f"?{urlencode(params)}" if params else ""
    ws_url = url.replace("http", "ws", 1).rstrip("/") + f"/v1/stream/{kind}{query}"
    key = os.environ.get("K2_API_KEY", DEV_API_KEY)
    seen = 0
    try:
        with connect(ws_url, additional_headers={"X-API-Key": key}, open_timeout=15) as ws:
            for frame in ws:
                tick = json.loads(frame)
                print(json.dumps(tick) if output == "json" else _tick_line(kind, tick), flush=True)
                seen += 1
                if count is not None and seen >= count:
                    return
    except ConnectionClosed as exc:
        stderr.print(f"[red]stream closed:[/] {exc.rcvd.reason if exc.rcvd else exc}")
        raise typer.Exit(1) from None
    except (OSError, TimeoutError) as exc:
        stderr.print(f"[red]error:[/] cannot reach {ws_url}: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


def _tick_line(kind: TickKind, tick: dict[str, Any]) -> str:
    when = dt.datetime.fromisoformat(tick["exchange_timestamp"]).astimezone(ZONE).strftime("%Y-%m-%d %H:%M:%S.%f")
    head = f"{when} {tick['symbol']:<8} #{tick['sequence_number']:<7}"
    if kind == "trades":
        return f"{head} {tick['volume']:>9} @ {tick['price']}"
    return f"{head} {tick['bid_size']:>9} {tick['bid_price']} / {tick['ask_price']} {tick['ask_size']}"
