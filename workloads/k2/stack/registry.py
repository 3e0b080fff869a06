"""The schema registry: Apicurio Registry 3, spoken to through its Confluent-compatible API.

Apicurio publishes a runnable build of its Quarkus app on Maven Central, the `all` tarball of
io.apicurio:apicurio-registry-app (the quarkus-app layout: quarkus-run.jar, lib/, app/). It is
fetched with Maven and unpacked into cache_dir()/apicurio-registry-VERSION. The app is built for
Java 21, so a Java 21+ runtime is looked up (JAVA_HOME, PATH, /usr/lib/jvm).

Storage is KafkaSQL: every change is appended to a Kafka topic that the registry replays on
start, as Confluent's registry does with `_schemas`, so schemas survive restarts and nothing but
Kafka holds state. Kafka must therefore be up first. The topics are created by the registry
itself (auto.create.topics.enable is off on our broker), with infinite retention.

Clients (confluent_kafka.schema_registry.SchemaRegistryClient, AvroSerializer) use `url`, which
ends in /apis/ccompat/v7. Ports: K2_REGISTRY_PORT (8081, the API) and
K2_REGISTRY_MANAGEMENT_PORT (8082, Quarkus health and metrics, which would otherwise take 9000,
the S3 server's port), both on 127.0.0.1.

What did not work, for the record: building the app from its Maven jars with the Quarkus plugin
fails here, because several of its 3.3.3 modules (schema-util-avro, config-index, ...) and some
Quarkus 3.33.3.1 extensions are not on the Maven Central we reach; 3.0.9's parent pom is missing
too. The prebuilt `all` tarball needs none of them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from .base import Service, StackError, cache_dir, port_from_env, unpack_tar
from .kafka import DEPENDENCY_PLUGIN, Kafka, find_java, maven_fetch

log = structlog.get_logger("k2.stack.registry")

APICURIO_VERSION = "3.3.3"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
# Underscored like Kafka's own internal topics, so they sort apart from market-data topics.
TOPICS = {
    "apicurio.kafkasql.topic": "_registry-journal",
    "apicurio.kafkasql.snapshots.topic": "_registry-snapshots",
    "apicurio.events.kafka.topic": "_registry-events",
}


@dataclass
class SchemaRegistry(Service):
    name: str = "registry"
    port_env: str = "K2_REGISTRY_PORT"
    default_port: int = 8081
    # A cold JVM start of the Quarkus app plus the replay of the journal, on 2 cores.
    start_timeout: float = 180.0
    kafka: Kafka = field(default_factory=Kafka)

    @property
    def url(self) -> str:
        """Base URL of the Confluent-compatible API, as given to SchemaRegistryClient."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    @property
    def management_port(self) -> int:
        return port_from_env("K2_REGISTRY_MANAGEMENT_PORT", 8082)

    @property
    def app_dir(self) -> Path:
        return cache_dir() / f"apicurio-registry-{APICURIO_VERSION}"

    def extra_ports(self) -> dict[str, int]:
        return {"K2_REGISTRY_MANAGEMENT_PORT": self.management_port}

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if (self.app_dir / "quarkus-run.jar").exists():
            return
        log.info("registry.install", version=APICURIO_VERSION, into=str(self.app_dir))
        # Unpack beside the final folder and rename it in one step: a half-unpacked app never
        # looks installed.
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="apicurio.partial-") as scratch:
            maven_fetch([f"{DEPENDENCY_PLUGIN}:copy", f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={scratch}"],
                        what=f"download Apicurio Registry {APICURIO_VERSION}")
            tarball = next(Path(scratch).glob("*.tar.gz"))
            staged = Path(scratch, "app")
            unpack_tar(tarball, staged)
            if not (staged / "quarkus-run.jar").exists():
                raise StackError(f"{ARTIFACT} has no quarkus-run.jar; its layout changed")
            staged.rename(self.app_dir)

    def prepare(self) -> None:
        # Without Kafka the app would retry its storage until start_timeout and fail obscurely.
        if not self.kafka.safe_ready():
            raise StackError(f"the registry keeps its schemas in Kafka, which does not answer at "
                             f"{self.kafka.bootstrap}: start Kafka first")

    def command(self) -> list[str]:
        props = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": self.port,
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": self.management_port,
            "apicurio.storage.kind": "kafkasql",
            "apicurio.kafkasql.bootstrap.servers": self.kafka.bootstrap,
            **TOPICS,
            # On start the app looks for a snapshot, ending each lookup with an empty poll: 5 s each by
            # default, mostly idle against a broker on the same machine.
            "apicurio.kafkasql.consumer.poll.timeout": 1000,
            # The Kafka clients log every rebalance step at INFO.
            'quarkus.log.category."org.apache.kafka".level': "WARN",
            # Snapshots and imports default to /tmp; keep them with the rest of the state.
            "apicurio.storage.snapshot.location": self.home,
            "apicurio.import.work-dir": self.home,
        }
        return [find_java(21), "-Xms128m", "-Xmx512m", "-XX:+ExitOnOutOfMemoryError",
                *(f"-D{key}={value}" for key, value in props.items()),
                "-jar", str(self.app_dir / "quarkus-run.jar")]

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/subjects", timeout=3).status_code == 200
