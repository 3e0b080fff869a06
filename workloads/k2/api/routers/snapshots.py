"""/v1/snapshots: table history, and queries against any retained snapshot (time travel)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from k2.api.deps import EngineDep
from k2.api.export import EXPORT_RESPONSES, export
from k2.api.models import SnapshotId, SnapshotList, SnapshotQuery
from k2.api.offload import offloaded
from k2.query import metadata
from k2.query.filters import TickKind
from k2.settings import TABLE_KINDS, TableKind

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])


@router.get("", response_model=SnapshotList)
@offloaded
def list_snapshots(engine: EngineDep, table: TableKind | None = None) -> SnapshotList:
    """Retained snapshots of one table or all, newest first per table."""
    kinds: tuple[TableKind, ...] = (table,) if table else TABLE_KINDS
    return SnapshotList(data=[s for k in kinds for s in metadata.snapshots(engine, k)])


@router.post("/{snapshot_id}/query", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
@offloaded
def query_snapshot(snapshot_id: SnapshotId, body: SnapshotQuery, engine: EngineDep) -> StreamingResponse:
    """Query `table` exactly as it was at that snapshot; same body and outputs as /v1/{table}/query."""
    kind: TickKind = body.table
    return export(engine, engine.pin(kind, snapshot_id=snapshot_id), body)
