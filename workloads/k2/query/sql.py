"""Small helpers for writing parameterised DuckDB SQL.

Values are only ever bound as `$name` parameters. Identifiers are quoted from names that
`k2.query.filters` has already checked against the table schemas.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

from k2.query.filters import TickFilter

# Exact ratio of two non-negative decimals of scale 6, rounded half-to-even to scale 6; the ratio
# must fit decimal(18, 6), as any average of prices does. DuckDB divides decimals in DOUBLE,
# which would make VWAP/TWAP inexact; this divides the unscaled integers in HUGEINT instead.
# Multiplying by 0.000001 (not dividing by 10^6) keeps the result a DECIMAL.
#
# HUGEINT division cost about 12 µs a row here. k2_exact_ratio_estimated divides in DOUBLE first:
# when the estimate's residual, num - estimate × den (exact in DECIMAL), is below half a unit
# (0.000001) of den, the estimate is the rounded ratio; otherwise (a tie, an estimate a unit off,
# a ratio too large for the estimate) it divides as k2_exact_ratio does. Its expression costs
# about 0.4 ms more to plan, so it pays from about 100 rows on (bars pick by their bucket count).
EXACT_RATIO_MACRO = """
CREATE OR REPLACE MACRO k2_exact_ratio(num, den) AS (
    CASE WHEN den IS NULL OR den = 0 THEN NULL ELSE (
        (num * 1000000)::HUGEINT // den::HUGEINT
        + CASE WHEN 2 * ((num * 1000000)::HUGEINT % den::HUGEINT) > den::HUGEINT
                 OR (2 * ((num * 1000000)::HUGEINT % den::HUGEINT) = den::HUGEINT
                     AND ((num * 1000000)::HUGEINT // den::HUGEINT) % 2 = 1)
               THEN 1 ELSE 0 END
    )::DECIMAL(18, 0) * 0.000001::DECIMAL(7, 6) END
);
CREATE OR REPLACE MACRO k2_ratio_estimate(num, den) AS (
    TRY_CAST(round(num::DOUBLE / den::DOUBLE, 6) AS DECIMAL(18, 6))
);
CREATE OR REPLACE MACRO k2_exact_ratio_estimated(num, den) AS (
    CASE WHEN abs(2 * (num - k2_ratio_estimate(num, den) * den)) < den * 0.000001 THEN k2_ratio_estimate(num, den)
         ELSE k2_exact_ratio(num, den) END
);
"""


def exact_ratio(num: Decimal | None, den: int | None) -> Decimal | None:
    """k2_exact_ratio of one pair, in Python: a query that ends in one row divides here, since the
    macro's expression cost more to plan than DuckDB took to read a symbol's day."""
    if num is None or not den:
        return None
    return Decimal(round(Fraction(num) * 10**6 / den)).scaleb(-6)  # round() of a Fraction is half-even


def ident(name: str) -> str:
    """Quote a whitelisted column name."""
    return '"' + name.replace('"', '""') + '"'


def select_list(names: Iterable[str], table_alias: str | None = None) -> str:
    prefix = f"{table_alias}." if table_alias else ""
    return ", ".join(prefix + ident(n) for n in names)


class Where:
    """A conjunction of conditions with their bound parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: dict[str, Any] = {}

    def add(self, clause: str, **params: Any) -> Where:
        """`clause` refers to its values as `$name`; names must be unique within the query."""
        clash = self.params.keys() & params.keys()
        if clash:
            raise ValueError(f"parameter names reused: {sorted(clash)}")
        self.clauses.append(clause)
        self.params.update(params)
        return self

    def is_in(self, column: str, values: Iterable[Any], prefix: str) -> Where:
        """`column IN ($prefix0, $prefix1, …)`: a literal list, which DuckDB pushes into Parquet scans."""
        names = {f"{prefix}{i}": v for i, v in enumerate(values)}
        placeholders = ", ".join(f"${n}" for n in names)
        return self.add(f"{ident(column)} IN ({placeholders})", **names)

    def ticks(self, flt: TickFilter, *, prefix: str = "", timestamped: bool = True) -> Where:
        """The conditions of a `TickFilter` (pyiceberg has pruned files; these prune rows).
        `prefix` keeps parameter names apart when one query filters two tables."""
        if flt.symbols:
            self.is_in("symbol", flt.symbols, f"{prefix}symbol_")
        if flt.exchange:
            self.add(f"exchange = ${prefix}exchange", **{f"{prefix}exchange": flt.exchange})
        if timestamped and flt.start:
            self.add(f"exchange_timestamp >= ${prefix}start", **{f"{prefix}start": flt.start})
        if timestamped and flt.end:
            self.add(f"exchange_timestamp < ${prefix}end", **{f"{prefix}end": flt.end})
        return self

    def sql(self) -> str:
        return "WHERE " + " AND ".join(f"({c})" for c in self.clauses) if self.clauses else ""
