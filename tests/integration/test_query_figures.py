"""Figures from the API, checked exactly against the oracle's plain-Python figures from the CSVs:
every summary, every 1m and 5m bar (OHLCV, VWAP, TWAP) of every symbol and day, and gap filling."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.asx]
SYDNEY = ZoneInfo("Australia/Sydney")
OHLCV = ("open", "high", "low", "close", "volume", "trade_count", "vwap")


def _day_range(day: dt.date) -> tuple[str, str]:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=SYDNEY)
    return start.isoformat(), (start + dt.timedelta(days=1)).isoformat()


def _aggregate(api, **body) -> dict:
    response = api.post("/v1/aggregations", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_row_counts_match_the_sample(asx_api) -> None:
    stats = {t["table"]: t for t in asx_api.get("/v1/stats").json()["data"]}
    assert stats["market.trades"]["rows"] == 200_545
    assert stats["market.quotes"]["rows"] == 169_629
    assert stats["market.trades"]["partitions"] == 5
    assert stats["market.trades"]["event_watermark"].startswith("2014-03-14")


def test_every_daily_summary_is_exact(asx_api, asx_oracle) -> None:
    for symbol, day in asx_oracle.symbol_days():
        response = asx_api.get(f"/v1/summary/{symbol}/{day.isoformat()}")
        assert response.status_code == 200, response.text
        assert response.json() == asx_oracle.summary(symbol, day), (symbol, day)


@pytest.mark.parametrize(("interval", "minutes"), [("1m", 1), ("5m", 5)])
def test_every_bar_of_every_symbol_day_is_exact(asx_api, asx_oracle, interval: str, minutes: int) -> None:
    checked = 0
    for symbol, day in asx_oracle.symbol_days():
        start, end = _day_range(day)
        expected = asx_oracle.bars(symbol, day, minutes)
        ohlcv = _aggregate(asx_api, metric="ohlcv", symbols=[symbol], interval=interval, start=start, end=end)
        assert ohlcv["timezone"] == "Australia/Sydney"
        assert ohlcv["data"] == [{k: b[k] for k in ("symbol", "bucket_start", "bucket_end", *OHLCV)}
                                 for b in expected], (symbol, day)
        twap = _aggregate(asx_api, metric="twap", symbols=[symbol], interval=interval, start=start, end=end)
        assert twap["data"] == [{k: b[k] for k in ("symbol", "bucket_start", "bucket_end", "trade_count", "twap")}
                                for b in expected], (symbol, day)
        checked += len(expected)
    assert checked > 800


def test_a_daily_bar_is_the_summary(asx_api, asx_oracle) -> None:
    bars = _aggregate(asx_api, metric="ohlcv", symbols=["BHP", "RIO", "DVN", "MWR"], interval="1d",
                      start="2014-03-10T00:00:00+11:00", end="2014-03-15T00:00:00+11:00")["data"]
    for bar in bars:
        day = dt.datetime.fromisoformat(bar["bucket_start"]).astimezone(SYDNEY).date()
        expected = asx_oracle.summary(bar["symbol"], day)
        assert {k: bar[k] for k in OHLCV} == {k: expected[k] for k in OHLCV}
    assert len(bars) == len(asx_oracle.symbol_days())


def test_vwap_metric_over_many_symbols(asx_api, asx_oracle) -> None:
    day = dt.date(2014, 3, 12)
    start, end = _day_range(day)
    data = _aggregate(asx_api, metric="vwap", symbols=["RIO", "BHP"], interval="5m", start=start, end=end)["data"]
    expected = [{k: b[k] for k in ("symbol", "bucket_start", "bucket_end", "vwap", "volume", "trade_count")}
                for symbol in ("BHP", "RIO") for b in asx_oracle.bars(symbol, day, 5)]
    assert data == expected


@pytest.mark.parametrize("fill", ["null", "prev"])
def test_gap_filling(asx_api, asx_oracle, fill: str) -> None:
    """MWR trades rarely: most 1h buckets of its day are empty."""
    day = dt.date(2014, 3, 11)
    start, end = _day_range(day)
    data = _aggregate(asx_api, metric="ohlcv", symbols=["MWR"], interval="1h", start=start, end=end, fill=fill)["data"]
    assert len(data) == 24
    trades = asx_oracle.trades["MWR", day]
    traded_hours = {t.local.hour for t in trades}
    last_close = None
    for hour, bar in enumerate(data):
        assert dt.datetime.fromisoformat(bar["bucket_start"]).astimezone(SYDNEY).hour == hour
        if hour in traded_hours:
            in_hour = [t for t in trades if t.local.hour == hour]
            assert bar["close"] == f"{in_hour[-1].price:.6f}"
            assert bar["trade_count"] == len(in_hour)
            last_close = bar["close"]
        elif fill == "null":
            assert all(bar[k] is None for k in OHLCV)
        else:
            assert [bar[k] for k in ("open", "high", "low", "close", "vwap")] == [last_close] * 5
            assert (bar["volume"], bar["trade_count"]) == (0, 0)


def test_filled_results_are_bounded(asx_api) -> None:
    response = asx_api.post("/v1/aggregations", json={
        "symbols": ["BHP", "RIO"], "interval": "1m", "fill": "null",
        "start": "2014-01-01T00:00:00Z", "end": "2014-03-01T00:00:00Z"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "interval"


def test_a_repeated_symbol_counts_once_in_the_bound(asx_api) -> None:
    """6,001 one-minute buckets of one symbol fit the 10,000-bar bound however often it is named."""
    body = {"interval": "1m", "fill": "null", "start": "2014-03-10T00:00:00Z", "end": "2014-03-14T04:00:00Z"}
    once = asx_api.post("/v1/aggregations", json={**body, "symbols": ["BHP"]})
    twice = asx_api.post("/v1/aggregations", json={**body, "symbols": ["BHP", "BHP"]})
    assert once.status_code == twice.status_code == 200, twice.text
    assert twice.json()["data"] == once.json()["data"]
