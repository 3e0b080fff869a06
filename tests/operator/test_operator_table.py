"""IcebergTable on the real apiserver and an embedded SQLite catalog: created and evolved through
`k2.tables`, properties kept in place, incompatible tables reported untouched, missing Secrets
waited for, and deletionPolicy Retain vs Delete. Creation, evolution and both deletion policies
also run with a catalog Secret naming the stack's PostgreSQL catalog and S3 warehouse (the chart's
configuration)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from k2 import schemas, tables
from k2.observability import REGISTRY
from k2.settings import Settings

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

FIELDS = [{"name": "pair", "type": "string", "required": True}, {"name": "rate", "type": "decimal(18,8)"}]


def iceberg_table(name: str, ns: str, table: str = "fx", fields: list | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": name},
            "spec": {"namespace": ns, "name": table, "schema": {"fields": fields or FIELDS}, **spec}}


def unique() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module", params=["sqlite-local", "postgres-s3"])
def table_catalog(request: pytest.FixtureRequest, cluster: Any, namespace: str, catalog: Any) -> tuple[str, Any]:
    """The catalog Secret an IcebergTable names, and the test's own connection to that catalog:
    the module's embedded one, or the stack's PostgreSQL catalog with a folder of the S3 bucket."""
    if request.param == "sqlite-local":
        return "k2-catalog", catalog
    s3, postgres = request.getfixturevalue("s3"), request.getfixturevalue("postgres")
    data = {"catalog_uri": postgres.sqlalchemy_url, "warehouse": f"s3://{s3.bucket}/op-{unique()}",
            "s3_endpoint": s3.endpoint, "s3_region": s3.region, "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key}
    cluster.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="k2-catalog-postgres-s3"),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))
    return "k2-catalog-postgres-s3", tables.catalog(Settings(**data))


def test_columns_are_added_compatibly(cluster: Any, namespace: str, operator: Any, table_catalog: tuple[str, Any],
                                      k2op: Any) -> None:
    secret, catalog = table_catalog
    ns = f"t_{unique()}"
    cluster.create(namespace, iceberg_table("fx", ns, catalogRef={"name": secret}))
    obj = cluster.wait_condition(namespace, "IcebergTable", "fx")
    assert obj["status"]["columns"] == 2 and obj["status"]["identifier"] == f"{ns}.fx"

    cluster.patch(namespace, "IcebergTable", "fx", {"spec": {"schema": {"fields": [
        *FIELDS, {"name": "venue", "type": "string"}]}}})
    obj = cluster.wait_condition(namespace, "IcebergTable", "fx")

    assert obj["status"]["columns"] == 3
    schema = catalog.load_table(f"{ns}.fx").schema()
    assert [(f.name, f.required) for f in schema.fields] == [("pair", True), ("rate", False), ("venue", False)]
    assert schema.schema_id == obj["status"]["schemaId"] == 1
    k2op.wait_for(lambda: any("added columns" in e.message for e in cluster.events(namespace, "fx", "Reconciled")),
                  "an Event saying columns were added", 15)
    cluster.delete(namespace, "IcebergTable", "fx")


def test_hand_changed_property_is_restored(cluster: Any, namespace: str, operator: Any, catalog: Any,
                                           k2op: Any) -> None:
    ns = f"t_{unique()}"
    cluster.create(namespace, iceberg_table("props", ns, properties={"compression": "snappy"}))
    cluster.wait_condition(namespace, "IcebergTable", "props")
    table = catalog.load_table(f"{ns}.fx")
    with table.transaction() as tx:
        tx.set_properties(**{"write.parquet.compression-codec": "gzip"})

    k2op.wait_for(lambda: catalog.load_table(f"{ns}.fx").properties["write.parquet.compression-codec"] == "snappy",
                  "the drift timer to restore the property", 30)
    events = k2op.wait_for(lambda: cluster.events(namespace, "props", "DriftRepaired"), "a DriftRepaired event", 15)
    assert "write.parquet.compression-codec" in events[0].message


def test_incompatible_existing_table_is_reported_and_left_alone(cluster: Any, namespace: str, operator: Any,
                                                                catalog: Any, k2op: Any) -> None:
    ns = f"t_{unique()}"
    catalog.create_namespace(ns)
    catalog.create_table(f"{ns}.fx", schema=Schema(NestedField(1, "pair", LongType(), required=True),
                                                   NestedField(2, "note", StringType(), required=False)))
    cluster.create(namespace, iceberg_table("clash", ns))

    obj = cluster.wait_condition(namespace, "IcebergTable", "clash", "TableReady", "False", "IncompatibleSchema")

    assert "pair (long → string)" in k2op.find_condition(obj, "TableReady")["message"]
    assert [f.name for f in catalog.load_table(f"{ns}.fx").schema().fields] == ["pair", "note"]
    cluster.delete(namespace, "IcebergTable", "clash")


def test_missing_catalog_secret_is_waited_for(cluster: Any, namespace: str, operator: Any, catalog_dir: Any,
                                              k2op: Any) -> None:
    ns = f"t_{unique()}"
    cluster.create(namespace, iceberg_table("later", ns, catalogRef={"name": "catalog-later"}))
    cluster.wait_condition(namespace, "IcebergTable", "later", "TableReady", "False", "SecretNotFound")
    series = {"kind": "IcebergTable", "resource_namespace": namespace, "resource": "later"}
    assert REGISTRY.get_sample_value("k2_operator_resource_ready", series) == 0, "the alert can name it"

    cluster.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="catalog-later"),
        data={k: base64.b64encode(v.encode()).decode() for k, v in k2op.catalog_secret_data(catalog_dir).items()}))

    cluster.wait_condition(namespace, "IcebergTable", "later", timeout=30)
    assert REGISTRY.get_sample_value("k2_operator_resource_ready", series) == 1
    waits = [s for m in REGISTRY.collect() if m.name == "k2_operator_reconcile_errors" for s in m.samples
             if s.labels.get("kind") == "IcebergTable" and s.labels.get("reason") in ("temporary", "TemporaryError")]
    assert not waits, "waiting for a Secret is not a reconcile error"
    cluster.delete(namespace, "IcebergTable", "later")
    k2op.wait_for(lambda: REGISTRY.get_sample_value("k2_operator_resource_ready", series) is None,
                  "the series of a deleted resource to go", 20)


def test_from_subject_follows_the_registered_schema(cluster: Any, namespace: str, operator: Any, catalog: Any,
                                                    schema_registry: Any) -> None:
    ns = f"t_{unique()}"
    subject = f"k2op-{unique()}-value"
    from k2.schemas.registry import register

    register(schema_registry, subject, schemas.avro_schema("quotes"))
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": "q"},
                               "spec": {"namespace": ns, "name": "quotes", "schema": {"fromSubject": subject}}})

    cluster.wait_condition(namespace, "IcebergTable", "q")

    assert catalog.load_table(f"{ns}.quotes").schema().as_struct() == schemas.iceberg_schema("quotes").as_struct()
    cluster.delete(namespace, "IcebergTable", "q")


def test_retain_keeps_the_table_and_delete_drops_it(cluster: Any, namespace: str, operator: Any,
                                                    table_catalog: tuple[str, Any]) -> None:
    secret, catalog = table_catalog
    ns = f"t_{unique()}"
    cluster.create(namespace, iceberg_table("kept", ns, table="kept", catalogRef={"name": secret}))
    cluster.create(namespace, iceberg_table("dropped", ns, table="dropped", deletionPolicy="Delete",
                                            catalogRef={"name": secret}))
    cluster.wait_condition(namespace, "IcebergTable", "kept")
    cluster.wait_condition(namespace, "IcebergTable", "dropped")
    dropped = catalog.load_table(f"{ns}.dropped")
    metadata = dropped.io.new_input(dropped.metadata_location)
    assert metadata.exists()

    cluster.delete(namespace, "IcebergTable", "kept")
    cluster.delete(namespace, "IcebergTable", "dropped")
    cluster.wait_gone(namespace, "IcebergTable", "kept", 30)
    cluster.wait_gone(namespace, "IcebergTable", "dropped", 30)

    assert catalog.table_exists(f"{ns}.kept")
    assert not catalog.table_exists(f"{ns}.dropped")
    assert not metadata.exists()


def test_two_tables_on_one_identifier_the_newer_gets_a_conflict(cluster: Any, namespace: str, operator: Any,
                                                                 k2op: Any) -> None:
    ns = f"t_{unique()}"
    cluster.create(namespace, iceberg_table("owner", ns))
    cluster.wait_condition(namespace, "IcebergTable", "owner")
    cluster.create(namespace, iceberg_table("claimant", ns, fields=[*FIELDS, {"name": "extra", "type": "long"}]))

    obj = cluster.wait_condition(namespace, "IcebergTable", "claimant", "Ready", "False", "ResourceConflict")

    assert f"IcebergTable {namespace}/owner" in k2op.find_condition(obj, "Ready")["message"]
    assert cluster.get(namespace, "IcebergTable", "owner")["status"]["columns"] == 2, "the owner's table is untouched"
    cluster.delete(namespace, "IcebergTable", "owner")
    obj = cluster.wait_condition(namespace, "IcebergTable", "claimant", timeout=30)  # the drift loop hands it over
    assert obj["status"]["columns"] == 3
    cluster.delete(namespace, "IcebergTable", "claimant")


def test_catalog_ref_is_immutable(cluster: Any, namespace: str) -> None:
    cluster.create(namespace, iceberg_table("pinned", f"t_{unique()}"))

    with pytest.raises(ApiException) as refused:
        cluster.patch(namespace, "IcebergTable", "pinned", {"spec": {"catalogRef": {"name": "elsewhere"}}})

    assert refused.value.status == 422 and "catalogRef is immutable" in json.loads(refused.value.body)["message"]
    cluster.delete(namespace, "IcebergTable", "pinned")
