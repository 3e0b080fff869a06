"""The live tail: ticks in Kafka past a table's snapshot, which a REST query adds to what it reads
so that a tick shows within a second of its production, not after the stream's next commit.

The API's hub (`k2.api.hub`) reads each tick topic from the offsets the table's snapshot recorded
when it started, and hands every poll's decoded ticks here in offset order. A tick is kept exactly
when the stream will store it: its key fields are present (the stream dead-letters it otherwise)
and its sequence number is above every earlier one of its (symbol, exchange date), starting from
the table's own maximum at that snapshot — the running maximum of `TableWriter._dedupe`, which
does not depend on how messages fall into batches.

A query at snapshot S reads, besides S, the kept ticks at or past the offsets S records (the stream
has not committed them yet), but only if the tail holds every message from those offsets on;
otherwise (it started later, or let its oldest rows go to stay within `live_tail_rows`) the query
reads S alone, as without a tail. Rows behind the newest snapshot seen are let go after a grace
period, as a query may still read a snapshot a little older than the newest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2.observability import LIVE_TAIL_ROWS
from k2.quality import SequenceKey, new_sequence_numbers, raise_marks, sequence_keys
from k2.query.filters import TickKind

KEY_FIELDS = ("symbol", "exchange_date", "sequence_number")
GRACE_SECONDS = 2.0  # rows behind the newest snapshot are kept this long: older pins may read them
_BEGINNING = -1  # covered from the partition's first message


@dataclass(frozen=True)
class TailRows:
    """The kept ticks past a snapshot's offsets, and the offsets the tail had reached (what a
    cached result computed with them depends on)."""

    table: pa.Table
    reach: tuple[tuple[int, int], ...]  # (partition, next offset), sorted


@dataclass
class _Chunk:
    partitions: np.ndarray  # of each kept row
    offsets: np.ndarray
    rows: pa.Table
    reach: dict[int, int]  # partition → next offset after this chunk's messages (kept or not)
    added: float  # monotonic


class KindTail:
    """The tail of one tick topic. The hub's thread adds; query threads read."""

    def __init__(self, kind: TickKind, schema: pa.Schema, marks: MutableMapping[SequenceKey, int],
                 max_rows: int) -> None:
        self.kind, self.schema, self.max_rows = kind, schema, max_rows
        self._marks = marks  # (symbol, epoch day) → highest sequence number seen; raised as ticks are kept
        # partition → first offset from which every message is accounted for
        self._covered: dict[int, int] = {}
        self._reach: dict[int, int] = {}  # partition → next offset to be added
        self._chunks: deque[_Chunk] = deque()
        self._rows = 0
        self._newest: dict[int, int] = {}  # offsets of the newest snapshot a query asked about
        self._lock = threading.Lock()
        LIVE_TAIL_ROWS.labels(kind).set(0)

    def open_partition(self, partition: int, offset: int | None) -> None:
        """A partition the hub reads from `offset` (None: from its beginning)."""
        with self._lock:
            self._covered.setdefault(partition, _BEGINNING if offset is None else offset)
            if offset is not None:
                self._reach.setdefault(partition, offset)

    def add(self, ticks: pa.Table, partitions: np.ndarray, offsets: np.ndarray, reach: dict[int, int]) -> None:
        """One poll's decoded ticks (conformed to the table's schema) in offset order, and where the
        poll left each partition (undecodable messages are simply not among `ticks`)."""
        kept = self._keep(ticks)
        with self._lock:
            if kept is not None and kept.any():
                rows = ticks if kept.all() else ticks.filter(pa.array(kept))
                self._chunks.append(_Chunk(partitions[kept], offsets[kept], rows, dict(reach), time.monotonic()))
                self._rows += rows.num_rows
            self._reach.update(reach)
            self._let_go()
        LIVE_TAIL_ROWS.labels(self.kind).set(self._rows)

    def _keep(self, ticks: pa.Table) -> np.ndarray | None:
        """Which ticks the stream will store: key fields present, sequence number new."""
        if not ticks.num_rows:
            return None
        present = np.ones(ticks.num_rows, bool)
        for name in KEY_FIELDS:
            if ticks[name].null_count:
                present &= ~ticks[name].is_null().to_numpy(zero_copy_only=False)
        fresh = np.zeros(ticks.num_rows, bool)
        where = np.flatnonzero(present)
        if where.size:
            keyed = ticks.take(pa.array(where))
            days = pc.cast(keyed["exchange_date"], pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)
            seqs = keyed["sequence_number"].to_numpy().astype(np.int64)
            groups, keys = sequence_keys(keyed["symbol"], days)
            fresh[where] = new_sequence_numbers(groups, keys, seqs, self._marks)
            raise_marks(self._marks, groups, keys, seqs)
        return fresh

    def _let_go(self) -> None:
        """Drop rows every query past the grace period reads from a snapshot, and the oldest rows
        beyond `max_rows` (the partitions they cover are then covered from later on)."""
        now = time.monotonic()
        while self._chunks:
            chunk = self._chunks[0]
            committed = all(self._newest.get(p, 0) >= o for p, o in chunk.reach.items())
            if not ((committed and now - chunk.added > GRACE_SECONDS) or self._rows > self.max_rows):
                break
            self._chunks.popleft()
            self._rows -= chunk.rows.num_rows
            for partition, offset in chunk.reach.items():
                self._covered[partition] = max(self._covered.get(partition, _BEGINNING), offset)

    def after(self, recorded: dict[int, int]) -> TailRows | None:
        """The kept ticks at or past the offsets a snapshot recorded; None unless the tail holds
        every message from there on."""
        with self._lock:
            if all(o >= self._newest.get(p, 0) for p, o in recorded.items()):
                self._newest = dict(recorded)
            if not self._covered or not set(recorded) <= set(self._covered):
                return None
            for partition, first in self._covered.items():
                if first != _BEGINNING and recorded.get(partition, 0) < first:
                    return None
            chunks = list(self._chunks)
            reach = tuple(sorted(self._reach.items()))
            top = max(self._covered)
        floors = np.zeros(top + 1, np.int64)
        for partition, offset in recorded.items():
            floors[partition] = offset
        parts = []
        for chunk in chunks:
            past = chunk.offsets >= floors[chunk.partitions]
            if past.all():
                parts.append(chunk.rows)
            elif past.any():
                parts.append(chunk.rows.filter(pa.array(past)))
        table = pa.concat_tables(parts) if parts else self.schema.empty_table()
        return TailRows(table, reach)
