"""Time travel, replay modes and cursors pinned to snapshots, on a lakehouse that keeps growing
while it is read; freshness of new commits; concurrent readers and writers."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyiceberg.expressions import EqualTo
from starlette.testclient import TestClient

from k2 import tables
from k2.api.app import create_app
from k2.query.engine import METADATA_MAX_AGE, Engine
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY

pytestmark = [pytest.mark.integration, pytest.mark.asx]
SYMBOLS = {"DVN", "MWR"}
DAYS = [dt.date(2014, 3, d) for d in range(10, 15)]


@pytest.fixture
def growing(asx_root, lakehouse_settings_for, tmp_path) -> Iterator[tuple[TestClient, Callable[[dt.date], int]]]:
    """An API over DVN and MWR trades of the first day, and `append(day)` to commit another day."""
    settings = lakehouse_settings_for(tmp_path)
    load_asx(settings, asx_root, symbols=SYMBOLS, days=DAYS[:1], kinds=("trades",))
    engine = Engine(settings)

    def append(day: dt.date) -> int:
        return load_asx(settings, asx_root, symbols=SYMBOLS, days=[day], kinds=("trades",))["trades"][-1]

    with TestClient(create_app(settings, engine=engine), headers={"X-API-Key": DEV_API_KEY}) as client:
        yield client, append
    engine.close()


def _expected(oracle, days) -> list[tuple[str, str, int]]:
    rows = [t for (s, d), ts in oracle.trades.items() if s in SYMBOLS and d in days for t in ts]
    rows.sort(key=lambda t: (t.ts_us, t.symbol, t.sequence_number))
    return [(t.symbol, t.local.date().isoformat(), t.sequence_number) for t in rows]


def _keys(rows: list[dict]) -> list[tuple[str, str, int]]:
    return [(r["symbol"], r["exchange_date"], r["sequence_number"]) for r in rows]


def _replay(api, body: dict, *, limit: int = 7, between_pages=None) -> tuple[list[dict], dict]:
    rows, cursor, first = [], None, None
    while True:
        page = api.post("/v1/replay", json={**body, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        page = page.json()
        first = first or page
        assert page["snapshot_id"] == first["snapshot_id"]
        rows.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return rows, first
        if between_pages:
            between_pages()


def test_cursor_pages_stay_on_their_snapshot_while_writers_append(growing, asx_oracle) -> None:
    api, append = growing
    days = iter(DAYS[1:])

    def append_next_day() -> None:
        if (day := next(days, None)) is not None:
            append(day)

    rows, first = _replay(api, {"mode": "cold_start"}, limit=3, between_pages=append_next_day)
    assert next(days, None) is None, "every day was appended while paging"
    assert _keys(rows) == _expected(asx_oracle, DAYS[:1])
    # …and meanwhile the table did grow: a new replay (once metadata is reloaded) sees everything.
    time.sleep(METADATA_MAX_AGE)
    everything, latest = _replay(api, {"mode": "cold_start"}, limit=500)
    assert latest["snapshot_id"] != first["snapshot_id"]
    assert _keys(everything) == _expected(asx_oracle, DAYS)


def test_catch_up_reads_exactly_what_was_appended(growing, asx_oracle) -> None:
    api, append = growing
    rows, first = _replay(api, {"mode": "cold_start"})
    append(DAYS[1])
    append(DAYS[2])
    time.sleep(METADATA_MAX_AGE)
    caught_up, page = _replay(api, {"mode": "catch_up", "since_snapshot_id": first["snapshot_id"]}, limit=11)
    assert page["since_snapshot_id"] == first["snapshot_id"]
    assert _keys(caught_up) == _expected(asx_oracle, DAYS[1:3])
    assert _keys(rows + caught_up) == _expected(asx_oracle, DAYS[:3])
    nothing, _ = _replay(api, {"mode": "catch_up", "since_snapshot_id": page["snapshot_id"]})
    assert nothing == []


def test_catch_up_refuses_to_cross_a_delete(growing) -> None:
    api, append = growing
    _, first = _replay(api, {"mode": "cold_start"})
    append(DAYS[1])
    table = tables.catalog(api.app.state.settings).load_table("market.trades")
    table.delete(EqualTo("symbol", "MWR"))
    time.sleep(METADATA_MAX_AGE)
    response = api.post("/v1/replay", json={"mode": "catch_up", "since_snapshot_id": first["snapshot_id"]})
    assert response.status_code == 409
    assert "not an append" in response.json()["error"]["message"]


def test_rewind_by_snapshot_id_and_by_time(growing, asx_oracle) -> None:
    api, append = growing
    first_snapshot = api.get("/v1/stats").json()["data"][0]["snapshot_id"]
    append(DAYS[1])
    time.sleep(0.01)  # snapshot timestamps are in ms: keep the two commits apart
    append(DAYS[2])
    time.sleep(METADATA_MAX_AGE)
    history = {s["snapshot_id"]: s for s in api.get("/v1/snapshots", params={"table": "trades"}).json()["data"]}
    assert len(history) == 3 and first_snapshot in history
    second = next(s for s in history.values() if s["parent_id"] == first_snapshot)

    by_id, _ = _replay(api, {"mode": "rewind", "snapshot_id": first_snapshot})
    assert _keys(by_id) == _expected(asx_oracle, DAYS[:1])
    by_time, page = _replay(api, {"mode": "rewind", "as_of": second["committed_at"]})
    assert page["snapshot_id"] == second["snapshot_id"]
    assert _keys(by_time) == _expected(asx_oracle, DAYS[:2])

    exported = api.post(f"/v1/snapshots/{first_snapshot}/query", json={"table": "trades", "symbols": sorted(SYMBOLS)})
    assert _keys(exported.json()["data"]) == _expected(asx_oracle, DAYS[:1])
    as_of = api.post("/v1/trades/query", json={"symbols": sorted(SYMBOLS), "as_of": second["committed_at"]})
    assert _keys(as_of.json()["data"]) == _expected(asx_oracle, DAYS[:2])

    assert api.post("/v1/snapshots/12345/query", json={"table": "trades", "symbols": ["DVN"]}).status_code == 404
    before = {"mode": "rewind", "as_of": "2000-01-01T00:00:00Z"}
    assert api.post("/v1/replay", json=before).status_code == 404


def test_new_commits_are_visible_within_a_second(growing) -> None:
    api, append = growing
    api.get("/v1/stats")  # metadata is now cached
    committed = append(DAYS[1])
    started = time.monotonic()
    while api.get("/v1/stats").json()["data"][0]["snapshot_id"] != committed:
        assert time.monotonic() - started < 1.0, "commit not visible within a second"
        time.sleep(0.02)


def test_concurrent_readers_and_a_writer(growing, asx_oracle) -> None:
    """Readers page through replays while a writer appends day after day; every replay is exactly
    the rows of the snapshot its first page pinned."""
    api, append = growing
    expected_by_snapshot = {api.get("/v1/stats").json()["data"][0]["snapshot_id"]: _expected(asx_oracle, DAYS[:1])}
    writing = threading.Event()

    def writer() -> None:
        for n, day in enumerate(DAYS[1:], start=2):
            expected_by_snapshot[append(day)] = _expected(asx_oracle, DAYS[:n])
        writing.set()

    def reader(_: int) -> list[tuple[int, list]]:
        seen = []
        while True:
            rows, page = _replay(api, {"mode": "cold_start"}, limit=13)
            seen.append((page["snapshot_id"], _keys(rows)))
            if writing.is_set():
                return seen

    with ThreadPoolExecutor(max_workers=5) as pool:
        readers = [pool.submit(reader, i) for i in range(4)]
        pool.submit(writer).result()
        results = [r.result() for r in readers]
    for seen in results:
        for snapshot_id, keys in seen:
            assert keys == expected_by_snapshot[snapshot_id]
