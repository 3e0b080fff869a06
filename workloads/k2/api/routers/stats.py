"""/v1/stats: table sizes and freshness, from Iceberg metadata."""

from __future__ import annotations

from fastapi import APIRouter

from k2.api.deps import EngineDep
from k2.api.models import Stats
from k2.api.offload import offloaded
from k2.query import metadata

router = APIRouter(prefix="/v1/stats", tags=["catalog"])


@router.get("", response_model=Stats)
@offloaded
def table_stats(engine: EngineDep) -> Stats:
    """Rows, files, bytes, partitions, latest snapshot and freshness watermarks per table."""
    return Stats(data=metadata.stats(engine))
