"""Bars on the days Sydney changes clocks (6 April 2014: a 25-hour day; 5 October 2014: 23 hours),
from a tiny ASX-format folder written here: daily buckets are exactly local dates, intraday
buckets are real hours."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from k2.api.app import create_app
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY

pytestmark = pytest.mark.integration
# (local date MM/DD/YYYY, local time, price): Australia/Sydney wall-clock times, as the ASX writes them
TRADES = [
    ("04/05/2014", "23:30:00.000", "1.00"),  # Saturday night, AEDT (UTC+11)
    ("04/06/2014", "01:30:00.000", "1.00"),  # AEDT: 2014-04-05 14:30Z
    ("04/06/2014", "03:30:00.000", "1.10"),  # AEST (UTC+10), after 03:00 AEDT became 02:00 AEST: 17:30Z
    ("04/06/2014", "23:30:00.000", "1.20"),  # AEST: 2014-04-06 13:30Z, still 6 April locally
    ("10/05/2014", "01:30:00.000", "2.00"),  # AEST: 2014-10-04 15:30Z
    ("10/05/2014", "03:30:00.000", "2.10"),  # AEDT, after 02:00 AEST became 03:00 AEDT: 16:30Z
    ("10/05/2014", "23:30:00.000", "2.20"),  # AEDT: 2014-10-05 12:30Z
]


@pytest.fixture(scope="module")
def dst_api(tmp_path_factory, lakehouse_settings_for):
    root = tmp_path_factory.mktemp("dst")
    folder = root / "asx"
    (folder / "reference-data").mkdir(parents=True)
    (folder / "trades").mkdir()
    (folder / "reference-data" / "company_info.csv").write_text(
        "company_id,symbol,company_name,ISIN,start_date,end_date\r\n9999,TST,TEST LTD,AU0000000TST,01/01/2014,\r\n")
    Path(folder / "trades" / "9999.csv").write_text(
        "".join(f"{d},{t},{p},100,0,X,\r\n" for d, t, p in TRADES))
    settings = lakehouse_settings_for(root / "lakehouse")
    load_asx(settings, folder, kinds=("trades",))
    with TestClient(create_app(settings), headers={"X-API-Key": DEV_API_KEY}) as client:
        yield client


def _bars(api, interval: str, start: str, end: str, **extra) -> list[dict]:
    response = api.post("/v1/aggregations", json={"symbols": ["TST"], "interval": interval, "start": start,
                                                  "end": end, **extra})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_daily_bars_are_local_dates_of_23_and_25_hours(dst_api) -> None:
    days = _bars(dst_api, "1d", "2014-04-04T00:00:00Z", "2014-10-07T00:00:00Z")
    assert [(d["bucket_start"], d["bucket_end"], d["trade_count"]) for d in days] == [
        ("2014-04-04T13:00:00Z", "2014-04-05T13:00:00Z", 1),  # 5 April
        ("2014-04-05T13:00:00Z", "2014-04-06T14:00:00Z", 3),  # 6 April: 25 hours
        ("2014-10-04T14:00:00Z", "2014-10-05T13:00:00Z", 3),  # 5 October: 23 hours
    ]
    assert dst_api.get("/v1/summary/TST/2014-04-06").json()["close"] == "1.200000"


def test_twap_of_a_25_hour_day(dst_api) -> None:
    day = _bars(dst_api, "1d", "2014-04-05T13:00:00Z", "2014-04-06T14:00:00Z", metric="twap")[0]
    held = {"1.00": 3 * 3600, "1.10": 20 * 3600, "1.20": 1800}  # until the next trade, then local midnight
    expected = Fraction(sum(Fraction(p) * s for p, s in held.items()), sum(held.values()))
    assert day["twap"] == f"{Decimal(round(expected * 10**6)).scaleb(-6):.6f}"


def test_the_repeated_hour_is_two_hourly_buckets(dst_api) -> None:
    hours = _bars(dst_api, "1h", "2014-04-06T00:00:00+11:00", "2014-04-06T05:00:00+10:00", fill="null")
    assert [h["bucket_start"][11:16] for h in hours] == ["13:00", "14:00", "15:00", "16:00", "17:00", "18:00"]
    assert [h["trade_count"] for h in hours] == [None, 1, None, None, 1, None]
