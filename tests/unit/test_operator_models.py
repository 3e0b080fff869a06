"""The spec models: validation, derived names shared with the workloads, and the column schema."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pyiceberg.types import DateType, DecimalType, LongType, StringType, TimestamptzType

from k2 import schemas
from k2.settings import Settings
from k2_operator.models import IcebergTableSpec, IngestionPipelineSpec, QueryServiceSpec, Resources

pytestmark = pytest.mark.unit


def test_topic_names_follow_the_workloads_convention() -> None:
    spec = IngestionPipelineSpec.model_validate({"exchange": "nasdaq", "assetClass": "fx",
                                                 "topics": {"kinds": ["trades", "quotes"]}})
    settings = Settings(exchange="nasdaq", asset_class="fx")

    assert spec.topic_names() == {"trades": settings.topic("trades"), "quotes": settings.topic("quotes")}
    assert spec.dlq_topic() == settings.dlq_topic


def test_defaults_fill_a_minimal_pipeline() -> None:
    spec = IngestionPipelineSpec.model_validate({"exchange": "asx"})

    assert spec.asset_class == "equities" and spec.source.type == "none"
    assert spec.topics.kinds == ["trades", "quotes", "reference"]
    assert spec.consumer.batch_rows == Settings().batch_rows
    assert spec.deletion_policy == "Retain"


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"exchange": "ASX"}, "Input should be 'asx', 'nasdaq' or 'crypto'"),
    ({"exchange": "lse"}, "Input should be 'asx'"),
    ({"exchange": "asx", "topics": {"partitions": 0}}, "greater than or equal to 1"),
    ({"exchange": "asx", "topics": {"kinds": ["trades", "bonds"]}}, "trades"),
    ({"exchange": "asx", "consumer": {"batchSeconds": 0}}, "greater than 0"),
    ({"exchange": "asx", "compatibility": "SOMETIMES"}, "BACKWARD"),
    ({"exchange": "asx", "unknown": 1}, "Extra inputs"),
    ({"exchange": "asx", "source": {"type": "asx-csv"}}, "source.folder (path, optional claimName) is required"),
    ({"exchange": "asx", "source": {"type": "asx-csv", "asxCsv": {"path": "/a"}, "folder": {"path": "/a"}}},
     "two spellings of one input: give one"),
    ({"exchange": "asx", "source": {"type": "synthetic", "folder": {"path": "/a"}}},
     "source.folder is only allowed with a folder source type"),
    ({"exchange": "asx", "source": {"type": "feed", "feed": {"url": "ws://f"}, "asxCsv": {"path": "/a"}}},
     "source.asxCsv is only allowed with type asx-csv"),
])
def test_invalid_pipelines_are_rejected(spec: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as error:
        IngestionPipelineSpec.model_validate(spec)
    assert fragment in str(error.value)


def test_resources_accept_quantities_as_strings_or_integers() -> None:
    assert Resources(requests={"cpu": 1, "memory": "512Mi"}).as_manifest() == {
        "requests": {"cpu": "1", "memory": "512Mi"}}
    with pytest.raises(ValidationError):
        Resources(limits={"memory": "lots"})


def test_fields_become_the_iceberg_schema_through_the_shared_avro_mapping() -> None:
    spec = IcebergTableSpec.model_validate({"name": "fx", "schema": {"fields": [
        {"name": "pair", "type": "string", "required": True},
        {"name": "day", "type": "date", "required": True},
        {"name": "at", "type": "timestamp", "required": True},
        {"name": "rate", "type": "decimal(18,8)", "required": True},
        {"name": "volume", "type": "long"},
    ]}})

    schema = schemas.iceberg_schema_from_avro(spec.schema_.avro_record(spec.name))

    types = {f.name: (f.field_type, f.required) for f in schema.fields}
    assert types == {"pair": (StringType(), True), "day": (DateType(), True), "at": (TimestamptzType(), True),
                     "rate": (DecimalType(18, 8), True), "volume": (LongType(), False)}


@pytest.mark.parametrize("type_", ["decimal(40,2)", "varchar", "timestamp_ns", "Decimal(10,2)"])
def test_unknown_column_types_are_rejected(type_: str) -> None:
    with pytest.raises(ValidationError):
        IcebergTableSpec.model_validate({"name": "t", "schema": {"fields": [{"name": "c", "type": type_}]}})


def test_table_defaults_and_identifier() -> None:
    spec = IcebergTableSpec.model_validate({"name": "trades", "schema": {"fromSubject": "x-value"}})

    assert spec.identifier == f"{Settings().namespace}.trades"
    assert spec.catalog_ref.name == "k2-catalog" and spec.deletion_policy == "Retain"
    assert spec.properties.target_file_size_bytes == Settings().target_file_size_bytes


def test_query_service_needs_tables_and_a_valid_rate_limit() -> None:
    with pytest.raises(ValidationError):
        QueryServiceSpec.model_validate({"tables": []})
    with pytest.raises(ValidationError):
        QueryServiceSpec.model_validate({"tables": [{"name": "t"}], "rateLimit": "lots"})
    spec = QueryServiceSpec.model_validate({"tables": [{"name": "t"}]})
    assert spec.rate_limit == Settings().rate_limit and spec.auth.api_keys_secret.key == "api_keys"


@pytest.mark.parametrize("key", ["commit.retry.num-retries", "write.parquet.compression-codec"])
def test_properties_k2_owns_are_refused_in_extra(key: str) -> None:
    with pytest.raises(ValidationError, match=f"must not set {key}"):
        IcebergTableSpec.model_validate({"name": "t", "schema": {"fromSubject": "s"},
                                         "properties": {"extra": {key: "x"}}})
