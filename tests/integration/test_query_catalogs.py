"""The engine and the API over both catalog configurations: the embedded one (SQLite + local
files) and the chart's (the stack's PostgreSQL catalog + its S3 warehouse, whose planned files are
read through a pyarrow S3 dataset). The answers are the same figures as from the CSV files."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from k2.api.app import create_app
from k2.query import bars, ticks
from k2.query.cursor import fingerprint
from k2.query.engine import Engine
from k2.query.filters import TickFilter, columns
from k2.query.sample import load_asx
from k2.settings import DEV_API_KEY, Settings

pytestmark = [pytest.mark.integration, pytest.mark.asx]
SYMBOLS = ("DVN", "MWR")
DAYS = [dt.date(2014, 3, 10), dt.date(2014, 3, 11)]


@pytest.fixture(scope="module", params=["sqlite-local", "postgres-s3"])
def lakehouse(request, asx_root, lakehouse_settings_for, tmp_path_factory) -> Iterator[tuple[Settings, Engine]]:
    root = tmp_path_factory.mktemp("lakehouse")
    if request.param == "sqlite-local":
        settings = lakehouse_settings_for(root)
    else:
        s3, postgres = request.getfixturevalue("s3"), request.getfixturevalue("postgres")
        name = f"q{uuid.uuid4().hex[:8]}"  # the shared catalog and bucket: a namespace and folder of our own
        settings = lakehouse_settings_for(root, catalog_uri=postgres.sqlalchemy_url, namespace=name,
                                          warehouse=f"s3://{s3.bucket}/{name}", s3_endpoint=s3.endpoint,
                                          s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
                                          s3_region=s3.region)
    load_asx(settings, asx_root, symbols=SYMBOLS, days=DAYS, kinds=("trades",))
    engine = Engine(settings)
    yield settings, engine
    engine.close()


def _expected_trades(asx_oracle) -> int:
    return sum(len(asx_oracle.trades[s, d]) for s in SYMBOLS for d in DAYS if (s, d) in asx_oracle.trades)


def test_planned_files_are_read_from_the_warehouse(lakehouse, asx_oracle) -> None:
    settings, engine = lakehouse
    scan = engine.plan(engine.pin("trades"), TickFilter(("DVN",)))
    assert scan.files and all(f.file_path.startswith("s3://") == settings.warehouse.startswith("s3://")
                              for f in scan.files)
    for symbol in SYMBOLS:
        for day in DAYS:
            if (symbol, day) in asx_oracle.trades:
                found = bars.summary(engine, symbol, day)
                assert {k: str(v) if k != "date" else v.isoformat() for k, v in found.items()} == \
                    {k: str(v) for k, v in asx_oracle.summary(symbol, day).items()}


def test_pages(lakehouse, asx_oracle) -> None:
    _, engine = lakehouse
    flt = TickFilter(SYMBOLS)
    rel = ticks.tick_relation(engine, engine.pin("trades"), flt)
    page = ticks.page(engine, rel, fields=columns("trades"), limit=10_000, cursor=None,
                      fingerprint=fingerprint("trades", flt))
    assert page.rows.num_rows == _expected_trades(asx_oracle) and page.next_cursor is None


def test_the_api_answers_from_the_catalog(lakehouse, asx_oracle) -> None:
    settings, engine = lakehouse
    with TestClient(create_app(settings, engine=engine), headers={"X-API-Key": DEV_API_KEY}) as api:
        stats = {t["table"]: t for t in api.get("/v1/stats").json()["data"]}
        assert stats[settings.table_identifier("trades")]["rows"] == _expected_trades(asx_oracle)
        for symbol, day in [(s, d) for s in SYMBOLS for d in DAYS if (s, d) in asx_oracle.trades]:
            response = api.get(f"/v1/summary/{symbol}/{day.isoformat()}")
            assert response.status_code == 200, response.text
            assert response.json() == asx_oracle.summary(symbol, day), (symbol, day)
