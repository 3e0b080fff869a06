"""/v1/replay: a table's ticks in order, in pages pinned to one table version.

- cold_start: everything matching, as of the latest snapshot;
- catch_up: only the rows appended after `since_snapshot_id` (a consumer that drained a replay
  at snapshot S continues with since_snapshot_id=S, re-reading nothing);
- rewind: the table as it was at `snapshot_id`, or at time `as_of`.
The first page fixes the snapshot; its cursor carries it, so the following pages stay consistent
however many commits writers make meanwhile.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from k2.api.deps import EngineDep, SettingsDep, check_limit
from k2.api.jsonrows import json_response
from k2.api.models import ReplayPage, ReplayRequest
from k2.api.offload import offloaded
from k2.query import ticks
from k2.query.cursor import Cursor, fingerprint
from k2.query.engine import Engine, Pin
from k2.query.errors import InvalidQuery
from k2.query.filters import TickFilter, select_fields

router = APIRouter(prefix="/v1/replay", tags=["replay"])


@router.post("", response_model=ReplayPage)
@offloaded
def replay(body: ReplayRequest, engine: EngineDep, settings: SettingsDep) -> Response:
    check_limit(body.limit, settings)
    fields = select_fields(body.table, body.fields)
    flt = TickFilter(tuple(body.symbols), body.exchange, body.start, body.end)
    request_fingerprint = fingerprint("replay", body.table, body.mode, flt, body.snapshot_id, body.as_of,
                                      body.since_snapshot_id)
    token = Cursor.decode(body.cursor, request_fingerprint) if body.cursor else None
    pin = _pin(engine, body, token)
    page = ticks.page(engine, ticks.tick_relation(engine, pin, flt), fields=fields, limit=body.limit, cursor=token,
                      fingerprint=request_fingerprint)
    return json_response(ReplayPage, page.rows, table=body.table, mode=body.mode, snapshot_id=pin.snapshot_id,
                         since_snapshot_id=pin.since_snapshot_id, next_cursor=page.next_cursor)


def _pin(engine: Engine, body: ReplayRequest, token: Cursor | None) -> Pin:
    if token is not None:
        return engine.pin(body.table, snapshot_id=token.snapshot(body.table),
                          since_snapshot_id=token.snapshot("since"))
    if body.mode != "rewind" and (body.snapshot_id is not None or body.as_of is not None):
        raise InvalidQuery("snapshot_id" if body.snapshot_id is not None else "as_of", "only rewind takes a snapshot")
    if body.mode != "catch_up" and body.since_snapshot_id is not None:
        raise InvalidQuery("since_snapshot_id", "only catch_up takes since_snapshot_id")
    if body.mode == "rewind" and (body.snapshot_id is None) == (body.as_of is None):
        raise InvalidQuery("snapshot_id", "rewind takes exactly one of snapshot_id and as_of")
    if body.mode == "catch_up" and body.since_snapshot_id is None:
        raise InvalidQuery("since_snapshot_id", "catch_up needs since_snapshot_id")
    return engine.pin(body.table, snapshot_id=body.snapshot_id, as_of=body.as_of,
                      since_snapshot_id=body.since_snapshot_id)
