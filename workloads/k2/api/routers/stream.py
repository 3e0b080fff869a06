"""WebSocket /v1/stream/{trades,quotes}: live ticks, optionally after a catch-up from `from`.

One JSON object per tick per text frame, shaped as the REST API's rows. The key comes in the
`X-API-Key` header or as the first message (`{"api_key": "…"}`), for browsers that cannot set
headers on a WebSocket.

Catch-up, then live, with no gap and no duplicate: the subscriber joins the hub first, which says
from which offset on each partition it will deliver (H). The ticks stored in Iceberg come from
the snapshot read, which records the offsets its data reaches (O): every message below O is in
it (or was a duplicate of a row that is). Kafka then fills [O, H) and the hub delivers from H, so
every message is covered once; a hub message below O (the table was ahead) is dropped by offset.
Duplicate ticks within Kafka (a re-ingested file, a replayed feed) are dropped as the stream
drops them: by the highest sequence number already sent per (symbol, exchange date).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import structlog
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic_core import to_json
from starlette.websockets import WebSocketState

from k2 import tables
from k2.api.access import caller
from k2.api.errors import ApiError
from k2.api.hub import LiveTick, Subscription, TickHub, decode_ticks, read_range
from k2.api.offload import offloaded_iter
from k2.exchanges import SYMBOL_PATTERN
from k2.observability import STREAM_DISCONNECTS
from k2.query import scope as scopes
from k2.query.engine import Engine
from k2.query.filters import EARLIEST, LATEST, MAX_SYMBOLS, TICK_KINDS, TickFilter, TickKind
from k2.query.scope import Forbidden, Scope
from k2.query.ticks import tick_relation
from k2.rows import to_rows
from k2.settings import Settings

log = structlog.get_logger("k2.api.stream")
router = APIRouter(tags=["stream"])
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013
_KEY_TIMEOUT = 10.0  # seconds to send the key as the first message
_HUB_START_TIMEOUT = 15.0


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def hub(app: Any) -> TickHub:
    """The process's one hub, started with the first subscriber (the REST API needs no Kafka)."""
    existing = getattr(app.state, "hub", None)
    if existing is None:
        existing = app.state.hub = TickHub(app.state.settings)
        existing.start()
    return existing


def _symbols(text: str | None) -> frozenset[str]:
    symbols = frozenset(s.strip() for s in (text or "").split(",") if s.strip())
    bad = sorted(s for s in symbols if not re.fullmatch(SYMBOL_PATTERN, s))
    if bad:
        raise Refused(POLICY_VIOLATION, f"bad_request: symbols {bad} do not match {SYMBOL_PATTERN}")
    if len(symbols) > MAX_SYMBOLS:
        raise Refused(POLICY_VIOLATION, f"bad_request: at most {MAX_SYMBOLS} symbols")
    return symbols


def _instant(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        instant = dt.datetime.fromisoformat(text)
    except ValueError:
        raise Refused(POLICY_VIOLATION, "bad_request: from must be an ISO-8601 instant") from None
    if instant.tzinfo is None or not EARLIEST <= instant < LATEST:
        raise Refused(POLICY_VIOLATION, "bad_request: from needs a UTC offset and a year from 1970 to 2199")
    return instant


async def _identify(ws: WebSocket) -> tuple[str, Scope | None]:
    """The key's id and scope (None: unrestricted)."""
    presented = ws.headers.get("x-api-key")
    if presented is None:
        try:
            first = await asyncio.wait_for(ws.receive_text(), _KEY_TIMEOUT)
            presented = json.loads(first).get("api_key")
        except (TimeoutError, ValueError, AttributeError):
            presented = None
    try:
        return caller(ws.app.state.api_keys, presented if isinstance(presented, str) else None)
    except ApiError:
        raise Refused(POLICY_VIOLATION, "unauthorized: send X-API-Key or {\"api_key\": …} first") from None


class Sender:
    """Sends ticks once each: by Kafka offset against where the stored part ends, and by sequence
    number per (symbol, exchange date)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.floor: dict[int, int] = {}  # partition → first offset not in the stored part
        self.highest: dict[tuple[str, int], int] = {}
        self.sent = 0

    async def row(self, symbol: str, day: int, seq: int, text: str) -> None:
        key = (symbol, day)
        if seq <= self.highest.get(key, 0):
            return
        self.highest[key] = seq
        await self.ws.send_text(text)
        self.sent += 1

    async def tick(self, tick: LiveTick) -> None:
        if tick.offset < self.floor.get(tick.partition[1], 0):
            return
        await self.row(tick.symbol, tick.exchange_date, tick.sequence_number, tick.json)


def _stored(engine: Engine, settings: Settings, kind: TickKind, symbols: frozenset[str],
            start: dt.datetime) -> tuple[dict[int, int], Iterator[list[tuple[str, int, int, str]]]]:
    """(offsets the snapshot records, batches of its ticks from `start` in sequence order per symbol)."""
    table = engine.table(kind, fresh=True)
    pin = engine.pin(kind)
    if table is None or pin.snapshot is None:
        return {}, iter(())
    offsets = tables.recorded_offsets(pin.existing_table, pin.snapshot).get(settings.topic(kind), {})
    relation = tick_relation(engine, pin, TickFilter(tuple(symbols), None, start))
    result = engine.stream("stream_catchup", f"SELECT * FROM ({relation.text()}) "
                           "ORDER BY symbol, exchange_date, sequence_number", relation.params, relation.scans)
    epoch = dt.date(1970, 1, 1)

    def batches() -> Iterator[list[tuple[str, int, int, str]]]:
        for batch in result.batches:
            yield [(r["symbol"], (r["exchange_date"] - epoch).days, r["sequence_number"], to_json(r).decode())
                   for r in to_rows(batch)]

    return offsets, batches()


async def _catch_up(ws: WebSocket, sender: Sender, sub: Subscription, start: dt.datetime,
                    live_from: dict[int, int]) -> None:
    kind, symbols = sub.kind, sub.symbols
    app, settings = ws.app, ws.app.state.settings
    offsets, stored = await asyncio.to_thread(_stored, app.state.engine, settings, kind, symbols, start)
    async for batch in offloaded_iter(stored):
        for symbol, day, seq, text in batch:
            await sender.row(symbol, day, seq, text)
    sender.floor = dict(offsets)
    topic = settings.topic(kind)
    gap = {p: (offsets.get(p, 0), end) for p, end in live_from.items() if end > offsets.get(p, 0)}
    decoder = hub(app).decoder
    async for messages in offloaded_iter(read_range(settings, topic, gap)):
        for tick in decode_ticks(decoder, kind, messages):
            if sub.wants(tick):
                await sender.tick(tick)


async def _incoming(ws: WebSocket) -> None:
    """Reads (and ignores) what the client sends, until it goes away."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await ws.receive()


@router.websocket("/v1/stream/{kind}")
async def stream_ticks(ws: WebSocket, kind: str) -> None:
    """Live trades or quotes: `?symbols=BHP,RIO` (default: all), `from=<ISO instant>` to catch up first."""
    await ws.accept()
    # The HTTP middleware that binds it skips WebSockets: refusals are logged with it too.
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id.get())
    sub: Subscription | None = None
    try:
        if kind not in TICK_KINDS:
            raise Refused(POLICY_VIOLATION, f"not_found: stream {kind!r}; choose from {', '.join(TICK_KINDS)}")
        identity, scope = await _identify(ws)
        structlog.contextvars.bind_contextvars(api_key_id=identity)
        symbols = _symbols(ws.query_params.get("symbols"))
        start = _instant(ws.query_params.get("from"))
        if scope is not None:
            if not scope.stream:
                raise Forbidden(f"key {scope.key_id} may not stream")
            scope.check(symbols=tuple(sorted(symbols)), table=kind)
            scopes.bind(scope)  # the catch-up's queries read only what the key may see
        the_hub = hub(ws.app)
        if not await asyncio.to_thread(the_hub.wait_started, _HUB_START_TIMEOUT):
            raise Refused(TRY_AGAIN_LATER, "unavailable: Kafka did not answer")
        settings: Settings = ws.app.state.settings
        sub = Subscription(kind, symbols, settings.stream_buffer, asyncio.get_running_loop(), scope)
        live_from = the_hub.subscribe(sub)
        log.info("stream.subscribed", kind=kind, symbols=sorted(symbols), start=str(start) if start else None)
        sender = Sender(ws)
        if start is not None:
            await _catch_up(ws, sender, sub, start, live_from)
        await _live(ws, sub, sender)
    except Forbidden as exc:
        log.warning("stream.forbidden", kind=kind, reason=str(exc))
        STREAM_DISCONNECTS.labels(kind, "forbidden").inc()
        await ws.close(POLICY_VIOLATION, f"forbidden: {exc}"[:120])
    except Refused as exc:
        log.warning("stream.refused", kind=kind, reason=exc.reason)
        reason = exc.reason.split(":")[0]
        if reason != "slow_consumer":  # counted by the hub the moment the queue filled
            STREAM_DISCONNECTS.labels(kind, reason).inc()
        if ws.application_state == WebSocketState.CONNECTED:
            await ws.close(exc.code, exc.reason[:120])  # a close reason holds at most 123 bytes
    except WebSocketDisconnect:
        pass
    finally:
        if sub is not None:
            hub(ws.app).unsubscribe(sub)


async def _live(ws: WebSocket, sub: Subscription, sender: Sender) -> None:
    """Send queued ticks until the client leaves or its queue overflows. Sending runs as its own
    task, so a client that stopped reading (its sends blocked on a full socket) is still cut off
    the moment its queue fills."""

    async def send_forever() -> None:
        while True:
            await sender.tick(await sub.queue.get())

    sending = asyncio.create_task(send_forever())
    incoming = asyncio.create_task(_incoming(ws))
    overflow = asyncio.create_task(sub.overflowed.wait())
    try:
        done, _ = await asyncio.wait({sending, incoming, overflow}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done:
            sending.result()  # raises what stopped it (the client went away mid-send)
        if overflow in done:
            raise Refused(TRY_AGAIN_LATER, f"slow_consumer: more than {sub.buffer} ticks queued")
    finally:
        for task in (sending, incoming, overflow):
            task.cancel()
