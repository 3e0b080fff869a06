"""The routes trades and quotes share: a keyset-paged list and a streamed query."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from k2.api.deps import EngineDep, PageLimit
from k2.api.export import EXPORT_RESPONSES, export
from k2.api.jsonrows import json_response
from k2.api.models import Exchange, Instant, Page, Symbol, TickQuery
from k2.api.offload import memory_first, offloaded
from k2.query import ticks
from k2.query.cursor import Cursor, fingerprint
from k2.query.filters import TickFilter, TickKind, columns


def add_tick_routes(router: APIRouter, kind: TickKind, page_model: type[Page]) -> None:
    @router.get("", response_model=page_model, summary=f"Page through {kind} in time order")
    @memory_first
    def list_ticks(engine: EngineDep, limit: PageLimit, symbol: Symbol | None = None,
                   exchange: Exchange | None = None,
                   start: Annotated[Instant | None, Query(description="inclusive")] = None,
                   end: Annotated[Instant | None, Query(description="exclusive")] = None,
                   cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
                   ) -> Response:
        flt = TickFilter((symbol,) if symbol else (), exchange, start, end)
        request_fingerprint = fingerprint(kind, flt)
        token = Cursor.decode(cursor, request_fingerprint) if cursor else None
        pin = engine.pin(kind, snapshot_id=token.snapshot(kind) if token else None, live=token is None)
        page = ticks.page(engine, ticks.tick_relation(engine, pin, flt), fields=columns(kind), limit=limit,
                          cursor=token, fingerprint=request_fingerprint)
        return json_response(page_model, page.rows, snapshot_id=pin.snapshot_id, next_cursor=page.next_cursor)

    @router.post("/query", response_class=StreamingResponse, responses=EXPORT_RESPONSES,
                 summary=f"Query {kind} of many symbols, streamed as JSON, CSV or Parquet")
    @offloaded
    def query_ticks(body: TickQuery, engine: EngineDep) -> StreamingResponse:
        return export(engine, engine.pin(kind, as_of=body.as_of, live=True), body)
