"""The engine over an S3 warehouse (the local stack's S3 server): planned files are read through a
pyarrow S3 dataset, and the answers are the same figures as from the CSV files."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest

from k2.query import bars, ticks
from k2.query.cursor import fingerprint
from k2.query.engine import Engine
from k2.query.filters import TickFilter, columns
from k2.query.sample import load_asx
from k2.stack.base import StackError
from k2.stack.s3 import S3

pytestmark = [pytest.mark.integration, pytest.mark.asx]
SYMBOLS = ("DVN", "MWR")
DAYS = [dt.date(2014, 3, 10), dt.date(2014, 3, 11)]


@pytest.fixture(scope="module")
def s3_engine(asx_root, lakehouse_settings_for, tmp_path_factory) -> Iterator[Engine]:
    s3 = S3()
    started = s3.pid() is None  # leave a server the developer already runs as it was
    try:
        s3.start()
    except StackError as exc:
        pytest.skip(f"the local S3 server is not available: {exc}")
    prefix = f"k2-query-test-{uuid.uuid4().hex}"
    try:
        settings = lakehouse_settings_for(
            tmp_path_factory.mktemp("s3-lakehouse"), warehouse=f"s3://{s3.bucket}/{prefix}",
            s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, s3_region=s3.region)
        load_asx(settings, asx_root, symbols=SYMBOLS, days=DAYS, kinds=("trades",))
        engine = Engine(settings)
        yield engine
        engine.close()
    finally:
        client = s3.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=s3.bucket, Key=obj["Key"])
        if started:
            s3.stop()


def test_s3_files_are_read_through_pyarrow(s3_engine, asx_oracle) -> None:
    pin = s3_engine.pin("trades")
    scan = s3_engine.plan(pin, TickFilter(("DVN",)))
    assert scan.files and all(f.file_path.startswith("s3://") for f in scan.files)
    for symbol in SYMBOLS:
        for day in DAYS:
            if (symbol, day) in asx_oracle.trades:
                found = bars.summary(s3_engine, symbol, day)
                assert {k: str(v) if k != "date" else v.isoformat() for k, v in found.items()} == \
                    {k: str(v) for k, v in asx_oracle.summary(symbol, day).items()}


def test_pages_over_s3(s3_engine, asx_oracle) -> None:
    flt = TickFilter(SYMBOLS)
    rel = ticks.tick_relation(s3_engine, s3_engine.pin("trades"), flt)
    page = ticks.page(s3_engine, rel, fields=columns("trades"), limit=10_000, cursor=None,
                      fingerprint=fingerprint("trades", flt))
    expected = sum(len(asx_oracle.trades[s, d]) for s in SYMBOLS for d in DAYS if (s, d) in asx_oracle.trades)
    assert page.rows.num_rows == expected and page.next_cursor is None
