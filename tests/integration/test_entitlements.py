"""Entitlements on the real stack: a key scoped to RIO sees no BHP row through any route (pages,
queries, exports, time travel, replay, aggregations, summaries, symbols, latest quotes, as-of, the
WebSocket), is refused with 403 and the reason when it names BHP, and the refusal is logged with
the correlation id and the key's id. Keys are stored only as digests."""

from __future__ import annotations

import csv
import io
import json

import pytest
import structlog
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from k2.api.app import create_app
from k2.api.auth import digest
from k2.ingest.pipeline import ingest_files
from k2.query.sample import load_asx
from k2_synthetic import generate

pytestmark = pytest.mark.integration
RIO_KEY, QUIET_KEY, QUOTES_KEY = "k2_rio_desk_key", "k2_rio_no_stream_key", "k2_quotes_only_key"
UNRESTRICTED_KEY = "k2-unrestricted"
DAY = "2014-03-10"
START = f"{DAY}T00:00:00+11:00"


@pytest.fixture
def scoped(tmp_path, embedded_settings):
    folder = generate(tmp_path / "ticks", symbols=2, days=1, seed=3)  # BHP and RIO
    snapshots = load_asx(embedded_settings, folder)
    ingest_files(folder, embedded_settings)  # Kafka holds the same ticks, for the stream's live part
    entitlements = {"keys": [
        {"id": "desk-rio", "sha256": digest(RIO_KEY), "symbols": ["RIO"], "exchanges": ["ASX"], "stream": True},
        {"id": "rio-no-stream", "sha256": digest(QUIET_KEY), "symbols": ["RI*"]},
        {"id": "quotes-only", "sha256": digest(QUOTES_KEY), "tables": ["quotes"]},
        {"id": "ops", "sha256": digest(UNRESTRICTED_KEY), "stream": True},
    ]}
    settings = embedded_settings.model_copy(update={"api_keys": SecretStr(json.dumps(entitlements))})
    with TestClient(create_app(settings)) as client:
        yield client, snapshots


def _rio(client: TestClient, method: str, url: str, **kwargs):
    return client.request(method, url, headers={"X-API-Key": RIO_KEY, "X-Correlation-ID": "corr-rls-1"}, **kwargs)


def _rows(client: TestClient, method: str, url: str, **kwargs) -> list[dict]:
    answer = _rio(client, method, url, **kwargs)
    assert answer.status_code == 200, (url, answer.text[:300])
    return answer.json()["data"]


def _symbols_of(rows) -> set[str]:
    return {row["symbol"] for row in rows}


def test_a_rio_key_sees_no_bhp_row_through_any_route(scoped):
    client, snapshots = scoped
    answer = client.get("/v1/symbols", headers={"X-API-Key": UNRESTRICTED_KEY})
    assert answer.status_code == 200, answer.text
    everything = answer.json()["data"]
    assert _symbols_of(everything) == {"BHP", "RIO"}, "the unrestricted key sees both"

    assert _symbols_of(_rows(client, "GET", "/v1/symbols")) == {"RIO"}
    assert _symbols_of(_rows(client, "GET", "/v1/trades", params={"symbol": "RIO", "start": START})) == {"RIO"}
    body = {"mode": "cold_start", "table": "trades", "limit": 1000}
    replay = _rows(client, "POST", "/v1/replay", json=body)
    assert replay and _symbols_of(replay) == {"RIO"}, "replay of every symbol: only RIO rows"
    rewind = _rows(client, "POST", "/v1/replay",
                   json={**body, "mode": "rewind", "snapshot_id": snapshots["trades"][-1]})
    assert rewind and _symbols_of(rewind) == {"RIO"}
    exported = _rio(client, "POST", "/v1/quotes/query", json={"symbols": ["RIO"], "format": "csv"})
    assert {row["symbol"] for row in csv.DictReader(io.StringIO(exported.text))} == {"RIO"}
    stats = _rio(client, "GET", "/v1/stats")
    assert stats.status_code == 200

    for method, url, kwargs in [
        ("GET", "/v1/trades", {"params": {"symbol": "BHP"}}),
        ("GET", "/v1/quotes", {"params": {"symbol": "BHP"}}),
        ("GET", "/v1/trades/asof", {"params": {"symbol": "BHP"}}),
        ("GET", "/v1/quotes/latest", {"params": {"symbol": "BHP"}}),
        ("GET", f"/v1/summary/BHP/{DAY}", {}),
        ("POST", "/v1/trades/query", {"json": {"symbols": ["BHP"]}}),
        ("POST", "/v1/trades/query", {"json": {"symbols": ["RIO", "BHP"], "format": "parquet"}}),
        ("POST", "/v1/replay", {"json": {**body, "symbols": ["BHP"]}}),
        ("POST", f"/v1/snapshots/{snapshots['trades'][-1]}/query", {"json": {"table": "trades", "symbols": ["BHP"]}}),
        ("POST", "/v1/trades/query", {"json": {"symbols": ["BHP"], "as_of": "2099-01-01T00:00:00Z"}}),
        ("POST", "/v1/aggregations", {"json": {"symbols": ["BHP"], "interval": "1d", "start": START,
                                               "end": f"{DAY}T23:00:00+11:00"}}),
        ("GET", "/v1/trades", {"params": {"symbol": "RIO", "exchange": "CRYPTO"}}),
    ]:
        answer = _rio(client, method, url, **kwargs)
        assert answer.status_code == 403, (url, answer.status_code, answer.text[:300])
        error = answer.json()["error"]
        assert error["code"] == "forbidden" and "desk-rio" in error["message"], error


def test_refusals_are_logged_with_correlation_and_key_id(scoped):
    client, _ = scoped
    with structlog.testing.capture_logs() as logs:
        assert _rio(client, "GET", "/v1/trades", params={"symbol": "BHP"}).status_code == 403
    refused = [e for e in logs if e["event"] == "api.forbidden"]
    assert len(refused) == 1 and "BHP" in refused[0]["reason"]
    assert refused[0]["correlation_id"] == "corr-rls-1" and refused[0]["api_key_id"] == "desk-rio"


def test_a_table_scope_and_prefix_patterns(scoped):
    client, _ = scoped
    quotes_only = {"X-API-Key": QUOTES_KEY}
    assert client.get("/v1/quotes", params={"symbol": "BHP"}, headers=quotes_only).status_code == 200
    refused = client.get("/v1/trades", params={"symbol": "BHP"}, headers=quotes_only)
    assert refused.status_code == 403 and "table trades" in refused.json()["error"]["message"]
    assert client.get("/v1/symbols", headers=quotes_only).status_code == 403, "symbols reads the trades table too"
    prefixed = client.get("/v1/symbols", headers={"X-API-Key": QUIET_KEY})
    assert prefixed.status_code == 200 and _symbols_of(prefixed.json()["data"]) == {"RIO"}, "RI* matches RIO only"


def test_the_stream_is_scoped_too(scoped):
    client, _ = scoped
    url = "/v1/stream/trades"
    with client.websocket_connect(f"{url}?symbols=BHP", headers={"X-API-Key": RIO_KEY}) as ws, \
            pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    assert closed.value.code == 1008 and "BHP" in closed.value.reason
    with client.websocket_connect(f"{url}?symbols=RIO", headers={"X-API-Key": QUIET_KEY}) as ws, \
            pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    assert closed.value.code == 1008 and "may not stream" in closed.value.reason
    # every symbol asked for, from the start of the day: Iceberg then Kafka, only RIO
    expected = client.post("/v1/trades/query", json={"symbols": ["RIO"]},
                           headers={"X-API-Key": UNRESTRICTED_KEY}).json()["data"]
    with client.websocket_connect(f"{url}?from={START.replace('+', '%2B')}", headers={"X-API-Key": RIO_KEY}) as ws:
        received = [json.loads(ws.receive_text()) for _ in range(len(expected))]
    assert _symbols_of(received) == {"RIO"}
    assert [r["sequence_number"] for r in received] == list(range(1, len(expected) + 1))


def test_prod_may_run_on_scoped_keys_alone(embedded_settings):
    from k2.settings import DEV_API_KEY

    entitlements = {"keys": [{"id": "desk-rio", "sha256": digest(RIO_KEY), "symbols": ["RIO"]}]}
    settings = embedded_settings.model_copy(update={"mode": "prod", "api_keys": SecretStr(json.dumps(entitlements))})
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/symbols", headers={"X-API-Key": DEV_API_KEY}).status_code == 401
        assert client.get("/v1/symbols", headers={"X-API-Key": RIO_KEY}).status_code == 200
