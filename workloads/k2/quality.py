"""Sequence tracking and the gap policy, shared by the ingest and stream stages.

Sequence numbers are per (symbol, exchange_date). A jump forward is a gap of `jump - 1` missing
records: below `alert` it is a warning, from `alert` to `halt` an alert, above `halt` processing
stops, because silently storing a day with hundreds of missing ticks is worse than stopping.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from k2.observability import SEQUENCE_ANOMALIES, SEQUENCE_GAPS

log = structlog.get_logger("k2.quality")


class Severity(StrEnum):
    WARNING = "warning"
    ALERT = "alert"
    HALT = "halt"


class SequenceGapHalt(RuntimeError):
    """A gap larger than the halt threshold: the stage must stop, nothing of the batch is kept."""


@dataclass(frozen=True, slots=True)
class Gap:
    symbol: str
    exchange_date: int  # epoch day, as Avro carries it
    expected: int
    received: int
    severity: Severity

    @property
    def missing(self) -> int:
        return self.received - self.expected


@dataclass
class GapDetector:
    stage: str
    alert: int = 10
    halt: int = 100
    last_seen: MutableMapping[tuple[str, int], int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def classify(self, missing: int) -> Severity:
        if missing > self.halt:
            return Severity.HALT
        if missing >= self.alert:
            return Severity.ALERT
        return Severity.WARNING

    def observe(self, symbol: str, exchange_date: int, sequence_number: int) -> Gap | None:
        """Record one sequence number; return the gap it reveals, raise on a halting gap."""
        key = (symbol, exchange_date)
        last = self.last_seen.get(key, 0)
        if sequence_number == last + 1:
            self.last_seen[key] = sequence_number
            return None
        if sequence_number <= last:
            kind = "duplicate" if sequence_number == last else "out_of_order"
            self.counts[kind] += 1
            SEQUENCE_ANOMALIES.labels(self.stage, kind).inc()
            return None
        gap = self._report(symbol, exchange_date, last, sequence_number)
        self.last_seen[key] = sequence_number
        return gap

    def _report(self, symbol: str, exchange_date: int, last: int, sequence_number: int) -> Gap:
        """Count and log the gap after `last`; raise if it halts."""
        gap = Gap(symbol, exchange_date, last + 1, sequence_number, self.classify(sequence_number - last - 1))
        self.counts[gap.severity.value] += 1
        SEQUENCE_GAPS.labels(self.stage, gap.severity.value).inc()
        fields = {"stage": self.stage, "symbol": symbol, "exchange_date": str(exchange_date),
                  "expected": gap.expected, "received": gap.received, "missing": gap.missing}
        if gap.severity is Severity.HALT:
            log.error("sequence.gap.halt", **fields)
            raise SequenceGapHalt(
                f"{symbol} {exchange_date}: expected sequence {gap.expected}, got {gap.received} "
                f"({gap.missing} missing > halt threshold {self.halt}); stopping so no partial day is stored"
            )
        if gap.severity is Severity.ALERT:
            log.error("sequence.gap.alert", **fields)
        else:
            log.warning("sequence.gap.warning", **fields)
        return gap

    def observe_many(self, symbols: pa.Array | pa.ChunkedArray | list[str], exchange_dates: np.ndarray,
                     sequence_numbers: np.ndarray) -> list[Gap]:
        """`observe` over many records in their order, vectorized, with the same outcome: the same
        last_seen, counts, metrics and log lines, the same halt after the same records.

        What `observe` keeps per key is the running maximum (it moves last_seen up on every step
        forward and never down), so each record's verdict follows from the maximum before it."""
        seqs = np.asarray(sequence_numbers, dtype=np.int64)
        if not len(seqs):
            return []
        groups, keys = sequence_keys(symbols, exchange_dates)
        initial = np.array([self.last_seen.get(k, 0) for k in keys], dtype=np.int64)
        prior = prior_max(groups, seqs, initial)
        step = seqs - prior
        gaps = np.flatnonzero(step > 1)
        halting = gaps[step[gaps] - 1 > self.halt]
        end = int(halting[0]) if len(halting) else len(seqs)  # records after a halt are never seen
        for kind, count in (("duplicate", np.count_nonzero(step[:end] == 0)),
                            ("out_of_order", np.count_nonzero(step[:end] < 0))):
            if count:
                self.counts[kind] += int(count)
                SEQUENCE_ANOMALIES.labels(self.stage, kind).inc(int(count))
        highest = initial.copy()
        np.maximum.at(highest, groups[:end], seqs[:end])
        for g in np.flatnonzero(highest > initial):
            self.last_seen[keys[g]] = int(highest[g])
        found = []
        for i in gaps[gaps <= end]:  # few: logged one by one, the halting one (if any) raises last
            symbol, day = keys[groups[i]]
            found.append(self._report(symbol, day, int(prior[i]), int(seqs[i])))
        return found


def sequence_keys(symbols: pa.Array | pa.ChunkedArray | list[str],
                  exchange_dates: np.ndarray) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Group ids of (symbol, exchange_date) pairs, and the (symbol, epoch day) key of each group."""
    if isinstance(symbols, pa.ChunkedArray):
        symbols = symbols.combine_chunks()
    encoded = pc.dictionary_encode(symbols if isinstance(symbols, pa.Array) else pa.array(symbols, pa.string()))
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    days = np.asarray(exchange_dates, dtype=np.int64)
    low, span = int(days.min()), int(days.max() - days.min()) + 1
    unique, groups = np.unique(codes * span + (days - low), return_inverse=True)
    return groups.reshape(-1), [(names[u // span], int(u % span) + low) for u in unique.tolist()]


def prior_max(groups: np.ndarray, values: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """For each element: the maximum of its group's `initial` and of the values before it in its group."""
    n, ngroups = len(values), len(initial)
    # the initial values go first, and a stable sort by group keeps the order within each group
    grouped = np.concatenate([np.arange(ngroups), groups])
    order = np.argsort(grouped, kind="stable")
    ranked, rank = np.unique(np.concatenate([initial, values]), return_inverse=True)
    # ranks offset per group so that one running maximum never crosses into the next group
    running = np.maximum.accumulate(grouped[order] * len(ranked) + rank.reshape(-1)[order])
    running -= grouped[order] * len(ranked)
    prior = np.empty(n, np.int64)
    elements = np.flatnonzero(order >= ngroups)
    prior[order[elements] - ngroups] = ranked[running[elements - 1]]
    return prior


SequenceKey = tuple[str, int]  # (symbol, epoch day)


class StoredSequences(MutableMapping[SequenceKey, int]):
    """The highest sequence number per (symbol, epoch day), starting from what a table stores, which
    is read one day at a time (`load_day`, all of the day's symbols) the first time a key of that
    day is looked up: dedup needs the days ticks arrive for (on a live feed, today), not a scan
    of the whole table up front, whose time and memory grow with the data."""

    def __init__(self, load_day: Callable[[int], Mapping[SequenceKey, int]]) -> None:
        self._load_day = load_day
        self._marks: dict[SequenceKey, int] = {}
        self._days: set[int] = set()

    def _load(self, day: int) -> None:
        if day not in self._days:  # no key of the day is held before it is read (`__setitem__`)
            self._marks.update(self._load_day(day))
            self._days.add(day)

    def load(self, days: Iterable[int]) -> None:
        """Read these days now, where they have not been read (so that a failure comes here)."""
        for day in days:
            self._load(day)

    def __getitem__(self, key: SequenceKey) -> int:
        self._load(key[1])
        return self._marks[key]

    def __setitem__(self, key: SequenceKey, seq: int) -> None:
        self._load(key[1])
        self._marks[key] = seq

    def __delitem__(self, key: SequenceKey) -> None:
        del self._marks[key]

    def __iter__(self) -> Iterator[SequenceKey]:
        """The keys of the days read so far."""
        return iter(self._marks)

    def __len__(self) -> int:
        return len(self._marks)


def new_sequence_numbers(groups: np.ndarray, keys: list[SequenceKey], seqs: np.ndarray,
                         marks: Mapping[SequenceKey, int]) -> np.ndarray:
    """Which ticks are news: a sequence number above its (symbol, day)'s mark and every earlier
    number of it here, the running maximum a row-by-row dedup keeps (whatever the batching)."""
    initial = np.array([marks.get(k, 0) for k in keys], np.int64)
    return seqs > prior_max(groups, seqs, initial)


def raise_marks(marks: MutableMapping[SequenceKey, int], groups: np.ndarray, keys: list[SequenceKey],
                seqs: np.ndarray) -> None:
    """Raise each (symbol, day)'s mark to the highest sequence number seen here."""
    highest = np.full(len(keys), np.iinfo(np.int64).min)
    np.maximum.at(highest, groups, seqs)
    for key, seq in zip(keys, highest.tolist(), strict=True):
        if seq > marks.get(key, 0):
            marks[key] = seq
