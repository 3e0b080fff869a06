"""Topics made to match their spec on the real broker, by several processes at once."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import KafkaException

from k2 import faults, topics


def _ensure_at_once(bootstrap: str, spec: topics.TopicSpec, creators: int) -> list[topics.TopicState | Exception]:
    """`ensure_topic` of one spec by `creators` clients released together, as the ingest and the
    stream of a pipeline started together do; each one's state or error."""
    admins = [topics.admin_client(bootstrap) for _ in range(creators)]
    start = threading.Barrier(creators)
    outcomes: list[topics.TopicState | Exception] = [RuntimeError("not run")] * creators

    def create(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = topics.ensure_topic(admins[i], spec)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcomes[i] = exc

    threads = [threading.Thread(target=create, args=(i,)) for i in range(creators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_clients_creating_one_topic_at_once_all_see_it_made(kafka, unique):
    """The one that loses the race is told the topic exists before the broker's metadata shows its
    partitions; it waits for them instead of failing (`k2 stream run` crashed so beside `k2 ingest feed`)."""
    for attempt in range(4):
        spec = topics.TopicSpec(f"race.{unique}.{attempt}", 6)
        outcomes = _ensure_at_once(kafka.bootstrap, spec, creators=3)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        assert not failed, f"attempt {attempt}: {failed!r}"
        assert sum(o.created for o in outcomes if isinstance(o, topics.TopicState)) == 1
        assert topics.describe_partitions(topics.admin_client(kafka.bootstrap), [spec.name]) == {spec.name: 6}


def test_partitions_never_listed_is_a_transient_kafka_failure(kafka, unique):
    """Waiting for another creator's partitions can time out while the broker elects leaders;
    that is an outage to retry, not a fault to crash on (the operator and `faults.retry` back off)."""
    admin = topics.admin_client(kafka.bootstrap)
    with pytest.raises(KafkaException) as raised:
        topics._created_elsewhere(admin, f"never-made.{unique}", timeout=0.3)
    assert faults.transient_dependency(raised.value) == "kafka"
