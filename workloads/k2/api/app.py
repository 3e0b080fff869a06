"""The K2 REST API: `create_app()` is the factory uvicorn runs (`k2 api`).

Read routes page through trades and quotes and summarise them; advanced routes stream exports,
replay tables at pinned snapshots and aggregate bars; system routes report health and metrics.
"""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI

from k2.api.access import AccessMiddleware, document_key
from k2.api.auth import ApiKeys
from k2.api.bodylimit import BodyLimitMiddleware
from k2.api.errors import install_error_handlers
from k2.api.middleware import ObservabilityMiddleware
from k2.api.ratelimit import ConcurrencyLimiter, RateLimiter
from k2.api.routers import include_routers
from k2.api.routers.stream import hub
from k2.observability import configure_logging
from k2.query.engine import Engine
from k2.settings import Settings

CORRELATION_HEADER = "X-Correlation-ID"
# Client-chosen ids are echoed in headers and logs: accept only plain tokens.
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

DESCRIPTION = """
Market data from K2's Iceberg tables, queried with DuckDB.

* Every `/v1` route needs an `X-API-Key` header and is rate limited per key (429 + `Retry-After`), in
  requests per window and in requests in progress at once.
* Request bodies over the size limit are refused (413); lists are paged (`limit` at most K2_MAX_ROWS, then
  `next_cursor`); exports stream in batches.
* Prices are exact decimals serialised as JSON **strings** (`"36.667000"`); instants are ISO-8601 UTC.
* `X-Correlation-ID` is accepted (or generated) and echoed; every error has the same JSON shape.
"""


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the app; refuses to (raises) when the API keys are unusable, e.g. prod without keys.

    `engine` lets several apps (tests, benchmarks) share one; an app closes only its own.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level)
    api_keys = ApiKeys(settings)
    owned = engine is None
    query_engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.live_tail_rows:
            query_engine.attach_tails(hub(app).tails)  # the hub starts now, not with a first subscriber
        # What startup made (modules, models, the catalog) lives as long as the process: frozen,
        # a full collection no longer walks it with every thread stopped (300 ms → 30 ms measured
        # in bench_live, where that pause held up every push).
        gc.collect()
        gc.freeze()
        yield
        if getattr(app.state, "hub", None) is not None:  # started by the first WebSocket subscriber
            query_engine.attach_tails({})
            app.state.hub.close()
        if owned:
            query_engine.close()

    app = FastAPI(title="K2 market data API", version=version("k2"), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = query_engine
    app.state.api_keys = api_keys
    install_error_handlers(app)
    # Added last = outermost: the correlation id exists before anything else runs, and refused
    # keys and bodies are counted and logged like any other request.
    app.add_middleware(AccessMiddleware, api_keys=api_keys, rate_limiter=RateLimiter(settings.rate_limit),
                       concurrency=ConcurrencyLimiter(settings.key_concurrency), openapi=lambda: app.openapi())
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware)
    app.add_middleware(CorrelationIdMiddleware, header_name=CORRELATION_HEADER,
                       validator=lambda value: bool(_CORRELATION_ID.match(value)))
    include_routers(app)
    document_key(app)
    return app
