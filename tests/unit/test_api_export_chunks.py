"""An export's JSON chunks: the body is the envelope pydantic writes, and the array's end travels
with the last rows (a chunk is a thread hop of the server), so a small export is one chunk."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from k2.api.export import CHUNK_ROWS, _json
from k2.query.engine import ResultStream

pytestmark = pytest.mark.unit


def _batches(*sizes: int) -> list[pa.RecordBatch]:
    start = 0
    batches = []
    for size in sizes:
        batches.append(pa.record_batch({"n": pa.array(range(start, start + size), pa.int64())}))
        start += size
    return batches


@pytest.mark.parametrize("sizes", [(), (0,), (5,), (CHUNK_ROWS,), (CHUNK_ROWS + 1,), (3, 0, CHUNK_ROWS, 0),
                                   (2 * CHUNK_ROWS, 7, 0)])
def test_json_chunks_are_the_envelope_with_the_end_in_the_last_rows_chunk(sizes: tuple[int, ...]):
    batches = _batches(*sizes)
    chunks = list(_json(ResultStream(pa.schema([("n", pa.int64())]), iter(batches)), 42))
    body = json.loads(b"".join(chunks))
    assert body == {"snapshot_id": 42, "data": [{"n": i} for i in range(sum(sizes))]}
    slices = sum(-(-b.num_rows // CHUNK_ROWS) for b in batches)
    assert len(chunks) == max(1, slices), "one chunk per slice of rows, the end with the last"
