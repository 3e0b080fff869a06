"""Registering K2's Avro schemas: TopicNameStrategy subjects, a compatibility level per subject,
and a compatibility check *before* registration so an incompatible change fails before anything
is produced (and the subject is left as it was)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from k2.reach import LOCAL_STACK_HINT, Unreachable, is_transport_error

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


CONFLUENT_PATH = "/apis/ccompat/v7"  # where Apicurio serves the Confluent-compatible API


def _subject_exists(registry: SchemaRegistryClient, subject: str) -> bool:
    try:
        registry.get_latest_version(subject)
        return True
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404 and exc.error_code is not None:  # the registry's "no such subject"
            return False
        raise


@contextmanager
def reachable(url: str) -> Iterator[None]:
    """Registry calls inside: no server at `url`, or a server that is no Confluent-compatible
    registry there (a bare 404), become `Unreachable` naming K2_REGISTRY_URL."""
    try:
        yield
    except SchemaRegistryError as exc:
        if exc.http_status_code != 404 or exc.error_code is not None:
            raise
        hint = "" if url.rstrip("/").endswith(CONFLUENT_PATH) else \
            f"Apicurio serves it under {CONFLUENT_PATH}: try K2_REGISTRY_URL={url.rstrip('/')}{CONFLUENT_PATH}"
        raise Unreachable("Schema Registry", url, "K2_REGISTRY_URL", "HTTP 404, no Confluent-compatible registry "
                          "API at this URL", hint or LOCAL_STACK_HINT) from exc
    except Exception as exc:
        if is_transport_error(exc):
            raise Unreachable("Schema Registry", url, "K2_REGISTRY_URL", f"{type(exc).__name__}: {exc}") from exc
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
