"""/v1/quotes: quotes, and the latest quote per symbol as of a time."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from k2.api.deps import EngineDep
from k2.api.jsonrows import json_response
from k2.api.models import Exchange, Instant, LatestQuotes, QuotePage, Symbol
from k2.api.offload import memory_first
from k2.api.routers.ticks import add_tick_routes
from k2.query import ticks
from k2.query.filters import MAX_SYMBOLS, TickFilter

router = APIRouter(prefix="/v1/quotes", tags=["quotes"])
add_tick_routes(router, "quotes", QuotePage)


@router.get("/latest", response_model=LatestQuotes)
@memory_first
def latest_quotes(
    engine: EngineDep,
    symbol: Annotated[list[Symbol], Query(min_length=1, max_length=MAX_SYMBOLS, description="repeatable")],
    exchange: Exchange | None = None,
    as_of: Annotated[Instant | None, Query(description="default: now")] = None,
) -> Response:
    """The last quote at or before `as_of` of each symbol (symbols without one are absent)."""
    pin = engine.pin("quotes", live=True)
    instant = as_of or dt.datetime.now(dt.UTC)
    rows = ticks.latest_quotes(engine, pin, TickFilter(tuple(symbol), exchange), instant, cacheable=as_of is not None)
    return json_response(LatestQuotes, rows, as_of=instant, snapshot_id=pin.snapshot_id)
