"""REST freshness on the real Kafka + registry: with a live tail, a query of the latest data sees
the ticks the stream has not committed yet — exactly those the stream will store (a re-ingested
file's duplicates are dropped as the stream drops them), only those its key is entitled to — and
once the stream has committed them, the same query answers the same rows. Time travel reads its
snapshot only."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from k2 import tables
from k2.api.app import create_app
from k2.api.auth import digest
from k2.ingest.pipeline import ingest_files
from k2.settings import Settings
from k2.stream.runner import run as stream_run
from k2_synthetic import generate

pytestmark = pytest.mark.integration
KEY = ("symbol", "exchange_date", "sequence_number")
RIO_KEY = "k2_rio_desk_key"
UNRESTRICTED_KEY = "k2-unrestricted"
ENTITLEMENTS = {"keys": [{"id": "desk-rio", "sha256": digest(RIO_KEY), "symbols": ["RIO"]},
                         {"id": "ops", "sha256": digest(UNRESTRICTED_KEY), "stream": True}]}


def _stored(settings: Settings) -> list[dict]:
    table = tables.catalog(settings).load_table(settings.table_identifier("trades"))
    return table.scan(selected_fields=KEY).to_arrow().to_pylist()


def _latest(client: TestClient, symbols: list[str], **extra: object) -> list[dict]:
    response = client.post("/v1/trades/query", json={"symbols": symbols, **extra})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _keys(rows: list[dict]) -> Counter:
    return Counter((r["symbol"], str(r["exchange_date"]), r["sequence_number"]) for r in rows)


def test_rest_answers_uncommitted_ticks_as_the_stream_will_store_them(tmp_path, embedded_settings):
    settings = embedded_settings.model_copy(update={
        "live_tail_rows": 1_000_000, "api_keys": SecretStr(json.dumps(ENTITLEMENTS))})
    day1 = generate(tmp_path / "day1", symbols=2, days=1, seed=21)
    ingest_files(day1, settings, kinds=("trades",))
    stream_run(settings, ("trades",), until_idle=1.0)
    committed = _stored(settings)
    symbols = sorted({r["symbol"] for r in committed})
    app = create_app(settings)
    with TestClient(app, headers={"X-API-Key": UNRESTRICTED_KEY}) as client:
        before = time.monotonic()
        while "trades" not in app.state.hub.tails and time.monotonic() - before < 60:
            time.sleep(0.1)
        assert "trades" in app.state.hub.tails, "the hub never opened the trades tail"
        day2 = generate(tmp_path / "day2", symbols=2, days=1, seed=21, start=dt.date(2014, 3, 11))
        produced = ingest_files(day2, settings, kinds=("trades",)).produced[settings.topic("trades")]
        ingest_files(day1, settings, kinds=("trades",))  # the same ticks again: not news

        asked_at = dt.datetime.now(dt.UTC)
        deadline, rows = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            rows = _latest(client, symbols)
            if len(rows) >= len(committed) + produced:
                break
            time.sleep(0.2)
        time.sleep(1)  # anything the tail wrongly keeps (a duplicate) has arrived by now
        rows = _latest(client, symbols)
        assert len(_stored(settings)) == len(committed), "the stream committed meanwhile: the test proves nothing"
        keys = _keys(rows)
        assert max(keys.values()) == 1, "a tick answered twice"
        assert len(keys) == len(committed) + produced
        assert _keys(_latest(client, symbols, as_of=asked_at.isoformat())) == _keys(committed), \
            "time travel reads its snapshot only"
        page = client.get("/v1/trades", params={"symbol": symbols[0], "start": "2014-03-10T12:00:00Z"}).json()
        assert page["data"] and {r["exchange_date"] for r in page["data"]} == {"2014-03-11"}, \
            "the first page is live too"
        rio = client.get("/v1/trades", params={"start": "2014-03-10T12:00:00Z"}, headers={"X-API-Key": RIO_KEY})
        assert rio.status_code == 200 and rio.json()["data"], rio.text[:300]
        assert {r["symbol"] for r in rio.json()["data"]} == {"RIO"}, "the tail's rows pass the key's scope too"

        stream_run(settings, ("trades",), until_idle=1.0)
        assert _keys(_stored(settings)) == keys, "the tail answered other ticks than the stream stored"
        assert sorted(map(str, _latest(client, symbols))) == sorted(map(str, rows)), \
            "the answer changed when the stream committed"
