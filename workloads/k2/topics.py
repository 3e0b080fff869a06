"""Kafka topics as desired state: create, grow partitions, apply config; never shrink.

Used by `k2 ingest` when it runs standalone and by the operator's IngestionPipeline handler, so
both manage topics the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from k2.reach import Unreachable
from k2.settings import Settings, TableKind

log = structlog.get_logger("k2.topics")


class TopicShrinkRefused(RuntimeError):
    """Kafka cannot remove partitions; the desired count is lower than the actual one."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = 6
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    created: bool = False
    grown_from: int | None = None
    config_changed: tuple[str, ...] = ()


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def describe_partitions(admin: AdminClient, names: list[str], timeout: float = 10.0) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    return {name: len(metadata.topics[name].partitions) for name in names
            if name in metadata.topics and metadata.topics[name].error is None}


def current_config(admin: AdminClient, name: str, timeout: float = 10.0) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=timeout)
    return {key: entry.value for key, entry in entries.items()}


def ensure_topic(admin: AdminClient, spec: TopicSpec, timeout: float = 30.0) -> TopicState:
    """Make the topic match `spec`; idempotent. Raises TopicShrinkRefused on a shrink request."""
    existing = describe_partitions(admin, [spec.name]).get(spec.name)
    if existing is None:
        futures = admin.create_topics([NewTopic(spec.name, num_partitions=spec.partitions,
                                                replication_factor=spec.replication_factor,
                                                config=dict(spec.config))])
        try:
            futures[spec.name].result(timeout=timeout)
            log.info("topic.created", topic=spec.name, partitions=spec.partitions)
            return TopicState(spec.name, spec.partitions, created=True)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
            existing = _created_elsewhere(admin, spec.name, timeout)

    grown_from = None
    if spec.partitions < existing:
        raise TopicShrinkRefused(f"topic {spec.name} has {existing} partitions; Kafka cannot shrink it "
                                 f"to {spec.partitions}")
    if spec.partitions > existing:
        admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result(timeout=timeout)
        log.info("topic.partitions_grown", topic=spec.name, from_=existing, to=spec.partitions)
        grown_from = existing

    changed: tuple[str, ...] = ()
    if spec.config:
        actual = current_config(admin, spec.name)
        drift = {k: v for k, v in spec.config.items() if actual.get(k) != str(v)}
        if drift:
            resource = ConfigResource(ConfigResource.Type.TOPIC, spec.name, incremental_configs=[
                ConfigEntry(k, str(v), incremental_operation=AlterConfigOpType.SET) for k, v in drift.items()])
            admin.incremental_alter_configs([resource])[resource].result(timeout=timeout)
            changed = tuple(sorted(drift))
            log.info("topic.config_applied", topic=spec.name, keys=list(changed))
    return TopicState(spec.name, spec.partitions, grown_from=grown_from, config_changed=changed)


def _created_elsewhere(admin: AdminClient, name: str, timeout: float) -> int:
    """The partitions of a topic another client has just created. The broker refuses a second
    creation before its metadata lists the topic's partitions (their leaders are still being
    elected), so they are waited for."""
    deadline = time.monotonic() + timeout
    while (existing := describe_partitions(admin, [name]).get(name)) is None:
        if time.monotonic() > deadline:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True, reason=(
                f"topic {name} exists, yet its partitions were not listed within {timeout:g}s")))
        time.sleep(0.05)
    return existing


class MissingResource(RuntimeError):
    """Something the workload needs does not exist, and creating it is not this workload's job."""


def ensure_pipeline_topics(settings: Settings, kinds: tuple[TableKind, ...]) -> None:
    """The data topics of `kinds` and the DLQ, as `settings` names and sizes them. With
    `create_resources` off (deployed by the operator, which creates them from the
    IngestionPipeline) they are only checked, and a missing one is a clear error."""
    admin = admin_client(settings.kafka_bootstrap)
    try:
        admin.list_topics(timeout=10)
    except KafkaException as exc:
        raise Unreachable("Kafka", settings.kafka_bootstrap, "K2_KAFKA_BOOTSTRAP", str(exc.args[0])) from exc
    specs = [TopicSpec(settings.topic(k), settings.topic_partitions, settings.topic_replication) for k in kinds]
    specs.append(TopicSpec(settings.dlq_topic, 1, settings.topic_replication))
    if not settings.create_resources:
        existing = describe_partitions(admin, [s.name for s in specs])
        missing = [s.name for s in specs if s.name not in existing]
        if missing:
            raise MissingResource(f"Kafka topics {', '.join(missing)} do not exist; K2_CREATE_RESOURCES is off, so "
                                  "they must come from their IngestionPipeline (is it Ready?)")
        return
    for spec in specs:
        ensure_topic(admin, spec)


def delete_topic(admin: AdminClient, name: str, timeout: float = 30.0) -> None:
    try:
        admin.delete_topics([name])[name].result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].name() != "UNKNOWN_TOPIC_OR_PART":
            raise
