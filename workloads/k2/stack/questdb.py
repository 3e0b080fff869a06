"""QuestDB, the time-series database `make bench` compares K2 with (a peer, not part of K2).

Not started by `k2 stack up`: only the peer benchmark (and its equality test) start it. The server
is the single `org.questdb:questdb` jar from Maven Central, which carries its native libraries;
`mvn dependency:copy` puts it in cache_dir()/questdb-VERSION/ and the JVM runs it as a module.
Settings come from QDB_* environment variables (QuestDB's own override of server.conf), so the
state folder holds only its data. Telemetry is off.

Ports, all on 127.0.0.1: K2_QUESTDB_HTTP_PORT (9010, not QuestDB's 9000, which is the local S3's:
/exec and ILP over HTTP), K2_QUESTDB_PG_PORT
(8812: PostgreSQL wire), K2_QUESTDB_ILP_PORT (9009: ILP over TCP), K2_QUESTDB_HEALTH_PORT (9003).
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import structlog

from .base import Service, cache_dir, port_from_env
from .kafka import DEPENDENCY_PLUGIN, find_java, maven_fetch

log = structlog.get_logger("k2.stack.questdb")

QUESTDB_VERSION = "9.3.2"


@dataclass
class QuestDB(Service):
    name: str = "questdb"
    port_env: str = "K2_QUESTDB_HTTP_PORT"
    default_port: int = 9010
    start_timeout: float = 120.0

    @property
    def pg_port(self) -> int:
        return port_from_env("K2_QUESTDB_PG_PORT", 8812)

    @property
    def ilp_port(self) -> int:
        return port_from_env("K2_QUESTDB_ILP_PORT", 9009)

    @property
    def health_port(self) -> int:
        return port_from_env("K2_QUESTDB_HEALTH_PORT", 9003)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pg_dsn(self) -> str:
        """libpq DSN with QuestDB's default credentials (a loopback benchmark peer, not a K2 secret)."""
        return f"host=127.0.0.1 port={self.pg_port} user=admin password=quest dbname=qdb"

    @property
    def jar(self) -> Path:
        return cache_dir() / f"questdb-{QUESTDB_VERSION}" / f"questdb-{QUESTDB_VERSION}.jar"

    def extra_ports(self) -> dict[str, int]:
        return {"K2_QUESTDB_PG_PORT": self.pg_port, "K2_QUESTDB_ILP_PORT": self.ilp_port,
                "K2_QUESTDB_HEALTH_PORT": self.health_port}

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if self.jar.is_file():
            return
        self.jar.parent.mkdir(parents=True, exist_ok=True)
        log.info("questdb.install", version=QUESTDB_VERSION, into=str(self.jar))
        # Into a scratch folder first, then one rename: an interrupted download never looks installed.
        with tempfile.TemporaryDirectory(dir=self.jar.parent, prefix="partial-") as scratch:
            maven_fetch([f"{DEPENDENCY_PLUGIN}:copy", f"-Dartifact=org.questdb:questdb:{QUESTDB_VERSION}",
                         f"-DoutputDirectory={scratch}"], what=f"download QuestDB {QUESTDB_VERSION}")
            Path(scratch, self.jar.name).rename(self.jar)

    def command(self) -> list[str]:
        return [find_java(17), "-Xms256m", "-Xmx1g", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                "-p", str(self.jar), "-m", "io.questdb/io.questdb.ServerMain", "-d", str(self.home)]

    def environment(self) -> dict[str, str]:
        return {
            "QDB_HTTP_BIND_TO": f"127.0.0.1:{self.port}",
            "QDB_PG_NET_BIND_TO": f"127.0.0.1:{self.pg_port}",
            "QDB_LINE_TCP_NET_BIND_TO": f"127.0.0.1:{self.ilp_port}",
            "QDB_HTTP_MIN_NET_BIND_TO": f"127.0.0.1:{self.health_port}",
            "QDB_TELEMETRY_ENABLED": "false",
        }

    def ready(self) -> bool:
        return self.exec("SELECT 1")["dataset"] == [[1]]

    # helpers -----------------------------------------------------------------------------
    def exec(self, sql: str, timeout: float = 30.0) -> dict:
        """One statement over HTTP /exec; the decoded JSON answer (columns, dataset, count)."""
        url = f"{self.http_url}/exec?{urllib.parse.urlencode({'query': sql})}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
