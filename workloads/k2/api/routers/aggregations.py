"""/v1/aggregations: OHLCV, VWAP and TWAP bars with gap filling (definitions in k2.query.bars)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from k2.api.deps import EngineDep, SettingsDep
from k2.api.jsonrows import json_response
from k2.api.models import AggregationRequest, Bar, Bars
from k2.api.offload import memory_first
from k2.query import bars
from k2.query.filters import exchange_zone

router = APIRouter(prefix="/v1/aggregations", tags=["aggregations"])


@router.post("", response_model=Bars, response_model_exclude_unset=True)
@memory_first
def aggregate(body: AggregationRequest, engine: EngineDep, settings: SettingsDep) -> Response:
    """Buckets are aligned to the exchange's local clock. TWAP weights each trade price by how long
    it prevailed: until the next trade in the bucket, or the bucket's end (cut at `end`)."""
    query = bars.BarQuery(tuple(body.symbols), body.interval, body.start, body.end, body.metric, body.fill,
                          body.exchange)
    table = bars.bars(engine, query, max_rows=settings.max_rows)
    # The model's field order (what `Bar(**row)` would write), whatever the query's column order.
    table = table.select([name for name in Bar.model_fields if name in table.column_names])
    return json_response(Bars, table, metric=body.metric, interval=body.interval, fill=body.fill,
                         timezone=exchange_zone(body.exchange).key)
