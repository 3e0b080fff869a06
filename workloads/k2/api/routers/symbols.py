"""/v1/symbols: what can be queried."""

from __future__ import annotations

from fastapi import APIRouter

from k2.api.deps import EngineDep
from k2.api.models import SymbolList
from k2.api.offload import offloaded
from k2.query import metadata
from k2.rows import to_rows

router = APIRouter(prefix="/v1/symbols", tags=["catalog"])


@router.get("", response_model=SymbolList)
@offloaded
def list_symbols(engine: EngineDep) -> SymbolList:
    """Every symbol with trades or quotes: row counts, first and last trading date, company name."""
    return SymbolList(data=to_rows(metadata.symbols(engine)))
