"""/v1/trades: trades, and trades with the quote that prevailed when they printed."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from k2.api.deps import EngineDep, PageLimit
from k2.api.jsonrows import json_response
from k2.api.models import Exchange, Instant, QuotedTradePage, Symbol, TradePage
from k2.api.offload import memory_first
from k2.api.routers.ticks import add_tick_routes
from k2.query import ticks
from k2.query.cursor import Cursor, fingerprint
from k2.query.filters import TickFilter

router = APIRouter(prefix="/v1/trades", tags=["trades"])
add_tick_routes(router, "trades", TradePage)


@router.get("/asof", response_model=QuotedTradePage)
@memory_first
def trades_with_quotes(
    engine: EngineDep, limit: PageLimit, symbol: Symbol, exchange: Exchange | None = None,
    start: Instant | None = None, end: Instant | None = None,
    tolerance_ms: Annotated[int, Query(ge=0, le=86_400_000, description="oldest usable quote, in ms")] = 5_000,
    cursor: str | None = None,
) -> Response:
    """Each trade with the last quote at or before it (DuckDB ASOF JOIN); quote fields are null when
    that quote is older than the tolerance."""
    flt = TickFilter((symbol,), exchange, start, end)
    request_fingerprint = fingerprint("trades_asof", flt, tolerance_ms)
    token = Cursor.decode(cursor, request_fingerprint) if cursor else None
    trades_pin = engine.pin("trades", snapshot_id=token.snapshot("trades") if token else None, live=token is None)
    quotes_pin = engine.pin("quotes", snapshot_id=token.snapshot("quotes") if token else None, live=token is None)
    rel = ticks.quoted_trades_relation(engine, trades_pin, quotes_pin, flt, dt.timedelta(milliseconds=tolerance_ms))
    page = ticks.page(engine, rel, fields=ticks.QUOTED_TRADE_COLUMNS, limit=limit, cursor=token,
                      fingerprint=request_fingerprint)
    return json_response(QuotedTradePage, page.rows, snapshot_id=trades_pin.snapshot_id,
                         quotes_snapshot_id=quotes_pin.snapshot_id, next_cursor=page.next_cursor)
