"""One router per resource. /v1 routers carry their full path (route templates are metric labels);
`k2.api.access` guards them with the API key and the key's budgets."""

from __future__ import annotations

from fastapi import FastAPI

from k2.api.errors import V1_ERRORS
from k2.api.routers import (
    aggregations,
    exchanges,
    quotes,
    replay,
    snapshots,
    stats,
    stream,
    summary,
    symbols,
    system,
    trades,
)


def include_routers(app: FastAPI) -> None:
    app.include_router(system.router)
    for module in (trades, quotes, summary, aggregations, replay, snapshots, symbols, stats, exchanges):
        app.include_router(module.router, responses=V1_ERRORS)
    app.include_router(stream.router)  # WebSockets: the key is checked in the route (header or first message)
