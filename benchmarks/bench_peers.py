"""K2 beside QuestDB, the time-series database a quant team would pick instead, on the same ticks.

    python benchmarks/bench_peers.py --data ../shared/data/asx-2014-03

Loads the ASX folder into a temporary embedded lakehouse (as bench_query.py does), starts QuestDB
(k2.stack.questdb, on K2_QUESTDB_* ports; stopped again unless it was already running) and loads
the same trades and quotes into it over ILP/HTTP, timing load → queryable. Then, for one
symbol-day, asks both the questions K2's API answers: daily summary with VWAP, 1-minute OHLCV
(QuestDB: SAMPLE BY 1m ALIGN TO CALENDAR), a page of 100 trades, and 100 trades ASOF JOINed to the
prevailing quote. Every answer is first checked to be exactly K2's engine's, over QuestDB's PG wire
and its HTTP /exec; only then are they timed, in alternating blocks of calls (bench_query.time_interleaved)
beside K2's engine, K2's API (result cache off) in-process and under uvicorn over loopback HTTP,
bare DuckDB over the same Parquet, and the Python HTTP floor (`http_floor.py`: uvicorn replying with
K2's recorded answer), with ratios to bare DuckDB and to QuestDB's /exec (all HTTP + JSON on a
kept-alive connection). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import platform
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import duckdb
import httpx
import psycopg2
from bench_query import HEADERS, api_server, http_request, load_average, markdown, time_interleaved, uvicorn_server
from http_floor import ANSWERS_ENV
from pyiceberg.io.pyarrow import PyArrowFileIO

from k2.api.app import create_app
from k2.query.engine import Engine
from k2.query.filters import TickFilter
from k2.query.sample import load_asx
from k2.settings import Settings
from k2.stack import questdb_peer as peer
from k2.stack.questdb import QUESTDB_VERSION, QuestDB

SYMBOL, DAY = "BHP", dt.date(2014, 3, 12)
# QuestDB's workers spin after a query: asked every 2 ms, its JVM took 1.9 of the 2 cores, and it
# went quiet within 0.25 s of the last query. Each system is therefore timed in blocks of
# consecutive calls after a pause, not one call after the other's.
BLOCK, SETTLE_S = 20, 0.3
ORDERED = "ORDER BY exchange_timestamp, sequence_number"
OHLCV = (f"first(price {ORDERED}), max(price), min(price), last(price {ORDERED}), sum(volume), count(*), "
         "sum(price * volume) / sum(volume)")
IN_DAY = "symbol = $s AND exchange_timestamp >= $start AND exchange_timestamp < $end"
# Bare DuckDB over the tables' Parquet files: the floor, without K2's planning, exact ratios or JSON.
BARE_SQL = [
    f"SELECT {OHLCV} FROM read_parquet($trades) WHERE {IN_DAY}",
    f"SELECT time_bucket(INTERVAL 1 minute, exchange_timestamp, 'Australia/Sydney') AS b, {OHLCV} "
    f"FROM read_parquet($trades) WHERE {IN_DAY} GROUP BY b ORDER BY b",
    f"SELECT * FROM read_parquet($trades) WHERE {IN_DAY} ORDER BY exchange_timestamp, sequence_number LIMIT 100",
    f"SELECT t.*, q.exchange_timestamp, q.bid_price, q.ask_price, q.bid_size, q.ask_size FROM "
    f"(SELECT * FROM read_parquet($trades) WHERE {IN_DAY} ORDER BY exchange_timestamp, sequence_number LIMIT 100) t "
    f"ASOF LEFT JOIN (SELECT * FROM read_parquet($quotes) WHERE symbol = $s AND exchange_timestamp < $end) q "
    "ON t.symbol = q.symbol AND t.exchange_timestamp >= q.exchange_timestamp",
]


def parquet_files(engine: Engine, kind: str) -> list[str]:
    return [PyArrowFileIO.parse_location(f.file_path)[2] for f in engine.plan(engine.pin(kind), TickFilter()).files]


def load_questdb(qdb: QuestDB, settings: Settings) -> list[tuple[str, ...]]:
    """Every trade and quote into fresh tables; one row per table: rows, rows/s and load → queryable."""
    out = []
    for kind in ("trades", "quotes"):
        rows = peer.read_ticks(settings, kind)
        qdb.exec(f"DROP TABLE IF EXISTS {kind}")
        loaded = peer.load(qdb, kind, kind, rows)
        out.append((kind, f"{loaded.rows:,}", f"{loaded.send_s:.2f}", f"{loaded.queryable_s:.2f}",
                    f"{loaded.rows / loaded.queryable_s:,.0f}"))
    return out


def check_equal(qdb: QuestDB, engine: Engine, pg, questions: list[peer.Question]) -> list[int]:
    """Raises peer.Mismatch unless QuestDB (PG wire and HTTP) gives K2's engine's exact figures;
    returns the rows each answer has."""
    sizes = []
    with pg.cursor() as cursor:
        for q in questions:
            k2 = peer.k2_rows(peer.k2_answer(engine, q, SYMBOL, DAY), q.figures)
            cursor.execute(q.questdb_sql)
            peer.assert_same(q.name, k2, peer.pg_rows(cursor.fetchall()), "QuestDB PG wire")
            peer.assert_same(q.name, k2, peer.http_rows(qdb.exec(q.questdb_sql)), "QuestDB HTTP /exec")
            sizes.append(len(k2))
    return sizes


def http_call(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None) -> None:
    status, _ = http_request(conn, method, path, json.dumps(body).encode() if body is not None else None)
    assert status == 200, (path, status)


def bench_questions(settings: Settings, qdb: QuestDB, rounds: int, warmup: int) -> list[tuple[str, ...]]:
    engine = Engine(settings.model_copy(update={"query_cache_mb": 0}))
    pg = psycopg2.connect(qdb.pg_dsn)
    pg.autocommit = True
    questions = peer.questions(SYMBOL, DAY)
    sizes = check_equal(qdb, engine, pg, questions)
    print(f"Equal figures: QuestDB's PG wire and HTTP /exec give K2's exactly for {SYMBOL} {DAY} "
          f"({', '.join(f'{q.name}: {n} rows' for q, n in zip(questions, sizes, strict=True))}).\n")
    start = dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=peer.SYDNEY)
    bare_params = {"trades": parquet_files(engine, "trades"), "quotes": parquet_files(engine, "quotes"),
                   "s": SYMBOL, "start": start, "end": start + dt.timedelta(days=1)}
    bare = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    bare.execute("SET TimeZone = 'UTC'")
    loop = asyncio.new_event_loop()
    uncached = settings.model_copy(update={"query_cache_mb": 0})
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(uncached, engine=engine)),
                            base_url="http://k2", headers=HEADERS)
    servers = ExitStack()

    def api_call(method: str, path: str, body: dict | None) -> str:
        response = loop.run_until_complete(api.request(method, path, json=body))
        return response.raise_for_status().text

    # Every server over loopback HTTP, each on one kept-alive connection, as a client would ask them.
    k2_conn = http.client.HTTPConnection("127.0.0.1", servers.enter_context(api_server(uncached)), timeout=30)
    exec_conn = http.client.HTTPConnection("127.0.0.1", qdb.port, timeout=30)
    floor_conn = http.client.HTTPConnection("127.0.0.1", servers.enter_context(http_floor(
        {f"{q.api[0]} {q.api[1]}": api_call(*q.api) for q in questions}, settings.warehouse)), timeout=30)

    def questdb_exec(sql: str) -> None:
        http_call(exec_conn, "GET", "/exec?" + urllib.parse.urlencode({"query": sql}), None)

    def questdb_pg(sql: str) -> None:
        with pg.cursor() as cursor:
            cursor.execute(sql)
            cursor.fetchall()

    rows = []
    try:
        for q, sql in zip(questions, BARE_SQL, strict=True):
            used = {k: v for k, v in bare_params.items() if f"${k}" in sql}
            bare_t, engine_t, api_t, http_t, floor_t, pg_t, exec_t = time_interleaved([
                lambda s=sql, p=used: bare.execute(s, p).fetch_arrow_table(),
                lambda q=q: peer.k2_answer(engine, q, SYMBOL, DAY),
                lambda q=q: api_call(*q.api),
                lambda q=q: http_call(k2_conn, *q.api),
                lambda q=q: http_call(floor_conn, *q.api),
                lambda q=q: questdb_pg(q.questdb_sql),
                lambda q=q: questdb_exec(q.questdb_sql)], rounds, warmup, block=BLOCK, settle=SETTLE_S)
            rows.append((q.name, *(f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f}" for p50, p99 in
                                   (bare_t, engine_t, api_t, http_t, floor_t, pg_t, exec_t)),
                         f"{engine_t[0] / bare_t[0]:.2f}×", f"{http_t[0] / bare_t[0]:.2f}×",
                         f"{pg_t[0] / bare_t[0]:.2f}×", f"{exec_t[0] / bare_t[0]:.2f}×",
                         f"{http_t[0] / exec_t[0]:.2f}×", f"{floor_t[0] / exec_t[0]:.2f}×",
                         f"{(floor_t[0] + engine_t[0]) / exec_t[0]:.2f}×"))
    finally:
        floor_conn.close()
        k2_conn.close()
        servers.close()
        exec_conn.close()
        loop.run_until_complete(api.aclose())
        loop.close()
        bare.close()
        pg.close()
        engine.close()
    return rows


@contextmanager
def http_floor(answers: dict[str, str], workdir: str) -> Iterator[int]:
    """`http_floor.py` under uvicorn, replying with `answers` ("METHOD path" → text); yields its port."""
    answers_file = Path(workdir) / "http-floor-answers.json"
    answers_file.write_text(json.dumps(answers))
    here = str(Path(__file__).parent)
    env = {**os.environ, ANSWERS_ENV: str(answers_file),
           "PYTHONPATH": os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))}
    with uvicorn_server(["http_floor:create_app", "--factory"], env) as port:
        yield port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ASX-format folder (trades/, quotes/, …)")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (one call of each per round)")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    qdb = QuestDB()
    was_running = qdb.status() == "ready"
    qdb.start()
    try:
        with tempfile.TemporaryDirectory(prefix="k2-bench-peers-") as tmp:
            settings = Settings(catalog_uri=f"sqlite:///{tmp}/catalog.db", warehouse=f"{tmp}/warehouse",
                                namespace="market", s3_endpoint=None, mode="dev", api_keys=None, api_keys_file=None,
                                rate_limit="1000000/minute", log_level="WARNING")
            started = time.perf_counter()
            counts = load_asx(settings, args.data, kinds=("trades", "quotes"))
            k2_s = time.perf_counter() - started
            print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, DuckDB {duckdb.__version__}, "
                  f"QuestDB {QUESTDB_VERSION}; {load_average()}.\n")
            k2_rows = sum(len(peer.read_ticks(settings, kind)) for kind in counts)
            print("Load → queryable. QuestDB: ILP over HTTP from rows already in memory (read from K2's tables), "
                  "until `count()` shows them all. K2 (for scale): `load_asx`, CSV → Iceberg without Kafka; "
                  "K2's CSV → Kafka → Iceberg figure is bench_pipeline.py's end to end.\n")
            print(markdown(("table", "rows", "ILP send s", "load → queryable s", "rows/s"),
                           load_questdb(qdb, settings)))
            print(f"\nK2 load_asx: {k2_rows:,} rows in {k2_s:.2f} s, {k2_rows / k2_s:,.0f} rows/s.\n")
            print(f"Latency, {SYMBOL} {DAY}, p50 / p99 ms over {args.rounds} calls each, timed in alternating "
                  f"blocks of {BLOCK} after a {SETTLE_S} s pause, after {args.warmup} warm-up calls each; K2 "
                  "uncached; K2's API in-process (httpx's ASGI transport, no TCP hop) and under uvicorn (one "
                  "process) over loopback HTTP like QuestDB.\n")
            print("The Python HTTP floor: uvicorn replying with K2's recorded answer to the same request, "
                  "doing nothing else (`http_floor.py`); floor + engine is what K2 would take with no "
                  "routing, validation, access control or JSON writing.\n")
            print(markdown(("question", "bare DuckDB", "K2 engine", "K2 API in-process", "K2 API HTTP",
                            "Python HTTP floor", "QuestDB PG", "QuestDB /exec",
                            "engine ÷ bare", "API HTTP ÷ bare", "PG ÷ bare", "/exec ÷ bare", "K2 API HTTP ÷ /exec",
                            "floor ÷ /exec", "(floor + engine) ÷ /exec"),
                           bench_questions(settings, qdb, args.rounds, args.warmup)))
            print(f"\n{load_average()} at the end.")
    finally:
        if not was_running:
            qdb.stop()


if __name__ == "__main__":
    main()
