"""Apache Iceberg's Kafka Connect sink, the standard "Kafka into Iceberg" that `make bench` compares
K2's stream with (a peer, not part of K2).

Not started by `k2 stack up`: only the peer benchmark starts it. One Kafka Connect worker in
standalone mode runs on the local stack's Kafka. Its classpath comes from Maven Central: the small
pom beside this module lists connect-runtime, iceberg-kafka-connect with the modules its
distribution zip would add (iceberg-parquet, Hadoop's shaded client for HadoopFileIO), SQLite's
JDBC driver (the JDBC catalog, as K2's embedded SQLite catalog) and Apicurio's Avro converter,
which reads the Confluent wire format K2 produces (4-byte schema ids, no headers) from the same
Apicurio registry over its v2 API. `mvn dependency:copy-dependencies` puts them in
cache_dir()/iceberg-connect-ICEBERG-VERSION-kafka-CONNECT-VERSION/libs.

Connectors are added over the worker's REST API (`connector_config` renders one), so a benchmark
can time a sink from its creation, without the JVM's start. Port: K2_CONNECT_PORT (8083, REST),
on 127.0.0.1.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from .base import Service, cache_dir
from .kafka import DEPENDENCY_PLUGIN, Kafka, find_java, maven_fetch

log = structlog.get_logger("k2.stack.iceberg_connect")

ICEBERG_VERSION = "1.10.1"
CONNECT_VERSION = "4.4.0"
RESOURCES = Path(__file__).with_name("iceberg_connect")
SINK_CLASS = "org.apache.iceberg.connect.IcebergSinkConnector"
CONVERTER_CLASS = "io.apicurio.registry.utils.converter.AvroConverter"
DEFAULT_COMMIT_INTERVAL_MS = 300_000  # iceberg.control.commit.interval-ms when not set
CATALOG_NAME = "iceberg"  # the sink's default `iceberg.catalog`: the catalog_name of its rows in the JDBC catalog
SQLITE_BUSY_TIMEOUT_MS = 60_000


def maven_command(scratch: Path) -> list[str]:
    """Maven arguments that resolve the worker's runtime classpath into `scratch`/libs."""
    return ["-f", str(RESOURCES / "pom.xml"), f"-Diceberg.version={ICEBERG_VERSION}",
            f"-Dconnect.version={CONNECT_VERSION}", f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={scratch}/libs"]


def worker_properties(bootstrap: str, port: int, offsets_file: Path) -> dict[str, str]:
    """A standalone worker with no connector of its own; keys are plain strings (K2 keys by symbol)."""
    return {
        "bootstrap.servers": bootstrap,
        "listeners": f"http://127.0.0.1:{port}",
        "offset.storage.file.filename": str(offsets_file),
        "key.converter": "org.apache.kafka.connect.storage.StringConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        # Iceberg's sink answers its commit rounds only inside put(), which Connect calls after each
        # poll; on a quiet topic a poll waits out the offset flush interval (60 s by default), so
        # every round of a quiet sink would time out (30 s) and its first rows wait minutes.
        "offset.flush.interval.ms": "1000",
    }


def registry_v2_url(ccompat_url: str) -> str:
    """Apicurio's own v2 API beside its Confluent-compatible one (what its 2.x converter speaks)."""
    base, sep, _ = ccompat_url.partition("/apis/ccompat/")
    if not sep:
        raise ValueError(f"not an Apicurio ccompat URL: {ccompat_url}")
    return f"{base}/apis/registry/v2"


def connector_config(*, topic: str, table: str, control_topic: str, catalog_db: Path, warehouse: Path,
                     bootstrap: str, registry_url: str, commit_interval_ms: int | None,
                     partition_by: str = "exchange_date") -> dict[str, str]:
    """One Iceberg sink of one topic into one table of a JDBC catalog on SQLite, decoding K2's Avro.

    `commit_interval_ms=None` keeps the sink's default (300 s); the table is created from the
    record schema on the first record, partitioned by `partition_by` (K2: one partition a day)."""
    config = {
        "connector.class": SINK_CLASS,
        "tasks.max": "1",
        "topics": topic,
        "iceberg.tables": table,
        "iceberg.tables.auto-create-enabled": "true",
        "iceberg.tables.default-partition-by": partition_by,
        "iceberg.catalog.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
        "iceberg.catalog.uri": f"jdbc:sqlite:{catalog_db}",
        "iceberg.catalog.warehouse": warehouse.as_uri(),
        # Connectors share the SQLite file: a commit waits for another's lock instead of failing
        # the task (the driver's default wait is 3 s, too short on a loaded machine).
        "iceberg.catalog.jdbc.busy_timeout": str(SQLITE_BUSY_TIMEOUT_MS),
        # One connection per catalog: with the default two, one held a read lock while the other
        # committed, and SQLite refuses such an upgrade at once (SQLITE_BUSY, no wait), so every
        # commit round failed and the sink fell minutes behind.
        "iceberg.catalog.clients": "1",
        "iceberg.control.topic": control_topic,
        "iceberg.kafka.bootstrap.servers": bootstrap,
        "consumer.override.auto.offset.reset": "earliest",
        "value.converter": CONVERTER_CLASS,
        "value.converter.apicurio.registry.url": registry_v2_url(registry_url),
        # K2 writes the Confluent wire format: magic byte, 4-byte id (the registry's content id), no headers.
        "value.converter.apicurio.registry.as-confluent": "true",
        "value.converter.apicurio.registry.use-id": "contentId",
        "value.converter.apicurio.registry.headers.enabled": "false",
    }
    if commit_interval_ms is not None:
        config["iceberg.control.commit.interval-ms"] = str(commit_interval_ms)
    return config


@dataclass
class IcebergConnect(Service):
    name: str = "iceberg-connect"
    port_env: str = "K2_CONNECT_PORT"
    default_port: int = 8083
    start_timeout: float = 180.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def libs(self) -> Path:
        return cache_dir() / f"iceberg-connect-{ICEBERG_VERSION}-kafka-{CONNECT_VERSION}" / "libs"

    @property
    def config_path(self) -> Path:
        return self.home / "worker.properties"

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if self.libs.is_dir():
            return
        self.libs.parent.mkdir(parents=True, exist_ok=True)
        log.info("iceberg_connect.install", iceberg=ICEBERG_VERSION, connect=CONNECT_VERSION, into=str(self.libs))
        # Resolved beside the final folder and renamed in one step: a half-filled libs/ never looks installed.
        with tempfile.TemporaryDirectory(dir=self.libs.parent, prefix="libs.partial-") as scratch:
            maven_fetch(maven_command(Path(scratch)),
                        what=f"resolve Iceberg {ICEBERG_VERSION} Kafka Connect {CONNECT_VERSION} jars")
            Path(scratch, "libs").rename(self.libs)

    def prepare(self) -> None:
        props = worker_properties(Kafka().bootstrap, self.port, self.home / "offsets")
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def command(self) -> list[str]:
        return [find_java(17), "-Xms256m", "-Xmx1g", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={RESOURCES / 'log4j2.properties'}", "-cp", f"{self.libs}/*",
                "org.apache.kafka.connect.cli.ConnectStandalone", str(self.config_path)]

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/connectors", timeout=3).status_code == 200

    # helpers -----------------------------------------------------------------------------
    def create(self, name: str, config: dict[str, str]) -> None:
        answer = httpx.put(f"{self.url}/connectors/{name}/config", json=config, timeout=60)
        answer.raise_for_status()

    def delete(self, name: str) -> None:
        httpx.delete(f"{self.url}/connectors/{name}", timeout=60).raise_for_status()

    def task_states(self, name: str) -> list[dict]:
        """Each task's state, with its Java trace when it FAILED."""
        return httpx.get(f"{self.url}/connectors/{name}/status", timeout=10).json().get("tasks", [])
