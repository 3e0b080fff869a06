"""Every sample in manifests/samples/ becomes Ready, and what it asked for exists exactly as
specified: Kafka topics (partitions, config), registry subjects (schema, compatibility), Iceberg
tables (schema, partition spec, sort order, properties) and the child objects (Deployments, Job,
Services, Ingress, CronJobs, PodDisruptionBudgets), all owned by their resource.

Also: invalid specs are refused by the apiserver itself (OpenAPI schema and CEL), with the message
the CRD promises."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from k2 import schemas

pytestmark = [pytest.mark.operator, pytest.mark.timeout(300)]

READY_WITHIN = 90.0


@pytest.fixture(scope="module")
def applied(cluster: Any, namespace: str, operator: Any, asset_class: str, k2op: Any) -> dict[tuple[str, str], dict]:
    """All samples applied at once with kubectl, as a user would, then waited for."""
    docs = k2op.load_samples(asset_class)
    manifest = yaml.safe_dump_all(docs)
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest)
    assert proc.returncode == 0, proc.stderr
    ready = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        ready[key] = cluster.wait_condition(namespace, *key, timeout=READY_WITHIN)
    return ready


def test_every_sample_is_synced(applied: dict[tuple[str, str], dict], k2op: Any) -> None:
    kinds = {kind for kind, _ in applied}
    assert kinds == set(k2op.PLURALS)
    for (kind, name), obj in applied.items():
        synced = k2op.find_condition(obj, "Synced")
        assert synced["reason"] == "Reconciled", (kind, name, synced)
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_synced_is_not_ready_while_no_pod_serves(applied: dict[tuple[str, str], dict], k2op: Any) -> None:
    """This control plane has no nodes: the consumers and API pods never run, so what is applied
    (Synced) is not Ready; tables, which serve nothing through pods, are both."""
    for (kind, name), obj in applied.items():
        ready = k2op.find_condition(obj, "Ready")
        if kind == "IcebergTable":
            assert ready["status"] == "True", (name, ready)
        else:
            assert (ready["status"], ready["reason"]) == ("False", "ReplicasUnavailable"), (kind, name, ready)
            assert "0/" in ready["message"]


def test_topics_are_created_as_specified(applied: dict, admin: Any, asset_class: str, k2op: Any) -> None:
    topic_partitions, topic_config = k2op.topic_partitions, k2op.topic_config
    spec = applied[("IngestionPipeline", "asx")]["spec"]
    for kind in ("trades", "quotes", "reference"):
        topic = f"market.{asset_class}.{kind}.asx"
        assert topic_partitions(admin, topic) == spec["topics"]["partitions"] == 6
        config = topic_config(admin, topic)
        assert config["retention.ms"] == "604800000" and config["compression.type"] == "zstd"
    assert topic_partitions(admin, f"market.{asset_class}syn.trades.asx") == 3
    assert topic_partitions(admin, f"market.{asset_class}.dlq") == 1
    status_topics = applied[("IngestionPipeline", "asx")]["status"]["topics"]
    assert {t["name"]: t["partitions"] for t in status_topics} == {
        f"market.{asset_class}.{k}.asx": 6 for k in ("trades", "quotes", "reference")}


def test_subjects_are_registered_with_the_compatibility_level(applied: dict, schema_registry: Any,
                                                              asset_class: str) -> None:
    status = applied[("IngestionPipeline", "asx")]["status"]["schemas"]
    assert len(status) == 3
    for entry in status:
        kind = entry["subject"].split(".")[2]
        latest = schema_registry.get_latest_version(entry["subject"])
        assert (latest.schema_id, latest.version) == (entry["schemaId"], entry["version"])
        assert json.loads(latest.schema.schema_str)["name"] == schemas.avro_schema(kind)["name"]
        assert schema_registry.get_compatibility(entry["subject"]) == "BACKWARD"


def test_tables_are_created_as_specified(applied: dict, catalog: Any) -> None:
    trades = catalog.load_table("market.trades")
    assert [f.name for f in trades.schema().fields] == [f.name for f in schemas.iceberg_schema("trades").fields]
    assert [(trades.schema().find_column_name(f.source_id), str(f.transform)) for f in trades.spec().fields] == [
        ("exchange_date", "identity")]
    assert [trades.schema().find_column_name(f.source_id) for f in trades.sort_order().fields] == [
        "symbol", "exchange_timestamp", "sequence_number"]
    assert trades.properties["write.parquet.compression-codec"] == "zstd"
    assert trades.properties["history.expire.min-snapshots-to-keep"] == "5"
    status = applied[("IcebergTable", "market-trades")]["status"]
    assert status["tableUuid"] == str(trades.metadata.table_uuid) and status["identifier"] == "market.trades"

    fx = catalog.load_table("market.fx_fixings")
    assert {f.name: (str(f.field_type), f.required) for f in fx.schema().fields} == {
        "pair": ("string", True), "fixing_date": ("date", True), "fixed_at": ("timestamptz", True),
        "rate": ("decimal(18, 8)", True), "source": ("string", False)}
    assert [str(f.transform) for f in fx.spec().fields] == ["bucket[8]"]
    assert fx.properties["write.metadata.previous-versions-max"] == "50"
    assert fx.properties["commit.retry.num-retries"] == "0", "K2 owns it: its writers retry conflicts themselves"
    assert catalog.load_table("synthetic.reference") is not None


def owned_by(obj: Any, kind: str, name: str) -> bool:
    return any(ref.kind == kind and ref.name == name and ref.controller for ref in obj.metadata.owner_references or [])


def test_child_objects_are_rendered_and_owned(applied: dict, cluster: Any, namespace: str) -> None:
    consumer = cluster.deployment(namespace, "asx-consumer")
    assert owned_by(consumer, "IngestionPipeline", "asx")
    assert consumer.spec.replicas == 1
    box = consumer.spec.template.spec.containers[0]
    assert box.command is None, "the image's entrypoint (tini -- k2) stays"
    assert box.args == ["stream", "run", "--tables", "trades,quotes,reference", "--group-id",
                        f"k2-stream-{namespace}-asx"]
    settings = cluster.core.read_namespaced_config_map("asx-settings", namespace).data
    assert settings["K2_EXCHANGE"] == "asx" and settings["K2_NAMESPACE"] == "market"
    assert settings["K2_TOPIC_PARTITIONS"] == "6" and settings["K2_MODE"] == "prod"

    jobs = cluster.batch.list_namespaced_job(namespace, label_selector="k2.io/ingestionpipeline=asx").items
    assert len(jobs) == 1 and owned_by(jobs[0], "IngestionPipeline", "asx")
    assert jobs[0].spec.template.spec.containers[0].args[:3] == ["ingest", "asx", "/data/asx-2014-03"]
    assert applied[("IngestionPipeline", "asx")]["status"]["ingest"]["job"] == jobs[0].metadata.name

    api = cluster.deployment(namespace, "k2-api")
    assert owned_by(api, "QueryService", "k2-api") and api.spec.replicas == 2
    assert api.spec.template.spec.containers[0].args == ["api", "--host", "0.0.0.0", "--port", "8000"]
    ingress = cluster.kubectl("get", "ingress", "k2-api", "-n", namespace, "-o", "json")
    assert json.loads(ingress.stdout)["spec"]["rules"][0]["host"] == "k2.localtest.me"
    assert applied[("QueryService", "k2-api")]["status"]["url"] == "http://k2.localtest.me"

    cron = cluster.batch.read_namespaced_cron_job("market-trades-maintenance", namespace)
    assert cron.spec.schedule == "15 3 * * *" and owned_by(cron, "IcebergTable", "market-trades")
    for pdb in ("asx-consumer", "synthetic-consumer", "k2-api"):
        assert cluster.kubectl("get", "pdb", pdb, "-n", namespace).returncode == 0


def test_the_controllers_act_on_the_children(applied: dict, cluster: Any, namespace: str) -> None:
    """kube-controller-manager creates ReplicaSets for the rendered Deployments (Pods stay Pending)."""
    rs = cluster.apps.list_namespaced_replica_set(namespace, label_selector="app.kubernetes.io/instance=asx").items
    assert rs and rs[0].spec.template.spec.containers[0].args[0] == "stream"


def test_printer_columns(applied: dict, cluster: Any, namespace: str) -> None:
    out = cluster.kubectl("get", "ipl", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "EXCHANGE", "SOURCE", "PARTITIONS", "CONSUMERS", "SYNCED", "READY", "AGE"]
    assert out[1].split()[:7] == ["asx", "asx", "asx-csv", "6", "1", "True", "False"]
    tables = cluster.kubectl("get", "k2", "-n", namespace).stdout  # the category lists all three kinds
    assert "icebergtable.k2.io/market-trades" in tables and "queryservice.k2.io/k2-api" in tables


INVALID = [
    ("IngestionPipeline", {"source": {"type": "asx-csv"}}, "source.folder (path, optional claimName) is required"),
    ("IngestionPipeline", {"source": {"type": "asx-csv", "asxCsv": {"path": "/a"}, "folder": {"path": "/a"}}},
     "two spellings of one input: give one"),
    ("IngestionPipeline", {"source": {"type": "synthetic", "folder": {"path": "/a"}}},
     "source.folder is only allowed with a folder source type"),
    ("IngestionPipeline", {"source": {"type": "asx-csv", "folder": {"path": "/a"}}, "topics": {"kinds": ["trades"]}},
     "a folder source (asx-csv, …) produces reference data"),
    ("IngestionPipeline", {"exchange": "ASX"}, 'Unsupported value: "ASX": supported values: "asx", "nasdaq", "crypto"'),
    ("IngestionPipeline", {"exchange": "lse"}, 'Unsupported value: "lse"'),
    ("IngestionPipeline", {"topics": {"partitions": 0}}, "should be greater than or equal to 1"),
    ("IngestionPipeline", {"consumer": {"gapAlert": 500}}, "consumer.gapAlert must not exceed consumer.gapHalt"),
    ("IngestionPipeline", {"deletionPolicy": "Maybe"}, 'supported values: "Retain", "Delete"'),
    ("IcebergTable", {"schema": {}}, "schema needs exactly one of fields or fromSubject"),
    ("IcebergTable", {"schema": {"fields": [{"name": "c", "type": "varchar"}]}}, "spec.schema.fields[0].type"),
    ("IcebergTable", {"compactionSchedule": "@daily"}, "compactionSchedule is supported for K2's tables"),
    ("QueryService", {"tables": []}, "should have at least 1 items"),
    ("IcebergTable", {"properties": {"extra": {"commit.retry.num-retries": "10"}}},
     "properties.extra must not set commit.retry.num-retries: K2 owns it"),
    ("IcebergTable", {"properties": {"extra": {"write.parquet.compression-codec": "gzip"}}},
     "set properties.compression instead"),
]
VALID = {
    "IngestionPipeline": {"exchange": "crypto"},
    "IcebergTable": {"name": "custom", "schema": {"fromSubject": "s-value"}},
    "QueryService": {"tables": [{"name": "t"}]},
}


@pytest.mark.parametrize(("kind", "override", "message"), INVALID,
                         ids=[f"{k}-{m[:30]}" for k, _, m in INVALID])
def test_invalid_specs_are_rejected_by_the_apiserver(cluster: Any, namespace: str, kind: str,
                                                     override: dict, message: str) -> None:
    body = {"apiVersion": "k2.io/v1alpha1", "kind": kind, "metadata": {"name": "invalid"},
            "spec": {**VALID[kind], **override}}
    with pytest.raises(ApiException) as rejected:
        cluster.create(namespace, body)
    assert rejected.value.status == 422
    assert message in json.loads(rejected.value.body)["message"]
