"""How K2's cost grows with data: the whole path at 1×, 10× and 100× the ASX sample's size.

    python benchmarks/bench_scale.py --scales 1,10,100   (needs Kafka + registry: `k2 stack up --embedded`;
    `make bench` runs 1,10 and `make bench-scale` all three)

For each scale, deterministic synthetic ticks (`k2_synthetic`, U-shaped sessions) of about
scale × 370k rows are generated into a temporary folder (`plan_scale`: a week at 1×, days and
symbols both growing as the square root of the scale; generation is timed apart, it is not K2's
cost). Then K2 runs as its own separate processes, as deployed, each with a private lakehouse
(SQLite catalog, local warehouse) and fresh topics:
  - `k2 ingest asx` (CSV → Kafka): msg/s from its own `ingest.summary`;
  - `k2 stream run --until-idle` (Kafka → Iceberg): rows/s from its own `stream.done`;
  - `k2 maintain` with no retention: compaction, snapshot expiry and orphan removal, wall time;
  - `k2 api` with the result cache off: p50/p99 of the daily summary and of 1-minute bars of one
    symbol-day (flat as data grows if partition pruning works), of the first page of 100 trades
    of one symbol with no dates (every day in range: flat if a page opens only the files it needs),
    and of one whole day's daily bar for every symbol (in requests of at most the API's 100 symbols);
and bytes on disk (warehouse: Parquet + Iceberg metadata) per row against the CSV's, and each
command's peak RSS (VmHWM, the kernel's high-water mark, read every 50 ms while it runs, summed
over its processes: the stream's table processes, the ingest's workers). The
operator is not run: it starts these same processes and holds no tick data itself. Prints one
table with each figure's growth 10×÷1× and 100×÷1×. Temporary folders and topics are removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pyiceberg
from bench_live import _peak_mb, process_tree
from bench_pipeline import bench_settings, process_env
from bench_query import http_request, load_average, markdown, time_interleaved

from k2 import topics
from k2.settings import Settings
from k2.stack.base import free_port
from k2_synthetic import generate, plan_scale

BASE_ROWS = 370_000  # the ASX sample: 370,174 rows
SYMBOL = "BHP"  # the first listing: present at every scale
DAY = dt.date(2014, 3, 10)  # the first trading day generated: present at every scale
SYDNEY = ZoneInfo("Australia/Sydney")
CHUNK = 100  # the API's most symbols per request


def progress(scale: float, message: str) -> None:
    print(f"[{scale:g}×] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_k2(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float, list[dict]]:
    """Run `k2 ARGS` to its end: (wall seconds, peak RSS MiB, its JSON log events)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("k2")), *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = _wait_peak_mb(proc)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"k2 {' '.join(args)} exited {proc.returncode}: {log.read_text()[-2000:]}")
    return seconds, peak, _events(log)


def _wait_peak_mb(proc: subprocess.Popen) -> float:
    """Wait for the process; the peak RSS (VmHWM, read every 50 ms until it exits) of it and of the
    processes it started (the stream's table processes, the ingest's workers), summed: an upper
    bound where a forked worker shares pages with its parent. Not wait4's ru_maxrss: that also
    counts the RSS this (large) process had when it forked the child."""
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in process_tree(proc.pid):
            try:
                peaks[pid] = max(peaks.get(pid, 0.0), _peak_mb(pid))  # nan (an exiting process) leaves it
            except OSError:
                pass
        time.sleep(0.05)
    return sum(peaks.values())


def _events(log: Path) -> list[dict]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def _event(events: list[dict], name: str) -> dict:
    found = [e for e in events if e.get("event") == name]
    if not found:
        raise RuntimeError(f"no {name} event in the process's log")
    return found[-1]


def tree_bytes(root: Path, suffixes: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and (suffixes is None or p.name.endswith(suffixes)))


class Api:
    """`k2 api` in its own process, and a lean HTTP client for it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self._log = log.open("w")
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("k2")), "api", "--port", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.request("GET", "/ready")[0] == 200:
                    break
            except OSError:
                self.connection.close()
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"k2 api did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        return http_request(self.connection, method, path, json.dumps(body).encode() if body is not None else None)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        status, data = self.request(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} answered {status}: {data[:500]!r}")
        return json.loads(data)

    def stop(self) -> float:
        """SIGTERM, wait, and the process's peak RSS in MiB."""
        self.connection.close()
        peak = _peak_mb(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return max(peak, _wait_peak_mb(self.proc))
        finally:
            self._log.close()


def bench_queries(api: Api, symbols: list[str], iterations: int) -> dict[str, float]:
    start = dt.datetime.combine(DAY, dt.time(), SYDNEY)
    end = start + dt.timedelta(days=1)
    span = {"start": start.isoformat(), "end": end.isoformat()}
    chunks = [symbols[i:i + CHUNK] for i in range(0, len(symbols), CHUNK)]

    def summary() -> None:
        api.call("GET", f"/v1/summary/{SYMBOL}/{DAY.isoformat()}")

    def bars() -> None:
        api.call("POST", "/v1/aggregations", {"symbols": [SYMBOL], "interval": "1m", **span})

    def first_page() -> None:  # no dates: every day is in range, and the page is in the first
        api.call("GET", f"/v1/trades?symbol={SYMBOL}&limit=100")

    def whole_day() -> int:
        return sum(len(api.call("POST", "/v1/aggregations", {"symbols": chunk, "interval": "1d", **span})["data"])
                   for chunk in chunks)

    answered = whole_day()
    if answered != len(symbols):  # every listing trades every day (the auctions at least)
        raise RuntimeError(f"the whole-day aggregation gave {answered} daily bars for {len(symbols)} symbols")
    (summary_p50, summary_p99), (bars_p50, bars_p99), (page_p50, page_p99) = time_interleaved(
        [summary, bars, first_page], iterations, 5)
    ((day_p50, day_p99),) = time_interleaved([whole_day], max(5, iterations // 10), 1)
    return {"summary_p50_ms": summary_p50 * 1e3, "summary_p99_ms": summary_p99 * 1e3,
            "bars_p50_ms": bars_p50 * 1e3, "bars_p99_ms": bars_p99 * 1e3,
            "page_p50_ms": page_p50 * 1e3, "page_p99_ms": page_p99 * 1e3,
            "whole_day_p50_ms": day_p50 * 1e3, "whole_day_p99_ms": day_p99 * 1e3}


def bench_scale(scale: float, iterations: int, keep: Path | None = None) -> dict[str, float]:
    symbols, days = plan_scale(BASE_ROWS * scale)
    with _workdir(scale, keep) as tmp:
        progress(scale, f"generating {symbols} symbols × {days} days (U-shaped sessions)")
        started = time.perf_counter()
        csv = generate(tmp / "csv", symbols=symbols, days=days, seed=42, intraday="u")
        generated = time.perf_counter() - started
        csv_bytes = tree_bytes(csv / "trades") + tree_bytes(csv / "quotes")
        progress(scale, f"generated {csv_bytes / 1e6:,.0f} MB of CSV in {generated:.0f} s")

        settings = bench_settings(tmp, uuid.uuid4().hex[:6]).model_copy(update={"log_level": "INFO"})
        env = process_env(settings)
        try:
            progress(scale, "k2 ingest asx")
            e2e_started = time.perf_counter()
            ingest_s, ingest_mb, events = run_k2(["ingest", "asx", str(csv), "--no-progress"], env,
                                                 tmp / "ingest.log")
            ingest = _event(events, "ingest.summary")
            rows = ingest["produced"]
            if ingest["rejected"]:
                raise RuntimeError(f"ingest rejected rows of generated data: {ingest['rejected_by_reason']}")
            progress(scale, f"ingested {rows:,} rows at {ingest['messages_per_second']:,} msg/s; k2 stream run")
            if keep is not None:
                shutil.rmtree(csv)  # what is kept is the lakehouse; the CSV is regenerated at will

            stream_s, stream_mb, events = run_k2(["stream", "run", "--until-idle", "0.5"], env, tmp / "stream.log")
            end_to_end = time.perf_counter() - e2e_started
            done = _event(events, "stream.done")
            if sum(done["rows_written"].values()) != rows:  # ticks and the listings' reference rows
                raise RuntimeError(f"stream wrote {done['rows_written']} of {rows:,} rows")
            rows = written = sum(n for table, n in done["rows_written"].items() if not table.endswith("reference"))
            warehouse = Path(settings.warehouse)
            files_streamed = tree_bytes(warehouse, (".parquet",))
            progress(scale, f"streamed {written:,} rows in {done['seconds']} s; k2 maintain")

            maintain_s, maintain_mb, _ = run_k2(["maintain", "--table", "trades,quotes", "--retention-hours", "0",
                                                 "--orphan-age-hours", "0"], env, tmp / "maintain.log")
            data_bytes = tree_bytes(warehouse, (".parquet",))
            meta_bytes = tree_bytes(warehouse) - data_bytes
            progress(scale, f"compacted in {maintain_s:.1f} s; k2 api (result cache off)")

            api = Api(process_env(settings.model_copy(update={
                "query_cache_mb": 0, "log_level": "WARNING", "mode": "dev", "api_keys": None,
                "rate_limit": "1000000/minute", "key_concurrency": 1024})), tmp / "api.log")
            try:
                listed = [row["symbol"] for row in api.call("GET", "/v1/symbols")["data"]]
                queries = bench_queries(api, listed, iterations)
            finally:
                api_mb = api.stop()
            progress(scale, f"queried: summary p50 {queries['summary_p50_ms']:.1f} ms, "
                            f"first page p50 {queries['page_p50_ms']:.1f} ms, "
                            f"whole day p50 {queries['whole_day_p50_ms']:.0f} ms")
        finally:
            _delete_topics(settings)
    return {"rows": rows, "symbols": symbols, "days": days, "generate_s": generated,
            "csv_bytes_per_row": csv_bytes / rows, "ingest_msgs_per_s": ingest["messages_per_second"],
            "ingest_s": ingest_s, "stream_rows_per_s": written / done["seconds"], "stream_s": stream_s,
            "end_to_end_s": end_to_end, "maintain_s": maintain_s,
            "parquet_bytes_per_row_streamed": files_streamed / rows, "parquet_bytes_per_row": data_bytes / rows,
            "metadata_bytes_per_row": meta_bytes / rows, **queries, "ingest_peak_mb": ingest_mb,
            "stream_peak_mb": stream_mb, "maintain_peak_mb": maintain_mb, "api_peak_mb": api_mb}


@contextmanager
def _workdir(scale: float, keep: Path | None) -> Iterator[Path]:
    """A temporary folder, or KEEP/<scale>x kept afterwards (emptied first) to profile queries on."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=f"k2-scale-{scale:g}x-") as tmp:
            yield Path(tmp)
        return
    kept = keep / f"{scale:g}x"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    yield kept


def _delete_topics(settings: Settings) -> None:
    admin = topics.admin_client(settings.kafka_bootstrap)
    names = [settings.topic("trades"), settings.topic("quotes"), settings.topic("reference"), settings.dlq_topic]
    existing = set(admin.list_topics(timeout=30).topics)
    for future in admin.delete_topics([n for n in names if n in existing]).values():
        future.result()


FIGURES: list[tuple[str, str, Callable[[float], str]]] = [
    ("symbols × days", "", lambda v: ""),
    ("generation s (not K2's cost)", "generate_s", lambda v: f"{v:.1f}"),
    ("ingest msg/s (`k2 ingest asx`)", "ingest_msgs_per_s", lambda v: f"{v:,.0f}"),
    ("ingest process s", "ingest_s", lambda v: f"{v:.1f}"),
    ("stream rows/s (`k2 stream run`)", "stream_rows_per_s", lambda v: f"{v:,.0f}"),
    ("stream process s", "stream_s", lambda v: f"{v:.1f}"),
    ("end to end s (CSV → Kafka → Iceberg)", "end_to_end_s", lambda v: f"{v:.1f}"),
    ("compaction s (`k2 maintain`)", "maintain_s", lambda v: f"{v:.1f}"),
    ("summary p50 ms (1 symbol-day)", "summary_p50_ms", lambda v: f"{v:.1f}"),
    ("summary p99 ms", "summary_p99_ms", lambda v: f"{v:.1f}"),
    ("1m bars p50 ms (1 symbol-day)", "bars_p50_ms", lambda v: f"{v:.1f}"),
    ("1m bars p99 ms", "bars_p99_ms", lambda v: f"{v:.1f}"),
    ("first 100 trades of every day's range p50 ms", "page_p50_ms", lambda v: f"{v:.1f}"),
    ("first 100 trades p99 ms", "page_p99_ms", lambda v: f"{v:.1f}"),
    ("whole day, every symbol's daily bar, p50 ms", "whole_day_p50_ms", lambda v: f"{v:.0f}"),
    ("whole day p99 ms", "whole_day_p99_ms", lambda v: f"{v:.0f}"),
    ("CSV bytes/row", "csv_bytes_per_row", lambda v: f"{v:.1f}"),
    ("Parquet bytes/row as streamed", "parquet_bytes_per_row_streamed", lambda v: f"{v:.1f}"),
    ("Parquet bytes/row compacted", "parquet_bytes_per_row", lambda v: f"{v:.1f}"),
    ("Iceberg metadata bytes/row", "metadata_bytes_per_row", lambda v: f"{v:.2f}"),
    ("peak RSS MiB, `k2 ingest`", "ingest_peak_mb", lambda v: f"{v:.0f}"),
    ("peak RSS MiB, `k2 stream run`", "stream_peak_mb", lambda v: f"{v:.0f}"),
    ("peak RSS MiB, `k2 maintain`", "maintain_peak_mb", lambda v: f"{v:.0f}"),
    ("peak RSS MiB, `k2 api`", "api_peak_mb", lambda v: f"{v:.0f}"),
]


def table(scales: list[float], results: list[dict[str, float]]) -> str:
    base = results[0]
    header = ("figure", *(f"{s:g}×" for s in scales), *(f"{s:g}× ÷ {scales[0]:g}×" for s in scales[1:]))
    rows = [("rows", *(f"{r['rows']:,}" for r in results), *(f"{r['rows'] / base['rows']:.1f}" for r in results[1:]))]
    for label, key, fmt in FIGURES:
        if not key:
            rows.append((label, *(f"{r['symbols']} × {r['days']}" for r in results), *("" for _ in results[1:])))
            continue
        rows.append((label, *(fmt(r[key]) for r in results),
                     *(f"{r[key] / base[key]:.2f}" if base[key] else "–" for r in results[1:])))
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,10,100", help="comma-separated multiples of the ASX sample's rows")
    parser.add_argument("--iterations", type=int, default=100, help="timed point queries per scale")
    parser.add_argument("--keep", type=Path, help="keep each scale's lakehouse (SQLite catalog, warehouse) in "
                                                 "KEEP/<scale>x, to profile queries on it afterwards")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, DuckDB {duckdb.__version__}, "
          f"pyiceberg {pyiceberg.__version__}; {load_average()} at the start.", flush=True)
    results = []
    for scale in scales:
        started = time.perf_counter()
        results.append(bench_scale(scale, args.iterations, args.keep))
        print(json.dumps({"scale": scale, **results[-1]}), flush=True)  # usable if a later scale is cut short
        progress(scale, f"done in {time.perf_counter() - started:.0f} s; {load_average()}")
    print(f"\n### Cost as data grows ({', '.join(f'{s:g}×' for s in scales)} the ASX sample's rows)\n")
    print(table(scales, results))
    print(f"\n{load_average()} at the end.")


if __name__ == "__main__":
    main()
