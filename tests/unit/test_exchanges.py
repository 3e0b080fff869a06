"""The exchange registry: one place for zones, calendars, symbol shapes and currencies, read by
every stage; and the layering it makes possible (no stage imports another stage's internals)."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError

from k2 import exchanges
from k2.api.models import AggregationRequest
from k2.query.errors import InvalidQuery
from k2.query.filters import TickFilter, exchange_zone

pytestmark = pytest.mark.unit
WORKLOADS = Path(__file__).resolve().parents[2] / "workloads" / "k2"


def test_every_stage_reads_the_same_facts():
    asx = exchanges.get("ASX")
    assert asx is exchanges.get("asx")  # record code or topic slug
    assert asx.timezone.key == "Australia/Sydney" and asx.currency == "AUD" and asx.slug == "asx"
    assert exchange_zone("ASX") is asx.timezone
    with pytest.raises(InvalidQuery, match="known: ASX, CRYPTO, NASDAQ"):
        exchange_zone("LSE")
    with pytest.raises(KeyError, match="unknown exchange 'LSE'"):
        exchanges.get("LSE")


@pytest.mark.parametrize(("code", "good", "bad"), [
    ("ASX", ["BHP", "RIO", "BHPN.A"], ["BTC-USD", "bhp", ""]),
    ("NASDAQ", ["AAPL", "AAPL.O"], ["AAPL.OOO", "BTC-USD"]),
    ("CRYPTO", ["BTC-USD", "ETH-USDT"], ["BTC", "BTCUSD", "btc-usd"]),
])
def test_symbol_shapes_are_per_exchange(code, good, bad):
    exchange = exchanges.get(code)
    assert all(exchange.valid_symbol(s) for s in good)
    assert not any(exchange.valid_symbol(s) for s in bad)


def test_the_api_accepts_symbols_of_any_registered_exchange():
    window = {"interval": "1m", "start": "2026-01-05T00:00:00Z", "end": "2026-01-06T00:00:00Z"}
    query = AggregationRequest(symbols=["BTC-USD", "AAPL.O"], exchange="CRYPTO", **window)
    assert query.symbols == ["BTC-USD", "AAPL.O"]
    assert AggregationRequest(symbols=["BHP"], **window).exchange == "ASX"
    with pytest.raises(ValidationError):
        AggregationRequest(symbols=["BTC USD"], **window)
    with pytest.raises(ValidationError):
        AggregationRequest(symbols=["BHP"], exchange="LSE", **window)


def test_dates_prune_on_the_exchanges_own_clock():
    # 23:30 UTC on 9 March is already 10 March in Sydney, still 9 March in UTC (crypto)
    start = dt.datetime(2014, 3, 9, 23, 30, tzinfo=dt.UTC)
    assert TickFilter(("BHP",), "ASX", start).exchange_dates()[0] == dt.date(2014, 3, 10)
    assert TickFilter(("BTC-USD",), "CRYPTO", start).exchange_dates()[0] == dt.date(2014, 3, 9)


def test_calendar_knows_trading_days():
    asx, crypto = exchanges.get("ASX").calendar, exchanges.get("CRYPTO").calendar
    saturday = dt.date(2014, 3, 15)
    assert not asx.is_trading_day(saturday) and crypto.is_trading_day(saturday)
    assert asx.trading_days(dt.date(2014, 3, 14), 2) == [dt.date(2014, 3, 14), dt.date(2014, 3, 17)]


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (WORKLOADS / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(WORKLOADS))] = names
    return found


@pytest.mark.parametrize("stage", ["query", "stream", "api"])
def test_no_stage_imports_ingest(stage):
    sideways = {path: sorted(n for n in names if n == "k2.ingest" or n.startswith("k2.ingest."))
                for path, names in _imports(stage).items()}
    assert not {p: n for p, n in sideways.items() if n}


def test_a_workload_starts_only_for_an_exchange_the_registry_knows(monkeypatch):
    from k2.settings import Settings

    monkeypatch.setenv("K2_EXCHANGE", "nasdaq")
    assert exchanges.get(Settings().exchange).code == "NASDAQ"
    monkeypatch.setenv("K2_EXCHANGE", "lse")
    with pytest.raises(ValidationError, match="unknown exchange 'lse'; known: asx, nasdaq, crypto"):
        Settings()
    with pytest.raises(ValidationError, match="unknown exchange 'ASX'"):  # the slug, as in topic names
        Settings(exchange="ASX")


def _us(instant: dt.datetime) -> int:
    return (instant - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@pytest.mark.parametrize(("code", "symbol", "instant", "day", "reason"), [
    # 23:00 UTC on 9 March 2014 is 10:00 on 10 March in Sydney (AEDT, +11)
    ("ASX", "BHP", dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC), dt.date(2014, 3, 10), None),
    ("ASX", "BHP", dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC), dt.date(2014, 3, 9), "wrong_exchange_date"),
    ("ASX", "BHP", dt.datetime(2014, 3, 9, 12, 59, 59, 999_999, tzinfo=dt.UTC), dt.date(2014, 3, 9), None),
    ("ASX", "BHP", dt.datetime(2014, 3, 9, 13, 0, tzinfo=dt.UTC), dt.date(2014, 3, 9), "wrong_exchange_date"),
    ("CRYPTO", "BTC-USD", dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC), dt.date(2014, 3, 9), None),
    ("CRYPTO", "BTC-USD", dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC), dt.date(2014, 3, 10),
     "wrong_exchange_date"),
    ("ASX", "BTC-USD", dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC), dt.date(2014, 3, 10), "bad_symbol"),
    # the day Sydney's clocks go back (6 April 2014, 25 hours): its last hour is still that day
    ("ASX", "BHP", dt.datetime(2014, 4, 6, 13, 30, tzinfo=dt.UTC), dt.date(2014, 4, 6), None),
])
def test_a_tick_fits_its_exchange_by_symbol_and_local_date(code, symbol, instant, day, reason):
    misfit = exchanges.get(code).misfit(code, symbol, _us(instant), (day - dt.date(1970, 1, 1)).days)
    assert (misfit.reason if misfit else None) == reason


@pytest.mark.parametrize(("pipeline", "code", "symbol", "reason"), [
    ("ASX", "NASDAQ", "AAPL", "wrong_exchange"),  # fits NASDAQ, but these are ASX topics
    ("ASX", "CRYPTO", "BTC-USD", "wrong_exchange"),
    ("CRYPTO", "ASX", "BHP", "wrong_exchange"),
    ("ASX", "LSE", "RIO", "unknown_exchange"),
    ("ASX", "asx", "BHP", "unknown_exchange"),  # a record carries the code, not the slug
])
def test_a_tick_of_another_exchange_does_not_fit_the_pipeline(pipeline, code, symbol, reason):
    at = _us(dt.datetime(2014, 3, 10, 5, 0, tzinfo=dt.UTC))  # 10 March in Sydney, New York and UTC alike
    day = (dt.date(2014, 3, 10) - dt.date(1970, 1, 1)).days
    misfit = exchanges.get(pipeline).misfit(code, symbol, at, day)
    assert misfit is not None and misfit.reason == reason
    if reason == "wrong_exchange":
        assert exchanges.get(code).misfit(code, symbol, at, day) is None, "a tick its own pipeline stores"
    assert code in misfit.detail and (reason == "unknown_exchange" or pipeline in misfit.detail)


def test_the_stream_finds_each_misfit_row_even_inside_a_group_that_mostly_fits():
    import pyarrow as pa

    from k2.stream.writer import _misfits

    at = _us(dt.datetime(2014, 3, 9, 23, 0, tzinfo=dt.UTC))  # 10 March in Sydney
    hour = 3_600_000_000
    data = pa.table({
        "symbol": ["BHP", "BHP", "BHP", "BHP", "ZZ-Z", "BTC-USD", "AAPL"],
        "exchange": ["ASX", "ASX", "ASX", "ASX", "ASX", "NYSE", "NASDAQ"],
        # the group BHP/ASX/10 March: in the day, its last instant, the next day's first, in the day
        "exchange_timestamp": pa.array([at, at + 14 * hour - 1, at + 14 * hour, at + hour], pa.int64()).cast(
            pa.timestamp("us", tz="UTC")).to_pylist() + [dt.datetime(2014, 3, 9, 23, tzinfo=dt.UTC)] * 3,
        "exchange_date": [dt.date(2014, 3, 10)] * 7,
    })
    found = {row: m.reason for row, m in _misfits(data, exchanges.get("ASX")).items()}
    assert found == {2: "wrong_exchange_date", 4: "bad_symbol", 5: "unknown_exchange", 6: "wrong_exchange"}


def test_the_api_lists_the_registry(tmp_path):
    from starlette.testclient import TestClient

    from k2.api.app import create_app
    from k2.settings import DEV_API_KEY, Settings

    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "w"),
                        api_keys="", api_keys_file=None, s3_endpoint=None)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/exchanges").status_code == 401  # a /v1 route like the others
        answer = client.get("/v1/exchanges", headers={"X-API-Key": DEV_API_KEY})
    assert answer.status_code == 200
    listed = {x["code"]: x for x in answer.json()["data"]}
    assert set(listed) == set(exchanges.EXCHANGES)
    assert listed["ASX"] == {"code": "ASX", "name": "Australian Securities Exchange", "timezone": "Australia/Sydney",
                             "currency": "AUD", "session_open": "10:00:00", "session_close": "16:00:00",
                             "trading_weekdays": [0, 1, 2, 3, 4],
                             "symbol_pattern": exchanges.get("ASX").symbol_pattern}
    assert listed["CRYPTO"]["trading_weekdays"] == list(range(7)) and listed["NASDAQ"]["currency"] == "USD"


def test_the_stream_refuses_to_start_for_an_unknown_exchange(monkeypatch, capsys):
    from typer.testing import CliRunner

    from k2.cli import app

    monkeypatch.setenv("K2_EXCHANGE", "lse")
    result = CliRunner().invoke(app, ["stream", "run"])
    said = result.output + capsys.readouterr().err
    assert result.exit_code == 2, said
    assert "invalid K2_* settings" in said and "unknown exchange 'lse'; known: asx, nasdaq, crypto" in said
