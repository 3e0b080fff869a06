"""Sequence tracking and the gap policy, shared by the ingest and stream stages.

Sequence numbers are per (symbol, exchange_date). A jump forward is a gap of `jump - 1` missing
records: below `alert` it is a warning, from `alert` to `halt` an alert, above `halt` processing
stops, because silently storing a day with hundreds of missing ticks is worse than stopping.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

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
    exchange_date: dt.date
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
    last_seen: dict[tuple[str, dt.date], int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def classify(self, missing: int) -> Severity:
        if missing > self.halt:
            return Severity.HALT
        if missing >= self.alert:
            return Severity.ALERT
        return Severity.WARNING

    def observe(self, symbol: str, exchange_date: dt.date, sequence_number: int) -> Gap | None:
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
        self.last_seen[key] = sequence_number
        return gap
