"""Where `k2-query` gets its rows: the REST API, or the catalog directly through the same engine.

Both sources return the API's JSON shapes (decimals as strings, instants as ISO-8601 UTC): the
local one encodes the engine's rows with the same pydantic-core encoder the API uses, so output
does not depend on how a command was answered.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import httpx
import pyarrow as pa
from pydantic_core import to_jsonable_python

from k2.query import bars, metadata, ticks
from k2.query.bars import BarQuery
from k2.query.cursor import fingerprint
from k2.query.engine import Engine
from k2.query.errors import QueryError
from k2.query.filters import TickFilter, TickKind, columns
from k2.reach import redacted
from k2.rows import to_rows
from k2.settings import TABLE_KINDS, Settings, TableKind

Row = dict[str, Any]


class ClientError(RuntimeError):
    """A query the source refused or could not answer; the message is meant for the user."""


class Source(Protocol):
    def ticks(self, kind: TickKind, *, symbol: str | None, start: dt.datetime | None, end: dt.datetime | None,
              limit: int) -> list[Row]: ...

    def summary(self, symbol: str, day: dt.date) -> Row: ...

    def bars(self, query: BarQuery) -> list[Row]: ...

    def symbols(self) -> list[Row]: ...

    def snapshots(self, table: TableKind | None) -> list[Row]: ...

    def stats(self) -> list[Row]: ...


class ApiSource:
    def __init__(self, http: httpx.Client) -> None:
        """`http` carries the base URL and the X-API-Key header (see `connect`)."""
        self._http = http

    @classmethod
    def connect(cls, url: str, api_key: str, *, timeout: float = 60.0) -> ApiSource:
        return cls(httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=timeout))

    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
              body: dict[str, Any] | None = None) -> Any:
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=query, json=body)
        except httpx.HTTPError as exc:
            raise ClientError(f"the K2 API could not be reached at {self._http.base_url}: {exc}. Start it with "
                              "`k2 api`, or pass --url where it runs (--local reads the catalog directly)") from exc
        if response.is_error:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ClientError(f"HTTP {response.status_code}: {message}")
        return response.json()

    def ticks(self, kind: TickKind, *, symbol: str | None, start: dt.datetime | None, end: dt.datetime | None,
              limit: int) -> list[Row]:
        return self._call("GET", f"/v1/{kind}", params={"symbol": symbol, "start": start, "end": end,
                                                         "limit": limit})["data"]

    def summary(self, symbol: str, day: dt.date) -> Row:
        return self._call("GET", f"/v1/summary/{symbol}/{day.isoformat()}")

    def bars(self, query: BarQuery) -> list[Row]:
        body = {"metric": query.metric, "symbols": list(query.symbols), "interval": query.interval,
                "start": query.start.isoformat(), "end": query.end.isoformat(), "fill": query.fill,
                "exchange": query.exchange}
        return self._call("POST", "/v1/aggregations", body=body)["data"]

    def symbols(self) -> list[Row]:
        return self._call("GET", "/v1/symbols")["data"]

    def snapshots(self, table: TableKind | None) -> list[Row]:
        return self._call("GET", "/v1/snapshots", params={"table": table})["data"]

    def stats(self) -> list[Row]:
        return self._call("GET", "/v1/stats")["data"]

    def close(self) -> None:
        self._http.close()


class LocalSource:
    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self._owned = engine is None
        self._engine = engine or Engine(settings)
        self._settings = settings
        self._max_rows = settings.max_rows

    def check_not_empty(self) -> None:
        """A catalog without K2's tables is most likely not the one meant: say which one was read."""
        with _answering():
            if any(self._engine.table(kind) is not None for kind in TABLE_KINDS):
                return
        s = self._settings
        raise ClientError(f"the catalog {redacted(s.resolved_catalog_uri)} (warehouse {s.warehouse}) has no K2 tables "
                          f"in namespace {s.namespace!r}: nothing was streamed into it. Set K2_CATALOG_URI and "
                          "K2_WAREHOUSE to the catalog that holds your data (`k2 demo` prints its own)")

    def ticks(self, kind: TickKind, *, symbol: str | None, start: dt.datetime | None, end: dt.datetime | None,
              limit: int) -> list[Row]:
        flt = TickFilter((symbol,) if symbol else (), None, start, end)
        with _answering():
            rel = ticks.tick_relation(self._engine, self._engine.pin(kind), flt)
            page = ticks.page(self._engine, rel, fields=columns(kind), limit=limit, cursor=None,
                              fingerprint=fingerprint(kind, flt))
        return _jsonable(page.rows)

    def summary(self, symbol: str, day: dt.date) -> Row:
        with _answering():
            found = bars.summary(self._engine, symbol, day)
        if found is None:
            raise ClientError(f"no {symbol} trades on {day.isoformat()}")
        return to_jsonable_python(found)

    def bars(self, query: BarQuery) -> list[Row]:
        with _answering():
            return _jsonable(bars.bars(self._engine, query, max_rows=self._max_rows))

    def symbols(self) -> list[Row]:
        with _answering():
            return _jsonable(metadata.symbols(self._engine))

    def snapshots(self, table: TableKind | None) -> list[Row]:
        with _answering():
            found = [s for k in ((table,) if table else TABLE_KINDS) for s in metadata.snapshots(self._engine, k)]
        return [to_jsonable_python(dataclasses.asdict(s)) for s in found]

    def stats(self) -> list[Row]:
        with _answering():
            found = metadata.stats(self._engine)
        return [to_jsonable_python(dataclasses.asdict(s)) for s in found]

    def close(self) -> None:
        if self._owned:
            self._engine.close()


@contextmanager
def _answering() -> Iterator[None]:
    """Engine refusals become `ClientError`s with the engine's own message."""
    try:
        yield
    except QueryError as exc:
        raise ClientError(str(exc)) from exc


def _jsonable(table: pa.Table) -> list[Row]:
    return to_jsonable_python(to_rows(table))


def _param(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime | dt.date) else value
