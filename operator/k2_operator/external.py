"""External state — Kafka topics, registry subjects, Iceberg tables — through the workloads' own
modules (`k2.topics`, `k2.schemas`, `k2.tables`), so the operator and `k2 ingest`/`k2 stream`
can never disagree on how a topic is sized, a subject registered or a table defined.

What is added here is only what an operator needs around them: cached clients (one AdminClient,
registry client and catalog per endpoint, shared by all handler threads), a fast reachability
check so deletion does not wait out long client timeouts when a system is gone, and the
comparison of an existing table with its definition (which `ensure_table` does not judge).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import structlog
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from pyiceberg.catalog import Catalog
from pyiceberg.schema import Schema
from pyiceberg.table import Table

from k2 import schemas, tables, topics
from k2.reach import is_transport_error
from k2.schemas import registry as schema_registry
from k2.settings import Settings
from k2_operator.render.common import CATALOG_SECRET_FIELDS, DeclaredSettings

log = structlog.get_logger("k2_operator.external")


class Unavailable(RuntimeError):
    """An external system did not answer; the reconcile is retried with backoff."""

    def __init__(self, system: str, detail: str) -> None:
        super().__init__(f"{system} unavailable: {detail}")
        self.system = system


# --- clients --------------------------------------------------------------------------------------
@cache
def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10_000,
                        "socket.connection.setup.timeout.ms": 5_000})


@cache
def registry(url: str) -> SchemaRegistryClient:
    return schema_registry.client(url)


_catalogs: dict[tuple, Catalog] = {}
_catalog_lock = threading.Lock()


def catalog_settings(secret: Mapping[str, str]) -> Settings:
    """The catalog part of `Settings` from a catalog Secret (keys named like the settings)."""
    values = {k: secret[k] for k in CATALOG_SECRET_FIELDS if secret.get(k)}
    if "catalog_uri" not in values:
        raise ValueError("the catalog Secret has no catalog_uri")
    return DeclaredSettings.model_validate(values)


def catalog(settings: Settings) -> Catalog:
    key = tuple(str(getattr(settings, f)) for f in CATALOG_SECRET_FIELDS)
    with _catalog_lock:
        if key not in _catalogs:
            _catalogs[key] = tables.catalog(settings)
        return _catalogs[key]


# --- Kafka ----------------------------------------------------------------------------------------
def check_kafka(bootstrap: str, timeout: float = 5.0) -> None:
    try:
        admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise Unavailable("Kafka", str(exc)) from exc


def ensure_topics(bootstrap: str, specs: list[topics.TopicSpec]) -> list[topics.TopicState]:
    """`k2.topics.ensure_topic` for each spec; TopicShrinkRefused propagates (nothing shrinks)."""
    check_kafka(bootstrap)
    client = admin(bootstrap)
    states = []
    for spec in specs:
        try:
            states.append(topics.ensure_topic(client, spec))
        except KafkaException as exc:
            raise Unavailable("Kafka", str(exc)) from exc
    return states


def topic_partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    try:
        return topics.describe_partitions(admin(bootstrap), names, timeout=5.0)
    except KafkaException as exc:
        raise Unavailable("Kafka", str(exc)) from exc


def partition_lag(committed: int, low: int, high: int) -> int:
    """Messages of one partition a group has still to read. A group that never committed
    (a negative offset) or whose offset retention already deleted past starts at the log start."""
    return max(high - max(committed, low), 0)


def group_lag(bootstrap: str, group: str, topic: str, timeout: float = 5.0) -> int:
    """Messages `group` is behind the end of `topic`, summed over its partitions."""
    client = admin(bootstrap)
    try:
        count = topics.describe_partitions(client, [topic], timeout=timeout).get(topic, 0)
        partitions = [TopicPartition(topic, p) for p in range(count)]
        if not partitions:
            return 0
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        (future,) = client.list_consumer_group_offsets(request, request_timeout=timeout).values()
        committed = {}
        for tp in future.result().topic_partitions:
            if tp.error is not None:
                raise KafkaException(tp.error)
            committed[tp.partition] = tp.offset
        low = _log_offsets(client, partitions, OffsetSpec.earliest(), timeout)
        high = _log_offsets(client, partitions, OffsetSpec.latest(), timeout)
    except KafkaException as exc:
        raise Unavailable("Kafka", str(exc)) from exc
    return sum(partition_lag(committed.get(p, -1), low[p], high[p]) for p in range(count))


def _log_offsets(client: AdminClient, partitions: list[TopicPartition], spec: OffsetSpec,
                 timeout: float) -> dict[int, int]:
    futures = client.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout)
    return {tp.partition: future.result().offset for tp, future in futures.items()}


def delete_topics(bootstrap: str, names: list[str]) -> None:
    check_kafka(bootstrap)
    for name in names:
        try:
            topics.delete_topic(admin(bootstrap), name)
        except KafkaException as exc:
            raise Unavailable("Kafka", str(exc)) from exc


# --- Schema Registry ------------------------------------------------------------------------------
def _registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except SchemaRegistryError as exc:
        if exc.http_status_code is not None and exc.http_status_code >= 500:
            raise Unavailable("Schema Registry", str(exc)) from exc
        raise
    except Exception as exc:
        if is_transport_error(exc):
            raise Unavailable("Schema Registry", f"{type(exc).__name__}: {exc}") from exc
        raise


def register_value_schemas(url: str, topic_by_kind: Mapping[str, str],
                           compatibility: str) -> list[schema_registry.Registration]:
    """Register each kind's Avro schema under its topic's value subject (`k2.schemas.registry.register`);
    SchemaIncompatible propagates before anything of that subject changes."""
    client = registry(url)
    return [_registry_call(schema_registry.register, client, schema_registry.value_subject(topic),
                           schemas.avro_schema(kind), compatibility)
            for kind, topic in topic_by_kind.items()]


def delete_subjects(url: str, subjects: list[str]) -> None:
    client = registry(url)
    for subject in subjects:
        for permanent in (False, True):
            try:
                _registry_call(client.delete_subject, subject, permanent=permanent)
            except SchemaRegistryError as exc:
                if exc.http_status_code != 404:
                    raise


def latest_avro_schema(url: str, subject: str) -> dict[str, Any] | None:
    try:
        version = _registry_call(registry(url).get_latest_version, subject)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return None
        raise
    return json.loads(version.schema.schema_str)


# --- Iceberg --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableMismatch:
    reason: str
    message: str


def partition_fields(table: Table) -> list[tuple[str, str]]:
    """(source column, transform) as `TableDefinition.partition_by` writes them ("identity", "bucket[16]")."""
    schema = table.schema()
    return [(schema.find_column_name(f.source_id) or "?", str(f.transform)) for f in table.spec().fields]


def compare_table(table: Table, definition: tables.TableDefinition) -> TableMismatch | None:
    """Why the existing `table` cannot become `definition` by compatible evolution, or None.

    Compatible means: new columns only (added optional, as `k2.tables.evolve_schema` does) and
    existing columns keep their type; the partition spec stays as created.
    """
    actual = {f.name: f for f in table.schema().fields}
    changed = [f"{f.name} ({actual[f.name].field_type} → {f.field_type})" for f in definition.schema.fields
               if f.name in actual and actual[f.name].field_type != f.field_type]
    if changed:
        return TableMismatch("IncompatibleSchema", "column types cannot change: " + ", ".join(changed)
                             + "; add a new column instead")
    wanted, have = list(definition.partition_by), partition_fields(table)
    if wanted != have:
        return TableMismatch("PartitionSpecMismatch", f"the table is partitioned by {have or 'nothing'}, the "
                             f"resource asks for {wanted or 'nothing'}; the operator does not repartition tables")
    return None


def apply_properties(table: Table, wanted: Mapping[str, str]) -> list[str]:
    """Set the properties that differ (a hand-changed one is put back); returns their keys."""
    drift = {k: v for k, v in wanted.items() if table.properties.get(k) != v and k != "format-version"}
    if drift:
        tables.set_properties(table, drift)
    return sorted(drift)


def drop_table(cat: Catalog, identifier: str, *, purge: bool) -> bool:
    if tables.load_table(cat, identifier) is None:
        return False
    (cat.purge_table if purge else cat.drop_table)(identifier)
    return True


def iceberg_schema(avro: dict[str, Any]) -> Schema:
    return schemas.iceberg_schema_from_avro(avro)
