"""API keys, rate limits, correlation ids, the error shape and metrics, on a real app over a small
synthetic lakehouse (SQLite catalog, local files): no services needed."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import structlog
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from k2.api.app import create_app
from k2.api.auth import DEV_KEY_ID, ApiKeyConfigError, Entitlement, document
from k2.query.engine import Engine
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings
from k2_synthetic import generate

pytestmark = pytest.mark.unit

PATH_VALUES = {"symbol": "BHP", "date": "2014-03-10", "snapshot_id": "1"}


def _v1_routes(app) -> list[tuple[str, str]]:
    operations = []
    for path, item in app.openapi()["paths"].items():
        if path.startswith("/v1/"):
            concrete = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
            operations.extend((method.upper(), concrete) for method in item)
    return operations


@dataclass(frozen=True)
class Lakehouse:
    settings: Settings
    engine: Engine


@pytest.fixture(scope="module")
def lakehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lakehouse]:
    root = tmp_path_factory.mktemp("api-lakehouse")
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{root}/catalog.db", warehouse=str(root / "warehouse"),
                        api_keys=None, api_keys_file=None, rate_limit="100000/minute", s3_endpoint=None)
    load_asx(settings, generate(root / "ticks", symbols=2, days=1, seed=7))
    engine = Engine(settings)
    yield Lakehouse(settings, engine)
    engine.close()


@pytest.fixture
def api(lakehouse: Lakehouse) -> Iterator[TestClient]:
    with TestClient(create_app(lakehouse.settings, engine=lakehouse.engine),
                    headers={"X-API-Key": DEV_API_KEY}) as client:
        yield client


def _keys(**keys: str) -> str:
    """The stored form of unrestricted keys, by id: their digests."""
    return document([Entitlement.of(key_id, key, stream=True) for key_id, key in keys.items()])


def _app(lakehouse, **overrides):
    return create_app(lakehouse.settings.model_copy(update=overrides), engine=lakehouse.engine)


def test_every_v1_route_needs_a_key(lakehouse) -> None:
    app = _app(lakehouse)
    routes = _v1_routes(app)
    assert len(routes) == 14
    with TestClient(app) as client:
        for method, path in routes:
            for headers in ({}, {"X-API-Key": "not-a-key"}):
                response = client.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                error = response.json()["error"]
                assert error["code"] == "unauthorized" and error["status"] == 401
                assert response.headers["WWW-Authenticate"] == "ApiKey"
        # Refused before routing, yet counted under the route asked for, not as unmatched.
        assert 'route="/v1/summary/{symbol}/{date}",status="401"' in client.get("/metrics").text


def test_system_routes_need_no_key(lakehouse) -> None:
    with TestClient(_app(lakehouse)) as client:
        for path in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_configured_keys_replace_the_dev_key(lakehouse) -> None:
    with TestClient(_app(lakehouse, api_keys=SecretStr(_keys(a="alpha", b="beta")))) as client:
        for key, status in (("alpha", 200), ("beta", 200), (DEV_API_KEY, 401), ("alph", 401)):
            assert client.get("/v1/symbols", headers={"X-API-Key": key}).status_code == status, key


def test_prod_mode_refuses_to_start_without_keys(lakehouse) -> None:
    with pytest.raises(ApiKeyConfigError, match="prod"):
        _app(lakehouse, mode="prod")
    with TestClient(_app(lakehouse, mode="prod", api_keys=SecretStr(_keys(prod="prod-key")))) as client:
        assert client.get("/v1/symbols", headers={"X-API-Key": DEV_API_KEY}).status_code == 401
        assert client.get("/v1/symbols", headers={"X-API-Key": "prod-key"}).status_code == 200


def test_keys_file_is_reread_when_rotated(lakehouse, tmp_path) -> None:
    secret = tmp_path / "api-keys"
    secret.write_text("# mounted Secret\n" + _keys(first="first-key"))
    with TestClient(_app(lakehouse, mode="prod", api_keys_file=secret)) as client:
        assert client.get("/v1/stats", headers={"X-API-Key": "first-key"}).status_code == 200
        secret.write_text(_keys(second="second-key", third="third-key"))
        os.utime(secret, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime, however coarse
        assert client.get("/v1/stats", headers={"X-API-Key": "first-key"}).status_code == 401
        assert client.get("/v1/stats", headers={"X-API-Key": "third-key"}).status_code == 200
    assert "first-key" not in secret.read_text() and "third-key" not in secret.read_text()


@pytest.mark.parametrize("mode", ["prod", "dev"])
@pytest.mark.parametrize("stored", [
    "first-key\n",  # the former format: plain keys, one a line
    "first-key, other-key",  # or comma-separated
    "keys: [first-key]",
    "keys: [{id: a, sha256: first-key}]",
    "keys: [{id: a, key: first-key}]",
])
def test_a_stored_plain_key_is_refused_naming_the_fix(lakehouse, tmp_path, mode, stored) -> None:
    secret = tmp_path / "api-keys"
    secret.write_text(stored)
    for source in ({"api_keys_file": secret}, {"api_keys": SecretStr(stored)}):
        with pytest.raises(ApiKeyConfigError) as refused:
            _app(lakehouse, mode=mode, **source)
        message = str(refused.value)
        assert "plain key" in message and "k2 api-key --id" in message, message
        assert "first-key" not in message, "the refusal must not print the key it refuses"


def test_a_second_keys_block_is_refused_not_silently_dropped(lakehouse, tmp_path) -> None:
    # YAML keeps the last of two equal mapping keys: an appended `keys:` block would revoke every
    # key of the first one without a word.
    first, second = _keys(one="one"), _keys(two="two")
    secret = tmp_path / "api-keys"
    secret.write_text(first + second)
    with pytest.raises(ApiKeyConfigError, match="'keys' more than once"):
        _app(lakehouse, api_keys_file=secret)
    secret.write_text(first + "k2_pasted: 1\nk2_pasted: 2\n")  # a name that is no field may be a key
    with pytest.raises(ApiKeyConfigError, match="more than once") as refused:
        _app(lakehouse, api_keys_file=secret)
    assert "k2_pasted" not in str(refused.value)


def test_an_unreadable_keys_file_stops_startup(lakehouse, tmp_path) -> None:
    with pytest.raises(ApiKeyConfigError, match="not readable"):
        _app(lakehouse, api_keys_file=tmp_path / "missing")


def test_rate_limit_is_per_key_with_retry_after(lakehouse) -> None:
    with TestClient(_app(lakehouse, api_keys=SecretStr(_keys(one="one", two="two")), rate_limit="3/minute")) as client:
        for _ in range(3):
            assert client.get("/v1/symbols", headers={"X-API-Key": "one"}).status_code == 200
        limited = client.get("/v1/symbols", headers={"X-API-Key": "one"})
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 'k2_http_requests_total{method="GET",route="/v1/symbols",status="429"}' in client.get("/metrics").text
        assert client.get("/v1/symbols", headers={"X-API-Key": "two"}).status_code == 200
        assert client.get("/health").status_code == 200  # system routes are not limited


def test_correlation_id_round_trip(api) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        ok = api.get("/v1/symbols", headers={"X-Correlation-ID": "req-42.a"})
        failed = api.get("/v1/summary/BHP/2014-03-15", headers={"X-Correlation-ID": "req-43"})
    assert ok.headers["X-Correlation-ID"] == "req-42.a"
    assert failed.status_code == 404
    assert failed.headers["X-Correlation-ID"] == "req-43"
    assert failed.json()["error"]["correlation_id"] == "req-43"
    access = {e["correlation_id"]: e for e in logs if e["event"] == "http.request"}
    assert access["req-42.a"]["route"] == "/v1/symbols" and access["req-42.a"]["status"] == 200
    assert access["req-42.a"]["api_key_id"] == DEV_KEY_ID
    assert access["req-43"]["status"] == 404

    generated = api.get("/health").headers["X-Correlation-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unsafe = api.get("/health", headers={"X-Correlation-ID": "bad id\twith spaces"})
    assert unsafe.headers["X-Correlation-ID"] != "bad id\twith spaces"


def test_validation_errors_name_the_field(api) -> None:
    cases = [
        ("GET", "/v1/trades?limit=0", None, "limit"),
        ("GET", "/v1/trades?limit=10001", None, "limit"),
        ("GET", "/v1/trades?start=2014-03-10T10:00:00", None, "start"),
        ("GET", "/v1/trades?symbol=bhp", None, "symbol"),
        ("GET", "/v1/trades?cursor=garbage", None, "cursor"),
        ("GET", "/v1/summary/BHP/2014-13-01", None, "date"),
        ("POST", "/v1/aggregations", {"symbols": ["BHP"], "interval": "7m", "start": "2014-03-10T00:00:00Z",
                                      "end": "2014-03-11T00:00:00Z"}, "interval"),
        ("POST", "/v1/aggregations", {"symbols": ["BHP"], "interval": "1m", "start": "2014-03-11T00:00:00Z",
                                      "end": "2014-03-10T00:00:00Z"}, "end"),
        ("POST", "/v1/trades/query", {"symbols": ["BHP"], "fields": ["price", "nope"]}, "fields"),
        ("POST", "/v1/trades/query", {"symbols": ["BHP"], "surprise": 1}, "surprise"),
        ("POST", "/v1/replay", {"mode": "rewind"}, "snapshot_id"),
        ("POST", "/v1/replay", {"mode": "catch_up"}, "since_snapshot_id"),
    ]
    for method, path, body, field in cases:
        response = api.request(method, path, json=body)
        assert response.status_code == 422, (path, body, response.text)
        error = response.json()["error"]
        assert error["status"] == 422
        assert field in [d["field"] for d in error["details"]], (path, body, error)


def test_unknown_routes_and_methods_use_the_error_shape(api) -> None:
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/trades", 405)):
        response = api.request(method, path)
        assert response.status_code == status
        assert response.json()["error"]["status"] == status


def test_metrics_are_exported(api) -> None:
    api.get("/v1/trades?symbol=DVN&limit=5")
    text = api.get("/metrics").text
    for sample in ('k2_http_requests_total{method="GET",route="/v1/trades",status="200"}',
                   'k2_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/trades"}',
                   'k2_query_executions_total{outcome="ok",query="trades_page"}',
                   'k2_query_duration_seconds_count{query="trades_page"}',
                   'k2_query_rows_returned_total{query="trades_page"}'):
        assert sample in text, sample


def test_unhandled_errors_keep_the_shape_and_the_correlation_id(lakehouse) -> None:
    app = _app(lakehouse)

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/broken").status_code == 401  # any /v1 route is behind the key, however added
        response = client.get("/v1/broken", headers={"X-Correlation-ID": "bug-1", "X-API-Key": DEV_API_KEY})
    assert response.status_code == 500
    assert response.headers["X-Correlation-ID"] == "bug-1"
    assert response.json()["error"] == {"status": 500, "code": "internal_error", "correlation_id": "bug-1",
                                        "message": "internal error; quote the correlation id when reporting it",
                                        "details": []}


def test_refusals_are_logged_with_the_correlation_id_and_key_id_never_the_key(lakehouse) -> None:
    """A 403 and a refused WebSocket subscription: each logged once with the correlation id and the
    key's id, as the production chain (with structlog's context) renders it; the key itself never."""
    keys = document([Entitlement.of("desk-rio", "k2_rio_secret", symbols=["RIO"], stream=True),
                     Entitlement.of("batch", "k2_batch_secret", symbols=["RIO"])])
    refusals = [  # (how, correlation id, key, event)
        (lambda c, h: c.get("/v1/trades", params={"symbol": "BHP"}, headers=h), "rest-1", "k2_rio_secret",
         "api.forbidden"),
        (lambda c, h: c.websocket_connect("/v1/stream/trades?symbols=BHP", headers=h), "ws-1", "k2_rio_secret",
         "stream.forbidden"),
        (lambda c, h: c.websocket_connect("/v1/stream/trades?symbols=RIO", headers=h), "ws-2", "k2_batch_secret",
         "stream.forbidden"),
    ]
    with TestClient(_app(lakehouse, api_keys=SecretStr(keys))) as client:
        for refuse, correlation, key, event in refusals:
            headers = {"X-API-Key": key, "X-Correlation-ID": correlation}
            with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
                answer = refuse(client, headers)
                if event == "api.forbidden":
                    assert answer.status_code == 403
                else:
                    with answer as ws, pytest.raises(WebSocketDisconnect) as closed:
                        ws.receive_text()
                    assert closed.value.code == 1008 and "forbidden" in closed.value.reason
            refused = [e for e in logs if e["event"] == event]
            assert len(refused) == 1, (correlation, logs)
            expected_id = "desk-rio" if key == "k2_rio_secret" else "batch"
            assert refused[0]["correlation_id"] == correlation and refused[0]["api_key_id"] == expected_id, refused
            assert key not in repr(logs), "the key itself is never logged"
