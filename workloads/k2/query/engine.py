"""DuckDB over K2's Iceberg tables, with no DuckDB extension installed or downloaded at run time.

pyiceberg plans every scan (partition pruning on `exchange_date`, file pruning on column bounds,
time travel by snapshot) and DuckDB reads the planned Parquet files with projection and predicate
pushdown: local files through its own Parquet reader, object storage through a pyarrow dataset.

Concurrency: one DuckDB database per process, and one cursor (a connection to that database) per
query, which is how DuckDB is meant to be used from many threads. Table metadata is served
stale-while-revalidate: older than `metadata_ttl` (0.1 s), a background thread reloads it while
queries go on with the copy they have; older than `metadata_max_age` (0.25 s; e.g. after an idle
spell) a query reloads it before reading. So a commit is visible to queries within a quarter of a
second, and under steady traffic no query waits for the catalog. A reload asks the catalog where
the metadata file is and reads the file only when a commit moved it: the file lists every kept
snapshot, and reading it ten times a second would cost more than the queries.

Two caches rest on the same fact, that a snapshot never changes: planned files by (snapshot,
filter), and query results by (query, parameters, the snapshots and files read). Neither needs
invalidation, only a bound on its size; a new commit simply makes new keys. Results are held up
to `query_cache_mb` (K2_QUERY_CACHE_MB) per process, least recently used out first.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import importlib.abc
import importlib.util
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

import cachetools
import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import structlog
from prometheus_client import Counter, Gauge
from pyarrow.fs import S3FileSystem
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import DataFile, DataFileContent, ManifestEntryStatus
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from k2 import schemas, tables
from k2.observability import (
    HELD_TICK_BYTES,
    HELD_TICK_FILES,
    QUERY_CACHE_BYTES,
    QUERY_CACHE_LOOKUPS,
    QUERY_DURATION,
    QUERY_EXECUTIONS,
    ROLLUP_BYTES,
    ROLLUP_FILES,
    ROWS_RETURNED,
)
from k2.query import planning
from k2.query.errors import Conflict, NotFound, Unavailable
from k2.query.filters import TICK_KINDS, TickFilter, TickKind, micros
from k2.query.scope import Scope
from k2.query.sql import EXACT_RATIO_MACRO
from k2.query.tail import KindTail, TailRows
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.query")

METADATA_TTL = 0.1  # seconds: older metadata is reloaded in the background
METADATA_MAX_AGE = 0.25  # seconds: a commit is visible to queries this soon after it lands
PLAN_CACHE_SIZE = 512
V = TypeVar("V")
STREAM_BATCH_ROWS = 65_536
_PARAMETER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_MEMORY_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("k2_query_memory_only", default=False)


class WouldBlock(Exception):
    """Raised under `memory_only()` where answering would wait: on the catalog, on storage, on
    another thread's metadata load or on DuckDB."""


@contextmanager
def memory_only() -> Iterator[None]:
    """Answer from what the process holds (metadata, plans, cached results, rollups, held ticks,
    the live tail) or raise `WouldBlock` before waiting on anything: for a caller on an event loop,
    which then hands the request to a thread. Work done before the raise is only lookups, done
    again by the thread (and counted twice: held files' hits, the result cache's misses)."""
    token = _MEMORY_ONLY.set(True)
    try:
        yield
    finally:
        _MEMORY_ONLY.reset(token)


def _may_block() -> None:
    if _MEMORY_ONLY.get():
        raise WouldBlock


class _AbsentModule(importlib.abc.MetaPathFinder):
    """Fails the import of a module known to be absent at once, instead of searching sys.path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


class _WithoutPandas:
    """While DuckDB binds and starts a query, `import pandas` fails at once when pandas is absent.

    DuckDB's Python client tries `import pandas` twice for every bound parameter (to recognise
    pandas values; docs/duckdb-pandas-probe.md); Python does not cache a failed import, so each
    attempt walks sys.path: about 90 µs a parameter, 1-2 ms a query. The finder is on sys.meta_path
    only while some query is being started, never merely because K2 was imported; it answers what
    a search would (pandas is looked for once, on first use).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._finder: _AbsentModule | None = None
        self._checked = False

    def __enter__(self) -> None:
        with self._lock:
            if not self._checked:
                self._checked = True
                if importlib.util.find_spec("pandas") is None:
                    self._finder = _AbsentModule("pandas")
            if self._finder is not None:
                if not self._active:
                    sys.meta_path.insert(0, self._finder)
                self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._finder is not None:
                self._active -= 1
                if not self._active:
                    sys.meta_path.remove(self._finder)


_without_pandas = _WithoutPandas()


@dataclass(frozen=True)
class Pin:
    """The table version a query reads; every page of one cursor reads the same one."""

    kind: TableKind
    table: Table | None  # None: the table has not been created yet
    snapshot: Snapshot | None  # None: the table holds no data yet
    since: Snapshot | None = None  # catch-up: only rows appended after this snapshot
    tail: TailRows | None = None  # live: ticks in Kafka past the snapshot, read with it (k2.query.tail)

    @property
    def snapshot_id(self) -> int | None:
        return self.snapshot.snapshot_id if self.snapshot else None

    @property
    def existing_table(self) -> Table:
        """The table, where only a pin of a table with data gets (planning, reading)."""
        if self.table is None:
            raise NotFound(f"{self.kind} does not exist yet")
        return self.table

    @property
    def existing_snapshot(self) -> Snapshot:
        if self.snapshot is None:
            raise NotFound(f"{self.kind} holds no data yet")
        return self.snapshot

    @property
    def since_snapshot_id(self) -> int | None:
        return self.since.snapshot_id if self.since else None

    def arrow_schema(self) -> pa.Schema:
        return self.table.schema().as_arrow() if self.table else schemas.arrow_schema(self.kind)


@dataclass(frozen=True)
class Scan:
    """The planned input of one table reference in a query."""

    pin: Pin
    row_filter: BooleanExpression
    files: tuple[DataFile, ...]
    has_deletes: bool = False
    scope: Scope | None = None  # every row read passes its predicate
    # Of a tick table's files, least exchange_timestamp first: each one's least and greatest (µs).
    # None where that is not known of every file, or deletes apply to them.
    time_bounds: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class _Planned:
    """A plan's files, as `Scan` holds them."""

    files: tuple[DataFile, ...]
    has_deletes: bool = False
    time_bounds: tuple[tuple[int, int], ...] | None = None

    def by_time(self, table: Table) -> _Planned:
        """The files least exchange_timestamp first, with their bounds, where every file has them."""
        bounds = planning.column_bounds(table, self.files, "exchange_timestamp")
        known = [(low, high) for low, high in bounds if low is not None and high is not None]
        if len(known) < len(bounds):
            return self
        ordered = sorted(zip(known, self.files, strict=True), key=lambda pair: pair[0])
        return _Planned(tuple(f for _, f in ordered), self.has_deletes, tuple(b for b, _ in ordered))


@dataclass(frozen=True)
class ResultStream:
    """A running query's result: iterate `batches` once; finishing or closing it frees the cursor."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]


class Engine:
    def __init__(self, settings: Settings, *, metadata_ttl: float = METADATA_TTL,
                 metadata_max_age: float = METADATA_MAX_AGE) -> None:
        if not 0 < metadata_ttl <= metadata_max_age:
            raise ValueError("need 0 < metadata_ttl <= metadata_max_age")
        self.settings = settings
        self._ttl = metadata_ttl
        self._max_age = metadata_max_age
        self._catalog: Catalog | None = None
        self._catalog_lock = threading.RLock()
        # kind → (monotonic time its load started, table); a load started at t saw every commit before t.
        self._tables: dict[TableKind, tuple[float, Table | None]] = {}
        self._tables_lock = threading.Lock()
        self._load_locks: dict[TableKind, threading.Lock] = {}
        self._reloading: set[TableKind] = set()
        self._reloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-metadata")
        self._plans: LockedLRU[tuple[BooleanExpression, _Planned]] = LockedLRU(PLAN_CACHE_SIZE)
        self.manifests = planning.ManifestCache()
        cache_bytes = settings.query_cache_mb * 2**20
        self._results: LockedLRU[pa.Table] | None = (
            LockedLRU(cache_bytes, getsizeof=_result_size) if cache_bytes else None)
        # Files' partial aggregates (k2.query.rollups) and rows in symbol order (k2.query.heldticks).
        self.rollups: PerFile[Any] | None = (
            PerFile(settings.query_rollup_mb, ROLLUP_FILES, ROLLUP_BYTES, "computed") if settings.query_rollup_mb
            else None)
        self.held_ticks: PerFile[Any] | None = (
            PerFile(settings.query_tick_cache_mb, HELD_TICK_FILES, HELD_TICK_BYTES, "read")
            if settings.query_tick_cache_mb else None)
        self._s3: S3FileSystem | None = None
        self._db = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False})
        self._db.execute("SET GLOBAL TimeZone = 'UTC'")  # results come back as UTC instants
        if settings.query_threads:
            self._db.execute(f"SET GLOBAL threads = {int(settings.query_threads)}")
        if settings.query_memory_mb:
            self._db.execute(f"SET GLOBAL memory_limit = '{int(settings.query_memory_mb)}MiB'")
        self._db.execute(EXACT_RATIO_MACRO)
        self._db_lock = threading.Lock()
        self._tails: Mapping[TickKind, KindTail] = {}

    def attach_tails(self, tails: Mapping[TickKind, KindTail]) -> None:
        """Live tails (from the API's hub) that `pin(..., live=True)` adds to the latest snapshot."""
        self._tails = tails

    # catalog and table versions ----------------------------------------------------------------
    def _get_catalog(self) -> Catalog:
        # Built lazily and rebuilt after a failure, so the API starts (and reports not-ready)
        # while the catalog database is still coming up.
        with self._catalog_lock:
            if self._catalog is None:
                try:
                    self._catalog = tables.catalog(self.settings)
                except Exception as exc:
                    raise self._unreachable(exc) from exc
            return self._catalog

    def _unreachable(self, exc: Exception) -> Unavailable:
        """Forget the catalog (the next call reconnects) and say why it failed."""
        with self._catalog_lock:
            self._catalog = None
        log.warning("query.catalog_unreachable", error=str(exc))
        return Unavailable(f"catalog unreachable: {exc}")

    def table(self, kind: TableKind, *, fresh: bool = False) -> Table | None:
        """The table's metadata: at most `metadata_max_age` old, or reloaded now when `fresh`."""
        with self._tables_lock:
            loaded = self._tables.get(kind)
            age = time.monotonic() - loaded[0] if loaded else math.inf
            if loaded is not None and not fresh and age < self._max_age:
                if age >= self._ttl and kind not in self._reloading:
                    self._reloading.add(kind)
                    self._reloader.submit(self._reload_in_background, kind)
                return loaded[1]
        # Callers arriving while another one loads share its result, unless they asked for `fresh`.
        now = time.monotonic()
        return self._load(kind, not_before=now if fresh else now - self._max_age)

    def _load(self, kind: TableKind, *, not_before: float) -> Table | None:
        """Reload unless a load that started at or after `not_before` already finished."""
        _may_block()
        with self._tables_lock:
            lock = self._load_locks.setdefault(kind, threading.Lock())
        with lock:  # one load per table at a time: concurrent callers share its result
            with self._tables_lock:
                loaded = self._tables.get(kind)
            if loaded and loaded[0] >= not_before:
                return loaded[1]
            started = time.monotonic()
            previous = loaded[1] if loaded else None
            identifier = self.settings.table_identifier(kind)
            try:
                catalog = self._get_catalog()
                if previous is not None and tables.metadata_location(catalog, identifier) == previous.metadata_location:
                    table: Table | None = previous  # nothing committed since: the same metadata
                else:
                    table = catalog.load_table(identifier)
            except (NoSuchTableError, NoSuchNamespaceError):
                table = None
            except Unavailable:
                raise
            except Exception as exc:
                raise self._unreachable(exc) from exc
            # A new Table object per load: queries holding the previous one keep a consistent view.
            with self._tables_lock:
                self._tables[kind] = (started, table)
            return table

    def _reload_in_background(self, kind: TableKind) -> None:
        try:
            self._load(kind, not_before=time.monotonic())
        except Unavailable:
            pass  # logged; queries reload (and report the failure) once the copy is too old
        finally:
            with self._tables_lock:
                self._reloading.discard(kind)

    def _snapshot(self, kind: TableKind, snapshot_id: int) -> tuple[Table, Snapshot]:
        """A snapshot by id; metadata is reloaded once in case it is newer than the cached copy."""
        for fresh in (False, True):
            table = self.table(kind, fresh=fresh)
            snapshot = table.snapshot_by_id(snapshot_id) if table else None
            if table is not None and snapshot is not None:
                return table, snapshot
        raise NotFound(f"{kind} has no snapshot {snapshot_id} (never existed or expired)")

    def pin(self, kind: TableKind, *, snapshot_id: int | None = None, as_of: dt.datetime | None = None,
            since_snapshot_id: int | None = None, live: bool = False) -> Pin:
        """Choose the version to read: a snapshot id, the one current at `as_of`, or the latest;
        with `since_snapshot_id`, only what was appended after that snapshot. The latest, when
        `live`, comes with the ticks of the live tail past it, if there is one that holds them all."""
        # The start of a catch-up is resolved first: finding it may reload the metadata, and the
        # end must then come from metadata at least as new.
        since = self._snapshot(kind, since_snapshot_id)[1] if since_snapshot_id is not None else None
        table: Table | None
        snapshot: Snapshot | None
        if snapshot_id is not None:
            table, snapshot = self._snapshot(kind, snapshot_id)
        else:
            table = self.table(kind)
            if as_of is not None:
                # Iceberg's snapshot log is in milliseconds.
                snapshot = table.snapshot_as_of_timestamp(micros(as_of) // 1000) if table else None
                if snapshot is None:
                    raise NotFound(f"{kind} had no snapshot at or before that time")
            else:
                snapshot = table.current_snapshot() if table else None
        if since is not None and (table is None or table.snapshot_by_id(since.snapshot_id) is None):
            raise Conflict(f"{kind} was re-created after snapshot {since_snapshot_id}")
        latest = snapshot_id is None and as_of is None and since is None
        tail = self._tail_past(kind, table, snapshot) if live and latest else None
        return Pin(kind, table, snapshot, since, tail)

    def _tail_past(self, kind: TableKind, table: Table | None, snapshot: Snapshot | None) -> TailRows | None:
        tail = self._tails.get(kind) if kind in TICK_KINDS else None
        if tail is None:
            return None
        recorded = tables.recorded_offsets(table, snapshot) if table is not None and snapshot is not None else {}
        return tail.after(recorded.get(self.settings.topic(kind), {}))

    # planning --------------------------------------------------------------------------------
    def plan(self, pin: Pin, flt: TickFilter) -> Scan:
        """The data files of `pin` that may hold rows matching `flt` (cached per snapshot)."""
        timestamped = pin.kind in TICK_KINDS
        if flt.scope is not None:
            flt.scope.check(table=pin.kind)
        if pin.table is None or pin.snapshot is None:
            return Scan(pin, flt.iceberg_filter(timestamped=timestamped), (), scope=flt.scope)
        key = (pin.kind, pin.table.metadata.table_uuid, pin.snapshot_id, pin.since_snapshot_id, flt)
        cached = self._plans.get(key)
        if cached is None:
            # The pyiceberg expression is built only when planning: on a cache hit it is reused.
            row_filter = flt.iceberg_filter(timestamped=timestamped)
            planned = self._plan_files(pin, row_filter)
            if timestamped and not planned.has_deletes:
                planned = planned.by_time(pin.existing_table)
            cached = (row_filter, planned)
            self._plans.put(key, cached)
        row_filter, planned = cached
        return Scan(pin, row_filter, planned.files, planned.has_deletes, flt.scope, planned.time_bounds)

    def _plan_files(self, pin: Pin, row_filter: BooleanExpression) -> _Planned:
        _may_block()
        if pin.since is not None:
            return _Planned(_appended_files(pin.kind, pin.existing_table, pin.since, pin.existing_snapshot,
                                            self.manifests))
        try:
            tasks = planning.plan_files(pin.existing_table, pin.existing_snapshot, row_filter, self.manifests)
        except OSError as exc:
            raise Unavailable(f"cannot read {pin.kind} metadata: {exc}") from exc
        return _Planned(tuple(t.file for t in tasks), any(t.delete_files for t in tasks))

    # execution -------------------------------------------------------------------------------
    def run(self, name: str, sql: str, params: Mapping[str, Any], scans: Mapping[str, Scan], *,
            cacheable: bool = True) -> pa.Table:
        """Run a query to completion. `sql` names each scan as `{alias}`; `name` labels metrics.

        The result is served from the cache when the same query read the same snapshots before;
        pass `cacheable=False` when the answer depends on anything else (the clock, say)."""
        results = self._results if cacheable else None
        key = _result_key(sql, params, scans) if results is not None else None
        if results is not None and key is not None:
            cached = results.get(key)
            QUERY_CACHE_LOOKUPS.labels(name, "miss" if cached is None else "hit").inc()
            if cached is not None:
                ROWS_RETURNED.labels(name).inc(cached.num_rows)
                return cached
        _may_block()
        started = time.perf_counter()
        outcome = "error"
        try:
            with self._cursor() as cur, _storage_errors():
                with _without_pandas:
                    text, bound = self._bind(cur, sql, params, scans)
                    executed = cur.execute(text, bound)
                result = executed.fetch_arrow_table()
            outcome = "ok"
        finally:
            record_query(name, outcome, started)
        ROWS_RETURNED.labels(name).inc(result.num_rows)
        if results is not None and key is not None:
            # one result may fill an eighth of the cache, so that one big answer does not empty it
            QUERY_CACHE_BYTES.set(results.put(key, result, at_most=results.maxsize // 8))
        return result

    def stream(self, name: str, sql: str, params: Mapping[str, Any], scans: Mapping[str, Scan],
               batch_rows: int = STREAM_BATCH_ROWS) -> ResultStream:
        """Start a query now (so errors surface before a response does); its batches come lazily."""
        _may_block()
        started = time.perf_counter()
        cur = self._new_cursor()
        try:
            with _storage_errors():
                with _without_pandas:
                    text, bound = self._bind(cur, sql, params, scans)
                    executed = cur.execute(text, bound)
                reader = executed.fetch_record_batch(batch_rows)
        except BaseException:
            cur.close()
            record_query(name, "error", started)
            raise
        return ResultStream(reader.schema, _drain(name, cur, reader, started))

    def _new_cursor(self) -> duckdb.DuckDBPyConnection:
        with self._db_lock:
            return self._db.cursor()

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self._new_cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _bind(self, cur: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any],
              scans: Mapping[str, Scan]) -> tuple[str, dict[str, Any]]:
        bound = dict(params)
        sources = {alias: self._source(cur, alias, scan, bound) for alias, scan in scans.items()}
        text = sql.format(**sources)
        # DuckDB refuses unused parameters; builders may offer some a query variant does not use.
        used = set(_PARAMETER.findall(text))
        return text, {name: value for name, value in bound.items() if name in used}

    def _source(self, cur: duckdb.DuckDBPyConnection, alias: str, scan: Scan, bound: dict[str, Any]) -> str:
        """The FROM-clause text that reads `scan`, only the rows of its scope."""
        source = self._read(cur, alias, scan, bound)
        if scan.scope is None or not scan.scope.restricts_rows:
            return source
        predicate, params = scan.scope.sql(f"k2_scope_{alias}_")
        bound.update(params)
        return f"(SELECT * FROM {source} WHERE {predicate})"

    def _read(self, cur: duckdb.DuckDBPyConnection, alias: str, scan: Scan, bound: dict[str, Any]) -> str:
        """The FROM-clause text that reads `scan` (registering an Arrow source on `cur` if needed)."""
        stored = self._read_snapshot(cur, alias, scan, bound)
        tail = scan.pin.tail
        if tail is None or not tail.table.num_rows:
            return stored
        cur.register(f"k2_tail_{alias}", tail.table)
        return f"(SELECT * FROM {stored} UNION ALL BY NAME SELECT * FROM k2_tail_{alias})"

    def _read_snapshot(self, cur: duckdb.DuckDBPyConnection, alias: str, scan: Scan, bound: dict[str, Any]) -> str:
        name = f"k2_scan_{alias}"
        if scan.has_deletes:
            # Row-level deletes (merge-on-read, written by other engines): pyiceberg applies them.
            reader = scan.pin.existing_table.scan(row_filter=scan.row_filter,
                                         snapshot_id=scan.pin.snapshot_id).to_arrow_batch_reader()
            cur.register(name, reader)
            return name
        if not scan.files:
            cur.register(name, scan.pin.arrow_schema().empty_table())
            return name
        locations = [PyArrowFileIO.parse_location(f.file_path) for f in scan.files]
        schemes = {scheme for scheme, _, _ in locations}
        if schemes == {"file"}:
            bound[name] = [path for _, _, path in locations]
            return f"read_parquet(${name}, union_by_name = true)"
        if schemes <= {"s3", "s3a"}:
            dataset = pads.dataset([path for _, _, path in locations], schema=scan.pin.arrow_schema(),
                                   format="parquet", filesystem=self._s3_filesystem())
            cur.register(name, dataset)
            return name
        raise Unavailable(f"unsupported warehouse storage {sorted(schemes)}")

    def _s3_filesystem(self) -> S3FileSystem:
        if self._s3 is None:
            s = self.settings
            self._s3 = S3FileSystem(
                endpoint_override=s.s3_endpoint, region=s.s3_region,
                access_key=s.s3_access_key.get_secret_value() if s.s3_access_key else None,
                secret_key=s.s3_secret_key.get_secret_value() if s.s3_secret_key else None)
        return self._s3

    # health ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise `Unavailable` unless both DuckDB and the catalog answer."""
        with self._cursor() as cur:
            cur.execute("SELECT 1").fetchall()
        try:
            self._get_catalog().list_tables(self.settings.namespace)
        except NoSuchNamespaceError:
            pass  # reachable; nothing has been written yet
        except Unavailable:
            raise
        except Exception as exc:
            raise self._unreachable(exc) from exc

    def close(self) -> None:
        self._reloader.shutdown(wait=True)
        self._db.close()


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Data files that cannot be read (storage down, files expired under a query) are a 503."""
    try:
        yield
    except (duckdb.IOException, OSError) as exc:
        raise Unavailable(f"cannot read table data: {exc}") from exc


def _drain(name: str, cur: duckdb.DuckDBPyConnection, reader: pa.RecordBatchReader,
           started: float) -> Iterator[pa.RecordBatch]:
    outcome = "error"
    try:
        for batch in reader:
            ROWS_RETURNED.labels(name).inc(batch.num_rows)
            yield batch
        outcome = "ok"
    except GeneratorExit:
        outcome = "cancelled"  # the client went away mid-stream
        raise
    finally:
        cur.close()
        record_query(name, outcome, started)


class LockedLRU(Generic[V]):
    """A thread-safe least-recently-used cache bounded by `maxsize` (entries, or `getsizeof` units)."""

    def __init__(self, maxsize: int, getsizeof: Callable[[V], int] | None = None) -> None:
        self._cache: cachetools.LRUCache[Hashable, V] = cachetools.LRUCache(maxsize, getsizeof=getsizeof)
        self._lock = threading.Lock()
        self.maxsize = maxsize

    @property
    def currsize(self) -> int:
        return int(self._cache.currsize)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._cache.get(key)

    def fits(self, value: V) -> bool:
        """Whether `value` alone is within `maxsize` (cachetools refuses a larger one)."""
        return bool(self._cache.getsizeof(value) <= self.maxsize)

    def put(self, key: Hashable, value: V, *, at_most: int | None = None) -> int:
        """Keep `value` unless its size is above `at_most`; returns the cache's size after."""
        with self._lock:
            if at_most is None or self._cache.getsizeof(value) <= at_most:
                self._cache[key] = value
            return int(self._cache.currsize)


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


S = TypeVar("S", bound=_Sized)


class PerFile(Generic[S]):
    """Values derived from one data file each, kept up to a byte budget, least recently used out
    first. A data file never changes, so a value is computed once, by the first query needing it.
    Values have `nbytes`; `files` counts each use, held ("hit"), made (`made`), or of a file whose
    value is larger than the whole budget ("too_large"): that file's value is made once, not kept,
    and its callers answer by SQL from then on."""

    def __init__(self, megabytes: int, files: Counter, size: Gauge, made: str) -> None:
        self._held: LockedLRU[S] = LockedLRU(megabytes * 2**20, getsizeof=lambda v: v.nbytes + 1024)
        self._too_large: LockedLRU[bool] = LockedLRU(100_000)  # file keys: bounded, as file paths are not
        self._files, self._size, self._made = files, size, made

    @property
    def currsize(self) -> int:
        return self._held.currsize

    @property
    def budget(self) -> int:
        return self._held.maxsize

    def held(self, pin: Pin, file: DataFile) -> S | None:
        """The value of `file` if it is held (none is made, no use counted)."""
        return self._held.get((pin.kind, file.file_path))

    def get(self, pin: Pin, file: DataFile, make: Callable[[Scan], S]) -> S | None:
        """The value of `file`, made from a scan of that file alone (no tail, no catch-up) if not held;
        None for a file whose value is larger than the budget."""
        key = (pin.kind, file.file_path)
        found = self._held.get(key)
        if found is not None:
            self._files.labels("hit").inc()
            return found
        if self._too_large.get(key):
            self._files.labels("too_large").inc()
            return None
        _may_block()
        found = make(Scan(replace(pin, since=None, tail=None), AlwaysTrue(), (file,)))
        if not self._held.fits(found):
            self._too_large.put(key, True)
            self._files.labels("too_large").inc()
            return None
        self._files.labels(self._made).inc()
        self._size.set(self._held.put(key, found))
        return found


def _result_size(result: pa.Table) -> int:
    return result.nbytes + 1024  # a floor, so that a flood of empty results is bounded too


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a bound parameter value (lists of symbols become tuples)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _result_key(sql: str, params: Mapping[str, Any], scans: Mapping[str, Scan]) -> tuple:
    """What decides a query's result: its text, its values, and exactly which data it reads.
    The types are part of the key: 1 and 1.0 and True bind differently."""
    return (sql,
            tuple(sorted((k, type(v).__name__, _frozen(v)) for k, v in params.items())),
            tuple(sorted((alias, s.pin.kind, s.pin.table.metadata.table_uuid if s.pin.table else None,
                          s.pin.snapshot_id, s.pin.since_snapshot_id, s.pin.tail.reach if s.pin.tail else None,
                          s.has_deletes,
                          tuple(f.file_path for f in s.files), _scope_key(s.scope)) for alias, s in scans.items())))


def _scope_key(scope: Scope | None) -> tuple:
    if scope is None:
        return ()
    return (scope.symbols, tuple(sorted(scope.exchanges)) if scope.exchanges is not None else None)


def record_query(name: str, outcome: str, started: float) -> None:
    QUERY_EXECUTIONS.labels(name, outcome).inc()
    QUERY_DURATION.labels(name).observe(time.perf_counter() - started)


def _appended_files(kind: TableKind, table: Table, since: Snapshot, until: Snapshot,
                    manifests: planning.ManifestCache) -> tuple[DataFile, ...]:
    """Data files added by the append snapshots after `since` up to `until`: Iceberg's
    incremental append scan. Compactions (`replace`) add no rows and are skipped; an overwrite or
    delete in between means earlier reads were not final, so catching up is refused."""
    chain: list[Snapshot] = []
    snapshot: Snapshot | None = until
    while snapshot is not None and snapshot.snapshot_id != since.snapshot_id:
        chain.append(snapshot)
        parent = snapshot.parent_snapshot_id
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
    if snapshot is None:
        raise Conflict(f"snapshot {since.snapshot_id} is not an ancestor of {until.snapshot_id}")
    files: list[DataFile] = []
    for snap in reversed(chain):
        operation = snap.summary.operation if snap.summary else None
        if operation == Operation.REPLACE:
            continue
        if operation != Operation.APPEND:
            raise Conflict(f"{kind} snapshot {snap.snapshot_id} is a {getattr(operation, 'value', operation)}, "
                           "not an append: catch up is only defined over appends; replay with cold_start")
        for manifest in snap.manifests(table.io):
            if manifest.added_snapshot_id != snap.snapshot_id:
                continue
            files.extend(entry.data_file for entry in manifests.entries(table.io, manifest)
                         if entry.status == ManifestEntryStatus.ADDED
                         and entry.data_file.content == DataFileContent.DATA)
    return tuple(files)
