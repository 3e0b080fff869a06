"""Transient dependency failures: told apart from bad data, retried with backoff, counted.

A registry, catalog, object store or broker that is down or slow says nothing about the message
being processed: dead-lettering it would turn an outage into data loss. `retry` runs a step until
it gets through, backing off exponentially (with jitter) while the failure is transient; any
other exception propagates at once. Poison is decided elsewhere, only from the message itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from confluent_kafka import KafkaError, KafkaException
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from k2.observability import DEPENDENCY_ERRORS, DEPENDENCY_RETRY_SECONDS

log = structlog.get_logger("k2.faults")
T = TypeVar("T")
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 10.0  # seconds
# Error codes that mean "the cluster is not reachable or not ready yet": librdkafka's local ones,
# and the broker's while a restarted broker elects partition leaders and reloads groups. The
# broker's cannot be told by KafkaError.retriable(): confluent-kafka raises them from calls such as
# get_watermark_offsets built from the bare code, without the retriable flag.
_KAFKA_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                    KafkaError._TIMED_OUT_QUEUE, KafkaError._MSG_TIMED_OUT, KafkaError._QUEUE_FULL,
                    KafkaError._RESOLVE, KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_BROKER,
                    KafkaError._WAIT_COORD,
                    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.PREFERRED_LEADER_NOT_AVAILABLE, KafkaError.FENCED_LEADER_EPOCH,
                    KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError.NOT_COORDINATOR,
                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
                    KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError.NOT_ENOUGH_REPLICAS,
                    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.KAFKA_STORAGE_ERROR,
                    KafkaError.OFFSET_NOT_AVAILABLE}


class Transient(RuntimeError):
    """A dependency did not answer as it should this time; `dependency` names which."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency}: {detail}")
        self.dependency = dependency


def transient_dependency(exc: BaseException) -> str | None:
    """The dependency a transient failure came from, or None if `exc` is not transient."""
    if isinstance(exc, Transient):
        return exc.dependency
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError):
        return "catalog"  # the SQL catalog: connection refused or lost, database locked
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        return "kafka" if err is not None and (err.retriable() or err.code() in _KAFKA_TRANSIENT) else None
    if isinstance(exc, BufferError):
        return "kafka"  # the producer's local queue is full while a broker is away
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return None  # a missing or forbidden object does not come back by waiting
    if isinstance(exc, OSError):
        return "storage"  # pyarrow's S3 and local file system errors, connection resets, timeouts
    return None


def retry(step: Callable[[], T], *, what: str) -> T:
    """`step()`, repeated with exponential backoff for as long as it fails transiently."""
    attempt = 0
    while True:
        try:
            result = step()
        except Exception as exc:
            dependency = transient_dependency(exc)
            if dependency is None:
                raise
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt) * random.uniform(0.5, 1.0)
            DEPENDENCY_ERRORS.labels(dependency).inc()
            log.warning("dependency.retrying", dependency=dependency, what=what, attempt=attempt + 1,
                        delay=round(delay, 2), error=f"{type(exc).__name__}: {exc}")
            time.sleep(delay)
            DEPENDENCY_RETRY_SECONDS.labels(dependency).inc(delay)
            attempt += 1
            continue
        if attempt:
            log.info("dependency.recovered", what=what, attempts=attempt + 1)
        return result
