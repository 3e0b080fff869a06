"""Vectorized sequence checks against their row-by-row definitions: `GapDetector.observe_many`
against `observe`, and the stream writer's de-duplication against the per-record loop."""

from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2.observability import REGISTRY
from k2.quality import GapDetector, SequenceGapHalt, prior_max
from k2.stream.writer import TableWriter

pytestmark = pytest.mark.unit

records = st.lists(st.tuples(st.sampled_from(["BHP", "RIO"]), st.sampled_from([16139, 16140, -5]),
                             st.integers(-3, 40)), max_size=80)
marks = st.dictionaries(st.tuples(st.sampled_from(["BHP", "RIO"]), st.sampled_from([16139, 16140])),
                        st.integers(0, 20), max_size=3)


def _metrics(stage: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for metric in REGISTRY.collect()
            for s in metric.samples if s.labels.get("stage") == stage and s.name.endswith("_total")}


def _outcome(detector: GapDetector, run) -> tuple:
    try:
        result = run()
    except SequenceGapHalt as exc:
        result = ("halt", str(exc))
    return result, detector.last_seen, detector.counts


@given(records, marks, st.integers(1, 12))
def test_observe_many_is_observe_in_order(rows, initial, alert):
    one = GapDetector("test-rows", alert=alert, halt=alert + 8, last_seen=dict(initial))
    many = GapDetector("test-many", alert=alert, halt=alert + 8, last_seen=dict(initial))
    before_rows, before_many = _metrics("test-rows"), _metrics("test-many")
    expected = _outcome(one, lambda: [g for s, d, q in rows if (g := one.observe(s, d, q)) is not None])
    got = _outcome(many, lambda: many.observe_many([r[0] for r in rows], np.array([r[1] for r in rows], np.int64),
                                                   np.array([r[2] for r in rows], np.int64)))
    assert got == expected

    def delta(before, stage):
        return {k[0] + str(k[1]).replace(stage, ""): v - before.get(k, 0) for k, v in _metrics(stage).items()
                if v != before.get(k, 0)}
    assert delta(before_many, "test-many") == delta(before_rows, "test-rows")


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-(2**62), 2**62)), max_size=60),
       st.lists(st.integers(-(2**62), 2**62), min_size=5, max_size=5))
def test_prior_max_is_the_running_maximum_before_each_element(pairs, initial):
    groups = np.array([g for g, _ in pairs], np.int64)
    values = np.array([v for _, v in pairs], np.int64)
    running, expected = list(initial), []
    for g, v in pairs:
        expected.append(running[g])
        running[g] = max(running[g], v)
    assert prior_max(groups, values, np.array(initial, np.int64)).tolist() == expected


def _row_dedupe(rows: list[dict], watermarks: dict) -> list[dict]:
    """The writer's per-record de-duplication before it went columnar."""
    fresh, batch_marks = [], {}
    for r in rows:
        key = (r["symbol"], r["exchange_date"])
        if r["sequence_number"] <= batch_marks.get(key, watermarks.get(key, 0)):
            continue
        batch_marks[key] = r["sequence_number"]
        fresh.append(r)
    return fresh


@given(records, marks)
def test_writer_dedupe_is_the_per_record_loop(rows, watermarks):
    rows = [{"symbol": s, "exchange_date": d, "sequence_number": q, "n": i} for i, (s, d, q) in enumerate(rows)]
    table = pa.table({"symbol": pa.array([r["symbol"] for r in rows], pa.string()),
                      "exchange_date": pa.array([r["exchange_date"] for r in rows], pa.int32()).view(pa.date32()),
                      "sequence_number": pa.array([r["sequence_number"] for r in rows], pa.int64()),
                      "n": pa.array([r["n"] for r in rows], pa.int64())})
    writer = types.SimpleNamespace(sequenced=True, keys=("symbol", "exchange_date", "sequence_number"),
                                   watermarks=watermarks)
    writer._sequence_groups = lambda data: TableWriter._sequence_groups(writer, data)
    kept = TableWriter._dedupe(writer, table)["n"].to_pylist()
    assert kept == [r["n"] for r in _row_dedupe(rows, watermarks)]


def test_reference_dedupe_keeps_the_last_write_where_the_key_first_appeared():
    table = pa.table({"symbol": ["A", "B", "A", "C", "B"], "company_id": ["1", "2", "1", "3", "2"],
                      "v": [1, 2, 3, 4, 5]})
    writer = types.SimpleNamespace(sequenced=False, keys=("symbol", "company_id"))
    assert TableWriter._dedupe(writer, table)["v"].to_pylist() == [3, 5, 4]
