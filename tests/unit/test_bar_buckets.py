"""Intraday bar buckets are computed on epoch microseconds from a bound origin; they must be
exactly DuckDB's time_bucket(width, ts, zone), which converts each row's time zone, and the
grid of filled bars must start on the same buckets."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from k2.query.bars import _INTRADAY, _bucket_params, _first_bucket
from k2.query.filters import INTERVALS

pytestmark = pytest.mark.unit
# Whole-hour DST (Sydney, New York, London), half-hour offsets (Kolkata), a 30-minute DST shift
# (Lord Howe), a quarter-hour offset (Kathmandu, Chatham)
ZONES = ["Australia/Sydney", "America/New_York", "Europe/London", "Asia/Kolkata", "Australia/Lord_Howe",
         "Asia/Kathmandu", "Pacific/Chatham", "UTC"]
INTRADAY = [name for name in INTERVALS if name != "1d"]


def _instants(zone: ZoneInfo, seed: int) -> np.ndarray:
    """Microseconds: spread over two centuries, and dense around 2014's DST changes in `zone`."""
    rng = np.random.default_rng(seed)
    spread = rng.integers(-2 * 10**15, 4 * 10**15, 20_000)
    near = [int(dt.datetime(2014, month, day, tzinfo=zone).timestamp() * 1e6) for month, day in ((4, 6), (10, 5))]
    dense = [t + rng.integers(-2 * 86_400 * 10**6, 2 * 86_400 * 10**6, 10_000) for t in near]
    return np.concatenate([spread, *dense, near])


@pytest.mark.parametrize("zone_name", ZONES)
def test_intraday_buckets_are_duckdbs_time_bucket(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ticks = pa.table({"exchange_timestamp": pa.array(_instants(zone, len(zone_name)), pa.timestamp("us", "UTC"))})
    con.register("ticks", ticks)
    for interval in INTRADAY:
        params = _bucket_params(zone, INTERVALS[interval])
        differing = con.execute(
            f"SELECT count(*) FILTER (WHERE {_INTRADAY.key} IS DISTINCT FROM "
            f"time_bucket($width, exchange_timestamp, $tz)), count(*) FROM ticks",
            {k: params[k] for k in ("width", "tz", "origin_us", "width_us")}).fetchone()
        assert differing == (0, ticks.num_rows), (zone_name, interval)


@pytest.mark.parametrize("zone_name", ZONES)
def test_the_grid_starts_on_the_bucket_of_the_range_start(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for us in _instants(zone, 7)[::997].tolist():
        start = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
        for interval in INTRADAY:
            width = INTERVALS[interval]
            (expected,) = con.execute("SELECT epoch_us(time_bucket($w, $t::TIMESTAMPTZ, $tz))",
                                      {"w": width, "t": start, "tz": zone_name}).fetchone()
            first = _first_bucket(start, zone, interval)
            assert (first - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) == expected
