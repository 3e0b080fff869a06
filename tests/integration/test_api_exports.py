"""Tick reads: keyset pages, streamed JSON/CSV/Parquet exports that parse back to the same rows,
the latest quote as of a time and trades as-of-joined to quotes, checked against the oracle."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pydantic_core import to_jsonable_python

from k2 import schemas

pytestmark = [pytest.mark.integration, pytest.mark.asx]
SYMBOLS = ["DVN", "MWR"]


def _all_pages(api, path: str, params: dict) -> list[dict]:
    rows, cursor, snapshots = [], None, set()
    while True:
        page = api.get(path, params={**params, **({"cursor": cursor} if cursor else {})}).json()
        rows.extend(page["data"])
        snapshots.add(page["snapshot_id"])
        cursor = page["next_cursor"]
        if cursor is None:
            assert len(snapshots) == 1
            return rows


def _order_key(row: dict) -> tuple:
    return row["exchange_timestamp"], row["symbol"], row["sequence_number"]


def test_pages_cover_every_row_once_in_tick_order(asx_api, asx_oracle) -> None:
    rows = [r for symbol in SYMBOLS for r in _all_pages(asx_api, "/v1/trades", {"symbol": symbol, "limit": 17})]
    expected = sum(len(asx_oracle.trades[s, d]) for s, d in asx_oracle.symbol_days() if s in SYMBOLS)
    assert len(rows) == expected
    for symbol in SYMBOLS:
        mine = [r for r in rows if r["symbol"] == symbol]
        assert mine == sorted(mine, key=_order_key)
        assert len({(r["exchange_date"], r["sequence_number"]) for r in mine}) == len(mine)


def test_a_cursor_only_fits_its_own_query(asx_api) -> None:
    cursor = asx_api.get("/v1/trades", params={"symbol": "DVN", "limit": 5}).json()["next_cursor"]
    response = asx_api.get("/v1/trades", params={"symbol": "MWR", "limit": 5, "cursor": cursor})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "cursor"


@pytest.mark.parametrize("kind", ["trades", "quotes"])
def test_exports_parse_back_to_the_same_rows(asx_api, kind: str) -> None:
    reference = [r for s in SYMBOLS for r in _all_pages(asx_api, f"/v1/{kind}", {"symbol": s, "limit": 500})]
    reference.sort(key=_order_key)
    schema = schemas.arrow_schema(kind)
    body = {"symbols": SYMBOLS}

    as_json = asx_api.post(f"/v1/{kind}/query", json={**body, "format": "json"})
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["data"] == reference

    as_csv = asx_api.post(f"/v1/{kind}/query", json={**body, "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    parsed = pacsv.read_csv(io.BytesIO(as_csv.content),
                            convert_options=pacsv.ConvertOptions(column_types=schema, strings_can_be_null=True))
    assert to_jsonable_python(parsed.to_pylist()) == reference

    as_parquet = asx_api.post(f"/v1/{kind}/query", json={**body, "format": "parquet"})
    table = pq.read_table(io.BytesIO(as_parquet.content))
    assert table.schema.field("exchange_timestamp").type == pa.timestamp("us", tz="UTC")
    assert pa.types.is_decimal(table.schema.field("price" if kind == "trades" else "bid_price").type)
    assert to_jsonable_python(table.to_pylist()) == reference
    assert as_parquet.headers["X-K2-Snapshot-Id"] == str(as_json.json()["snapshot_id"])


def test_export_field_selection_limit_and_range(asx_api, asx_oracle) -> None:
    body = {"symbols": ["BHP", "RIO"], "fields": ["symbol", "price", "volume"],
            "start": "2014-03-11T11:00:00+11:00", "end": "2014-03-11T11:05:00+11:00"}
    rows = asx_api.post("/v1/trades/query", json=body).json()["data"]
    start, end = (dt.datetime.fromisoformat(body[k]) for k in ("start", "end"))
    expected = [t for s in ("BHP", "RIO") for t in asx_oracle.trades[s, start.date()] if start <= t.local < end]
    assert len(rows) == len(expected)
    assert sorted((r["symbol"], Decimal(r["price"]), r["volume"]) for r in rows) == \
        sorted((t.symbol, t.price, t.volume) for t in expected)
    assert set(rows[0]) == {"symbol", "price", "volume"}
    limited = asx_api.post("/v1/trades/query", json={**body, "limit": 25}).json()["data"]
    assert len(limited) == 25


def test_empty_export_still_has_a_csv_header(asx_api) -> None:
    body = {"symbols": ["ZZZ"], "format": "csv", "fields": ["symbol", "price"]}
    response = asx_api.post("/v1/trades/query", json=body)
    assert response.status_code == 200
    assert response.text.strip() == '"symbol","price"'


def test_latest_quote_as_of(asx_api, asx_oracle) -> None:
    as_of = dt.datetime(2014, 3, 12, 11, 30, 0, 123000, tzinfo=dt.timezone(dt.timedelta(hours=11)))
    response = asx_api.get("/v1/quotes/latest", params={"symbol": ["BHP", "DVN", "ZZZ"], "as_of": as_of.isoformat()})
    data = {q["symbol"]: q for q in response.json()["data"]}
    assert set(data) == {"BHP", "DVN"}
    for symbol, quote in data.items():
        expected = asx_oracle.prevailing_quote(symbol, as_of)
        assert (quote["exchange_date"], quote["sequence_number"]) == (expected.local.date().isoformat(),
                                                                        expected.sequence_number)
        assert (quote["bid_price"], quote["ask_price"]) == (f"{expected.bid:.6f}", f"{expected.ask:.6f}")


def test_trades_carry_their_prevailing_quote(asx_api, asx_oracle) -> None:
    tolerance = dt.timedelta(minutes=10)
    rows = _all_pages(asx_api, "/v1/trades/asof", {"symbol": "DVN", "limit": 100,
                                                   "tolerance_ms": tolerance // dt.timedelta(milliseconds=1)})
    trades = [t for (s, _), ts in sorted(asx_oracle.trades.items()) if s == "DVN" for t in ts]
    assert len(rows) == len(trades)
    stale = 0
    for row, trade in zip(rows, trades, strict=True):
        assert row["sequence_number"] == trade.sequence_number
        quote = asx_oracle.prevailing_quote("DVN", trade.local)
        if quote is None or trade.local - quote.local > tolerance:
            assert row["quote_timestamp"] is None and row["bid_price"] is None
            stale += 1
        else:
            assert (row["bid_price"], row["ask_price"], row["bid_size"]) == (
                f"{quote.bid:.6f}", f"{quote.ask:.6f}", quote.bid_size)
            assert dt.datetime.fromisoformat(row["quote_timestamp"]) == quote.local
    assert 0 < stale < len(rows)  # DVN is thinly quoted: both cases occur
