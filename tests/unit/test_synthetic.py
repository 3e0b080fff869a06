"""The demo's generator: deterministic, ASX format, realistic traps included."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import pytest

import k2_synthetic
from k2 import exchanges
from k2.sources.asx import RecordBuilder, discover
from k2_synthetic import LISTINGS, generate, listings, plan_scale

pytestmark = pytest.mark.unit


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.csv")):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path):
    a = generate(tmp_path / "a", symbols=3, days=2, seed=7)
    b = generate(tmp_path / "b", symbols=3, days=2, seed=7)
    c = generate(tmp_path / "c", symbols=3, days=2, seed=8)
    assert _digest(a) == _digest(b) != _digest(c)


def test_existing_arguments_still_write_the_bytes_they_wrote_before_more_symbols_and_intraday(tmp_path: Path):
    # Digests of the generator's output before the scale options existed: the demo and the tests
    # rely on these exact files.
    assert _digest(generate(tmp_path / "a")) == "f07762c57b6b2a79aae2c27d8f887115c1c8cb0921da09a07dfd7c2305575a61"
    assert _digest(generate(tmp_path / "b", symbols=12, days=3, seed=7)) == (
        "4164483af144285dc8d6b5468cc2236697a0e390fa453fd9d9cbbc68dc10f21b")


def test_more_symbols_than_the_fixed_listings_are_deterministic_and_distinct(tmp_path: Path):
    a = generate(tmp_path / "a", symbols=15, days=1, seed=3, intraday="u")
    b = generate(tmp_path / "b", symbols=15, days=1, seed=3, intraday="u")
    c = generate(tmp_path / "c", symbols=15, days=1, seed=4, intraday="u")
    assert _digest(a) == _digest(b) != _digest(c)
    chosen = listings(15)
    assert chosen[:12] == LISTINGS and listings(40)[:15] == chosen  # a listing never depends on how many
    assert len({x.symbol for x in chosen}) == len({x.company_id for x in chosen}) == 15
    assert len((a / "reference-data" / "company_info.csv").read_text().splitlines()) == 1 + 15
    assert {p.stem for p in (a / "trades").glob("*.csv")} == {str(x.company_id) for x in chosen}
    with pytest.raises(ValueError, match="intraday"):
        generate(tmp_path / "d", symbols=1, days=1, intraday="w")  # type: ignore[arg-type]


def _rows(root: Path) -> int:
    return sum(p.read_bytes().count(b"\r\n") for kind in ("trades", "quotes") for p in (root / kind).glob("*.csv"))


@pytest.mark.parametrize("target", [50_000, 150_000])
def test_plan_scale_gives_about_the_requested_rows(tmp_path: Path, target: int):
    symbols, days = plan_scale(target)
    assert abs(_rows(generate(tmp_path, symbols=symbols, days=days, intraday="u")) - target) < 0.15 * target


def _continuous_trades_per_hour(root: Path) -> dict[int, int]:
    hours = dict.fromkeys(range(10, 16), 0)
    for path in (root / "trades").glob("*.csv"):
        for line in path.read_text().splitlines():
            hour = int(line.split(",")[1][:2])
            if hour in hours:
                hours[hour] += 1
    return hours


def test_u_shape_is_busier_after_the_open_and_before_the_close_than_at_midday(tmp_path: Path):
    u = _continuous_trades_per_hour(generate(tmp_path / "u", symbols=14, days=2, intraday="u"))
    flat = _continuous_trades_per_hour(generate(tmp_path / "flat", symbols=14, days=2))
    midday = (u[12] + u[13]) / 2
    assert u[10] > 2 * midday and u[15] > 2 * midday, u
    assert max(flat.values()) < 1.3 * min(flat.values()), flat  # the default stays flat
    assert abs(sum(u.values()) - sum(flat.values())) < 0.1 * sum(flat.values())  # same volume, reshaped


@pytest.mark.parametrize("options", [{"symbols": 2}, {"symbols": 14, "intraday": "u"}])
def test_generated_files_parse_cleanly_and_contain_the_real_traps(tmp_path: Path, options: dict):
    root = generate(tmp_path, days=2, seed=1, **options)
    assert (root / "trades" / "7078.csv").read_bytes().endswith(b"\r\n")
    flags = {"one_sided": 0, "crossed": 0, "outside_hours": 0, "identical_fills": 0}
    for tick_file in discover(root):
        builder = RecordBuilder(tick_file, 0)
        previous = None
        for line in tick_file.path.open(newline=""):
            record = builder.build(line)  # raises on any malformed row
            fields = line.split(",")
            if tick_file.kind == "quotes":
                flags["one_sided"] += record["is_one_sided"]
                flags["crossed"] += record["is_crossed"]
            else:
                flags["outside_hours"] += not ("10:00" <= fields[1][:5] < "16:00")
                flags["identical_fills"] += fields[:4] == previous
                previous = fields[:4]
    assert all(count > 0 for count in flags.values()), flags


def test_trading_days_and_the_session_are_the_registrys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The generator keeps no calendar of its own: a holiday added to ASX's calendar is skipped."""
    asx = exchanges.get("ASX")
    assert k2_synthetic.SESSION == (10 * 3600, 16 * 3600)
    holiday = dt.date(2014, 3, 11)
    monkeypatch.setattr(k2_synthetic, "ASX", dataclasses.replace(
        asx, calendar=dataclasses.replace(asx.calendar, holidays=frozenset({holiday}))))
    root = generate(tmp_path, symbols=1, days=3)  # from Monday 10 March 2014
    days = {line.split(",")[0] for line in (root / "trades" / "7078.csv").read_text().splitlines()}
    assert days == {"03/10/2014", "03/12/2014", "03/13/2014"}
