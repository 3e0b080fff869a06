"""The three custom resources as Pydantic models: the one description of each spec and status.

Everything else is derived from these classes: the CRD YAML (`k2_operator.crds` turns them into
OpenAPI v3 with the CEL rules attached here), the handlers (which validate `spec` into them) and
the render functions (which read typed fields, never raw dicts). Defaults and bounds that also
exist on the workloads' `k2.settings.Settings` are copied from it (`_setting`), so a CR default,
its env var and the workload's own default cannot drift apart.

Field names are snake_case in Python and camelCase on the wire (`alias_generator`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from k2 import tables
from k2.exchanges import SLUGS, SYMBOL_PATTERN
from k2.settings import TABLE_KINDS, Compatibility, Settings
from k2.sources import SOURCES
from k2.sources.base import FolderSource
from k2.sources.feed import ADAPTERS, CHANNELS

GROUP = "k2.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# CR names become prefixes of child names (`<name>-consumer-metrics`, `<name>-ingest-<hash>`),
# which must stay valid DNS-1035 labels of at most 63 characters.
MAX_NAME_LENGTH = 45

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
IDENTIFIER = r"^[a-z][a-z0-9_]*$"  # Iceberg namespace / table / column names (as Settings.namespace)
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
CRON = r"^(@(yearly|annually|monthly|weekly|daily|hourly)|(\S+\s+){4}\S+)$"
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|[num])?$")
FIELD_TYPE = (r"^(boolean|int|long|float|double|date|timestamp|string|binary"
              r"|decimal\(([1-9]|[1-3][0-9]),([0-9]|[1-3][0-9])\))$")
PARTITION_TRANSFORM = r"^(identity|bucket\[[1-9][0-9]{0,3}\])$"

TableKind = Literal["trades", "quotes", "reference"]
assert TABLE_KINDS == ("trades", "quotes", "reference")
DeletionPolicy = Literal["Retain", "Delete"]
if TYPE_CHECKING:
    FeedProtocol = str
    FeedChannel = str
    SourceType = str
    ExchangeSlug = str
else:  # enums in the CRD schema, from the registries of sources, feed adapters, channels and exchanges
    FeedProtocol = Literal[tuple(ADAPTERS)]
    FeedChannel = Literal[tuple(CHANNELS)]
    SourceType = Literal[(*SOURCES, "none")]
    ExchangeSlug = Literal[SLUGS]


def _cel(rule: str, message: str | None = None, *, message_expression: str | None = None,
         reason: str | None = None, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; messages are written for the person running kubectl."""
    entry = {"rule": rule}
    if message:
        entry["message"] = message
    if message_expression:
        entry["messageExpression"] = message_expression
    if reason:
        entry["reason"] = reason
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _immutable(what: str, why: str) -> dict[str, Any]:
    return _validations(_cel("self == oldSelf", f"{what} is immutable: {why}"))


def _setting(name: str, description: str, **overrides: Any) -> Any:
    """A Field with the default and bounds of `Settings.<name>`: one place for both."""
    source = Settings.model_fields[name]
    constraints: dict[str, Any] = {}
    for item in source.metadata:
        for attr in ("ge", "gt", "le", "lt", "pattern", "min_length", "max_length"):
            value = getattr(item, attr, None)
            if value is not None:
                constraints[attr] = value
    default = overrides.pop("default", source.default)
    constraints.update(overrides)
    return Field(default, description=description, **constraints)


def _section(factory: Any, description: str) -> Any:
    """An object-valued field whose CRD default is the model's complete default, so the apiserver
    fills it in (and CEL rules on it, which the apiserver checks against the default, see its fields)."""
    default = factory().model_dump(by_alias=True, exclude_none=True, mode="json")
    return Field(default_factory=factory, description=description, json_schema_extra={"default": default})


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


def _quantity_schema() -> dict[str, Any]:
    return {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}


Quantity = Annotated[int | str, WithJsonSchema(_quantity_schema())]


# --- shared pieces ------------------------------------------------------------------------------
class SecretKeyRef(_Model):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(max_length=253, pattern=SECRET_KEY, description="Key within the Secret.")


class LocalObjectReference(_Model):
    """Another K2 resource in the same namespace, by name."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="Resource name.")


class Resources(_Model):
    """Container compute resources (as core/v1 ResourceRequirements: cpu, memory, …)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Minimum resources reserved.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Maximum resources allowed.")

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        for name, quantity in value.items():
            if isinstance(quantity, str) and not QUANTITY.match(quantity):
                raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity")
        return value

    def as_manifest(self) -> dict[str, dict[str, str]]:
        return {section: {k: str(v) for k, v in sorted(values.items())}
                for section, values in (("requests", self.requests), ("limits", self.limits)) if values}


# Kubernetes' own structures (affinity, tolerations, …) pass through verbatim: the apiserver
# validates them when the operator applies the workload, and a refusal shows as ApplyFailed.
FreeForm = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]
LabelMap = dict[str, Annotated[str, Field(max_length=4096)]]


class ObjectMetadata(_Model):
    """Labels and annotations added to a rendered object; K2's own labels win a clash."""

    labels: LabelMap = Field(default_factory=dict, max_length=64, description="Extra labels.")
    annotations: LabelMap = Field(default_factory=dict, max_length=64, description="Extra annotations.")


class PodOverrides(ObjectMetadata):
    """Where a workload's pods run and what they carry (core/v1 PodSpec fields, verbatim)."""

    affinity: FreeForm | None = Field(None, description="Pod affinity and anti-affinity (core/v1 Affinity).")
    topology_spread_constraints: list[FreeForm] = Field(default_factory=list, max_length=16,
                                                         description="core/v1 TopologySpreadConstraint list.")
    tolerations: list[FreeForm] = Field(default_factory=list, max_length=32, description="core/v1 Toleration list.")
    node_selector: LabelMap = Field(default_factory=dict, max_length=32, description="Node labels to match.")
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                            description="PriorityClass of the pods.")
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16,
                                                           description="Secrets to pull the image with.")
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                             description="ServiceAccount of the pods (no token is mounted).")


def _resources(cpu: str, memory: str, memory_limit: str) -> Any:
    return Field(Resources(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory_limit}),
                 description="Container resources.")


class SchemaRegistryRef(_Model):
    """Where the Confluent-compatible Schema Registry is: a URL, or a Secret key holding one
    (credentials may be embedded as https://user:password@host). Omitted: the operator's default."""

    model_config = ConfigDict(json_schema_extra=_validations(
        _cel("has(self.url) || has(self.secretRef)", "schemaRegistry needs url or secretRef")))

    url: str | None = Field(None, max_length=2048, pattern=r"^https?://\S+$", description="Registry URL.")
    secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the registry URL; takes precedence over url.")


# --- IngestionPipeline --------------------------------------------------------------------------
class FolderInput(_Model):
    """A folder of files that a folder source (`k2.sources.base.FolderSource`) reads to completion."""

    path: str = Field(max_length=1024, pattern=r"^/\S*$",
                      description="Folder inside the ingest container (under mountPath when claimName is set).")
    claim_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                   description="PersistentVolumeClaim holding the files, mounted read-only.")
    mount_path: str = Field("/data", max_length=1024, pattern=r"^/\S*$",
                            description="Where the claim is mounted.")
    symbols: list[Annotated[str, Field(max_length=16, pattern=SYMBOL_PATTERN)]] = Field(
        default_factory=list, max_length=500, description="Only these symbols (empty: all).")


class FeedSource(_Model):
    """A live WebSocket feed, ingested by a long-running `k2 ingest feed` Deployment."""

    url: str = Field(max_length=2048, pattern=r"^wss?://\S+$", description="ws:// or wss:// URL of the feed.")
    protocol: FeedProtocol = Field(
        "k2", description="Feed adapter: k2 is the K2 feed protocol (docs/feed-protocol.md).")
    channels: list[FeedChannel] = Field(
        list(CHANNELS), min_length=1, max_length=len(CHANNELS), description="Channels to subscribe to.",
        json_schema_extra={"x-kubernetes-list-type": "set"})
    symbols: list[Annotated[str, Field(max_length=16, pattern=SYMBOL_PATTERN)]] = Field(
        default_factory=list, max_length=500, description="Only these symbols (empty: all).")
    stale_seconds: float = _setting("feed_stale_seconds", "No message (not even a heartbeat) for this long: "
                                    "reconnect; twice as long: the liveness probe fails.")


class SyntheticSource(_Model):
    """K2's deterministic synthetic tick generator (`k2 ingest synthetic`)."""

    symbols: int = Field(4, ge=1, le=12, description="Number of symbols.")
    days: int = Field(2, ge=1, le=60, description="Trading days to generate.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Random seed (same seed, same ticks).")


# Registered folder sources the operator runs with `k2 ingest folder` from `source.folder` (asx-csv
# also from its own spelling, `source.asxCsv`); synthetic generates its folder from `source.synthetic`.
FOLDER_TYPES = tuple(name for name, source in SOURCES.items()
                     if isinstance(source, FolderSource) and name != "synthetic")
_FOLDER_TYPES_CEL = "[" + ", ".join(f"'{name}'" for name in FOLDER_TYPES) + "]"
FOLDER_REQUIRED = ("source.folder (path, optional claimName) is required when source.type is a folder source "
                   "(asx-csv: source.folder or source.asxCsv)")
FOLDER_NOT_ALLOWED = f"source.folder is only allowed with a folder source type: {', '.join(FOLDER_TYPES)}"
ASX_CSV_NOT_ALLOWED = "source.asxCsv is only allowed with type asx-csv"
FOLDER_TWICE = "source.asxCsv and source.folder are two spellings of one input: give one"


class SourceSpec(_Model):
    """Where ticks come from. `none`: external producers write to the topics."""

    model_config = ConfigDict(json_schema_extra=_validations(
        _cel(f"!(self.type in {_FOLDER_TYPES_CEL}) || has(self.folder) || has(self.asxCsv)", FOLDER_REQUIRED),
        _cel(f"self.type in {_FOLDER_TYPES_CEL} || !has(self.folder)", FOLDER_NOT_ALLOWED),
        _cel("!has(self.folder) || !has(self.asxCsv)", FOLDER_TWICE),
        _cel("self.type == 'asx-csv' || !has(self.asxCsv)", ASX_CSV_NOT_ALLOWED),
        _cel("self.type == 'synthetic' || !has(self.synthetic)",
             "source.synthetic is only allowed with type synthetic"),
        _cel("self.type != 'feed' || has(self.feed)", "source.feed (url) is required when source.type is feed"),
        _cel("self.type == 'feed' || !has(self.feed)", "source.feed is only allowed with type feed"),
    ))

    type: SourceType = Field("none", description="Kind of source.")
    asx_csv: FolderInput | None = Field(None, description="ASX CSV input (type asx-csv): its spelling of folder.")
    folder: FolderInput | None = Field(None, description="The input of a folder source (any of them: "
                                       "`k2 ingest folder PATH --source TYPE`).")
    synthetic: SyntheticSource | None = Field(None, description="Generator options (type synthetic).")
    feed: FeedSource | None = Field(None, description="Live feed (type feed): a Deployment, not a Job.")
    workers: int = _setting("ingest_workers", "Processes of a file ingest that parse and encode the next files while "
                            "it produces (0: all in its own process). Each wants a core of its own: with one "
                            "core, 0 is faster.")
    resources: Resources = _resources("250m", "512Mi", "2Gi")
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Placement and metadata of ingest pods.")

    # The CEL rules above, for what reaches the operator without the apiserver's checks: the
    # InvalidSpec condition then says the same thing.
    @model_validator(mode="after")
    def _one_folder_input(self) -> SourceSpec:
        if self.folder is not None and self.asx_csv is not None:
            raise ValueError(FOLDER_TWICE)
        if self.type in FOLDER_TYPES and self.folder_input is None:
            raise ValueError(FOLDER_REQUIRED)
        if self.type not in FOLDER_TYPES and self.folder is not None:
            raise ValueError(FOLDER_NOT_ALLOWED)
        if self.type != "asx-csv" and self.asx_csv is not None:
            raise ValueError(ASX_CSV_NOT_ALLOWED)
        return self

    @property
    def folder_input(self) -> FolderInput | None:
        return self.folder or self.asx_csv


class TopicsSpec(_Model):
    """The pipeline's Kafka topics: one per record kind, named market.<assetClass>.<kind>.<exchange>."""

    kinds: list[TableKind] = Field(
        ["trades", "quotes", "reference"], min_length=1, max_length=3,
        description="Record kinds (one topic each).",
        json_schema_extra={"x-kubernetes-list-type": "set", **_validations(
            _cel("oldSelf.all(k, k in self)",
                 "topics.kinds may only be added to: removing a kind would orphan its topic and table"))})
    partitions: int = _setting(
        "topic_partitions", "Partitions per topic; may only grow.", json_schema_extra=_validations(
            # A static message: CEL's string(int) has no size bound, so messageExpression is too costly.
            _cel("self >= oldSelf", "partitions may only grow: Kafka cannot remove partitions from a topic, "
                 "so keep topics.partitions at or above its current value", reason="FieldValueForbidden")))
    replication_factor: int = _setting(
        "topic_replication", "Replicas of each partition.",
        json_schema_extra=_immutable("topics.replicationFactor",
                                     "the operator does not reassign partitions of existing topics"))
    config: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=64,
        description="Topic configs (e.g. retention.ms), applied and kept in place.")


class ConsumerSpec(_Model):
    """The `k2 stream run` Deployment that writes the topics into the referenced IcebergTables."""

    model_config = ConfigDict(json_schema_extra=_validations(
        _cel("self.gapAlert <= self.gapHalt", "consumer.gapAlert must not exceed consumer.gapHalt")))

    replicas: int = Field(1, ge=0, le=64, description="Consumer pods (a consumer group shares the partitions).")
    process_per_table: bool = _setting(
        "stream_process_per_table", "Each table written by a process of its own in a consumer pod (about 1.5 "
        "times the rows/s of one process where a core per table is free); false: every table in one process, "
        "less memory.")
    batch_rows: int = _setting("batch_rows", "Rows per micro-batch before a commit.", le=10_000_000)
    batch_bytes: int = _setting("batch_bytes", "Bytes per micro-batch before a commit.", le=2**34)
    batch_seconds: float = _setting("batch_seconds", "Seconds before a partial batch is committed (sub-second "
                                    "values such as 0.2 make ticks queryable sooner, in more, smaller files).",
                                    le=3600)
    compact_interval_seconds: float = _setting(
        "compact_interval_seconds", "How often the consumers merge like-sized small files (size-tiered); 0: never.",
        le=86_400)
    compact_min_files: int = _setting("compact_min_files", "Fan-in: like-sized files in a partition are merged "
                                      "once this many gather.",
                                      le=100_000)
    compact_max_bytes: int = _setting("compact_max_bytes", "The most Parquet bytes the consumers merge into one "
                                      "file as they write (bounds the pause and memory; larger files are left to "
                                      "maintenance).")
    history_detail_seconds: float = _setting(
        "history_detail_seconds", "The consumers keep every commit's snapshot this recent (time travel, cursors "
        "and catch-up at commit precision) and thin older ones this often; each kept snapshot slows every commit, "
        "so with sub-second batchSeconds keep it short (e.g. 60).", le=31_536_000)
    history_interval_seconds: float = _setting(
        "history_interval_seconds", "Of snapshots older than historyDetailSeconds the consumers keep one per "
        "this interval (the table's snapshotRetention still expires them by age).", le=31_536_000)
    gap_alert: int = _setting("gap_alert", "Sequence gaps of at least this size raise an alert.")
    gap_halt: int = _setting("gap_halt", "Sequence gaps above this size halt the consumer.")
    ready_max_lag: int = Field(
        100_000, ge=0, le=10**15,
        description="Ready requires every table's consumer lag at or below this many messages: the messages "
                    "between the table's consumer group offsets (committed after each Iceberg commit) and the "
                    "end of its topic, summed over partitions. The default matches the chart's K2ConsumerLagHigh "
                    "alert threshold. 0: lag does not gate Ready.")
    # A process per table (`processPerTable`): the ASX sample's two took 0.8 GiB at their peak.
    resources: Resources = _resources("250m", "1Gi", "2Gi")
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Placement and metadata of consumer pods.")
    service: ObjectMetadata = Field(default_factory=ObjectMetadata, description="Metadata of the metrics Service.")
    service_monitor: ObjectMetadata = Field(
        default_factory=ObjectMetadata,
        description="Metadata of the ServiceMonitor (e.g. the release label your Prometheus selects).")


class IngestionPipelineSpec(_Model):
    """Topics, schemas, an optional ingest Job and the stream consumers of one exchange feed."""

    # `k2 ingest` always produces reference data too (and the synthetic feed every kind), so the
    # pipeline must own those topics rather than let the ingest Job create them unmanaged.
    model_config = ConfigDict(json_schema_extra=_validations(
        _cel("self.source.type != 'synthetic' || size(self.topics.kinds) == 3",
             "a synthetic source produces trades, quotes and reference: topics.kinds must list all three",
             field_path=".topics.kinds"),
        _cel(f"!(self.source.type in {_FOLDER_TYPES_CEL}) || "
             "('reference' in self.topics.kinds && size(self.topics.kinds) >= 2)",
             "a folder source (asx-csv, …) produces reference data and trades and/or quotes: topics.kinds must "
             "include reference and at least one of them", field_path=".topics.kinds"),
        _cel("self.source.type != 'feed' || self.source.feed.channels.all(c, c in self.topics.kinds)",
             "a feed source produces its channels (trades, quotes): topics.kinds must list them",
             field_path=".topics.kinds"),
        _cel("self.consumer.replicas <= self.topics.partitions",
             "consumer.replicas must not exceed topics.partitions: a consumer beyond the partition count "
             "gets no partition and idles (grow topics.partitions first)", field_path=".consumer.replicas"),
    ))

    exchange: ExchangeSlug = _setting(
        "exchange", "Exchange: the lower-case slug of a code in K2's exchange registry (k2.exchanges); part of "
        "every topic name.", default=...,
        json_schema_extra=_immutable("exchange", "it names the pipeline's Kafka topics; create a new "
                                     "IngestionPipeline instead"))
    asset_class: str = _setting("asset_class", "Asset class; part of every topic name.", max_length=32,
                                json_schema_extra=_immutable("assetClass", "it names the pipeline's Kafka "
                                                             "topics; create a new IngestionPipeline instead"))
    source: SourceSpec = _section(SourceSpec, "Where ticks come from.")
    topics: TopicsSpec = _section(TopicsSpec, "Kafka topics.")
    schema_registry: SchemaRegistryRef | None = Field(
        None, description="Schema Registry; omitted: the operator's K2_REGISTRY_URL.")
    compatibility: Compatibility = _setting("compatibility", "Compatibility level set on each subject.")
    consumer: ConsumerSpec = _section(ConsumerSpec, "Stream consumers.")
    tables: list[LocalObjectReference] = Field(
        default_factory=list, max_length=3,
        description="IcebergTables the consumers write (spec.name must be one of topics.kinds; "
                    "empty: no consumers).")
    deletion_policy: DeletionPolicy = Field(
        "Retain", description="Retain keeps topics and subjects when the resource is deleted; Delete removes them.")

    def topic_names(self) -> dict[str, str]:
        """kind → topic, named by the workloads' own convention (`Settings.topic`)."""
        names = Settings.model_construct(asset_class=self.asset_class, exchange=self.exchange)
        return {kind: names.topic(kind) for kind in self.topics.kinds}

    def dlq_topic(self) -> str:
        """Shared by every pipeline of the asset class, so created but never claimed or deleted."""
        return Settings.model_construct(asset_class=self.asset_class, exchange=self.exchange).dlq_topic


# --- IcebergTable -------------------------------------------------------------------------------
class ColumnSpec(_Model):
    """One column. `timestamp` is an instant (UTC, microseconds); `decimal(P,S)` is exact."""

    name: str = Field(max_length=128, pattern=IDENTIFIER, description="Column name.")
    type: str = Field(max_length=16, pattern=FIELD_TYPE,
                      description="boolean, int, long, float, double, date, timestamp, string, binary or "
                                  "decimal(P,S).",
                      json_schema_extra=_immutable("a column's type", "add a new column instead"))
    required: bool = Field(False, description="Whether the column is NOT NULL.")
    doc: str | None = Field(None, max_length=1024, description="Column documentation.")


class TableSchemaSpec(_Model):
    """The table's columns, or the Avro value schema of a registered subject to derive them from."""

    model_config = ConfigDict(json_schema_extra=_validations(
        _cel("has(self.fields) != has(self.fromSubject)", "schema needs exactly one of fields or fromSubject"),
    ))

    fields: list[ColumnSpec] | None = Field(
        None, min_length=1, max_length=128, description="Columns; existing ones cannot be removed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           **_validations(
            _cel("oldSelf.all(o, self.exists(n, n.name == o.name))",
                 "schema fields may only be added: existing columns cannot be removed or renamed"),
            _cel("self.all(n, !n.required || oldSelf.exists(o, o.name == n.name))",
                 "columns added to an existing table must be optional (required: false)"))})
    from_subject: str | None = Field(
        None, max_length=255, pattern=r"^[A-Za-z0-9._-]+$",
        description="Schema Registry subject (e.g. market.equities.trades.asx-value) whose latest Avro "
                    "schema defines the columns.")
    registry: SchemaRegistryRef | None = Field(
        None, description="Registry for fromSubject; omitted: the operator's K2_REGISTRY_URL.")

    def avro_record(self, name: str) -> dict[str, Any]:
        """`fields` as an Avro record, so `k2.schemas.iceberg_schema_from_avro` builds the Iceberg
        schema exactly as it does for the registered schemas."""
        return {"type": "record", "name": name, "fields": [_avro_field(c) for c in self.fields or []]}


def _avro_field(column: ColumnSpec) -> dict[str, Any]:
    primitive: dict[str, Any] = {
        "boolean": "boolean", "int": "int", "long": "long", "float": "float", "double": "double",
        "string": "string", "binary": "bytes",
        "date": {"type": "int", "logicalType": "date"},
        "timestamp": {"type": "long", "logicalType": "timestamp-micros"},
    }
    if column.type.startswith("decimal("):
        precision, scale = (int(x) for x in column.type[len("decimal("):-1].split(","))
        avro_type: Any = {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}
    else:
        avro_type = primitive[column.type]
    field: dict[str, Any] = {"name": column.name, "type": avro_type if column.required else ["null", avro_type]}
    if not column.required:
        field["default"] = None
    if column.doc:
        field["doc"] = column.doc
    return field


class PartitionFieldSpec(_Model):
    """A partition field: a source column and a transform (identity or bucket[N])."""

    column: str = Field(max_length=128, pattern=IDENTIFIER, description="Source column.")
    transform: str = Field("identity", max_length=16, pattern=PARTITION_TRANSFORM,
                           description="identity or bucket[N].")


# Properties `extra` may not set: K2 owns the first (its writers resolve commit conflicts themselves),
# the others have a typed field, so one property never has two sources that could disagree.
COMPRESSION_PROPERTY = "write.parquet.compression-codec"
TARGET_FILE_SIZE_PROPERTY = "write.target-file-size-bytes"
MAX_SNAPSHOT_AGE_PROPERTY = "history.expire.max-snapshot-age-ms"
MIN_SNAPSHOTS_PROPERTY = "history.expire.min-snapshots-to-keep"
OWNED_TABLE_PROPERTIES = {
    **{key: f"K2 owns it (always {value}): its writers re-check their Kafka offsets and retry a conflicting "
            "commit themselves, an Iceberg-level retry would rebase a stale batch"
       for key, value in tables.REQUIRED_PROPERTIES.items()},
    COMPRESSION_PROPERTY: "set properties.compression instead",
    TARGET_FILE_SIZE_PROPERTY: "set properties.targetFileSizeBytes instead",
    MAX_SNAPSHOT_AGE_PROPERTY: "set snapshotRetention.maxAgeHours instead",
    MIN_SNAPSHOTS_PROPERTY: "set snapshotRetention.minSnapshotsToKeep instead",
}


class TablePropertiesSpec(_Model):
    """Write properties of the table."""

    compression: Literal["zstd", "snappy", "gzip", "lz4", "brotli", "uncompressed"] = Field(
        "zstd", description="Parquet compression codec.")
    target_file_size_bytes: int = _setting("target_file_size_bytes", "Target data file size.", le=2**34)
    extra: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=64,
        description="Further Iceberg table properties, verbatim (not those K2 owns or a field sets: "
                    f"{', '.join(OWNED_TABLE_PROPERTIES)}).",
        json_schema_extra=_validations(*(_cel(f"!('{key}' in self)", f"properties.extra must not set {key}: {why}")
                                         for key, why in OWNED_TABLE_PROPERTIES.items())))

    @field_validator("extra")
    @classmethod
    def _not_owned(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key in OWNED_TABLE_PROPERTIES:
                raise ValueError(f"properties.extra must not set {key}: {OWNED_TABLE_PROPERTIES[key]}")
        return value


class SnapshotRetentionSpec(_Model):
    """How long snapshots (time travel) are kept by maintenance."""

    max_age_hours: float = Field(168.0, gt=0, le=24 * 3650, description="Expire snapshots older than this.")
    min_snapshots_to_keep: int = Field(1, ge=1, le=10_000, description="Always keep this many snapshots.")


class IcebergTableSpec(_Model):
    """One Iceberg table in a catalog: created, evolved (compatible changes only) and maintained."""

    model_config = ConfigDict(json_schema_extra=_validations(
        _cel("!has(self.schema.fields) || self.partitionBy.all(p, self.schema.fields.exists(f, f.name == p.column))",
             "every partitionBy column must be one of schema.fields", field_path=".partitionBy"),
        _cel("!has(self.schema.fields) || self.sortBy.all(c, self.schema.fields.exists(f, f.name == c))",
             "every sortBy column must be one of schema.fields", field_path=".sortBy"),
        _cel("!has(self.compactionSchedule) || self.name in ['trades', 'quotes', 'reference']",
             "compactionSchedule is supported for K2's tables (name trades, quotes or reference): "
             "`k2 maintain` compacts those", field_path=".compactionSchedule"),
    ))

    catalog_ref: LocalObjectReference = Field(
        LocalObjectReference(name="k2-catalog"),
        description="Secret with the catalog connection; its keys are K2 setting names: catalog_uri "
                    "(required), warehouse, catalog_name, s3_endpoint, s3_region, s3_access_key, s3_secret_key.",
        json_schema_extra=_immutable("catalogRef", "the table lives in that catalog; create a new IcebergTable "
                                     "to move it"))
    namespace: str = _setting("namespace", "Iceberg namespace.", max_length=128,
                              json_schema_extra=_immutable("namespace", "it is the table's identity; "
                                                           "create a new IcebergTable instead"))
    name: str = Field(max_length=128, pattern=IDENTIFIER, description="Table name.",
                      json_schema_extra=_immutable("name", "it is the table's identity; "
                                                   "create a new IcebergTable instead"))
    schema_: TableSchemaSpec = Field(alias="schema", description="Columns or the subject to derive them from.")
    partition_by: list[PartitionFieldSpec] = Field(
        default_factory=list, max_length=4, description="Partition spec (immutable).",
        json_schema_extra={"default": [], **_immutable("partitionBy", "repartitioning needs a new table")})
    sort_by: list[Annotated[str, Field(max_length=128, pattern=IDENTIFIER)]] = Field(
        default_factory=list, max_length=8, description="Sort order: columns, ascending, nulls last (immutable).",
        json_schema_extra={"default": [], **_immutable("sortBy", "the sort order is set when the table is created")})
    properties: TablePropertiesSpec = _section(TablePropertiesSpec, "Write properties.")
    snapshot_retention: SnapshotRetentionSpec = _section(SnapshotRetentionSpec, "Snapshot expiry.")
    compaction_schedule: str | None = Field(
        None, max_length=128, pattern=CRON,
        description="Cron schedule of a `k2 maintain` CronJob (compaction + snapshot expiry); omitted: none.")
    maintenance_pod: PodOverrides = Field(default_factory=PodOverrides,
                                          description="Placement and metadata of maintenance pods.")
    compaction_time_zone: str = Field(
        "Etc/UTC", max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$",
        description="IANA time zone of compactionSchedule (e.g. Australia/Sydney: after the local close).")
    deletion_policy: DeletionPolicy = Field(
        "Retain", description="Retain keeps the table when the resource is deleted; Delete drops and purges it.")

    @property
    def identifier(self) -> str:
        return f"{self.namespace}.{self.name}"


# --- QueryService -------------------------------------------------------------------------------
class AuthSpec(_Model):
    """API keys for /v1 routes, stored as SHA-256 digests only."""

    api_keys_secret: SecretKeyRef = Field(
        SecretKeyRef(name="k2-api-keys", key="api_keys"),
        description="Secret key holding the API keys as SHA-256 digests, with each key's scopes (YAML: id, sha256, "
        "and optionally exchanges, symbols, tables, stream; `k2 api-key` prints a key and its entry). Plain keys "
        "are refused. Re-read when the Secret changes.")


class IngressSpec(_Model):
    """An Ingress in front of the API Service."""

    host: str = Field(max_length=253, pattern=HOSTNAME, description="Host name.")
    class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                   description="IngressClass; omitted: the cluster default.")
    tls_secret: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                   description="TLS Secret for the host; omitted: plain HTTP.")
    path: str = Field("/", max_length=256, pattern=r"^/\S*$", description="Path prefix.")
    labels: LabelMap = Field(default_factory=dict, max_length=64, description="Extra labels of the Ingress.")
    annotations: LabelMap = Field(default_factory=dict, max_length=64,
                                  description="Extra annotations of the Ingress (e.g. for cert-manager).")


class QueryServiceSpec(_Model):
    """The REST API (`k2 api`) over a set of IcebergTables."""

    replicas: int = Field(2, ge=0, le=32, description="API pods.")
    tables: list[LocalObjectReference] = Field(
        min_length=1, max_length=16, description="IcebergTables served (one catalog and namespace).")
    auth: AuthSpec = _section(AuthSpec, "API key authentication.")
    rate_limit: str = _setting("rate_limit", "Per-key rate limit.", max_length=32,
                               pattern=r"^[1-9][0-9]*/(second|minute|hour|day)$")
    max_rows: int = _setting("max_rows", "Hard cap on rows per response.", le=10_000_000)
    query_cache_mb: int = _setting("query_cache_mb", "Result cache per API process, in MiB (0: none).")
    query_rollup_mb: int = _setting("query_rollup_mb", "Trades' per-minute partial aggregates kept per API process, "
                                    "by data file, for summaries and OHLCV/VWAP bars, in MiB (0: none).")
    query_tick_cache_mb: int = _setting("query_tick_cache_mb", "Data files' ticks kept decoded per API process, "
                                        "for pages of named symbols, in MiB (0: none).")
    live_tail_rows: int = _setting("live_tail_rows", "Ticks not yet committed that queries of the latest data "
                                   "add, held per tick table per API process, so that a tick shows within a second "
                                   "(0: after the stream's next commit).", default=500_000)
    query_threads: int = _setting("query_threads", "DuckDB threads per API process (0: one per core).")
    query_memory_mb: int = _setting("query_memory_mb", "DuckDB memory per API process, in MiB; past it sorts "
                                    "spill to disk (0: 80% of the container's memory limit).")
    max_body_bytes: int = _setting("max_body_bytes", "Larger request bodies are refused (413).")
    request_timeout_seconds: float = _setting("request_timeout_seconds",
                                              "A request's headers and body must arrive within this (else 408).")
    write_timeout_seconds: float = _setting("write_timeout_seconds",
                                            "A client taking no response bytes for this long is disconnected.")
    key_concurrency: int = _setting("key_concurrency", "Requests in progress per API key per pod (more: 429).")
    ingress: IngressSpec | None = Field(None, description="Ingress; omitted: none.")
    resources: Resources = _resources("250m", "512Mi", "1Gi")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Type of the API Service.")
    pod: PodOverrides = Field(
        default_factory=PodOverrides,
        description="Placement and metadata of API pods; without affinity, replicas prefer distinct nodes.")
    service: ObjectMetadata = Field(default_factory=ObjectMetadata, description="Metadata of the API Service.")
    service_monitor: ObjectMetadata = Field(
        default_factory=ObjectMetadata,
        description="Metadata of the ServiceMonitor (e.g. the release label your Prometheus selects).")


# --- status ---------------------------------------------------------------------------------------
class Condition(_Model):
    """A condition per the Kubernetes API conventions."""

    type: str = Field(max_length=316, pattern=r"^[A-Z][A-Za-z0-9]*$", description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="Condition status.")
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="Machine-readable CamelCase reason.")
    message: str = Field("", max_length=32768, description="Human-readable explanation.")
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"},
                                      description="When the status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="Generation the condition reflects.")


def _conditions() -> Any:
    return Field(default_factory=list, description="Current state: a summary Ready plus specific conditions.",
                 json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


def _observed_generation() -> Any:
    return Field(None, ge=0, description="The metadata.generation the status reflects.")


class TopicStatus(_Model):
    name: str = Field(description="Topic name.")
    partitions: int = Field(description="Partitions in Kafka.")


class SubjectStatus(_Model):
    subject: str = Field(description="Registry subject.")
    schema_id: int = Field(description="Registered schema id.")
    version: int = Field(description="Subject version of that schema.")


class ReplicasStatus(_Model):
    replicas: int = Field(0, description="Desired replicas (the scale subresource reads it).")
    available_replicas: int = Field(0, description="Replicas available per the Deployment.")
    selector: str | None = Field(None, description="Label selector of the consumer pods (for an HPA or KEDA).")


class IngestStatus(_Model):
    job: str | None = Field(None, description="Name of the ingest Job for the current source, once created "
                            "(it waits until the topics and schemas are in place).")
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = Field(description="Job phase.")


class IngestionPipelineStatus(_Model):
    conditions: list[Condition] = _conditions()
    observed_generation: int | None = _observed_generation()
    topics: list[TopicStatus] = Field(default_factory=list, description="Topics as they are in Kafka.")
    schemas: list[SubjectStatus] = Field(default_factory=list, description="Registered value schemas.")
    consumers: ReplicasStatus | None = Field(None, description="Consumer Deployment replicas.")
    ingest: IngestStatus | None = Field(None, description="The ingest Job, for csv/synthetic sources.")


class IcebergTableStatus(_Model):
    conditions: list[Condition] = _conditions()
    observed_generation: int | None = _observed_generation()
    identifier: str | None = Field(None, description="namespace.name in the catalog.")
    table_uuid: str | None = Field(None, description="Iceberg table UUID.")
    location: str | None = Field(None, description="Table location in the warehouse.")
    schema_id: int | None = Field(None, description="Current Iceberg schema id.")
    columns: int | None = Field(None, description="Number of columns.")
    current_snapshot_id: str | None = Field(None, description="Current snapshot id (a string: 64-bit).")
    snapshots: int | None = Field(None, description="Snapshots in the table metadata.")


class QueryServiceStatus(_Model):
    conditions: list[Condition] = _conditions()
    observed_generation: int | None = _observed_generation()
    replicas: int | None = Field(None, description="Pods of the API Deployment (the scale subresource reads it).")
    available_replicas: int | None = Field(None, description="Replicas available per the Deployment.")
    url: str | None = Field(None, description="Where the API answers.")
    selector: str | None = Field(None, description="Label selector of the API pods (for an HPA).")


# --- the kinds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KindInfo:
    """What the CRD generator and the handlers need to know about one kind."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: tuple[dict[str, Any], ...]
    # Conditions that say the workload serves (pods available, consumers caught up): Ready needs
    # them, Synced does not.
    serving: tuple[str, ...] = ()


def _ready_columns() -> tuple[dict[str, Any], ...]:
    return (
        {"name": "Synced", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Synced")].status',
         "description": "Whether the desired state has been applied."},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
         "description": "Whether it is applied and serves (pods available; a pipeline's consumer lag bounded)."},
        {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
         "priority": 1, "description": "Why (not) ready."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )


CATEGORIES = ("k2",)

PIPELINE = KindInfo(
    kind="IngestionPipeline", plural="ingestionpipelines", singular="ingestionpipeline", short_names=("ipl",),
    spec=IngestionPipelineSpec, status=IngestionPipelineStatus,
    description="An exchange feed: Kafka topics, registered Avro schemas, an optional ingest Job and the "
                "consumers that write the topics into IcebergTables.",
    printer_columns=(
        {"name": "Exchange", "type": "string", "jsonPath": ".spec.exchange", "description": "Exchange code."},
        {"name": "Source", "type": "string", "jsonPath": ".spec.source.type", "description": "Source type."},
        {"name": "Partitions", "type": "integer", "jsonPath": ".spec.topics.partitions",
         "description": "Partitions per topic."},
        {"name": "Consumers", "type": "integer", "jsonPath": ".spec.consumer.replicas",
         "description": "Desired consumer pods."},
        {"name": "Available", "type": "integer", "jsonPath": ".status.consumers.availableReplicas",
         "priority": 1, "description": "Available consumer pods."},
        *_ready_columns(),
    ),
    serving=("ConsumersAvailable", "ConsumersCaughtUp"),
)
TABLE = KindInfo(
    kind="IcebergTable", plural="icebergtables", singular="icebergtable", short_names=("ibt",),
    spec=IcebergTableSpec, status=IcebergTableStatus,
    description="An Apache Iceberg table: schema, partition spec, sort order, properties and maintenance.",
    printer_columns=(
        {"name": "Namespace", "type": "string", "jsonPath": ".spec.namespace", "description": "Iceberg namespace."},
        {"name": "Table", "type": "string", "jsonPath": ".spec.name", "description": "Table name."},
        {"name": "Snapshot", "type": "string", "jsonPath": ".status.currentSnapshotId",
         "description": "Current snapshot id."},
        {"name": "Policy", "type": "string", "jsonPath": ".spec.deletionPolicy", "priority": 1,
         "description": "What deleting the resource does to the table."},
        *_ready_columns(),
    ),
)
QUERY = KindInfo(
    kind="QueryService", plural="queryservices", singular="queryservice", short_names=("qs",),
    spec=QueryServiceSpec, status=QueryServiceStatus,
    description="The K2 REST API over IcebergTables, with API keys, rate limits and an optional Ingress.",
    printer_columns=(
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired API pods."},
        {"name": "Available", "type": "integer", "jsonPath": ".status.availableReplicas",
         "description": "Available API pods."},
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "description": "Where the API answers."},
        *_ready_columns(),
    ),
    serving=("Available",),
)
KINDS: tuple[KindInfo, ...] = (PIPELINE, TABLE, QUERY)
