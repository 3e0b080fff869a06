"""Gap policy thresholds: < alert warns, alert..halt alerts, > halt stops."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2.quality import GapDetector, SequenceGapHalt, Severity

pytestmark = pytest.mark.unit
DAY = dt.date(2014, 3, 10)


def _after(detector: GapDetector, seq: int):
    detector.observe("BHP", DAY, 1)
    return detector.observe("BHP", DAY, seq)


@pytest.mark.parametrize(("received", "severity"), [(3, Severity.WARNING), (11, Severity.WARNING),
                                                    (12, Severity.ALERT), (102, Severity.ALERT)])
def test_gap_severity_by_missing_count(received: int, severity: Severity):
    gap = _after(GapDetector("test", alert=10, halt=100), received)
    assert gap is not None and gap.severity is severity and gap.missing == received - 2


def test_gap_above_halt_threshold_stops():
    with pytest.raises(SequenceGapHalt, match="102 missing > halt threshold 100"):
        _after(GapDetector("test", alert=10, halt=100), 104)


def test_contiguous_sequences_have_no_gap_and_keys_are_independent():
    d = GapDetector("test")
    assert all(d.observe("BHP", DAY, s) is None for s in range(1, 50))
    assert d.observe("RIO", DAY, 1) is None
    assert d.observe("BHP", DAY + dt.timedelta(days=1), 1) is None
    assert not d.counts


def test_duplicates_and_out_of_order_are_counted_not_gaps():
    d = GapDetector("test")
    for s in (1, 2, 3):
        d.observe("BHP", DAY, s)
    assert d.observe("BHP", DAY, 3) is None
    assert d.observe("BHP", DAY, 1) is None
    assert d.counts == {"duplicate": 1, "out_of_order": 1}


@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=200))
def test_total_missing_equals_sum_of_reported_gaps(steps: list[int]):
    d = GapDetector("test", alert=1000, halt=10_000)
    seq, missing = 0, 0
    for step in steps:
        seq += step
        gap = d.observe("BHP", DAY, seq)
        missing += gap.missing if gap else 0
    assert missing == seq - len(steps)
