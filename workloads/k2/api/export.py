"""Streamed exports of tick queries as JSON, CSV or Parquet.

Rows go from DuckDB's Arrow batches to the socket a slice at a time, so an export's memory
does not grow with its size: the server holds a chunk being encoded and at most one waiting for the
client (uvicorn writes no more while its send buffer is full), and DuckDB's batch being sliced (two
at a batch's end, where a JSON export looks ahead for the end of the rows). Exports of named symbols
small enough are sliced from held ticks instead (`k2.query.ticks.stream`). JSON values are encoded exactly as
the models encode them (decimals as strings, instants as ISO-8601 UTC; column at a time by
`k2.api.jsonrows`), CSV by Arrow (decimals at their stored scale), and Parquet keeps the stored
types, decimal(18,6) included.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fastapi.responses import StreamingResponse
from pydantic_core import to_json

from k2.api.jsonrows import rows_text
from k2.api.models import Format, TickSelection
from k2.api.offload import offloaded_iter
from k2.query import ticks
from k2.query.engine import Engine, Pin, ResultStream
from k2.query.filters import TickFilter, select_fields

MEDIA_TYPES: dict[str, str] = {"json": "application/json", "csv": "text/csv; charset=utf-8",
                               "parquet": "application/vnd.apache.parquet"}
SNAPSHOT_HEADER = "X-K2-Snapshot-Id"
CHUNK_ROWS = 8192  # rows per JSON or CSV chunk written to the client (about 2 MiB of JSON)

# For the OpenAPI document of export routes.
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Rows in tick order, streamed in the requested format",
          "content": {m: {} for m in MEDIA_TYPES.values()}}}


def export(engine: Engine, pin: Pin, body: TickSelection) -> StreamingResponse:
    fields = select_fields(pin.kind, body.fields)
    flt = TickFilter(tuple(body.symbols), body.exchange, body.start, body.end)
    result = ticks.stream(engine, ticks.tick_relation(engine, pin, flt), fields=fields, limit=body.limit)
    headers = {SNAPSHOT_HEADER: str(pin.snapshot_id)} if pin.snapshot_id is not None else {}
    chunks = _ENCODERS[body.format](result, pin.snapshot_id)
    # The first chunk on the route's thread: no hop of its own, and a small export is whole (its end
    # included) before the response starts.
    first = next(chunks)
    return StreamingResponse(offloaded_iter(chunks, ready=(first,)), media_type=MEDIA_TYPES[body.format],
                             headers=headers)


def _json(result: ResultStream, snapshot_id: int | None) -> Iterator[bytes]:
    # Each chunk costs the server a thread hop (`offloaded_iter`): the envelope travels with the first
    # and last rows, which the next slice tells (a batch's last slice waits for DuckDB's next batch).
    head = b'{"snapshot_id":' + to_json(snapshot_id) + b',"data":['
    rows = (batch for batch in _slices(result.batches) if batch.num_rows)
    batch = next(rows, None)
    if batch is None:
        yield head + b"]}"
        return
    pending = head
    while batch is not None:
        following = next(rows, None)
        yield b"".join((pending, rows_text(batch), b"]}" if following is None else b""))  # one copy of the rows
        pending, batch = b",", following


def _slices(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Batches of at most CHUNK_ROWS rows (zero-copy): a chunk is encoded whole and may wait whole in
    the server's send buffer, so its size, not the export's, is what the server holds per client."""
    for batch in batches:
        for offset in range(0, batch.num_rows, CHUNK_ROWS):
            yield batch.slice(offset, CHUNK_ROWS)


def _csv(result: ResultStream, _snapshot_id: int | None) -> Iterator[bytes]:
    buffer = io.BytesIO()
    with pacsv.CSVWriter(buffer, result.schema) as writer:  # writes the header even for no rows
        for batch in _slices(result.batches):
            writer.write_batch(batch)
            yield _take(buffer)
    yield _take(buffer)


def _parquet(result: ResultStream, _snapshot_id: int | None) -> Iterator[bytes]:
    sink = _Sink()
    with pq.ParquetWriter(sink, result.schema, compression="zstd") as writer:
        for batch in result.batches:
            writer.write_batch(batch)  # one row group per batch, flushed to the client right away
            yield sink.take()
    yield sink.take()  # the footer


def _take(buffer: io.BytesIO) -> bytes:
    data = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return data


class _Sink(io.RawIOBase):
    """A write-only file that hands its bytes out as they come, yet reports the full length
    written from `tell()`, which Parquet needs to record offsets in the footer."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


_ENCODERS: dict[Format, Callable[[ResultStream, int | None], Iterator[bytes]]] = {
    "json": _json, "csv": _csv, "parquet": _parquet,
}
