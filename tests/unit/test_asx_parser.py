"""The ASX CSV parser: exact prices, Sydney time, sequence numbering, rejection reasons."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2.sources.asx import (
    RecordBuilder,
    RowError,
    TickFile,
    micros_to_decimal_str,
    parse_price,
    parse_size,
    parse_timestamp,
    unscaled_bytes,
)

pytestmark = pytest.mark.unit


def _builder(kind: str = "trades") -> RecordBuilder:
    return RecordBuilder(TickFile(kind, Path(f"/x/{kind}/7078.csv"), "BHP"), ingest_us=1)


def test_sydney_local_time_is_converted_to_utc_with_daylight_saving():
    # 10 March 2014 is AEDT (UTC+11); 10 July 2014 is AEST (UTC+10).
    ts, day, date = parse_timestamp("03/10/2014", "10:00:00.250")
    assert dt.datetime.fromtimestamp(ts / 1e6, dt.UTC) == dt.datetime(2014, 3, 9, 23, 0, 0, 250000, tzinfo=dt.UTC)
    assert date == dt.date(2014, 3, 10) and day == (date - dt.date(1970, 1, 1)).days
    ts, _, _ = parse_timestamp("07/10/2014", "10:00:00.000")
    assert dt.datetime.fromtimestamp(ts / 1e6, dt.UTC) == dt.datetime(2014, 7, 10, 0, 0, tzinfo=dt.UTC)


def test_pre_open_quote_with_zero_ask_and_crossed_book_are_kept_and_flagged():
    b = _builder("quotes")
    zero_ask = b.build("03/10/2014,05:43:45.676,37.7,0.0,300,0\r\n")
    crossed = b.build("03/10/2014,07:00:11.938,37.75,37.73,19,600\r\n")
    assert zero_ask["is_one_sided"] and not zero_ask["is_crossed"]
    assert crossed["is_crossed"] and not crossed["is_one_sided"]
    assert int.from_bytes(crossed["bid_price"], "big", signed=True) == 37_750_000


def test_identical_fills_get_distinct_consecutive_sequence_numbers_per_day():
    b = _builder()
    line = "03/10/2014,10:00:01.000,36.667,100,0,,\r\n"
    seqs = [b.build(line)["sequence_number"] for _ in range(3)]
    next_day = b.build("03/11/2014,10:00:01.000,36.667,100,0,,\r\n")["sequence_number"]
    assert seqs == [1, 2, 3] and next_day == 1


def test_rejected_rows_do_not_consume_sequence_numbers():
    b = _builder()
    b.build("03/10/2014,10:00:01.000,36.667,100,0,,\r\n")
    with pytest.raises(RowError):
        b.build("03/10/2014,10:00:01.000,abc,100,0,,\r\n")
    assert b.build("03/10/2014,10:00:02.000,36.667,100,0,,\r\n")["sequence_number"] == 2


@pytest.mark.parametrize(("line", "reason"), [
    ("03/10/2014,10:00:01.000,36.667,100,0,\r\n", "column_count"),
    ("03/10/2014,10:00:01.000,36.667,100,0,,,\r\n", "column_count"),
    ("13/40/2014,10:00:01.000,36.667,100,0,,\r\n", "bad_date"),
    ("03/10/2014,25:00:01.000,36.667,100,0,,\r\n", "bad_time"),
    ("03/10/2014,10:00:01.000,3x.6,100,0,,\r\n", "bad_number"),
    ("03/10/2014,10:00:01.000,-36.6,100,0,,\r\n", "negative_value"),
    ("03/10/2014,10:00:01.000,36.6,-100,0,,\r\n", "negative_value"),
    ("03/10/2014,10:00:01.000,36.6,10.5,0,,\r\n", "bad_number"),
    ("03/10/2014,10:00:01.000,36.1234567,100,0,,\r\n", "bad_number"),
    ("\r\n", "column_count"),
])
def test_malformed_trade_rows_are_rejected_with_a_reason(line, reason):
    with pytest.raises(RowError) as err:
        _builder().build(line)
    assert err.value.reason == reason


def test_quote_with_a_price_in_a_size_column_is_rejected():
    with pytest.raises(RowError) as err:
        _builder("quotes").build("03/10/2014,10:00:01.000,36.6,36.7,abc,100\r\n")
    assert err.value.reason == "bad_number"


prices = st.decimals(min_value=0, max_value=Decimal("999999999.999999"), places=6, allow_nan=False)


@given(prices)
def test_price_text_round_trips_exactly(price: Decimal):
    text = format(price, "f")
    micros = parse_price(text, "price")
    assert Decimal(micros) / 10**6 == price
    assert Decimal(micros_to_decimal_str(micros)) == price
    assert int.from_bytes(unscaled_bytes(micros), "big", signed=True) == micros


@given(st.integers(min_value=0, max_value=10**12))
def test_sizes_accept_whole_numbers_written_with_a_zero_fraction(size: int):
    assert parse_size(str(size), "v") == size
    assert parse_size(f"{size}.0", "v") == size


@given(st.text(alphabet="0123456789.,-:/ abcXe\r\n", max_size=60))
def test_arbitrary_lines_either_parse_or_raise_row_error(line: str):
    try:
        record = _builder().build(line)
    except RowError as exc:  # either outcome is right; each is checked
        assert exc.reason  # noqa: PT017
    else:
        assert record["volume"] >= 0 and record["sequence_number"] >= 1
