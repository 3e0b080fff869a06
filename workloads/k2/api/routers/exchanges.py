"""/v1/exchanges: the exchanges K2 knows, with the facts their ticks are read and queried by."""

from __future__ import annotations

from fastapi import APIRouter

from k2 import exchanges
from k2.api.models import ExchangeInfo, ExchangeList

router = APIRouter(prefix="/v1/exchanges", tags=["catalog"])


@router.get("", response_model=ExchangeList)
def list_exchanges() -> ExchangeList:
    """Every exchange of the registry: code, name, time zone, currency, main session, trading
    weekdays and symbol pattern. Facts, not data: every key may read them."""
    return ExchangeList(data=[
        ExchangeInfo(code=x.code, name=x.name, timezone=x.timezone.key, currency=x.currency,
                     session_open=x.calendar.session_open.isoformat(),
                     session_close=x.calendar.session_close.isoformat(),
                     trading_weekdays=sorted(x.calendar.weekdays), symbol_pattern=x.symbol_pattern)
        for x in exchanges.EXCHANGES.values()])
