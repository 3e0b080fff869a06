"""Summaries and OHLCV/VWAP bars answered from files' per-minute partials equal the SQL path's,
row for row and type for type: over days of two files each whose hours overlap, every interval,
whole days and ranges inside them, with the live tail's rows added, and for ratios beyond 64 bits.

Real embedded catalog (SQLite + local warehouse) with synthetic ticks; two engines over it, one
with rollups and one without.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import replace
from decimal import Context, Decimal
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from k2.observability import REGISTRY
from k2.query import bars, rollups
from k2.query.bars import BarQuery
from k2.query.engine import Engine
from k2.query.filters import INTERVALS
from k2.query.sample import load_asx
from k2.query.sql import exact_ratio
from k2.query.tail import TailRows
from k2.settings import Settings
from k2_synthetic import generate

pytestmark = pytest.mark.unit

SYDNEY = ZoneInfo("Australia/Sydney")
DAYS = 3


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    """(with rollups, without) over the same tables: two loads, so two files a day over the same hours."""
    tmp = tmp_path_factory.mktemp("rollups")
    settings = Settings(mode="dev", catalog_uri=f"sqlite:///{tmp}/catalog.db", warehouse=str(tmp / "wh"),
                        namespace="market", s3_endpoint=None, log_level="WARNING", query_cache_mb=0)
    for seed in (1, 2):  # seeds whose ticks have unique (time, symbol, sequence) keys (test_tick_pages)
        load_asx(settings, generate(tmp / f"load{seed}", symbols=3, days=DAYS, seed=seed), kinds=("trades",))
    rolled, plain = Engine(settings), Engine(settings.model_copy(update={"query_rollup_mb": 0}))
    assert rolled.rollups is not None and plain.rollups is None
    yield rolled, plain
    rolled.close()
    plain.close()


def _symbols_and_days(engine: Engine) -> tuple[list[str], list[dt.date]]:
    table = engine.table("trades", fresh=True).scan(selected_fields=("symbol", "exchange_date")).to_arrow()
    return sorted(set(table["symbol"].to_pylist())), sorted(set(table["exchange_date"].to_pylist()))


def _computed_files() -> float:
    return REGISTRY.get_sample_value("k2_query_rollup_files_total", {"result": "computed"}) or 0.0


def _held_files() -> float:
    return REGISTRY.get_sample_value("k2_query_rollup_files_total", {"result": "hit"}) or 0.0


def test_summaries_from_rollups_equal_sql(engines):
    rolled, plain = engines
    symbols, days = _symbols_and_days(plain)
    held = _held_files()
    for symbol in symbols:
        for day in [days[0] - dt.timedelta(days=1), *days]:  # and a day without trades
            assert _exactly(bars.summary(rolled, symbol, day)) == _exactly(bars.summary(plain, symbol, day)), \
                (symbol, day)
    assert rolled.rollups.currsize > 0
    assert _held_files() > held, "summaries were answered from partials"


def _rollup_summaries() -> float:
    return REGISTRY.get_sample_value("k2_query_executions_total", {"query": "rollup_summary", "outcome": "ok"}) or 0.0


def test_summaries_are_reduced_to_python_values_without_a_table_of_bars(engines):
    rolled, _ = engines
    symbols, days = _symbols_and_days(rolled)
    before = _rollup_summaries()
    assert bars.summary(rolled, symbols[0], days[1]) is not None
    assert _rollup_summaries() == before + 1


def test_summaries_past_64_bits_take_the_general_combination_and_still_equal_sql(engines, monkeypatch):
    """Where `_totals` cannot answer (a null, a sum that may not fit 64 bits) the bars' combination
    does, with the same figures."""
    rolled, plain = engines
    symbols, days = _symbols_and_days(plain)
    monkeypatch.setattr(rollups, "_totals", lambda rows: None)
    for symbol in symbols:
        for day in days:
            assert _exactly(bars.summary(rolled, symbol, day)) == _exactly(bars.summary(plain, symbol, day)), \
                (symbol, day)


def _exactly(found: dict | None) -> dict | None:
    """Each value with its type and text: decimals equal in value but not in scale print apart."""
    return None if found is None else {k: (type(v), str(v)) for k, v in found.items()}


def _ranges(days: list[dt.date]) -> list[tuple[dt.datetime, dt.datetime]]:
    def at(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
        return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=SYDNEY)

    return [(at(days[0], 0), at(days[-1] + dt.timedelta(days=1), 0)),  # every day
            (at(days[1], 0), at(days[1] + dt.timedelta(days=1), 0)),  # one day
            (at(days[0], 10, 17), at(days[1], 14, 3)),  # across a night, on whole minutes
            (at(days[1], 11, 7), at(days[1], 11, 8)),  # one minute
            (at(days[1], 11, 7) + dt.timedelta(seconds=30), at(days[1], 15, 0))]  # not whole minutes: SQL


@pytest.mark.parametrize("interval", list(INTERVALS))
def test_bars_from_rollups_equal_sql(engines, interval: str):
    rolled, plain = engines
    symbols, days = _symbols_and_days(plain)
    held = _held_files()
    for start, end in _ranges(days):
        for asked in [(symbols[0],), tuple(symbols), (symbols[1], "NOPE")]:
            for metric in ("ohlcv", "vwap", "twap"):
                q = BarQuery(asked, interval, start, end, metric=metric)  # type: ignore[arg-type]
                expected = bars.bars(plain, q, max_rows=100_000)
                got = bars.bars(rolled, q, max_rows=100_000)
                assert got.schema == expected.schema, q
                assert got.to_pylist() == expected.to_pylist(), q
    assert _held_files() > held


def test_bars_from_rollups_add_the_live_tail(engines):
    """Rows past the snapshot are aggregated per request beside the files' partials."""
    _, plain = engines
    symbols, days = _symbols_and_days(plain)
    stored = plain.table("trades", fresh=True).scan().to_arrow()
    some = stored.filter(pc.equal(stored["symbol"], symbols[0])).slice(0, 500)
    # Later in the same day, with sequence numbers no stored tick has: new ticks the stream has not committed.
    later = some.set_column(some.schema.get_field_index("exchange_timestamp"), "exchange_timestamp",
                            pc.add(some["exchange_timestamp"], pa.scalar(dt.timedelta(minutes=37))))
    later = later.set_column(later.schema.get_field_index("sequence_number"), "sequence_number",
                             pc.add(later["sequence_number"], 10_000_000))
    tail = TailRows(later, ())
    start = dt.datetime(days[0].year, days[0].month, days[0].day, tzinfo=SYDNEY)
    for interval in ("1m", "15m", "1d"):
        q = BarQuery(tuple(symbols), interval, start, start + dt.timedelta(days=DAYS + 3))  # type: ignore[arg-type]
        results = [bars.bars(e, q, max_rows=100_000, pin=replace(e.pin("trades"), tail=tail)) for e in engines]
        assert results[0].to_pylist() == results[1].to_pylist(), interval
        without = bars.bars(plain, q, max_rows=100_000)
        assert sum(results[0]["trade_count"].to_pylist()) == sum(without["trade_count"].to_pylist()) + later.num_rows


def test_a_file_is_aggregated_once_then_held(engines):
    rolled, _ = engines
    symbols, days = _symbols_and_days(rolled)
    day = days[-1]
    bars.summary(rolled, symbols[0], day)
    computed = _computed_files()
    for symbol in symbols:  # one GROUP BY per file served every symbol
        bars.summary(rolled, symbol, day)
    assert _computed_files() == computed


def test_vwap_divides_as_exact_ratio_on_any_notional():
    rng = random.Random(7)
    volumes = [rng.choice((0, 1, 2, 3, 7, 10, 400, rng.randrange(1, 10**9))) for _ in range(2000)]
    # unscaled below volume × 10^18: every ratio fits decimal(18, 6), as an average price does
    notionals = [Decimal(rng.randrange(0, max(v, 1) * 10**rng.choice((6, 12, 18)))).scaleb(-6) for v in volumes]
    notionals += [Decimal("2.5"), Decimal("3.5"), Decimal("0.000005"), Decimal("0.000007")]  # halves: ties
    volumes += [1_000_000, 1_000_000, 2, 2]
    for cut in (len(notionals), 1000):  # all of them (some beyond 64 bits), and only small ones
        chosen = [(n, v) for n, v in zip(notionals, volumes, strict=True) if cut == len(notionals) or n < 10**12]
        column = pa.array([n for n, _ in chosen], pa.decimal128(38, 6))
        got = rollups._vwap(column, np.array([v for _, v in chosen], dtype=np.int64)).to_pylist()
        assert got == [exact_ratio(n, v) for n, v in chosen]


_NOTIONALS = {  # unscaled notionals: on 64 bits, summing past them, beyond them, and small but with a high word
    "40 bits": lambda rng: rng.randrange(-2**40, 2**40),
    "62 bits": lambda rng: rng.randrange(-2**62, 2**62),
    "100 bits": lambda rng: rng.randrange(-2**100, 2**100),
    "2**64 + small": lambda rng: 2**64 + rng.randrange(1000),
}


@pytest.mark.parametrize("notionals", _NOTIONALS)
def test_partials_combine_to_python_sums_and_extremes_on_64_bits_and_past_them(notionals: str):
    """Sums on 64-bit integers where they fit, Arrow's 128-bit group-by where they may not: the same
    figures as Python's integers either way."""
    rng = random.Random(notionals)
    n = 300
    buckets = np.array(sorted(rng.randrange(8) for _ in range(n)), dtype=np.int64)
    price = lambda: _scaled(rng.randrange(-10**12, 10**12))  # noqa: E731
    rows = pa.table({
        "open_us": pa.array([rng.randrange(10**6) for _ in range(n)], pa.int64()),
        "open_seq": pa.array([rng.randrange(50) for _ in range(n)], pa.int64()),
        "open": pa.array([price() for _ in range(n)], pa.decimal128(18, 6)),
        "close_us": pa.array([rng.randrange(10**6) for _ in range(n)], pa.int64()),
        "close_seq": pa.array([rng.randrange(50) for _ in range(n)], pa.int64()),
        "close": pa.array([price() for _ in range(n)], pa.decimal128(18, 6)),
        "high": pa.array([price() for _ in range(n)], pa.decimal128(18, 6)),
        "low": pa.array([price() for _ in range(n)], pa.decimal128(18, 6)),
        "volume": pa.array([rng.randrange(10**9) for _ in range(n)], pa.int64()),
        "trade_count": pa.array([rng.randrange(1, 10**4) for _ in range(n)], pa.int64()),
        "notional": pa.array([_scaled(_NOTIONALS[notionals](rng))
                              for _ in range(n)], pa.decimal128(38, 6)),
    })
    got_buckets, got = rollups._grouped(rows, buckets)
    assert got_buckets.tolist() == sorted(set(buckets.tolist()))
    for i, bucket in enumerate(got_buckets.tolist()):
        of = [r for r, b in zip(rows.to_pylist(), buckets.tolist(), strict=True) if b == bucket]
        row = got.slice(i, 1).to_pylist()[0]
        assert row["high"] == max(r["high"] for r in of) and row["low"] == min(r["low"] for r in of)
        assert row["volume"] == sum(r["volume"] for r in of)
        assert row["trade_count"] == sum(r["trade_count"] for r in of)
        assert _unscaled(row["notional"]) == sum(_unscaled(r["notional"]) for r in of)
        assert row["open"] == min(of, key=lambda r: (r["open_us"], r["open_seq"]))["open"]
        assert row["close"] == max(of, key=lambda r: (r["close_us"], r["close_seq"]))["close"]
    assert got.schema.field("notional").type == pa.decimal128(38, 6)
    assert got.schema.field("high").type == pa.decimal128(18, 6)

    # One bucket of all of them, reduced to Python values (a daily summary): the same figures, or
    # None where the notional may not fit 64 bits.
    totals = rollups._totals(rows)
    assert (totals is None) == (notionals != "40 bits")
    if totals is not None:
        of = rows.to_pylist()
        volume = sum(r["volume"] for r in of)
        assert _exactly(totals) == _exactly({
            "open": min(of, key=lambda r: (r["open_us"], r["open_seq"]))["open"],
            "high": max(r["high"] for r in of), "low": min(r["low"] for r in of),
            "close": max(of, key=lambda r: (r["close_us"], r["close_seq"]))["close"],
            "volume": volume, "trade_count": sum(r["trade_count"] for r in of),
            "vwap": exact_ratio(_scaled(sum(_unscaled(r["notional"]) for r in of)), volume)})


def _scaled(unscaled: int) -> Decimal:
    """unscaled × 10⁻⁶, exactly (Decimal arithmetic would round past 28 digits)."""
    return Decimal(unscaled).scaleb(-6, Context(prec=80))


def _unscaled(value: Decimal) -> int:
    return int(value.scaleb(6, Context(prec=80)))
