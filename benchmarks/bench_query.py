"""Query-stage latency: K2's engine and API against bare DuckDB over the same Parquet files.

    python benchmarks/bench_query.py --data ../shared/data/asx-2014-03

Loads the ASX folder into a temporary embedded lakehouse (SQLite catalog, local warehouse), then
for four queries (daily summary, trades?limit=100, 1-minute OHLCV of one symbol-day, a
multi-symbol tick query) measures p50/p99 latency of
  - bare DuckDB: hand-written SQL over the table's Parquet files, results fetched as Arrow;
  - the engine: the same question through `k2.query` (planning, metrics, exact decimals), with the
    result cache off: first without rollups or held ticks, so that DuckDB reads the ticks every
    time, then with them as deployed (summaries and bars combine each file's per-minute partials,
    pages of a symbol slice each file's decoded ticks; both computed once per file:
    `k2.query.rollups`, `k2.query.heldticks`);
  - the API in-process: an HTTP request through the ASGI app (httpx), JSON included, rollups and
    held ticks on, result cache off, then on (the API's default: a repeated question on an unchanged snapshot is
    answered from memory);
each also as a ratio to bare DuckDB in the same run. All are timed interleaved (one call of
each per round, rotating which goes first), so load from other processes on the machine falls on
all alike instead of skewing the ratios. Finally uvicorn is started on loopback (`--api-workers`
processes) and a steady open-loop load is sent to it from this process for a bounded time: a mix
of the three point queries over every symbol and day of the sample, once with the result cache
and once without (rollups and held ticks on in both). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import httpx
from bench_pipeline import process_env
from pyiceberg.io.pyarrow import PyArrowFileIO

from k2.api.app import create_app
from k2.query import bars, ticks
from k2.query.bars import BarQuery
from k2.query.cursor import fingerprint
from k2.query.engine import Engine
from k2.query.filters import TickFilter, columns, select_fields
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings
from k2.stack.base import free_port

SYDNEY = ZoneInfo("Australia/Sydney")
SYMBOL, DAY = "BHP", "2014-03-12"
DAY_START = f"{DAY}T00:00:00+11:00"
DAY_END = "2014-03-13T00:00:00+11:00"
HOUR = ("2014-03-12T10:00:00+11:00", "2014-03-12T11:00:00+11:00")
MULTI = ["BHP", "RIO", "DVN", "MWR"]
HEADERS = {"X-API-Key": DEV_API_KEY}


@dataclass(frozen=True)
class Case:
    name: str
    bare_sql: str
    bare_params: dict
    engine: Callable[[], object]
    api: tuple[str, str, dict | None]  # method, path, JSON body


def cases(engine: Engine) -> list[Case]:
    start, end = dt.datetime.fromisoformat(DAY_START), dt.datetime.fromisoformat(DAY_END)
    hour = TickFilter(tuple(MULTI), None, *(dt.datetime.fromisoformat(t) for t in HOUR))

    def trades_page():
        flt = TickFilter((SYMBOL,))
        rel = ticks.tick_relation(engine, engine.pin("trades"), flt)
        return ticks.page(engine, rel, fields=columns("trades"), limit=100, cursor=None,
                          fingerprint=fingerprint("trades", flt))

    def multi_symbol():
        rel = ticks.tick_relation(engine, engine.pin("trades"), hour)
        return sum(b.num_rows for b in ticks.stream(engine, rel, fields=select_fields("trades", None),
                                                     limit=None).batches)

    ordered = "ORDER BY exchange_timestamp, sequence_number"
    return [
        Case("summary (1 symbol-day)",
             f"SELECT first(price {ordered}), max(price), min(price), last(price {ordered}), sum(volume), count(*), "
             "sum(price * volume) / sum(volume) FROM read_parquet($files) WHERE symbol = $s AND exchange_date = $d",
             {"s": SYMBOL, "d": DAY},
             lambda: bars.summary(engine, SYMBOL, start.date()),
             ("GET", f"/v1/summary/{SYMBOL}/{DAY}", None)),
        Case("trades?limit=100",
             "SELECT * FROM read_parquet($files) WHERE symbol = $s "
             "ORDER BY exchange_timestamp, symbol, sequence_number LIMIT 100",
             {"s": SYMBOL}, trades_page, ("GET", f"/v1/trades?symbol={SYMBOL}&limit=100", None)),
        Case("1m OHLCV (1 symbol-day)",
             f"SELECT time_bucket(INTERVAL 1 minute, exchange_timestamp, 'Australia/Sydney') AS b, "
             f"first(price {ordered}), max(price), min(price), last(price {ordered}), sum(volume), count(*), "
             "sum(price * volume) / sum(volume) FROM read_parquet($files) "
             "WHERE symbol = $s AND exchange_timestamp >= $start AND exchange_timestamp < $end GROUP BY b ORDER BY b",
             {"s": SYMBOL, "start": start, "end": end},
             lambda: bars.bars(engine, BarQuery((SYMBOL,), "1m", start, end), max_rows=10_000),
             ("POST", "/v1/aggregations", {"symbols": [SYMBOL], "interval": "1m", "start": DAY_START,
                                           "end": DAY_END})),
        Case("multi-symbol ticks (4 symbols, 1 h)",
             "SELECT * FROM read_parquet($files) WHERE symbol IN ('BHP', 'RIO', 'DVN', 'MWR') "
             "AND exchange_timestamp >= $start AND exchange_timestamp < $end "
             "ORDER BY exchange_timestamp, symbol, sequence_number",
             {"start": hour.start, "end": hour.end}, multi_symbol,
             ("POST", "/v1/trades/query", {"symbols": MULTI, "start": HOUR[0], "end": HOUR[1]})),
    ]


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def time_interleaved(calls: list[Callable[[], object]], iterations: int, warmup: int, *, block: int = 1,
                     settle: float = 0.0) -> list[tuple[float, float]]:
    """p50/p99 of each call over `iterations` runs, timed in rounds of `block` consecutive runs of
    each call, the first of a round rotating. A pause of `settle` seconds before each block lets a
    server that keeps its threads spinning after a burst (QuestDB's workers do) go quiet, so the
    next call is not timed against it."""
    for call in calls:
        for _ in range(warmup):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(max(1, iterations // block)):
        for j in range(len(calls)):
            k = (i + j) % len(calls)
            time.sleep(settle)
            for _ in range(block):
                started = time.perf_counter()
                calls[k]()
                samples[k].append(time.perf_counter() - started)
    return [percentiles(s) for s in samples]


def bench_latency(settings: Settings, iterations: int, warmup: int) -> list[tuple[str, ...]]:
    uncached = settings.model_copy(update={"query_cache_mb": 0})
    engine, cached_engine = Engine(uncached), Engine(settings)
    # SQL over the ticks every time: no rollups, no held ticks
    plain_engine = Engine(uncached.model_copy(update={"query_rollup_mb": 0, "query_tick_cache_mb": 0}))
    files = [PyArrowFileIO.parse_location(f.file_path)[2]
             for f in engine.plan(engine.pin("trades"), TickFilter()).files]
    bare = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    bare.execute("SET TimeZone = 'UTC'")
    # The API in-process: requests through the ASGI app on this thread's event loop.
    loop = asyncio.new_event_loop()
    clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(s, engine=e)), base_url="http://k2",
                                 headers=HEADERS) for s, e in ((uncached, engine), (settings, cached_engine))]

    def api_call(client: httpx.AsyncClient, method: str, path: str, body: dict | None) -> None:
        loop.run_until_complete(client.request(method, path, json=body)).raise_for_status()

    rows = []
    try:
        for case, plain in zip(cases(engine), cases(plain_engine), strict=True):
            params = {"files": files, **case.bare_params}
            baseline, *measured = time_interleaved(
                [lambda p=params, c=case: bare.execute(c.bare_sql, p).fetch_arrow_table(), plain.engine, case.engine,
                 lambda c=case: api_call(clients[0], *c.api), lambda c=case: api_call(clients[1], *c.api)],
                iterations, warmup)
            cells = [f"{baseline[0] * 1e3:.2f} / {baseline[1] * 1e3:.2f}"]
            for p50, p99 in measured:  # engines, API uncached, API cached: latency, then ratio to bare
                cells += [f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f}", f"{p50 / baseline[0]:.2f}×"]
            rows.append((case.name, *cells))
    finally:
        for client in clients:
            loop.run_until_complete(client.aclose())
        loop.close()
        bare.close()
        engine.close()
        plain_engine.close()
        cached_engine.close()
    return rows



def bench_steady_load(settings: Settings, rate: float, seconds: float, warmup: float, workers: int,
                      api_workers: int, mix: list[tuple[str, str, dict | None]]) -> tuple[str, ...]:
    """Open-loop load on a uvicorn server in its own processes: requests are sent on a fixed schedule
    and latency counts from the scheduled time, so a slow server cannot hide its queueing. A
    warm-up at the same rate comes first and is not counted."""
    with api_server(settings, api_workers) as port:
        body_of = {i: json.dumps(body).encode() if body is not None else None for i, (_, _, body) in enumerate(mix)}
        local = threading.local()

        def send(scheduled: float, index: int, results: list[tuple[float, bool]]) -> None:
            # http.client, not httpx: a lean client leaves the shared CPUs to the server under test.
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            method, path, _ = mix[index]
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                ok = http_request(connection, method, path, body_of[index])[0] == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                local.connection = None
                ok = False
            results.append((time.perf_counter() - scheduled, ok))  # list.append is atomic

        def run(duration: float) -> tuple[list[tuple[float, bool]], float]:
            results: list[tuple[float, bool]] = []
            total = int(rate * duration)
            started = time.perf_counter() + 0.2
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i in range(total):
                    pool.submit(send, started + i / rate, i % len(mix), results)
            return results, total / (time.perf_counter() - started)

        run(warmup)  # every worker process loads metadata and, with the cache, meets each request once
        results, achieved = run(seconds)
        latencies = [latency for latency, _ in results]
        p50, p99 = percentiles(latencies)
        return (f"{settings.query_cache_mb} MiB" if settings.query_cache_mb else "off", f"{rate:.0f}",
                f"{achieved:.1f}", f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}", f"{max(latencies) * 1e3:.2f}",
                str(sum(not ok for _, ok in results)))


def http_request(connection: http.client.HTTPConnection, method: str, path: str,
                 payload: bytes | None) -> tuple[int, bytes]:
    """One request with the bench key (and a JSON body, if any) on a kept-alive connection."""
    connection.request(method, path, body=payload,
                       headers={**HEADERS, **({"Content-Type": "application/json"} if payload else {})})
    response = connection.getresponse()
    return response.status, response.read()


@contextmanager
def api_server(settings: Settings, workers: int = 1) -> Iterator[int]:
    """`k2 serve`'s app under uvicorn in its own processes on loopback, as deployed; yields its port
    once /ready answers."""
    with uvicorn_server(["k2.api.app:create_app", "--factory", "--workers", str(workers)],
                        process_env(settings)) as port:
        yield port


@contextmanager
def uvicorn_server(app: list[str], env: dict[str, str]) -> Iterator[int]:
    """uvicorn serving `app` (its import string and options) on loopback with the API's logging;
    yields its port once /ready answers 200."""
    port = free_port()
    # A connection left idle past uvicorn's 5 s keep-alive is closed under http.client, which does
    # not reconnect: a benchmark timing several servers in turn leaves each idle that long.
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", *app, "--host", "127.0.0.1", "--port", str(port),
                               "--timeout-keep-alive", "60", "--no-access-log", "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{app[0]} did not become ready")
            time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def point_query_mix(engine: Engine) -> list[tuple[str, str, dict | None]]:
    """Summary, trades?limit=100 and 1-minute bars of every symbol and day that traded, interleaved."""
    days = engine.run("bench_symbol_days", "SELECT DISTINCT symbol, exchange_date FROM {t} ORDER BY ALL", {},
                      {"t": engine.plan(engine.pin("trades"), TickFilter())}).to_pylist()
    mix: list[tuple[str, str, dict | None]] = []
    for row in days:
        symbol, day = row["symbol"], row["exchange_date"]
        start = dt.datetime.combine(day, dt.time(), SYDNEY)
        mix += [("GET", f"/v1/summary/{symbol}/{day.isoformat()}", None),
                ("GET", f"/v1/trades?symbol={symbol}&start={start.isoformat()}&limit=100".replace("+", "%2B"), None),
                ("POST", "/v1/aggregations", {"symbols": [symbol], "interval": "1m", "start": start.isoformat(),
                                              "end": (start + dt.timedelta(days=1)).isoformat()})]
    return mix


def load_average() -> str:
    """The machine's 1/5/15-minute load averages: other work running alongside skews latencies."""
    try:
        return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ASX-format folder (trades/, quotes/, …)")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rate", type=float, default=40.0, help="steady load, requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady load duration")
    parser.add_argument("--load-warmup", type=float, default=5.0, help="uncounted seconds of load first")
    parser.add_argument("--workers", type=int, default=32, help="steady load client threads")
    parser.add_argument("--api-workers", type=int, default=os.cpu_count() or 1, help="uvicorn worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="k2-bench-") as tmp:
        # A private embedded lakehouse, whatever K2_* variables are set.
        settings = Settings(catalog_uri=f"sqlite:///{tmp}/catalog.db", warehouse=f"{tmp}/warehouse",
                            namespace="market", s3_endpoint=None, mode="dev", api_keys=None, api_keys_file=None,
                            rate_limit="1000000/minute", key_concurrency=1024,
                            log_level="WARNING")  # the load's many clients share one key
        loaded = time.perf_counter()
        load_asx(settings, args.data)
        print(f"Loaded {args.data} in {time.perf_counter() - loaded:.1f} s; {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, DuckDB {duckdb.__version__}; "
              f"{args.iterations} timed runs after {args.warmup} warm-up runs; {load_average()}.\n")
        latency = bench_latency(settings, args.iterations, args.warmup)
        print(markdown(("query", "bare DuckDB p50 / p99 ms", "engine, SQL on ticks p50 / p99 ms", "÷ bare",
                        "engine p50 / p99 ms", "engine ÷ bare",
                        "API p50 / p99 ms", "API ÷ bare", "API, cached result p50 / p99 ms", "cached ÷ bare"),
                       latency))
        engine = Engine(settings)
        try:
            mix = point_query_mix(engine)
        finally:
            engine.close()
        # Requests run side by side: each worker process gets its share of the cores for DuckDB.
        threads = max(1, (os.cpu_count() or 1) // args.api_workers)
        print(f"\nSteady load: uvicorn with {args.api_workers} worker processes (K2_QUERY_THREADS={threads}) on "
              f"loopback, {args.seconds:.0f} s "
              f"open-loop from {args.workers} client threads after {args.load_warmup:.0f} s of uncounted warm-up; "
              f"a mix of summary / trades?limit=100 / 1m OHLCV over every symbol-day ({len(mix)} distinct "
              "requests); latency from each request's scheduled send time.\n")
        loads = [bench_steady_load(settings.model_copy(update={"query_cache_mb": cache_mb, "query_threads": threads}),
                                   args.rate, args.seconds, args.load_warmup, args.workers, args.api_workers, mix)
                 for cache_mb in (settings.query_cache_mb, 0)]
        print(markdown(("result cache", "target req/s", "achieved req/s", "p50 ms", "p99 ms", "max ms", "errors"),
                       loads))
        print(f"\n{load_average()} at the end.")


if __name__ == "__main__":
    main()
