"""The query vocabulary: filters, whitelists, parameterised SQL and exact decimal ratios."""

from __future__ import annotations

import datetime as dt
from decimal import Context, Decimal
from fractions import Fraction

import duckdb
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pyiceberg.expressions import AlwaysTrue

from k2.query.errors import InvalidQuery
from k2.query.filters import TickFilter, columns, micros, select_fields
from k2.query.sql import EXACT_RATIO_MACRO, Where, exact_ratio

pytestmark = pytest.mark.unit
UTC = dt.UTC


def test_exchange_dates_follow_the_sydney_clock() -> None:
    # 2014-03-09T13:00Z is midnight of 10 March in Sydney (AEDT, UTC+11).
    flt = TickFilter(("BHP",), "ASX", dt.datetime(2014, 3, 9, 13, tzinfo=UTC),
                     dt.datetime(2014, 3, 10, 12, 59, tzinfo=UTC))
    assert flt.exchange_dates() == (dt.date(2014, 3, 10), dt.date(2014, 3, 10))
    assert TickFilter().exchange_dates() == (None, None)


def test_iceberg_filter_prunes_by_symbol_time_and_partition() -> None:
    text = repr(TickFilter(("RIO", "BHP"), "ASX", dt.datetime(2014, 3, 10, tzinfo=UTC)).iceberg_filter())
    for term in ("symbol", "'BHP'", "'RIO'", "exchange", "exchange_timestamp", "exchange_date"):
        assert term in text
    assert TickFilter().iceberg_filter() == AlwaysTrue()
    assert "exchange_timestamp" not in repr(TickFilter(("BHP",)).iceberg_filter(timestamped=False))


def test_equal_filters_share_a_cache_key() -> None:
    assert TickFilter(("RIO", "BHP", "RIO")) == TickFilter(("BHP", "RIO"))
    assert hash(TickFilter(("RIO", "BHP"))) == hash(TickFilter(("BHP", "RIO")))


def test_filter_refusals_name_the_field() -> None:
    at = dt.datetime(2014, 3, 10, tzinfo=UTC)
    with pytest.raises(InvalidQuery) as refused:
        TickFilter(start=at, end=at)
    assert refused.value.field == "end"
    with pytest.raises(InvalidQuery) as refused:
        TickFilter(exchange="NYSE")
    assert refused.value.field == "exchange"


def test_field_selection_is_whitelisted() -> None:
    assert select_fields("trades", None) == columns("trades")
    assert select_fields("quotes", ["ask_price", "symbol", "ask_price"]) == ("ask_price", "symbol")
    with pytest.raises(InvalidQuery) as refused:
        select_fields("trades", ["price", 'price"; DROP TABLE x; --'])
    assert refused.value.field == "fields"


def test_micros_is_exact() -> None:
    assert micros(dt.datetime(2014, 3, 9, 23, 0, 6, 717000, tzinfo=UTC)) == 1394406006717000


def test_where_binds_every_value() -> None:
    where = Where().ticks(TickFilter(("BHP", "RIO"), "ASX", dt.datetime(2014, 3, 10, tzinfo=UTC)), prefix="t_")
    assert where.sql() == ('WHERE ("symbol" IN ($t_symbol_0, $t_symbol_1)) AND (exchange = $t_exchange) '
                           "AND (exchange_timestamp >= $t_start)")
    assert where.params == {"t_symbol_0": "BHP", "t_symbol_1": "RIO", "t_exchange": "ASX",
                            "t_start": dt.datetime(2014, 3, 10, tzinfo=UTC)}
    with pytest.raises(ValueError, match="reused"):
        where.add("x = $t_exchange", t_exchange="again")
    assert Where().sql() == ""


@pytest.fixture(scope="module", params=["k2_exact_ratio", "k2_exact_ratio_estimated", "python"])
def ratio(request):
    if request.param == "python":  # the macros' twin, which a one-row summary divides with
        yield lambda numerator, denominator, den_type="BIGINT": exact_ratio(numerator, denominator)
        return
    db = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    db.execute(EXACT_RATIO_MACRO)

    def compute(numerator: Decimal, denominator: int, den_type: str = "BIGINT") -> Decimal | None:
        # BIGINT: sum(volume)::BIGINT of a VWAP; HUGEINT: sum(held_us) of a TWAP
        # bound as text: a Python int beyond int64 would be bound as a DOUBLE and lose digits
        return db.execute(f"SELECT {request.param}($n::DECIMAL(38, 6), $d::VARCHAR::{den_type})",
                          {"n": numerator, "d": str(denominator)}).fetchone()[0]

    yield compute
    db.close()


def test_exact_ratio_rounds_half_to_even(ratio) -> None:
    assert ratio(Decimal("1.000001"), 2) == Decimal("0.500000")  # 0.5000005 → even
    assert ratio(Decimal("1.000003"), 2) == Decimal("0.500002")  # 0.5000015 → even
    assert ratio(Decimal("2"), 3) == Decimal("0.666667")
    assert ratio(Decimal("5"), 0) is None
    assert ratio(Decimal("5"), 0, "HUGEINT") is None


def _rounded(numerator: Decimal, denominator: int) -> Decimal:
    return Decimal(round(Fraction(numerator) * 10**6 / denominator)).scaleb(-6)  # round() on a Fraction is half-even


@settings(max_examples=300, deadline=None)
@given(units=st.integers(0, 10**18 - 1), denominator=st.integers(1, 10**20),
       offset=st.sampled_from([-2, -1, 0, 1, 2]), den_type=st.sampled_from(["BIGINT", "HUGEINT"]))
def test_exact_ratio_at_and_beside_half_units(ratio, units: int, denominator: int, offset: int, den_type: str) -> None:
    """Ratios of (units + ½) millionths give or take a millionth of a unit: the ties and near-ties
    where a double quotient rounds the wrong way, up to prices at the top of decimal(18, 6)."""
    if den_type == "BIGINT":
        denominator = denominator % 2**62 + 1
    millionths = ((2 * units + 1) * denominator) // 2 + offset  # ≈ (units + ½) × denominator
    # below 10**26 (scaled by 10**6 it must fit DECIMAL(38)), the average within decimal(18, 6)
    assume(0 <= millionths < 10**32 and millionths < (10**18 - 1) * denominator)
    numerator = Decimal(millionths).scaleb(-6, Context(prec=40))
    assert ratio(numerator, denominator, den_type) == _rounded(numerator, denominator)


@settings(max_examples=200, deadline=None)
@given(numerator=st.decimals(min_value=0, max_value=10**15, places=6), denominator=st.integers(1, 10**12))
def test_exact_ratio_matches_rational_arithmetic(ratio, numerator: Decimal, denominator: int) -> None:
    assume(numerator / denominator < 10**12)  # averages of prices fit decimal(18, 6)
    assert ratio(numerator, denominator) == _rounded(numerator, denominator)
