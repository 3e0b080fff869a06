"""The engine's caches: table metadata (stale-while-revalidate within a second, never older) and
query results (by snapshot: never a stale answer).

Real embedded catalog (SQLite + local warehouse) with synthetic ticks; the catalog is made slow
where a test needs to see who waits for it.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from k2.observability import REGISTRY
from k2.query import bars
from k2.query.engine import Engine
from k2.query.filters import exchange_zone, local_midnight
from k2.query.sample import load_asx
from k2.settings import Settings
from k2_synthetic import generate

pytestmark = pytest.mark.unit

TTL, MAX_AGE, SLOW_LOAD = 0.1, 0.6, 0.3


@pytest.fixture
def lakehouse(tmp_path):
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "wh"),
                        namespace="market", s3_endpoint=None, log_level="WARNING",
                        query_rollup_mb=0)  # rollups would answer these summaries and bars without the result cache
    root = generate(tmp_path / "ticks", symbols=1, days=1, seed=1)
    engine = Engine(settings, metadata_ttl=TTL, metadata_max_age=MAX_AGE)
    yield settings, root, engine
    engine.close()


DAY = dt.date(2014, 3, 10)  # the generator's first day


def _append(settings: Settings, root) -> int:
    return load_asx(settings, root, kinds=("trades",))["trades"][-1]


def _slow_catalog(engine: Engine, monkeypatch) -> list[float]:
    """Make every catalog load take SLOW_LOAD seconds; returns the times loads started."""
    catalog = engine._get_catalog()
    original, started = catalog.load_table, []

    def slow_load(identifier):
        started.append(time.monotonic())
        time.sleep(SLOW_LOAD)
        return original(identifier)

    monkeypatch.setattr(catalog, "load_table", slow_load)
    return started


def test_stale_metadata_is_served_while_it_reloads_in_the_background(lakehouse, monkeypatch):
    settings, root, _ = lakehouse
    # A max age far off, so that a slow machine cannot turn the stale read into a blocking reload.
    engine = Engine(settings, metadata_ttl=TTL, metadata_max_age=60)
    first = _append(settings, root)
    assert engine.pin("trades").snapshot_id == first
    loads = _slow_catalog(engine, monkeypatch)
    second = _append(settings, root)
    time.sleep(TTL)

    asked = time.monotonic()
    assert engine.pin("trades").snapshot_id == first, "the cached copy is still young enough to serve"
    assert time.monotonic() - asked < SLOW_LOAD / 2, "a query waited for the reload"
    deadline = time.monotonic() + 5
    while engine.pin("trades").snapshot_id != second:
        assert time.monotonic() < deadline, "the background reload never landed"
        time.sleep(0.02)
    assert len(loads) == 1, "one background reload, however many queries asked meanwhile"
    engine.close()


def test_metadata_older_than_the_max_age_is_reloaded_before_reading(lakehouse):
    settings, root, engine = lakehouse
    first = _append(settings, root)
    assert engine.pin("trades").snapshot_id == first
    second = _append(settings, root)
    time.sleep(MAX_AGE)
    assert engine.pin("trades").snapshot_id == second


def test_a_load_is_shared_by_concurrent_callers(lakehouse, monkeypatch):
    settings, root, _ = lakehouse
    engine = Engine(settings, metadata_ttl=TTL, metadata_max_age=60)
    _append(settings, root)
    loads = _slow_catalog(engine, monkeypatch)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: engine.table("trades"), range(8)))
    engine.close()
    assert len({id(t) for t in results}) == 1 and len(loads) == 1


def test_metadata_is_read_again_only_after_a_commit_changed_it(lakehouse, monkeypatch):
    """Reloading is asking the catalog where the metadata is; the file (every snapshot kept, read
    and parsed) is read only when a commit moved it, so reloads can be frequent and cheap."""
    settings, root, engine = lakehouse
    first = _append(settings, root)
    assert engine.pin("trades").snapshot_id == first
    catalog = engine._get_catalog()
    original, loads = catalog.load_table, []
    monkeypatch.setattr(catalog, "load_table", lambda identifier: loads.append(identifier) or original(identifier))

    for _ in range(5):
        assert engine.table("trades", fresh=True).current_snapshot().snapshot_id == first
    assert loads == []

    second = _append(settings, root)
    assert engine.table("trades", fresh=True).current_snapshot().snapshot_id == second
    assert len(loads) == 1


def test_inconsistent_freshness_settings_are_refused(lakehouse):
    settings, _, _ = lakehouse
    with pytest.raises(ValueError, match="metadata_ttl"):
        Engine(settings, metadata_ttl=2.0, metadata_max_age=1.0)


def _executions() -> float:
    return REGISTRY.get_sample_value("k2_query_executions_total", {"query": "summary", "outcome": "ok"}) or 0.0


def _hits() -> float:
    return REGISTRY.get_sample_value("k2_query_cache_lookups_total", {"query": "summary", "result": "hit"}) or 0.0


def test_a_repeated_query_on_the_same_snapshot_is_served_from_the_cache(lakehouse):
    settings, root, engine = lakehouse
    _append(settings, root)
    executions, hits = _executions(), _hits()
    first = bars.summary(engine, "BHP", DAY)
    again = bars.summary(engine, "BHP", DAY)
    assert first == again and first["trade_count"] > 0
    assert (_executions() - executions, _hits() - hits) == (1, 1)
    assert bars.summary(engine, "RIO", DAY) is None, "another symbol is another question"


@pytest.mark.parametrize("rollup_mb", [0, 64], ids=["sql", "rollups"])
def test_a_new_commit_is_never_answered_from_the_cache(lakehouse, rollup_mb):
    settings, root, _ = lakehouse
    engine = Engine(settings.model_copy(update={"query_rollup_mb": rollup_mb}),
                    metadata_ttl=TTL, metadata_max_age=MAX_AGE)
    try:
        _new_commit_is_read(settings, root, engine)
    finally:
        engine.close()


def _new_commit_is_read(settings: Settings, root, engine: Engine) -> None:
    old_snapshot = _append(settings, root)
    before = bars.summary(engine, "BHP", DAY)
    _append(settings, root)  # the same ticks again: every figure but the prices doubles
    time.sleep(MAX_AGE)
    after = bars.summary(engine, "BHP", DAY)
    assert after["trade_count"] == 2 * before["trade_count"] and after["volume"] == 2 * before["volume"]
    pinned = bars.bars(engine, bars.BarQuery(("BHP",), "1d", *_day_bounds()), max_rows=1,
                       pin=engine.pin("trades", snapshot_id=old_snapshot))
    assert pinned["trade_count"].to_pylist() == [before["trade_count"]], "time travel reads its own snapshot"


def test_with_the_cache_off_every_query_runs(lakehouse):
    settings, root, _ = lakehouse
    _append(settings, root)
    engine = Engine(settings.model_copy(update={"query_cache_mb": 0}))
    try:
        executions = _executions()
        assert bars.summary(engine, "BHP", DAY) == bars.summary(engine, "BHP", DAY)
        assert _executions() - executions == 2
    finally:
        engine.close()


def test_cached_bytes_stay_within_the_budget(lakehouse):
    settings, root, _ = lakehouse
    _append(settings, root)
    engine = Engine(settings.model_copy(update={"query_cache_mb": 1}))
    try:
        def hour_of_bars(minutes: int):
            start = dt.datetime(2014, 3, 10, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=minutes)
            return bars.bars(engine, bars.BarQuery(("BHP",), "1m", start, start + dt.timedelta(hours=1)),
                             max_rows=10_000)

        first = hour_of_bars(0)
        total = 0
        for minutes in range(1, 400):  # many distinct questions: more than a mebibyte of answers
            total += hour_of_bars(minutes).nbytes + 1024
        assert total > 2**20 >= engine._results.currsize > 0
        assert REGISTRY.get_sample_value("k2_query_cache_bytes") == engine._results.currsize
        hits = _hits()
        assert hour_of_bars(0) == first and _hits() == hits, "the oldest answer was evicted, and recomputed"
    finally:
        engine.close()


def _day_bounds() -> tuple[dt.datetime, dt.datetime]:
    zone = exchange_zone("ASX")
    return local_midnight(DAY, zone), local_midnight(DAY + dt.timedelta(days=1), zone)


@pytest.mark.parametrize("threads", [1, 3])
def test_duckdb_threads_follow_the_setting(lakehouse, threads):
    settings, _, _ = lakehouse
    engine = Engine(settings.model_copy(update={"query_threads": threads}))
    try:
        with engine._cursor() as cur:
            assert cur.execute("SELECT current_setting('threads')").fetchone()[0] == threads
    finally:
        engine.close()
