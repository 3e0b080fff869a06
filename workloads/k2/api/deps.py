"""Dependencies as `Annotated` aliases, so routes read like their signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from k2.query.engine import Engine
from k2.query.errors import InvalidQuery
from k2.settings import Settings


# Dependencies that do not block are `async def`: FastAPI runs a plain `def` dependency in the
# thread pool, a hop per dependency per request.
async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def check_limit(limit: int, settings: Settings) -> int:
    """Row limits above K2_MAX_ROWS are refused rather than silently cut."""
    if limit > settings.max_rows:
        raise InvalidQuery("limit", f"limit may be at most {settings.max_rows} (K2_MAX_ROWS)")
    return limit


async def page_limit(settings: SettingsDep,
                     limit: Annotated[int, Query(ge=1, description="rows per page, at most K2_MAX_ROWS")] = 100) -> int:
    return check_limit(limit, settings)


PageLimit = Annotated[int, Depends(page_limit)]
