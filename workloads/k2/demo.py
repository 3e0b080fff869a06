"""`k2 demo` / `make demo`: the whole pipeline on embedded defaults, then a short tour.

Kafka and the schema registry are real (started from the local stack); Iceberg lives in a SQLite
catalog and a local warehouse under `.k2/demo`. Synthetic ticks arrive in two rounds: two days,
then the same files again with a third day, so the tour can show that re-ingesting changes
nothing and that the earlier snapshot still reads the table as it was. It ends live: the market
simulator replays a new day through `k2 ingest feed` while `k2-query tail` prints its trades over
the API's WebSocket. Running the demo again is
safe for the same reason: the same ticks get the same sequence numbers and de-duplication
leaves the tables as they were.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table as RichTable

from k2.settings import DEV_API_KEY, Settings

console = Console()


def _step(text: str) -> None:
    console.rule(f"[bold cyan]{text}")


def _show(title: str, rows: list[dict], columns: list[str] | None = None, limit: int = 8) -> None:
    if not rows:
        console.print(f"{title}: (no rows)")
        return
    columns = columns or list(rows[0])
    table = RichTable(*columns, title=title)
    for row in rows[:limit]:
        table.add_row(*["—" if row.get(c) is None else str(row[c]) for c in columns])
    console.print(table)


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def run_demo(*, asx: Path | None, port: int, keep_running: bool) -> None:
    from k2 import stack
    from k2_synthetic import generate

    started = time.monotonic()
    home = Path(".k2/demo").absolute()
    home.mkdir(parents=True, exist_ok=True)

    _step("1/6 local stack (embedded: Kafka KRaft + schema registry; Iceberg on SQLite + local files)")
    for service in stack.services(embedded=True):
        service.start()
        console.print(f"  {service.name}: ready on 127.0.0.1:{service.port}")
    env = {**stack.settings_env(embedded=True), "K2_CATALOG_URI": f"sqlite:///{home}/catalog.db",
           "K2_WAREHOUSE": str(home / "warehouse"), "K2_DLQ_PATH": str(home / "dlq.jsonl"), "K2_MODE": "dev",
           "K2_BATCH_SECONDS": "1"}
    os.environ.update(env)
    settings = Settings()

    _step("2/6 ingest: CSV → Kafka (Avro, Confluent wire format, idempotent producer)")
    generated = asx is None
    if asx is None:
        asx = generate(home / "ticks", symbols=4, days=2, seed=2014)
        console.print(f"  generated two days of deterministic synthetic ticks in {asx}")
    _ingest(asx, settings)
    _step("3/6 stream: Kafka → Iceberg (exactly-once, de-duplicated), until caught up")
    _stream(settings)
    if generated:
        _step("4/6 a day later: the same files again, now with a third day")
        generate(home / "ticks", symbols=4, days=3, seed=2014)
        _ingest(asx, settings)
        console.print("  the first two days are duplicates by (symbol, exchange date, sequence number): "
                      "only the new day lands, as a new snapshot")
        _stream(settings)

    _step("5/6 query API")
    api = subprocess.Popen([str(Path(sys.executable).with_name("k2")), "api", "--port", str(port)],
                           env={**os.environ, "K2_LOG_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health")
        client = httpx.Client(base_url=base, headers={"X-API-Key": DEV_API_KEY}, timeout=30)
        symbol, day = _tour(client, home)
        _step("6/6 live: market simulator → k2 ingest feed → Kafka → k2 stream, and k2-query tail over WebSocket")
        _live(base, home)
        more = (f"(also: trades --symbol {symbol} --limit 10, bars {symbol} --interval 5m, summary {symbol} {day}, "
                "snapshots, stats)")
        if keep_running:
            console.print(Panel.fit(
                f"Explore: {base}/docs (key header X-API-Key: {DEV_API_KEY})\n"
                f"CLI:     k2-query symbols --url {base}   {more}\n"
                f"Live:    k2 feed serve --speed 60 & k2 ingest feed ws://127.0.0.1:8765, then "
                f"k2-query tail {symbol} --url {base}\n"
                f"Stack:   Kafka and the registry keep running (`make dev-down` stops them).\n"
                f"Done in {time.monotonic() - started:.0f}s. The API serves until you press Ctrl-C.",
                title="K2 demo"))
            with contextlib.suppress(KeyboardInterrupt):
                api.wait()
    finally:
        api.terminate()
        api.wait(timeout=20)
    if not keep_running:
        console.print(Panel.fit(f"Done in {time.monotonic() - started:.0f}s. The demo's API has stopped; its "
                                f"tables stay in {home}.", title="K2 demo"))
        # Plain lines, so they copy and paste whole: the demo's catalog is not the default one.
        print("Query them again (Kafka and the registry keep running; `make dev-down` stops them):")
        print(f"  export K2_CATALOG_URI=sqlite:///{home}/catalog.db K2_WAREHOUSE={home / 'warehouse'}")
        print(f"  k2-query symbols --local   {more}")
        print(f"  k2 api --port {port}   # then {base}/docs, or k2-query … --url {base}")


def _live(base: str, home: Path, ticks: int = 12) -> None:
    """A new trading day replayed at 3000× (about ten seconds): a tail subscribed first prints the
    first trades as they print; the stream then commits the day."""
    from k2_synthetic import generate

    folder = generate(home / "live", symbols=2, days=1, seed=2015, start=dt.date(2014, 3, 13))
    k2 = str(Path(sys.executable).with_name("k2"))
    env = {**os.environ, "K2_LOG_LEVEL": "WARNING", "K2_API_KEY": DEV_API_KEY}
    tail = subprocess.Popen([str(Path(sys.executable).with_name("k2-query")), "tail", "BHP", "--count", str(ticks),
                             "--url", base], env=env)
    time.sleep(1.0)  # subscribed before the market opens
    feed = subprocess.Popen([k2, "feed", "serve", str(folder), "--port", "0", "--speed", "3000", "--max-idle", "0.2"],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert feed.stdout is not None  # stdout=PIPE
    url = feed.stdout.readline().split(": ", 1)[-1].strip()
    ingest = subprocess.Popen([k2, "ingest", "feed", url, "--until-end"], env=env, stdout=subprocess.DEVNULL)
    procs: list[subprocess.Popen[Any]] = [tail, ingest, feed]
    try:
        tail.wait(timeout=120)
        # Started now, the stream is never idle before the day ends; then it commits the rest and exits.
        procs.append(subprocess.Popen([k2, "stream", "run", "--until-idle", "2"], env=env))
        ingest.wait(timeout=120)
        procs[-1].wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    console.print(f"  {ticks} live BHP trades above; the whole simulated day of 2014-03-13 is now stored")


def _ingest(root: Path, settings: Settings) -> None:
    from k2.ingest.pipeline import ingest_files

    summary = ingest_files(root, settings, show_progress=True)
    console.print(f"  read {summary.rows_read:,} rows → produced {summary.produced_total:,}, "
                  f"rejected {summary.rejected_total:,} ({summary.messages_per_second:,.0f} msg/s)")


def _stream(settings: Settings) -> None:
    from k2.stream.runner import run as stream_run

    result = stream_run(settings, until_idle=2.0)
    for table, rows in result.rows_written.items():
        console.print(f"  {table}: {rows:,} new rows committed")


def _tour(client: httpx.Client, home: Path) -> tuple[str, str]:
    """The guided queries; returns the symbol and exchange-local date it looked at."""
    symbols = client.get("/v1/symbols").raise_for_status().json()["data"]
    _show("symbols", symbols)
    first = symbols[0]
    symbol = first["symbol"]
    day = str(first.get("last_date") or first.get("first_date"))
    summary = client.get(f"/v1/summary/{symbol}/{day}").raise_for_status().json()
    _show(f"daily summary {symbol} {day}", [summary.get("data", summary)],
          ["open", "high", "low", "close", "volume", "trade_count", "vwap"])
    start, end = f"{day}T10:00:00+11:00", f"{day}T16:30:00+11:00"
    bars = client.post("/v1/aggregations", json={"metric": "ohlcv", "symbols": [symbol], "interval": "5m",
                                                 "start": start, "end": end, "fill": "none"}).raise_for_status()
    _show(f"5-minute bars {symbol}", bars.json()["data"],
          ["bucket_start", "open", "high", "low", "close", "volume", "vwap"], limit=6)
    vwap = client.post("/v1/aggregations", json={"metric": "vwap", "symbols": [s["symbol"] for s in symbols],
                                                 "interval": "1d", "start": start, "end": end, "fill": "none"})
    _show(f"VWAP per symbol on {day}", vwap.raise_for_status().json()["data"], ["symbol", "vwap", "volume"])
    _time_travel(client, symbol, day)
    chart = home / f"{symbol.lower()}-{day}.png"
    k2_query = str(Path(sys.executable).with_name("k2-query"))
    subprocess.run([k2_query, "chart", symbol, day, "--interval", "5m", "-o", str(chart), "--url",
                    str(client.base_url)], check=True, env={**os.environ, "K2_API_KEY": DEV_API_KEY})
    console.print(f"candlestick chart written to {chart}")
    return symbol, day


def _time_travel(client: httpx.Client, symbol: str, day: str) -> None:
    """The table's history, and `day` as the oldest snapshot saw it and as it is now."""
    snapshots = client.get("/v1/snapshots", params={"table": "trades"}).raise_for_status().json()["data"]
    _show("trades table history (newest first)", snapshots,
          ["snapshot_id", "committed_at", "operation", "added_rows", "total_rows"], limit=6)
    oldest = snapshots[-1]
    body = {"table": "trades", "symbols": [symbol], "start": f"{day}T00:00:00+11:00", "limit": 3}
    then = client.post(f"/v1/snapshots/{oldest['snapshot_id']}/query", json=body).raise_for_status().json()
    now = client.post("/v1/trades/query", json={k: v for k, v in body.items() if k != "table"})
    console.print(f"time travel: {symbol} trades from {day} on, as of the oldest snapshot "
                  f"{oldest['snapshot_id']} ({oldest['committed_at']}):")
    _show("as of the oldest snapshot", then["data"], ["exchange_timestamp", "price", "volume", "sequence_number"])
    _show("as of now", now.raise_for_status().json()["data"],
          ["exchange_timestamp", "price", "volume", "sequence_number"])
