"""Logging and metrics for every K2 process.

All `k2_*` metrics are declared here, in one registry, so the Grafana dashboard and the alert
rules in the chart can be checked against what the code really exports.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector


def _with_process_figures(registry: CollectorRegistry) -> CollectorRegistry:
    """`registry` serving this process's CPU, memory, file descriptors and start time (process_*),
    its interpreter (python_info) and its GC (python_gc_*)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# Every K2 process (API, stream, ingest, operator) serves this registry.
REGISTRY = _with_process_figures(CollectorRegistry(auto_describe=True))

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# ingest
MESSAGES_PRODUCED = Counter("k2_messages_produced", "Messages acknowledged by Kafka", ["topic"],
                            registry=REGISTRY)
BYTES_PRODUCED = Counter("k2_bytes_produced", "Payload bytes acknowledged by Kafka", ["topic"],
                         registry=REGISTRY)
PRODUCE_ERRORS = Counter("k2_produce_errors", "Messages Kafka refused", ["topic", "reason"], registry=REGISTRY)
PRODUCE_LATENCY = Histogram("k2_produce_latency_seconds", "Produce call to delivery report", ["topic"],
                            buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ROWS_REJECTED = Counter("k2_rows_rejected", "Rows and messages sent to the DLQ", ["stage", "reason"],
                        registry=REGISTRY)
SEQUENCE_GAPS = Counter("k2_sequence_gaps", "Sequence gaps by severity (warning, alert, halt)",
                        ["stage", "severity"], registry=REGISTRY)
SEQUENCE_ANOMALIES = Counter("k2_sequence_anomalies", "Duplicate and out-of-order sequence numbers",
                             ["stage", "kind"], registry=REGISTRY)
FEED_MESSAGES = Counter("k2_feed_messages", "Ticks received from a live feed", ["kind"], registry=REGISTRY)
FEED_LAG = Gauge("k2_feed_lag_seconds", "Feed server send time to receipt, for the latest tick", registry=REGISTRY)
FEED_LAST_MESSAGE = Gauge("k2_feed_last_message_timestamp_seconds", "When the feed last sent anything (Unix time)",
                          registry=REGISTRY)
FEED_RECONNECTS = Counter("k2_feed_reconnects", "Feed connections lost or refused, then retried", registry=REGISTRY)
FEED_CONNECTED = Gauge("k2_feed_connected", "1 while the feed connection is up", registry=REGISTRY)

# stream
MESSAGES_CONSUMED = Counter("k2_messages_consumed", "Messages the stream read from Kafka (rows, tombstones and "
                            "poison alike; committed or not)", ["table"], registry=REGISTRY)
STREAM_STALLS = Counter("k2_stream_stalls", "A writer behind the log that fetched nothing, by remedy: its "
                        "partitions sought again (reseek) or a new consumer (rejoin)", ["table", "remedy"],
                        registry=REGISTRY)
ROWS_WRITTEN = Counter("k2_rows_written", "Rows committed to Iceberg", ["table"], registry=REGISTRY)
FILES_WRITTEN = Counter("k2_files_written", "Data files committed to Iceberg", ["table"], registry=REGISTRY)
DUPLICATES_DROPPED = Counter("k2_duplicates_dropped", "Rows dropped by de-duplication", ["table"],
                             registry=REGISTRY)
COMMIT_DURATION = Histogram("k2_commit_duration_seconds", "Iceberg commit duration", ["table"],
                            buckets=_LATENCY_BUCKETS, registry=REGISTRY)
COMMITS = Counter("k2_commits", "Iceberg commits by outcome", ["table", "outcome"], registry=REGISTRY)
BATCH_ROWS = Histogram("k2_batch_rows", "Rows per micro-batch", ["table"],
                       buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000), registry=REGISTRY)
CONSUMER_LAG = Gauge("k2_consumer_lag", "Messages behind the log end", ["table", "topic", "partition"],
                     registry=REGISTRY)
SNAPSHOTS = Gauge("k2_table_snapshots", "Snapshots retained per table", ["table"], registry=REGISTRY)
# Freshness is `time() - k2_table_newest_tick_timestamp_seconds`: it keeps growing when commits stop.
NEWEST_TICK = Gauge("k2_table_newest_tick_timestamp_seconds", "Exchange time of the newest tick the table holds, "
                    "as its snapshot records it (Unix time)", ["table"], registry=REGISTRY)
LAST_COMMIT = Gauge("k2_table_last_commit_timestamp_seconds", "When this writer last committed to the table "
                    "(Unix time), empty batches included", ["table"], registry=REGISTRY)

# dependencies (registry, catalog, storage, Kafka): transient failures are retried, never dead-lettered
DEPENDENCY_ERRORS = Counter("k2_dependency_errors", "Transient dependency failures, each followed by a retry",
                            ["dependency"], registry=REGISTRY)
DEPENDENCY_RETRY_SECONDS = Counter("k2_dependency_retry_seconds", "Time spent backing off before retrying a "
                                   "dependency", ["dependency"], registry=REGISTRY)

# query + API
HTTP_REQUESTS = Counter("k2_http_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
HTTP_DURATION = Histogram("k2_http_request_duration_seconds", "HTTP request duration", ["method", "route"],
                          buckets=_LATENCY_BUCKETS, registry=REGISTRY)
HTTP_CONNECTIONS_CUT = Counter("k2_http_connections_cut", "Connections the API cut: request not received in time "
                               "(request_timeout) or response not taken (write_timeout)", ["reason"],
                               registry=REGISTRY)
QUERY_EXECUTIONS = Counter("k2_query_executions", "Engine queries", ["query", "outcome"], registry=REGISTRY)
QUERY_DURATION = Histogram("k2_query_duration_seconds", "Engine query duration", ["query"],
                           buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ROWS_RETURNED = Counter("k2_query_rows_returned", "Rows returned to clients", ["query"], registry=REGISTRY)
QUERY_CACHE_LOOKUPS = Counter("k2_query_cache_lookups", "Result cache lookups (hit, miss)", ["query", "result"],
                              registry=REGISTRY)
ROLLUP_FILES = Counter("k2_query_rollup_files", "Data files whose per-minute partials a query used, "
                       "by whether they were held, computed for it, or too large for K2_QUERY_ROLLUP_MB "
                       "(SQL answered)", ["result"], registry=REGISTRY)
ROLLUP_BYTES = Gauge("k2_query_rollup_bytes", "Bytes of data files' partials held", registry=REGISTRY)
HELD_TICK_FILES = Counter("k2_query_held_tick_files", "Data files whose decoded ticks a page used, by whether "
                          "they were held, read for it, or too large for K2_QUERY_TICK_CACHE_MB (SQL answered)",
                          ["result"], registry=REGISTRY)
HELD_TICK_BYTES = Gauge("k2_query_held_tick_bytes", "Bytes of data files' decoded ticks held", registry=REGISTRY)
QUERY_CACHE_BYTES = Gauge("k2_query_cache_bytes", "Bytes of results held by the result cache", registry=REGISTRY)
STREAM_SUBSCRIBERS = Gauge("k2_stream_subscribers", "WebSocket subscribers of live ticks", ["kind"],
                           registry=REGISTRY)
LIVE_TAIL_ROWS = Gauge("k2_live_tail_rows", "Ticks past the newest snapshot the API holds for REST queries",
                       ["kind"], registry=REGISTRY)
STREAM_TICKS = Counter("k2_stream_ticks", "Live ticks read by the API's Kafka consumer", ["kind"], registry=REGISTRY)
# From the Kafka record's timestamp (its producer's clock: CreateTime) to the hand-off to subscribers'
# event loop, for the oldest tick of each push: what a subscriber waits, less the last WebSocket hop.
STREAM_PUSH_DELAY = Histogram("k2_stream_push_delay_seconds", "Produce to a live tick handed to its subscribers",
                              ["kind"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                              registry=REGISTRY)
STREAM_DISCONNECTS = Counter("k2_stream_disconnects", "WebSocket subscribers cut off, by reason", ["kind", "reason"],
                         registry=REGISTRY)

# operator
RECONCILES = Counter("k2_operator_reconcile", "Reconciliations", ["kind", "outcome"], registry=REGISTRY)
RECONCILE_DURATION = Histogram("k2_operator_reconcile_duration_seconds", "Reconciliation duration", ["kind"],
                               buckets=_LATENCY_BUCKETS, registry=REGISTRY)
RECONCILE_ERRORS = Counter("k2_operator_reconcile_errors", "Failed reconciliations", ["kind", "reason"],
                           registry=REGISTRY)
MANAGED_RESOURCES = Gauge("k2_operator_resources", "Custom resources by Ready state", ["kind", "ready"],
                          registry=REGISTRY)
# `resource_namespace`, not `namespace`: Prometheus gives that label the scraped pod's namespace.
RESOURCE_READY = Gauge("k2_operator_resource_ready", "1 while the custom resource is Ready, else 0",
                       ["kind", "resource_namespace", "resource"], registry=REGISTRY)


def exported_metric_names() -> set[str]:
    """Every sample name a scrape can show (counters gain `_total`, histograms `_bucket`…),
    the process and platform collectors' included."""
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        if metric.type == "counter":
            names.update({f"{metric.name}_total", f"{metric.name}_created"})
        elif metric.type == "histogram":
            names.update(f"{metric.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
    return names


_configured = False


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """structlog → one JSON object per line on stderr (console rendering on a terminal)."""
    global _configured
    if _configured:
        return
    _configured = True
    if json is None:
        json = not sys.stderr.isatty()
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")


LivenessCheck = Callable[[], tuple[bool, str]]
_liveness: list[LivenessCheck] = []


@contextmanager
def liveness(check: LivenessCheck) -> Iterator[None]:
    """While inside, `/livez` on the metrics port answers 503 with the reason when `check` fails:
    a workload that can hang without crashing (a silent feed) says so to its liveness probe."""
    _liveness.append(check)
    try:
        yield
    finally:
        _liveness.remove(check)


_served: list[CollectorRegistry] = [REGISTRY]


@contextmanager
def serving(registry: CollectorRegistry) -> Iterator[None]:
    """While inside, the metrics port serves `registry` instead of this process's own (a process
    that supervises others serves what they record)."""
    _served.append(registry)
    try:
        yield
    finally:
        _served.remove(registry)


def processes_registry(path: str) -> CollectorRegistry:
    """The metrics that processes started with `PROMETHEUS_MULTIPROC_DIR=path` record (prometheus-
    client's multiprocess mode: a gauge gains a `pid` label), and this process's own CPU, memory
    and interpreter figures."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return _with_process_figures(registry)


def _app() -> Callable:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") != "/livez":
            return make_wsgi_app(_served[-1])(environ, start_response)
        failing = [reason for ok, reason in (check() for check in list(_liveness)) if not ok]
        start_response("503 Service Unavailable" if failing else "200 OK", [("Content-Type", "text/plain")])
        return [("\n".join(failing) or "ok").encode()]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:  # probes every few seconds are not news
        pass


def serve_metrics(port: int, host: str = "") -> WSGIServer | None:
    """Expose the registry (and `/livez`) on its own port, for workloads without an HTTP server."""
    if not port:
        return None
    server = make_server(host, port, _app(), ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="k2-metrics", daemon=True).start()
    return server
