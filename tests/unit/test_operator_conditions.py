"""The one condition helper: transitions, observedGeneration, the Ready summary."""

from __future__ import annotations

import pytest

from k2_operator import conditions
from k2_operator.conditions import Condition

pytestmark = pytest.mark.unit

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def test_new_conditions_get_the_time_and_generation() -> None:
    merged = conditions.merge([], [Condition.true("TopicsReady", "Reconciled", "3 topics")], generation=4,
                              timestamp=T0)

    assert merged == [{"type": "TopicsReady", "status": "True", "reason": "Reconciled", "message": "3 topics",
                       "lastTransitionTime": T0, "observedGeneration": 4}]


def test_transition_time_moves_only_when_the_status_changes() -> None:
    first = conditions.merge([], [Condition.true("TopicsReady", "Reconciled", "3 topics")], generation=1,
                             timestamp=T0)
    same = conditions.merge(first, [Condition.true("TopicsReady", "Reconciled", "4 topics")], generation=2,
                            timestamp=T1)
    flipped = conditions.merge(same, [Condition.false("TopicsReady", "ShrinkRefused", "no")], generation=3,
                               timestamp=T1)

    assert same[0]["lastTransitionTime"] == T0 and same[0]["message"] == "4 topics"
    assert same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["reason"] == "ShrinkRefused"


def test_other_conditions_are_kept_and_ready_comes_first() -> None:
    existing = conditions.merge([], [Condition.true("A", "Ok")], generation=1, timestamp=T0)
    merged = conditions.merge(existing, [Condition.true("Ready", "Reconciled")], generation=1, timestamp=T0)

    assert [c["type"] for c in merged] == ["Ready", "A"]


def test_summary_is_true_only_when_every_required_condition_is() -> None:
    ok = [Condition.true("A", "Ok"), Condition.true("B", "Ok"), Condition.false("Info", "Whatever")]
    assert conditions.summary(ok, ["A", "B"]).ok

    failing = [Condition.true("A", "Ok"), Condition.false("B", "ShrinkRefused", "cannot shrink")]
    ready = conditions.summary(failing, ["A", "B"])
    assert (ready.status, ready.reason, ready.message) == ("False", "ShrinkRefused", "B: cannot shrink")

    missing = conditions.summary([Condition.true("A", "Ok")], ["A", "B"])
    assert missing.status == "Unknown"


def test_is_ready_reads_a_status() -> None:
    status = {"conditions": conditions.merge([], [Condition.true("Ready", "Reconciled")], generation=1)}

    assert conditions.is_ready(status)
    assert not conditions.is_ready({}) and not conditions.is_ready(None)


def test_conditions_that_no_longer_apply_can_be_removed() -> None:
    existing = conditions.merge([], [Condition.true("IngestComplete", "IngestSucceeded")], generation=1)

    merged = conditions.merge(existing, [Condition.true("Ready", "Reconciled")], generation=2,
                              remove=["IngestComplete"])

    assert [c["type"] for c in merged] == ["Ready"]


def test_ready_needs_synced_and_every_serving_condition() -> None:
    synced = Condition.true("Synced", "Reconciled", "reconciled")
    serving = conditions.merge([], [Condition.false("ConsumersAvailable", "ReplicasUnavailable", "0/2")],
                               generation=1)[0]

    ready = conditions.readiness(synced, [serving])
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "ReplicasUnavailable")
    assert conditions.readiness(synced, [{**serving, "status": "True"}]).ok
    assert conditions.readiness(synced, []).ok, "nothing to serve: applied is ready"
    failed = conditions.readiness(Condition.false("Synced", "ShrinkRefused", "no"), [])
    assert (failed.type, failed.status, failed.reason) == ("Ready", "False", "ShrinkRefused")


def test_ready_is_unknown_while_a_serving_condition_cannot_be_told() -> None:
    """Kafka not answering says nothing about the consumers: Ready is Unknown, not False."""
    synced = Condition.true("Synced", "Reconciled", "reconciled")
    available = {"type": "ConsumersAvailable", "status": "True", "reason": "MinimumReplicasAvailable"}
    unknown = {"type": "ConsumersCaughtUp", "status": "Unknown", "reason": "KafkaUnavailable", "message": "gone"}

    ready = conditions.readiness(synced, [available, unknown])

    assert (ready.status, ready.reason, ready.message) == ("Unknown", "KafkaUnavailable", "ConsumersCaughtUp: gone")

