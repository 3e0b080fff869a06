"""/v1/summary: one symbol's exchange-local trading day."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from k2.api.deps import EngineDep
from k2.api.models import Day, Exchange, Summary, Symbol
from k2.api.offload import memory_first
from k2.exchanges import DEFAULT_EXCHANGE
from k2.query import bars
from k2.query.errors import NotFound

router = APIRouter(prefix="/v1/summary", tags=["summary"])


@router.get("/{symbol}/{date}", response_model=Summary)
@memory_first
def daily_summary(symbol: Symbol, date: Day, engine: EngineDep,
                  exchange: Exchange = DEFAULT_EXCHANGE) -> Response:
    """Open, high, low, close, volume, trade count and VWAP of that exchange-local date."""
    day = bars.summary(engine, symbol, date, exchange)
    if day is None:
        raise NotFound(f"no {symbol} trades on {exchange} on {date.isoformat()}")
    # Serialised here, not by FastAPI from the returned model: its response-model path validated and
    # encoded the model again, which cost more than the rolled-up summary itself.
    return Response(Summary(**day).model_dump_json(), media_type="application/json")
