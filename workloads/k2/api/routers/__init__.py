"""One router per resource. /v1 routers carry their full path (route templates are metric labels)
and are included behind the API key and the rate limit."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from k2.api.deps import rate_limit
from k2.api.errors import V1_ERRORS
from k2.api.routers import aggregations, quotes, replay, snapshots, stats, stream, summary, symbols, system, trades


def include_routers(app: FastAPI) -> None:
    app.include_router(system.router)
    for module in (trades, quotes, summary, aggregations, replay, snapshots, symbols, stats):
        # rate_limit depends on authenticate: a request without a valid key is a 401, never a 429.
        app.include_router(module.router, dependencies=[Depends(rate_limit)], responses=V1_ERRORS)
    app.include_router(stream.router)  # WebSockets: the key is checked in the route (header or first message)
