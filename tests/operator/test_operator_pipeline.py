"""IngestionPipeline behaviour on the real apiserver, Kafka and registry: scaling and partition
growth applied, shrinking refused (by CEL, and by a condition when Kafka already has more),
incompatible schemas reported without changes, two pipelines on one topic, drift repaired, and
deletion honouring deletionPolicy without ever hanging."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic
from confluent_kafka.schema_registry import Schema
from kubernetes.client.rest import ApiException

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]


def pipeline(name: str, ex: str, asset_class: str, **spec: Any) -> dict[str, Any]:
    """An ASX pipeline whose topics are its own: `ex` (from `unique()`) makes its asset class private."""
    return {"apiVersion": "k2.io/v1alpha1", "kind": "IngestionPipeline", "metadata": {"name": name},
            "spec": {"exchange": "asx", "assetClass": f"{asset_class}{ex}", "topics": {"kinds": ["trades", "quotes"]},
                     **spec}}


def table(name: str, namespace: str, subject: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": name},
            "spec": {"namespace": namespace, "name": "trades", "schema": {"fromSubject": subject}, **spec}}


def unique() -> str:
    """Makes a test's asset class, and so its topics, private."""
    return f"x{uuid.uuid4().hex[:6]}"


def topic(asset_class: str, ex: str, kind: str = "trades") -> str:
    return f"market.{asset_class}{ex}.{kind}.asx"


@pytest.fixture
def with_consumers(cluster: Any, namespace: str, operator: Any, asset_class: str) -> tuple[str, str]:
    """A Ready pipeline writing one Ready IcebergTable, so it has a consumer Deployment."""
    ex = unique()
    name = f"p-{ex}"
    cluster.create(namespace, table(f"t-{ex}", f"ns_{ex}", f"{topic(asset_class, ex)}-value"))
    cluster.create(namespace, pipeline(name, ex, asset_class, tables=[{"name": f"t-{ex}"}],
                                       consumer={"replicas": 1}))
    cluster.wait_condition(namespace, "IngestionPipeline", name, timeout=60)
    return name, ex


def test_scaling_and_partition_growth_are_applied(cluster: Any, namespace: str, with_consumers: tuple[str, str],
                                                  admin: Any, asset_class: str, k2op: Any) -> None:
    name, ex = with_consumers
    assert cluster.deployment(namespace, f"{name}-consumer").spec.replicas == 1

    cluster.patch(namespace, "IngestionPipeline", name, {"spec": {"consumer": {"replicas": 3},
                                                                  "topics": {"partitions": 9}}})
    obj = cluster.wait_condition(namespace, "IngestionPipeline", name)

    assert cluster.deployment(namespace, f"{name}-consumer").spec.replicas == 3
    assert k2op.topic_partitions(admin, topic(asset_class, ex)) == 9
    assert k2op.topic_partitions(admin, topic(asset_class, ex, "quotes")) == 9
    assert {t["partitions"] for t in obj["status"]["topics"]} == {9}
    assert obj["status"]["consumers"]["replicas"] == 3
    assert k2op.wait_for(lambda: cluster.events(namespace, name, "Reconciled"), "a Reconciled event", 15)


def test_consumers_scale_through_the_scale_subresource_up_to_the_partitions(
        cluster: Any, namespace: str, with_consumers: tuple[str, str], k2op: Any) -> None:
    """An HPA or KEDA scales consumers like a Deployment; CEL keeps them at most one per partition."""
    name, _ = with_consumers
    path = f"/apis/k2.io/v1alpha1/namespaces/{namespace}/ingestionpipelines/{name}/scale"
    proc = cluster.kubectl("scale", "ipl", name, "-n", namespace, "--replicas=2")
    assert proc.returncode == 0, proc.stderr

    k2op.wait_for(lambda: cluster.deployment(namespace, f"{name}-consumer").spec.replicas == 2, "2 consumers", 30)
    scale = json.loads(cluster.kubectl("get", "--raw", path).stdout)
    assert scale["spec"]["replicas"] == 2
    selector = dict(pair.split("=") for pair in scale["status"]["selector"].split(","))
    pod_labels = cluster.deployment(namespace, f"{name}-consumer").spec.template.metadata.labels
    assert selector.items() <= pod_labels.items()

    partitions = cluster.get(namespace, "IngestionPipeline", name)["spec"]["topics"]["partitions"]
    refused = cluster.kubectl("scale", "ipl", name, "-n", namespace, f"--replicas={partitions + 1}")
    assert refused.returncode != 0 and "consumer.replicas must not exceed topics.partitions" in refused.stderr


def test_shrinking_is_refused_by_the_apiserver(cluster: Any, namespace: str, operator: Any, asset_class: str) -> None:
    name = f"p-{unique()}"
    cluster.create(namespace, pipeline(name, name[2:], asset_class, topics={"partitions": 4}))
    cluster.wait_condition(namespace, "IngestionPipeline", name)

    with pytest.raises(ApiException) as refused:
        cluster.patch(namespace, "IngestionPipeline", name, {"spec": {"topics": {"partitions": 2}}})

    assert refused.value.status == 422
    message = json.loads(refused.value.body)["message"]
    assert "spec.topics.partitions" in message and "partitions may only grow" in message
    assert cluster.get(namespace, "IngestionPipeline", name)["spec"]["topics"]["partitions"] == 4


def test_a_topic_larger_than_asked_is_reported_not_shrunk(cluster: Any, namespace: str, operator: Any,
                                                         admin: Any, asset_class: str, k2op: Any) -> None:
    ex = unique()
    admin.create_topics([NewTopic(topic(asset_class, ex), num_partitions=8, replication_factor=1)])[
        topic(asset_class, ex)].result(10)
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class, topics={"partitions": 4}))

    obj = cluster.wait_condition(namespace, "IngestionPipeline", name, "TopicsReady", "False", "ShrinkRefused")

    assert "cannot shrink" in k2op.find_condition(obj, "TopicsReady")["message"]
    assert k2op.find_condition(obj, "Ready")["status"] == "False"
    assert k2op.topic_partitions(admin, topic(asset_class, ex)) == 8


def test_incompatible_schema_is_reported_and_nothing_changes(cluster: Any, namespace: str, operator: Any,
                                                              schema_registry: Any, asset_class: str,
                                                              k2op: Any) -> None:
    ex = unique()
    subject = f"{topic(asset_class, ex)}-value"
    foreign = {"type": "record", "name": "Trade", "namespace": "elsewhere",
               "fields": [{"name": "symbol", "type": "long"}, {"name": "venue_code", "type": "string"}]}
    schema_registry.register_schema(subject, Schema(json.dumps(foreign), "AVRO"))
    before = schema_registry.get_versions(subject)
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class))

    obj = cluster.wait_condition(namespace, "IngestionPipeline", name, "SchemasRegistered", "False",
                                 "SchemaIncompatible")

    assert subject in k2op.find_condition(obj, "SchemasRegistered")["message"]
    assert k2op.find_condition(obj, "Ready")["reason"] == "SchemaIncompatible"
    assert schema_registry.get_versions(subject) == before
    latest = json.loads(schema_registry.get_latest_version(subject).schema.schema_str)
    assert latest["namespace"] == "elsewhere"


def test_two_pipelines_on_one_topic_the_newer_gets_a_conflict(cluster: Any, namespace: str, operator: Any,
                                                              asset_class: str, k2op: Any) -> None:
    ex = unique()
    cluster.create(namespace, pipeline(f"first-{ex}", ex, asset_class))
    cluster.wait_condition(namespace, "IngestionPipeline", f"first-{ex}")
    cluster.create(namespace, pipeline(f"second-{ex}", ex, asset_class, topics={"partitions": 12}))

    obj = cluster.wait_condition(namespace, "IngestionPipeline", f"second-{ex}", "Ready", "False", "ResourceConflict")

    assert f"IngestionPipeline {namespace}/first-{ex}" in k2op.find_condition(obj, "Ready")["message"]
    assert k2op.find_condition(cluster.get(namespace, "IngestionPipeline", f"first-{ex}"), "Ready")["status"] == "True"
    # kopf posts events in the background: the status can be seen before its event
    assert k2op.wait_for(lambda: cluster.events(namespace, f"second-{ex}", "ResourceConflict"),
                         "a ResourceConflict event", 15)

    # Once the owner is gone, the other pipeline takes the topics over (drift timer).
    cluster.delete(namespace, "IngestionPipeline", f"first-{ex}")
    cluster.wait_condition(namespace, "IngestionPipeline", f"second-{ex}", timeout=30)


def test_deleted_deployment_is_recreated_with_an_event(cluster: Any, namespace: str,
                                                       with_consumers: tuple[str, str], k2op: Any) -> None:
    name, _ = with_consumers
    old = cluster.deployment(namespace, f"{name}-consumer")

    cluster.apps.delete_namespaced_deployment(f"{name}-consumer", namespace)

    k2op.wait_for(lambda: (d := cluster.deployment(namespace, f"{name}-consumer")) is not None
                  and d.metadata.uid != old.metadata.uid, "the consumer Deployment to be recreated", 30)
    k2op.wait_for(lambda: cluster.events(namespace, name, "DriftRepaired"), "a DriftRepaired event", 15)


def test_hand_scaled_deployment_is_put_back(cluster: Any, namespace: str, with_consumers: tuple[str, str],
                                            k2op: Any) -> None:
    name, _ = with_consumers
    cluster.apps.patch_namespaced_deployment_scale(f"{name}-consumer", namespace, {"spec": {"replicas": 5}})

    k2op.wait_for(lambda: cluster.deployment(namespace, f"{name}-consumer").spec.replicas == 1,
                  "the replica count to be restored", 30)


def test_hand_changed_topic_config_is_repaired(cluster: Any, namespace: str, operator: Any, admin: Any,
                                               asset_class: str, k2op: Any) -> None:
    ex = unique()
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class, topics={"config": {"retention.ms": "86400000"}}))
    cluster.wait_condition(namespace, "IngestionPipeline", name)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic(asset_class, ex), incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(10)

    k2op.wait_for(lambda: k2op.topic_config(admin, topic(asset_class, ex))["retention.ms"] == "86400000",
                  "retention.ms to be restored by the drift timer", 30)
    events = k2op.wait_for(lambda: cluster.events(namespace, name, "DriftRepaired"), "a DriftRepaired event", 15)
    assert "retention.ms" in events[0].message


def test_retain_keeps_topics_and_subjects(cluster: Any, namespace: str, operator: Any, admin: Any,
                                          schema_registry: Any, asset_class: str, k2op: Any) -> None:
    ex = unique()
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class))
    cluster.wait_condition(namespace, "IngestionPipeline", name)

    cluster.delete(namespace, "IngestionPipeline", name)
    cluster.wait_gone(namespace, "IngestionPipeline", name, 30)

    assert k2op.topic_partitions(admin, topic(asset_class, ex)) == 6
    assert schema_registry.get_latest_version(f"{topic(asset_class, ex)}-value").version == 1


def test_delete_removes_topics_and_subjects(cluster: Any, namespace: str, operator: Any, admin: Any,
                                            schema_registry: Any, asset_class: str, k2op: Any) -> None:
    ex = unique()
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class, deletionPolicy="Delete"))
    cluster.wait_condition(namespace, "IngestionPipeline", name)
    assert "k2.io/cleanup" in cluster.get(namespace, "IngestionPipeline", name)["metadata"]["finalizers"]

    cluster.delete(namespace, "IngestionPipeline", name)
    cluster.wait_gone(namespace, "IngestionPipeline", name, 30)

    k2op.wait_for(lambda: k2op.topic_partitions(admin, topic(asset_class, ex)) is None, "topics deleted", 20)
    assert not [s for s in schema_registry.get_subjects() if s.startswith(topic(asset_class, ex))]
    assert k2op.topic_partitions(admin, f"market.{asset_class}{ex}.dlq") == 1  # shared: never deleted
    assert k2op.wait_for(lambda: cluster.events(namespace, name, "CleanedUp"), "a CleanedUp event", 15)


def _deleted_while_the_registry_is_gone(cluster: Any, namespace: str, asset_class: str) -> str:
    """A Delete-policy pipeline whose registry does not answer, then deleted; returns its name."""
    ex = unique()
    name = f"p-{ex}"
    cluster.create(namespace, pipeline(name, ex, asset_class, deletionPolicy="Delete",
                                       schemaRegistry={"url": "http://127.0.0.1:9/apis/ccompat/v7"}))
    cluster.wait_condition(namespace, "IngestionPipeline", name, "SchemasRegistered", "False", "RegistryUnavailable")
    cluster.delete(namespace, "IngestionPipeline", name)
    return name


def test_deletion_with_the_registry_gone_reports_and_honours_the_escape_hatch(
        cluster: Any, namespace: str, operator: Any, asset_class: str, k2op: Any) -> None:
    name = _deleted_while_the_registry_is_gone(cluster, namespace, asset_class)
    obj = cluster.wait_condition(namespace, "IngestionPipeline", name, "Ready", "False", "CleanupFailed",
                                 generation=False)
    assert "k2.io/skip-external-cleanup=true" in k2op.find_condition(obj, "Ready")["message"]

    cluster.patch(namespace, "IngestionPipeline", name,
                  {"metadata": {"annotations": {"k2.io/skip-external-cleanup": "true"}}})
    cluster.wait_gone(namespace, "IngestionPipeline", name, 30)
    assert cluster.events(namespace, name, "CleanupSkipped")


def test_deletion_gives_up_after_the_configured_attempts(cluster: Any, namespace: str, operator: Any,
                                                         asset_class: str) -> None:
    name = _deleted_while_the_registry_is_gone(cluster, namespace, asset_class)

    cluster.wait_gone(namespace, "IngestionPipeline", name, 45)  # 3 attempts, 1 s + 2 s backoff
    assert cluster.events(namespace, name, "CleanupAbandoned")


def test_the_ingest_job_waits_for_topics_and_schemas(cluster: Any, namespace: str, operator: Any,
                                                      asset_class: str) -> None:
    """A Job started before its schemas exist fails its pods on them (seen on kind while the
    in-cluster registry was still starting) and can exhaust its backoff limit: it is created once
    the topics and schemas are in place."""
    ex = unique()
    name = f"p-{ex}"
    source = {"type": "synthetic", "synthetic": {"symbols": 1, "days": 1}}
    body = pipeline(name, ex, asset_class, source=source,
                    schemaRegistry={"url": "http://127.0.0.1:9/apis/ccompat/v7"})
    body["spec"]["topics"]["kinds"] = ["trades", "quotes", "reference"]
    cluster.create(namespace, body)
    cluster.wait_condition(namespace, "IngestionPipeline", name, "SchemasRegistered", "False", "RegistryUnavailable")

    jobs = cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()
    assert not [j for j in jobs if name in j], "a Job was created before its schemas were registered"
    assert cluster.get(namespace, "IngestionPipeline", name)["status"]["ingest"]["phase"] == "Pending"

    cluster.patch(namespace, "IngestionPipeline", name, {"spec": {"schemaRegistry": None}})
    cluster.wait_condition(namespace, "IngestionPipeline", name, "SchemasRegistered", timeout=90)
    jobs = cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()
    assert [j for j in jobs if name in j], "no Job once the schemas were registered"
