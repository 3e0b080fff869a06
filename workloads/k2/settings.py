"""K2's one settings model.

Every workload reads its configuration from `K2_*` environment variables through `Settings`, and
the operator renders the very same fields into Deployment env with `Settings.to_env()`, so a CR
field, its env var and the workload's typed value can never drift apart.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from k2 import exchanges

DEV_API_KEY = "k2-dev-api-key-2026"
TableKind = Literal["trades", "quotes", "reference"]
TABLE_KINDS: tuple[TableKind, ...] = ("trades", "quotes", "reference")
Compatibility = Literal["BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE",
                        "NONE"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="K2_", extra="ignore", frozen=True)

    mode: Literal["dev", "prod"] = Field("dev", description="dev allows the built-in API key")
    create_resources: bool = Field(True, description="create missing topics and tables (standalone runs); the "
                                   "operator turns it off, since it owns them: workloads then only check")

    # Kafka + Schema Registry
    kafka_bootstrap: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081/apis/ccompat/v7"  # the local stack's registry (Apicurio's Confluent API)
    asset_class: str = Field("equities", pattern=r"^[a-z][a-z0-9-]*$")
    exchange: str = Field("asx", description="the exchange's slug in "
                          "k2.exchanges (asx): its topics' names, and the facts its ticks are checked against")
    topic_partitions: int = Field(6, ge=1, le=1000)
    topic_replication: int = Field(1, ge=1, le=7)
    compatibility: Compatibility = "BACKWARD"

    # Iceberg catalog + warehouse (embedded defaults: SQLite + local files)
    catalog_name: str = "k2"
    catalog_uri: str = "sqlite:///.k2/catalog.db"
    warehouse: str = ".k2/warehouse"
    namespace: str = Field("market", pattern=r"^[a-z][a-z0-9_]*$")
    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"

    # stream writer
    batch_rows: int = Field(50_000, ge=1)
    batch_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    batch_seconds: float = Field(2.0, gt=0)
    target_file_size_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024)
    compact_interval_seconds: float = Field(10.0, ge=0, description="the stream merges like-sized small files "
                                            "this often (size-tiered: k2.stream.maintenance.compact_tiers); "
                                            "0: never (k2 maintain only)")
    compact_min_files: int = Field(8, ge=2, description="fan-in of the stream's compaction: files of like size in "
                                   "a partition are merged once this many gather")
    compact_max_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=2**34, description="the most Parquet bytes the "
                                   "stream merges into one file: a pass pauses its writer and holds the rows in "
                                   "memory, so larger files are left to k2 maintain")
    history_detail_seconds: float = Field(300.0, ge=0, description="the stream keeps the snapshot of every commit "
                                          "this recent (time travel, cursors and catch-up at commit precision), "
                                          "thinning older ones this often")
    history_interval_seconds: float = Field(3600.0, gt=0, description="of older snapshots the stream keeps one "
                                            "per this interval")
    stream_stall_seconds: float = Field(300.0, gt=0, le=86400, description="the stream's poll loop not turning "
                                        "for this long (a hung commit or client) fails its liveness probe")
    stream_process_per_table: bool = Field(True, description="`k2 stream run` over several tables writes each in "
                                           "a process of its own (k2.stream.processes): faster with a core per "
                                           "table, a Python process's memory more per table")

    # data quality: sequence gaps below `gap_alert` warn, up to `gap_halt` alert, above halt
    gap_alert: int = Field(10, ge=1)
    gap_halt: int = Field(100, ge=1)
    dlq_path: str = ".k2/dlq.jsonl"

    # folder ingest (`k2 ingest folder`)
    ingest_workers: int = Field(2, ge=0, le=64, description="processes that parse and encode a folder's next "
                                "chunks while the current one is produced (k2.ingest.ahead): faster with a core "
                                "to spare, about a fifth more CPU in all; 0: all in the ingest's own process")

    # live feeds (`k2 ingest feed`)
    feed_stale_seconds: float = Field(30.0, gt=0, le=3600, description="no feed message (not even a heartbeat) "
                                      "for this long: reconnect; twice as long: the liveness probe fails")

    # query API
    api_keys: SecretStr | None = Field(None, description="the API keys as SHA-256 digests, with their scopes (YAML; "
                                       "see k2.api.auth), e.g. from a Secret; never plain keys")
    api_keys_file: Path | None = Field(None, description="the same document in a mounted Secret, re-read when it "
                                       "changes")
    rate_limit: str = "100/minute"
    max_rows: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=1024**3, description="larger request bodies are refused "
                                "(413) before they are read")
    request_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="a request's headers and body must "
                                           "arrive within this; else 408 and the connection is closed (slowloris)")
    write_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="a client that takes no bytes of its "
                                         "response for this long is disconnected")
    key_concurrency: int = Field(8, ge=1, le=1024, description="requests in progress per API key; more at once "
                                 "are refused (429), so one key cannot occupy every worker thread")
    query_cache_mb: int = Field(64, ge=0, le=65_536,
                                description="results cached per API process, by table snapshot; 0 disables")
    query_rollup_mb: int = Field(64, ge=0, le=65_536,
                                 description="trades' per-minute partial aggregates kept per API process, by data "
                                             "file, for summaries and OHLCV/VWAP bars; 0 disables")
    query_tick_cache_mb: int = Field(64, ge=0, le=65_536,
                                     description="data files' ticks kept decoded per API process, in symbol order, "
                                                 "for pages of named symbols; 0 disables")
    query_memory_mb: int = Field(0, ge=0, le=1_048_576, description="DuckDB's memory per process, in MiB; past it "
                                 "a large export's sort spills to temporary files (.tmp in the working directory) "
                                 "instead of growing; 0: DuckDB's default, 80% of the RAM or container limit")
    query_threads: int = Field(0, ge=0, le=256, description="DuckDB threads per process; 0: one per core. Serving "
                               "many requests at once, cores ÷ worker processes wastes less on coordination")

    live_tail_rows: int = Field(0, ge=0, le=50_000_000, description="REST queries of the latest data add the "
                                "ticks in Kafka the stream has not committed yet, so that a tick shows within a "
                                "second: up to this many held per tick table per API process; 0: none, a tick "
                                "shows after the stream's next commit")
    stream_buffer: int = Field(10_000, ge=10, le=1_000_000, description="ticks queued per WebSocket subscriber; "
                               "a subscriber whose queue fills is disconnected (slow consumer)")

    log_level: str = "INFO"
    metrics_port: int = Field(0, ge=0, le=65535, description="0: no separate metrics server")

    @field_validator("exchange")
    @classmethod
    def _known_exchange(cls, slug: str) -> str:
        """Every workload starts only for an exchange the registry knows (an unknown one fails here, at start)."""
        if slug not in exchanges.SLUGS:
            raise ValueError(f"unknown exchange {slug!r}; known: {', '.join(exchanges.SLUGS)}")
        return slug

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> Settings:
        if self.gap_alert > self.gap_halt:
            raise ValueError("gap_alert must not exceed gap_halt")
        return self

    # derived names: one place for the naming conventions
    def topic(self, kind: TableKind) -> str:
        return f"market.{self.asset_class}.{kind}.{self.exchange}"

    @property
    def dlq_topic(self) -> str:
        return f"market.{self.asset_class}.dlq"

    def table_identifier(self, kind: TableKind) -> str:
        return f"{self.namespace}.{kind}"

    @cached_property
    def warehouse_uri(self) -> str:
        if "://" in self.warehouse:
            return self.warehouse
        path = Path(self.warehouse).absolute()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()

    @cached_property
    def resolved_catalog_uri(self) -> str:
        """Relative SQLite paths are made absolute so every process of a run shares one file."""
        prefix = "sqlite:///"
        if self.catalog_uri.startswith(prefix) and not self.catalog_uri.startswith(prefix + "/"):
            path = Path(self.catalog_uri[len(prefix):]).absolute()
            path.parent.mkdir(parents=True, exist_ok=True)
            return prefix + str(path)
        return self.catalog_uri

    def to_env(self) -> dict[str, str]:
        """The `K2_*` environment that reproduces these settings in another process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"K2_{name.upper()}"] = str(value)
        return env
