"""`k2 demo` / `make demo`: the whole pipeline on embedded defaults, then a short tour.

Kafka and the schema registry are real (started from the local stack); Iceberg lives in a SQLite
catalog and a local warehouse under `.k2/demo`. Running it again is safe: the same ticks get the
same sequence numbers and de-duplication leaves the tables as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
        table.add_row(*[str(row.get(c, "")) for c in columns])
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
    from k2.ingest.pipeline import ingest_files
    from k2.stream.runner import run as stream_run
    from k2_synthetic import generate

    started = time.monotonic()
    home = Path(".k2/demo").absolute()
    home.mkdir(parents=True, exist_ok=True)

    _step("1/5 local stack (embedded: Kafka KRaft + schema registry; Iceberg on SQLite + local files)")
    for service in stack.services(embedded=True):
        service.start()
        console.print(f"  {service.name}: ready on 127.0.0.1:{service.port}")
    env = {**stack.settings_env(embedded=True), "K2_CATALOG_URI": f"sqlite:///{home}/catalog.db",
           "K2_WAREHOUSE": str(home / "warehouse"), "K2_DLQ_PATH": str(home / "dlq.jsonl"), "K2_MODE": "dev",
           "K2_BATCH_SECONDS": "1"}
    os.environ.update(env)
    settings = Settings()

    _step("2/5 ingest: CSV → Kafka (Avro, Confluent wire format, idempotent producer)")
    if asx is None:
        asx = generate(home / "ticks", symbols=4, days=3, seed=2014)
        console.print(f"  generated deterministic synthetic ticks in {asx}")
    summary = ingest_files(asx, settings, show_progress=True)
    console.print(f"  read {summary.rows_read:,} rows → produced {summary.produced_total:,}, "
                  f"rejected {summary.rejected_total:,} ({summary.messages_per_second:,.0f} msg/s)")

    _step("3/5 stream: Kafka → Iceberg (exactly-once, de-duplicated), until caught up")
    result = stream_run(settings, until_idle=2.0)
    for table, rows in result.rows_written.items():
        console.print(f"  {table}: {rows:,} new rows committed")

    _step("4/5 query API")
    api = subprocess.Popen([str(Path(sys.executable).with_name("k2")), "api", "--port", str(port)],
                           env={**os.environ, "K2_LOG_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health")
        client = httpx.Client(base_url=base, headers={"X-API-Key": DEV_API_KEY}, timeout=30)
        _tour(client, home)
        console.print(Panel.fit(
            f"Explore: {base}/docs (key header X-API-Key: {DEV_API_KEY})\n"
            f"CLI:     k2-query symbols --url {base}   (also: trades --symbol BHP --limit 10, bars BHP "
            f"--interval 5m, summary BHP {{date}}, snapshots, stats; --local reads the catalog directly)\n"
            f"Done in {time.monotonic() - started:.0f}s.", title="K2 demo"))
        if keep_running:
            console.print("API running; Ctrl-C to stop")
            api.wait()
    finally:
        api.terminate()
        api.wait(timeout=20)


def _tour(client: httpx.Client, home: Path) -> None:
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
    _show("daily VWAP per symbol", vwap.raise_for_status().json()["data"], ["symbol", "bucket_start", "vwap"])
    snapshots = client.get("/v1/snapshots", params={"table": "trades"}).raise_for_status().json()["data"]
    if snapshots:
        oldest = snapshots[-1] if len(snapshots) > 1 else snapshots[0]
        as_of = client.post(f"/v1/snapshots/{oldest['snapshot_id']}/query",
                            json={"table": "trades", "symbols": [symbol], "limit": 3}).raise_for_status().json()
        console.print(f"time travel: trades table has {len(snapshots)} snapshots; at snapshot "
                      f"{oldest['snapshot_id']} the first rows for {symbol} were:")
        _show("as of the first snapshot", as_of["data"], ["exchange_timestamp", "price", "volume", "sequence_number"])
    chart = home / f"{symbol.lower()}-{day}.png"
    k2_query = str(Path(sys.executable).with_name("k2-query"))
    subprocess.run([k2_query, "chart", symbol, day, "--interval", "5m", "-o", str(chart), "--url",
                    str(client.base_url)], check=True, env={**os.environ, "K2_API_KEY": DEV_API_KEY})
    console.print(f"candlestick chart written to {chart}")
