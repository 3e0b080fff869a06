"""Handler decisions that need no cluster: who owns a topic, a Job's phase, what counts as drift,
and which table changes are compatible (on a throwaway SQLite catalog)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from k2 import schemas, tables
from k2.settings import Settings
from k2_operator import external
from k2_operator.conditions import Condition
from k2_operator.handlers import apply, children, pipeline, status
from k2_operator.handlers.claims import Claim
from k2_operator.models import IcebergTableSpec, IngestionPipelineSpec
from k2_operator.render import table_definition
from k2_operator.render.pipeline import TableBinding

pytestmark = pytest.mark.unit


def claims_for(*pipelines: tuple[str, str, str]) -> dict[str, list[Claim]]:
    """(created, name, uid) → the index kopf would build."""
    index: dict[str, list[Claim]] = {}
    for created, name, uid in pipelines:
        for topic in IngestionPipelineSpec.model_validate({"exchange": "asx"}).topic_names().values():
            index.setdefault(topic, []).append(Claim(created, False, "ns", name, uid))
    return index


def test_the_oldest_pipeline_owns_its_topics() -> None:
    index = claims_for(("2026-01-02T00:00:00Z", "newer", "u2"), ("2026-01-01T00:00:00Z", "older", "u1"))
    spec = IngestionPipelineSpec.model_validate({"exchange": "asx"})

    assert pipeline.conflicts(spec, "u1", index) == {}
    owners = pipeline.conflicts(spec, "u2", index)
    assert set(owners) == set(spec.topic_names().values())
    assert {c.ref for c in owners.values()} == {"ns/older"}


def test_same_second_ties_are_broken_deterministically() -> None:
    index = claims_for(("2026-01-01T00:00:00Z", "b", "u2"), ("2026-01-01T00:00:00Z", "a", "u1"))
    spec = IngestionPipelineSpec.model_validate({"exchange": "asx"})

    assert pipeline.conflicts(spec, "u1", index) == {}
    assert pipeline.conflicts(spec, "u2", index)


@pytest.mark.parametrize(("job", "phase"), [
    (None, "Pending"),
    ({"status": {}}, "Pending"),
    ({"status": {"active": 1, "startTime": "t"}}, "Running"),
    ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "Succeeded"),
    ({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}, "Failed"),
])
def test_job_phase(job: dict | None, phase: str) -> None:
    assert pipeline.job_phase(job) == phase


def test_a_deleted_job_keeps_its_recorded_phase() -> None:
    assert pipeline.job_phase(None, recorded_phase="Succeeded") == "Succeeded"


def test_fingerprints_ignore_status_but_not_spec() -> None:
    deployment = {"kind": "Deployment", "metadata": {"generation": 3, "resourceVersion": "100"}}
    status_moved = {"kind": "Deployment", "metadata": {"generation": 3, "resourceVersion": "101"}}
    config_map = {"kind": "ConfigMap", "metadata": {"resourceVersion": "7"}}

    assert apply.fingerprint(deployment) == apply.fingerprint(status_moved) == "g3"
    assert apply.fingerprint(config_map) == "r7"


def test_children_are_traced_to_their_controlling_owner() -> None:
    child = {"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "controller": True},
        {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "name": "api", "controller": True}]}}

    info, name = children.owner_of(child)
    assert (info.kind, name) == ("QueryService", "api")
    assert children.owner_of({"metadata": {}}) is None


def test_availability() -> None:
    assert status.availability("Available", 0, 0).reason == "ScaledToZero"
    assert status.availability("Available", 2, 2).ok
    assert status.availability("Available", 2, 1).status == "False"


def test_catalog_settings_come_from_the_secret_keys() -> None:
    settings = external.catalog_settings({"catalog_uri": "sqlite:////tmp/x.db", "warehouse": "s3://w",
                                          "s3_endpoint": "http://s3:9000", "unrelated": "ignored"})

    assert (settings.catalog_uri, settings.warehouse, settings.s3_endpoint) == ("sqlite:////tmp/x.db", "s3://w",
                                                                                "http://s3:9000")
    with pytest.raises(ValueError, match="catalog_uri"):
        external.catalog_settings({"warehouse": "w"})


@pytest.fixture
def catalog(tmp_path: Path):
    return tables.catalog(Settings(catalog_uri=f"sqlite:///{tmp_path}/c.db", warehouse=str(tmp_path / "w")))


def test_compare_accepts_added_columns_and_refuses_type_changes(catalog) -> None:
    spec = IcebergTableSpec.model_validate({"namespace": "m", "name": "fx", "schema": {"fields": [
        {"name": "pair", "type": "string", "required": True}, {"name": "rate", "type": "double"}]}})
    definition = table_definition(spec, schemas.iceberg_schema_from_avro(spec.schema_.avro_record("fx")))
    catalog.create_namespace("m")
    existing = catalog.create_table("m.fx", schema=Schema(NestedField(1, "pair", StringType(), required=True)))

    assert external.compare_table(existing, definition) is None
    table, created, evolved = tables.ensure(catalog, definition)
    assert (created, evolved) == (False, True)
    assert [f.name for f in table.schema().fields] == ["pair", "rate"]

    catalog.create_table("m.clash", schema=Schema(NestedField(1, "pair", LongType(), required=True)))
    mismatch = external.compare_table(catalog.load_table("m.clash"), definition)
    assert mismatch is not None and mismatch.reason == "IncompatibleSchema"


def test_compare_refuses_a_different_partition_spec(catalog) -> None:
    spec = IcebergTableSpec.model_validate({"namespace": "m", "name": "trades", "schema": {"fromSubject": "s"},
                                            "partitionBy": [{"column": "exchange_date"}]})
    definition = table_definition(spec, schemas.iceberg_schema("trades"))
    catalog.create_namespace("m")
    unpartitioned = catalog.create_table("m.trades", schema=schemas.iceberg_schema("trades"))

    mismatch = external.compare_table(unpartitioned, definition)

    assert mismatch is not None and mismatch.reason == "PartitionSpecMismatch"


def test_properties_are_put_back(catalog) -> None:
    catalog.create_namespace("m")
    table = catalog.create_table("m.t", schema=Schema(NestedField(1, "a", StringType())),
                                 properties={"write.parquet.compression-codec": "gzip"})

    assert external.apply_properties(table, {"write.parquet.compression-codec": "zstd"}) == [
        "write.parquet.compression-codec"]
    assert catalog.load_table("m.t").properties["write.parquet.compression-codec"] == "zstd"
    assert external.apply_properties(catalog.load_table("m.t"), {"write.parquet.compression-codec": "zstd"}) == []


def test_retries_back_off_exponentially_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    from k2_operator.config import OperatorConfig
    from k2_operator.handlers import backoff, runtime

    monkeypatch.setattr(runtime, "_runtime", runtime.Runtime(kube=None, settings=Settings(),  # type: ignore[arg-type]
                                                             config=OperatorConfig(retry_delay=2.0)))
    for attempt, ceiling in [(0, 2.0), (1, 4.0), (3, 16.0), (20, backoff.MAX_DELAY)]:
        delays = [backoff.retry_delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(set(delays)) > 1, "jittered: resources waiting on one outage must not retry in lockstep"


def test_an_operator_in_a_cluster_needs_real_endpoints() -> None:
    from k2_operator.main import missing_endpoints

    assert missing_endpoints({}) == [], "outside a cluster the local stack's defaults are right"
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert missing_endpoints(in_cluster) == ["K2_KAFKA_BOOTSTRAP", "K2_REGISTRY_URL"]
    assert missing_endpoints({**in_cluster, "K2_KAFKA_BOOTSTRAP": "kafka:9092", "K2_REGISTRY_URL": "http://r"}) == []


def test_within_one_second_an_established_owner_keeps_what_it_owns() -> None:
    from k2_operator.handlers.claims import owned_by_others

    established = Claim("2026-01-01T00:00:00Z", False, "ns", "zeta", "u1")
    newcomer = Claim("2026-01-01T00:00:00Z", True, "ns", "alpha", "u2")
    index = {"key": [newcomer, established]}

    assert owned_by_others(["key"], "u1", index) == {}
    assert owned_by_others(["key"], "u2", index) == {"key": established}


@pytest.mark.parametrize(("committed", "low", "high", "lag"), [
    (-1001, 0, 50, 50),  # the group never committed: everything from the log start
    (-1001, 30, 50, 20),  # … which retention may have moved
    (40, 0, 50, 10),
    (50, 0, 50, 0),  # caught up
    (10, 30, 50, 20),  # committed before what retention deleted: only what is left counts
])
def test_partition_lag(committed: int, low: int, high: int, lag: int) -> None:
    assert external.partition_lag(committed, low, high) == lag


def test_lag_condition_names_the_tables_behind() -> None:
    bounded = pipeline.lag_condition({"trades": 100, "quotes": 0}, 100, replicas=2)
    lagging = pipeline.lag_condition({"trades": 101, "quotes": 7}, 100, replicas=2)
    idle = pipeline.lag_condition({"trades": 101}, 100, replicas=0)

    assert (bounded.status, bounded.reason) == ("True", "LagBounded")
    assert "trades 100, quotes 0" in bounded.message
    assert (lagging.status, lagging.reason) == ("False", "ConsumerLagging")
    assert lagging.message.startswith("trades more than readyMaxLag 100") and "quotes 7" in lagging.message
    assert "consumer.replicas is 0" in idle.message and "replicas is 0" not in lagging.message


def test_ready_max_lag_defaults_to_the_lag_alert_threshold() -> None:
    """The chart alerts on lag above monitoring.prometheusRule.thresholds.consumerLag; a pipeline
    past that is not Ready either, unless the resource says otherwise."""
    values = yaml.safe_load((Path(__file__).parents[2] / "charts/k2/values.yaml").read_text())
    spec = IngestionPipelineSpec.model_validate({"exchange": "asx"})
    assert spec.consumer.ready_max_lag == values["monitoring"]["prometheusRule"]["thresholds"]["consumerLag"]


def _lag_checked(monkeypatch: pytest.MonkeyPatch, bootstrap: str, *earlier: Condition) -> pipeline.Outcome:
    """check_lag of a pipeline writing `trades`, after the steps that found `earlier`."""
    from k2_operator.config import OperatorConfig
    from k2_operator.handlers import runtime

    monkeypatch.setattr(runtime, "_runtime", runtime.Runtime(kube=None, settings=Settings(kafka_bootstrap=bootstrap),  # type: ignore[arg-type]
                                                             config=OperatorConfig()))
    spec = IngestionPipelineSpec.model_validate({"exchange": "asx", "topics": {"kinds": ["trades"]},
                                                 "tables": [{"name": "t"}]})
    out = pipeline.Outcome(checks=list(earlier))
    pipeline.check_lag("ns", "p", spec, TableBinding(kinds=("trades",), namespace="market", catalog_secret="c"), out)
    return out


def test_lag_that_cannot_be_measured_is_unknown_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka not answering says nothing about the consumers: Unknown (Ready Unknown), and retried."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again below: nothing listens there

    try:
        out = _lag_checked(monkeypatch, f"127.0.0.1:{port}")
    finally:
        external.admin.cache_clear()  # the client would retry that port for the rest of the session

    assert [(c.type, c.status, c.reason) for c in out.checks] == [
        ("ConsumersCaughtUp", "Unknown", "KafkaUnavailable")]
    assert out.retry


def test_lag_is_not_asked_of_a_kafka_the_topics_step_found_away(monkeypatch: pytest.MonkeyPatch) -> None:
    away = Condition.false("TopicsReady", "KafkaUnavailable", "Kafka unavailable: transport failure")

    out = _lag_checked(monkeypatch, "127.0.0.1:1", away)

    assert out.checks[-1] == Condition.unknown("ConsumersCaughtUp", "KafkaUnavailable", away.message)

