"""Ready means the consumers keep up: an IngestionPipeline whose consumer groups are more than
`consumer.readyMaxLag` messages behind its topics is not Ready (ConsumerLagging, the lag per table
in the message), and turns Ready by itself once `k2 stream run` has caught up, with no edit to
the resource. On the real apiserver and Kafka; the test plays the kubelet (see tests/conftest.py)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition

pytestmark = [pytest.mark.operator, pytest.mark.timeout(300)]

PIPELINE = "IngestionPipeline"


def _resources(namespace: str, cluster: Any, asset_class: str, ex: str, **spec: Any) -> str:
    """An IcebergTable `trades` and a pipeline writing it; returns the pipeline's name."""
    name = f"lag-{ex}"
    cluster.create(namespace, {
        "apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": f"t-{ex}"},
        "spec": {"namespace": f"ns_{ex}", "name": "trades",
                 "schema": {"fromSubject": f"market.{asset_class}{ex}.trades.asx-value"}}})
    cluster.create(namespace, {
        "apiVersion": "k2.io/v1alpha1", "kind": PIPELINE, "metadata": {"name": name},
        "spec": {"exchange": "asx", "assetClass": f"{asset_class}{ex}", "tables": [{"name": f"t-{ex}"}], **spec}})
    return name


def _log_end(admin: Any, topic: str) -> int:
    """Messages in the topic (its partitions' high watermarks), asked of Kafka."""
    from confluent_kafka.admin import OffsetSpec

    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    futures = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
                                 request_timeout=10)
    return sum(f.result().offset for f in futures.values())


def _stop(proc: Any, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_waits_until_the_consumers_catch_up(cluster: Any, namespace: str, operator: Any, admin: Any,
                                                   asset_class: str, k2op: Any, tmp_path: Path) -> None:
    ex = f"x{uuid.uuid4().hex[:6]}"
    topic = f"market.{asset_class}{ex}.trades.asx"
    name = _resources(namespace, cluster, asset_class, ex,
                      source={"type": "synthetic", "synthetic": {"symbols": 1, "days": 1}},
                      consumer={"replicas": 1, "readyMaxLag": 10})
    obj = cluster.wait_condition(namespace, PIPELINE, name, timeout=90)

    # The ingest Job fills the topics before any consumer runs.
    (job,) = [j for j in cluster.batch.list_namespaced_job(namespace).items if j.metadata.name.startswith(name)]
    ingest = k2op.start_container(cluster, namespace, job.spec.template.spec, tmp_path / "ingest.log")
    assert ingest.wait(timeout=180) == 0, (tmp_path / "ingest.log").read_text()[-3000:]
    produced = _log_end(admin, topic)
    assert produced > 10

    # Its consumer pod is up as far as Kubernetes can tell, but nothing consumes yet.
    selector = obj["status"]["consumers"]["selector"]
    k2op.wait_for(lambda: k2op.mark_pods_ready(cluster, namespace, selector), "the consumer pod", 30)
    obj = cluster.wait_condition(namespace, PIPELINE, name, "Ready", "False", "ConsumerLagging", timeout=60)
    assert k2op.find_condition(obj, "ConsumersAvailable")["status"] == "True"
    lagging = k2op.find_condition(obj, "ConsumersCaughtUp")
    assert lagging["status"] == "False"
    assert f"trades {produced}" in lagging["message"] and "readyMaxLag 10" in lagging["message"]
    generation = obj["metadata"]["generation"]

    deployment = cluster.deployment(namespace, f"{name}-consumer")
    consumer = k2op.start_container(cluster, namespace, deployment.spec.template.spec, tmp_path / "stream.log")
    try:
        obj = cluster.wait_condition(namespace, PIPELINE, name, "Ready", "True", timeout=150)
    finally:
        _stop(consumer, tmp_path / "stream.log")

    assert obj["metadata"]["generation"] == generation, "Ready followed the consumers, not an edit"
    caught_up = k2op.find_condition(obj, "ConsumersCaughtUp")
    assert (caught_up["status"], caught_up["reason"]) == ("True", "LagBounded")
    assert "trades 0" in caught_up["message"]
    assert k2op.wait_for(lambda: cluster.events(namespace, name, "ConsumerLagging"), "a ConsumerLagging event", 15)


def test_scaled_to_zero_with_a_backlog_is_not_ready_unless_lag_is_not_gated(
        cluster: Any, namespace: str, operator: Any, kafka: Any, asset_class: str, k2op: Any) -> None:
    ex = f"x{uuid.uuid4().hex[:6]}"
    name = _resources(namespace, cluster, asset_class, ex, topics={"kinds": ["trades"]},
                      consumer={"replicas": 0, "readyMaxLag": 5})
    cluster.wait_condition(namespace, PIPELINE, name, timeout=90)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(20):  # what is in them does not matter: nothing reads them
        producer.produce(f"market.{asset_class}{ex}.trades.asx", f"tick {i}".encode())
    assert producer.flush(30) == 0

    obj = cluster.wait_condition(namespace, PIPELINE, name, "Ready", "False", "ConsumerLagging", timeout=60)
    assert k2op.find_condition(obj, "ConsumersAvailable")["reason"] == "ScaledToZero"
    message = k2op.find_condition(obj, "ConsumersCaughtUp")["message"]
    assert "trades 20" in message and "consumer.replicas is 0" in message

    cluster.patch(namespace, PIPELINE, name, {"spec": {"consumer": {"readyMaxLag": 0}}})
    obj = cluster.wait_condition(namespace, PIPELINE, name, "Ready", "True", timeout=60)
    assert k2op.find_condition(obj, "ConsumersCaughtUp")["reason"] == "LagNotGated"

