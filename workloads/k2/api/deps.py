"""Dependencies as `Annotated` aliases, so routes read like their signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader

from k2.api.errors import ApiError
from k2.query import scope as scopes
from k2.query.engine import Engine
from k2.query.errors import InvalidQuery
from k2.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="K2_API_KEYS / K2_API_KEYS_FILE; dev mode without keys accepts "
                                          "the built-in development key")


# Dependencies that do not block are `async def`: FastAPI runs a plain `def` dependency in the
# thread pool, a hop per dependency per request.
async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def authenticate(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> str:
    """The caller's key id; 401 without a valid key."""
    identity = request.app.state.api_keys.identify(key)
    scope = request.app.state.entitlements.scope(key) if identity is None else None
    if scope is not None:
        identity = scope.key_id
        scopes.bind(scope)  # every query of this request reads only what the key is entitled to
    if identity is None:
        raise ApiError(401, "unauthorized", "missing or invalid X-API-Key header",
                       headers={"WWW-Authenticate": "ApiKey"})
    structlog.contextvars.bind_contextvars(api_key_id=identity)
    return identity


async def rate_limit(request: Request, identity: Annotated[str, Depends(authenticate)]) -> AsyncIterator[None]:
    """The key's budgets: one request more in its window, and a slot held until the response
    (a streamed export included) has been sent or the client is gone."""
    request.app.state.rate_limiter.hit(identity)
    with request.app.state.concurrency.slot(identity):
        yield


def check_limit(limit: int, settings: Settings) -> int:
    """Row limits above K2_MAX_ROWS are refused rather than silently cut."""
    if limit > settings.max_rows:
        raise InvalidQuery("limit", f"limit may be at most {settings.max_rows} (K2_MAX_ROWS)")
    return limit


async def page_limit(settings: SettingsDep,
                     limit: Annotated[int, Query(ge=1, description="rows per page, at most K2_MAX_ROWS")] = 100) -> int:
    return check_limit(limit, settings)


PageLimit = Annotated[int, Depends(page_limit)]
