"""Shared fixtures: the real local stack and the ASX sample.

Services are started once per session and only if they are not already serving: under
`make test` the stack is up before pytest starts and stays up; a bare `pytest` starts what the
selected tests need and stops what it started at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2.settings import Settings
from k2.stack.base import Service

REPO = Path(__file__).resolve().parents[1]
ASX_DATA = Path(os.environ.get("K2_ASX_DATA", REPO.parent / "shared" / "data" / "asx-2014-03"))


def _docker_engine_answers() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("kind" in item.keywords for item in items) and not _docker_engine_answers():
        skip = pytest.mark.skip(reason="no Docker engine answers (`docker info` failed): kind clusters cannot run here")
        for item in items:
            if "kind" in item.keywords:
                item.add_marker(skip)


class _Stack:
    def __init__(self) -> None:
        self.started: list[Service] = []

    def ensure(self, service: Service) -> Service:
        if service.status() != "ready":
            service.start()
            self.started.append(service)
        return service

    def stop_started(self) -> None:
        for service in reversed(self.started):
            service.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator[_Stack]:
    running = _Stack()
    yield running
    running.stop_started()


@pytest.fixture(scope="session")
def kafka(stack: _Stack):
    from k2.stack.kafka import Kafka

    return stack.ensure(Kafka())


@pytest.fixture(scope="session")
def registry(stack: _Stack, kafka):
    from k2.stack.registry import SchemaRegistry

    return stack.ensure(SchemaRegistry())


@pytest.fixture(scope="session")
def postgres(stack: _Stack):
    from k2.stack.postgres import Postgres

    return stack.ensure(Postgres())


@pytest.fixture(scope="session")
def s3(stack: _Stack):
    from k2.stack.s3 import S3

    return stack.ensure(S3())


@pytest.fixture(scope="session")
def kube(stack: _Stack):
    from k2.stack.kube import kube_services, kubeconfig_path

    for service in kube_services():
        stack.ensure(service)
    return kubeconfig_path()


@pytest.fixture
def unique() -> str:
    """A short unique suffix, so tests sharing one Kafka/catalog never see each other's data."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def embedded_settings(tmp_path: Path, kafka, registry, unique: str) -> Settings:
    """Settings on the real Kafka + registry with a private embedded catalog and private topics."""
    return Settings(kafka_bootstrap=kafka.bootstrap, registry_url=registry.url, asset_class=f"t{unique}",
                    catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "warehouse"),
                    dlq_path=str(tmp_path / "dlq.jsonl"), batch_seconds=0.5)


@pytest.fixture(scope="session")
def asx_root() -> Path:
    if not (ASX_DATA / "reference-data" / "company_info.csv").is_file():
        pytest.skip(f"ASX sample not found at {ASX_DATA} (set K2_ASX_DATA to its folder)")
    return ASX_DATA


def drain_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every message of `topic` from the beginning up to its current end (real consumer)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-drain-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        messages, remaining = [], dict(ends)
        import time

        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    continue
                messages.append(msg)
                if msg.offset() + 1 >= remaining.get(msg.partition(), 0):
                    remaining.pop(msg.partition(), None)
        assert not remaining, f"timed out draining {topic}: partitions {sorted(remaining)} unfinished"
        return messages
    finally:
        consumer.close()


@pytest.fixture
def drain():
    return drain_topic
