"""Row-level security: what the caller's key may read, applied inside every query.

The API binds the caller's `Scope` for the request (`bind`). Every `TickFilter` made while it is
bound carries it: a filter naming a symbol, exchange or table outside the scope is refused
(`Forbidden`, a 403 with the reason), and the engine reads every table through the scope's
predicate, so no query, whatever its SQL, sees a row outside it. The scope is part of the filter's
identity, so plans and cached results are never shared across scopes.
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyiceberg.expressions import BooleanExpression, In, Or, StartsWith

from k2.query.errors import QueryError


class Forbidden(QueryError):
    """The key's entitlements do not cover the request; the message says which scope refused it."""


@dataclass(frozen=True)
class Scope:
    key_id: str
    exchanges: frozenset[str] | None = None  # None: every exchange
    symbols: tuple[str, ...] | None = None  # exact symbols or prefixes ending in `*`; None: every symbol
    tables: frozenset[str] | None = None  # None: every table
    stream: bool = False  # may subscribe to the WebSocket streams

    def allows_symbol(self, symbol: str) -> bool:
        return self.symbols is None or any(fnmatch.fnmatchcase(symbol, p) for p in self.symbols)

    def allows(self, symbol: str, exchange: str) -> bool:
        return self.allows_symbol(symbol) and (self.exchanges is None or exchange in self.exchanges)

    def check(self, *, symbols: tuple[str, ...] = (), exchange: str | None = None, table: str | None = None) -> None:
        refused = [s for s in symbols if not self.allows_symbol(s)]
        if refused:
            raise Forbidden(f"key {self.key_id} may not read symbols {refused} (entitled: {list(self.symbols or [])})")
        if exchange is not None and self.exchanges is not None and exchange not in self.exchanges:
            raise Forbidden(f"key {self.key_id} may not read exchange {exchange} (entitled: {sorted(self.exchanges)})")
        if table is not None and self.tables is not None and table not in self.tables:
            raise Forbidden(f"key {self.key_id} may not read table {table} (entitled: {sorted(self.tables)})")

    @property
    def restricts_rows(self) -> bool:
        return self.symbols is not None or self.exchanges is not None

    def _exact_and_prefixes(self) -> tuple[list[str], list[str]]:
        exact = [p for p in self.symbols or () if not p.endswith("*")]
        return exact, [p[:-1] for p in self.symbols or () if p.endswith("*")]

    def sql(self, prefix: str) -> tuple[str, dict[str, Any]]:
        """A DuckDB predicate for the rows in scope, with its bound parameters."""
        clauses, params = [], {}
        if self.symbols is not None:
            exact, prefixes = self._exact_and_prefixes()
            alternatives = []
            if exact:
                names = {f"{prefix}sym_{i}": s for i, s in enumerate(exact)}
                params.update(names)
                alternatives.append(f"symbol IN ({', '.join('$' + n for n in names)})")
            for i, start in enumerate(prefixes):
                params[f"{prefix}pre_{i}"] = start
                alternatives.append(f"starts_with(symbol, ${prefix}pre_{i})")
            clauses.append("(" + (" OR ".join(alternatives) or "FALSE") + ")")
        if self.exchanges is not None:
            names = {f"{prefix}exch_{i}": e for i, e in enumerate(sorted(self.exchanges))}
            params.update(names)
            clauses.append(f"exchange IN ({', '.join('$' + n for n in names)})" if names else "FALSE")
        return " AND ".join(clauses) or "TRUE", params

    def iceberg_terms(self) -> list[BooleanExpression]:
        """The same restriction for pyiceberg, so planning prunes files outside the scope too."""
        terms: list[BooleanExpression] = []
        if self.symbols is not None:
            exact, prefixes = self._exact_and_prefixes()
            options: list[BooleanExpression] = ([In("symbol", exact)] if exact else []) + [
                StartsWith("symbol", p) for p in prefixes]
            if options:
                terms.append(options[0] if len(options) == 1 else Or(*options))
        if self.exchanges:
            terms.append(In("exchange", sorted(self.exchanges)))
        return terms


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("k2_scope", default=None)


def current() -> Scope | None:
    return _current.get()


@contextmanager
def bound(scope: Scope | None) -> Iterator[None]:
    token = _current.set(scope)
    try:
        yield
    finally:
        _current.reset(token)


def bind(scope: Scope | None) -> None:
    """For the rest of the current request (its task and the threads it hands work to)."""
    _current.set(scope)
