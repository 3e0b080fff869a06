"""Registering K2's Avro schemas: TopicNameStrategy subjects, a compatibility level per subject,
and a compatibility check *before* registration so an incompatible change fails before anything
is produced (and the subject is left as it was)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

log = structlog.get_logger("k2.schemas")
REQUEST_TIMEOUT_SECONDS = 30


class SchemaIncompatible(RuntimeError):
    """The new schema breaks the subject's compatibility level; nothing was registered."""


@dataclass(frozen=True)
class Registration:
    subject: str
    schema_id: int
    version: int | None


def value_subject(topic: str) -> str:
    return f"{topic}-value"


def client(url: str) -> SchemaRegistryClient:
    # Without a timeout the client waits forever on a registry that accepted the connection
    # but never answers; a clear error is better than a hung ingest.
    return SchemaRegistryClient({"url": url, "timeout": REQUEST_TIMEOUT_SECONDS})


def _subject_exists(registry: SchemaRegistryClient, subject: str) -> bool:
    try:
        registry.get_latest_version(subject)
        return True
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return False
        raise


def register(registry: SchemaRegistryClient, subject: str, schema: dict[str, Any] | str,
             compatibility: str = "BACKWARD") -> Registration:
    """Idempotently register `schema` under `subject` with `compatibility` set on the subject."""
    text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
    candidate = Schema(text, "AVRO")
    if _subject_exists(registry, subject):
        if not registry.test_compatibility(subject, candidate):
            raise SchemaIncompatible(
                f"schema for subject {subject} is not {compatibility}-compatible with the registered "
                f"versions; register a compatible evolution (e.g. add an optional field with a default)")
    registry.set_compatibility(subject_name=subject, level=compatibility)
    schema_id = registry.register_schema(subject, candidate)
    version = registry.lookup_schema(subject, candidate).version
    log.info("schema.registered", subject=subject, schema_id=schema_id, version=version,
             compatibility=compatibility)
    return Registration(subject, schema_id, version)
