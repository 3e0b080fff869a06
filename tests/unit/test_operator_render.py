"""The render functions, object by object: what each child looks like, restricted pod security and
probes everywhere, and configuration that round-trips through `Settings` (CR → env → workload)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from k2 import schemas, tables
from k2.settings import Settings
from k2_operator.models import IcebergTableSpec, IngestionPipelineSpec, QueryServiceSpec, SchemaRegistryRef
from k2_operator.render import (
    Owner,
    RenderContext,
    TableBinding,
    common,
    render_pipeline,
    render_query,
    render_table,
    table_definition,
)
from k2_operator.render import pipeline as pipeline_render
from k2_operator.render import query as query_render
from k2_operator.render.common import CATALOG_SECRET_FIELDS
from k2_operator.render.query import StreamTopics

pytestmark = pytest.mark.unit

CTX = RenderContext(image="registry.example.com/k2:1.2.3", kafka_bootstrap="kafka:9092",
                    registry_url="http://registry:8081")
ASX = Owner(kind="IngestionPipeline", name="asx", namespace="k2")
LIVE = Owner(kind="IngestionPipeline", name="live", namespace="k2")
API = Owner(kind="QueryService", name="api", namespace="k2")
TRADES = Owner(kind="IcebergTable", name="trades", namespace="k2")
QUOTES = Owner(kind="IcebergTable", name="quotes", namespace="k2")
BINDING = TableBinding(kinds=("trades", "quotes"), namespace="market", catalog_secret="k2-catalog",
                       target_file_size_bytes=64 * 1024 * 1024)


def pipeline_spec(**overrides: Any) -> IngestionPipelineSpec:
    return IngestionPipelineSpec.model_validate({
        "exchange": "asx", "source": {"type": "synthetic", "synthetic": {"symbols": 3, "days": 1, "seed": 7}},
        "topics": {"partitions": 12}, "consumer": {"replicas": 3, "batchRows": 1000, "gapAlert": 5},
        "tables": [{"name": "market-trades"}], **overrides})


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    if obj["kind"] in ("Deployment", "Job"):
        return obj["spec"]["template"]["spec"]["containers"]
    return []


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def workload_env(objects: list[dict[str, Any]], container: dict[str, Any],
                 secrets: dict[str, str]) -> dict[str, str]:
    """The environment the container would see: its ConfigMap, then its secretKeyRefs resolved."""
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    env = {}
    for source in container["envFrom"]:
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets:
            env[var["name"]] = secrets[ref["key"]]
        else:
            assert ref.get("optional"), f"{var['name']} refers to a missing required key"
    return env


FEED = {"type": "feed", "feed": {"url": "ws://feed.market:8765", "channels": ["trades"], "symbols": ["BHP", "RIO"],
                                  "staleSeconds": 20}}
ALL = [
    *render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX),
    *[o for o in render_pipeline(LIVE, pipeline_spec(source=FEED), binding=BINDING, ctx=CTX)
      if o["kind"] == "Deployment"],
    *render_query(API, QueryServiceSpec.model_validate({"tables": [{"name": "t"}]}),
                  table_namespace="market", catalog_secret="k2-catalog", ctx=CTX),
    *render_table(TRADES, IcebergTableSpec.model_validate(
        {"name": "trades", "schema": {"fromSubject": "s"}, "compactionSchedule": "@daily"}), ctx=CTX),
]


@pytest.mark.parametrize("obj", [o for o in ALL if containers(o)], ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_pod_is_restricted_with_probes_and_resources(obj: dict[str, Any]) -> None:
    spec = pod(obj)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert {"name": "tmp", "emptyDir": spec["volumes"][0]["emptyDir"]} == spec["volumes"][0]
    for box in containers(obj):
        security = box["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in box["volumeMounts"]
        assert box["livenessProbe"] and box["readinessProbe"]
        assert box["resources"]["requests"]["cpu"] and box["resources"]["limits"]["memory"]
        assert box["image"] == CTX.image and "command" not in box, "keep the image's tini entrypoint"


def test_every_child_is_labelled_for_its_owner() -> None:
    for obj in ALL:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "k2-operator"
        assert labels["app.kubernetes.io/part-of"] == "k2"
        assert obj["metadata"]["namespace"] == "k2"


def test_consumer_deployment_runs_k2_stream_for_the_bound_tables() -> None:
    objects = by_kind(render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX))
    deployment = objects["Deployment"]

    assert deployment["metadata"]["name"] == "asx-consumer"
    assert deployment["spec"]["replicas"] == 3
    box = containers(deployment)[0]
    assert box["args"] == ["stream", "run", "--tables", "trades,quotes", "--group-id", "k2-stream-k2-asx"]
    assert box["envFrom"] == [{"configMapRef": {"name": "asx-settings"}}]
    assert box["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}, "liveness is poll-loop progress"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert objects["PodDisruptionBudget"]["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert objects["Service"]["spec"]["clusterIP"] == "None"
    assert objects["Service"]["spec"]["selector"] == selector


def test_configuration_round_trips_through_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """CR → Settings → ConfigMap + secretKeyRef → env → the workload's own Settings()."""
    objects = render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX)
    box = containers(by_kind(objects)["Deployment"])[0]
    secrets = {"catalog_uri": "postgresql+psycopg2://k2:pw@pg/k2", "warehouse": "s3://lake/warehouse",
               "s3_secret_key": "hunter2"}
    for key in list(__import__("os").environ):
        if key.startswith("K2_"):
            monkeypatch.delenv(key)
    for key, value in workload_env(objects, box, secrets).items():
        monkeypatch.setenv(key, value)

    seen = Settings()

    assert (seen.exchange, seen.asset_class, seen.topic_partitions) == ("asx", "equities", 12)
    assert (seen.batch_rows, seen.gap_alert, seen.gap_halt) == (1000, 5, 100)
    assert seen.kafka_bootstrap == "kafka:9092" and seen.registry_url == "http://registry:8081"
    assert seen.namespace == "market" and seen.target_file_size_bytes == 64 * 1024 * 1024
    assert seen.catalog_uri == secrets["catalog_uri"] and seen.warehouse == secrets["warehouse"]
    assert seen.s3_secret_key.get_secret_value() == "hunter2"
    assert seen.mode == "prod" and seen.metrics_port == CTX.workload_metrics_port
    assert seen.create_resources is False, "the operator owns topics and tables; its workloads only check"


def test_secrets_never_land_in_the_config_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_API_KEYS", "operator-key")
    monkeypatch.setenv("K2_S3_SECRET_KEY", "operator-secret")
    objects = render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX)
    data = by_kind(objects)["ConfigMap"]["data"]

    assert "operator-key" not in data.values() and "operator-secret" not in data.values()
    assert not {f"K2_{f.upper()}" for f in CATALOG_SECRET_FIELDS} & set(data)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers(by_kind(objects)["Deployment"])[0]["env"]}
    assert env["K2_CATALOG_URI"] == {"name": "k2-catalog", "key": "catalog_uri"}
    assert env["K2_S3_SECRET_KEY"] == {"name": "k2-catalog", "key": "s3_secret_key", "optional": True}


def test_registry_url_from_a_secret() -> None:
    spec = pipeline_spec(schemaRegistry={"secretRef": {"name": "registry", "key": "url"}})
    objects = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))

    env = {e["name"]: e for e in containers(objects["Deployment"])[0]["env"]}
    assert env["K2_REGISTRY_URL"]["valueFrom"]["secretKeyRef"] == {"name": "registry", "key": "url"}
    assert "K2_REGISTRY_URL" not in objects["ConfigMap"]["data"]


def test_settings_changes_roll_the_pods_but_unrelated_ones_do_not() -> None:
    def digest(spec: IngestionPipelineSpec) -> str:
        deployment = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"]["k2.io/settings-hash"]

    base = digest(pipeline_spec())
    assert digest(pipeline_spec(consumer={"replicas": 3, "batchRows": 2000, "gapAlert": 5})) != base
    assert digest(pipeline_spec(consumer={"replicas": 7, "batchRows": 1000, "gapAlert": 5})) == base


def test_no_consumers_without_bound_tables() -> None:
    objects = render_pipeline(ASX, pipeline_spec(), binding=None, ctx=CTX)

    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Job"]


def test_synthetic_source_is_an_ingest_job_named_after_its_source() -> None:
    spec = pipeline_spec()
    job = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["Job"]

    assert containers(job)[0]["args"] == ["ingest", "synthetic", "--symbols", "3", "--days", "1", "--seed", "7",
                                          "--no-progress"]
    assert pod(job)["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 2
    assert job["metadata"]["name"] == pipeline_render.ingest_job_name("asx", spec)
    scaled = pipeline_spec(consumer={"replicas": 9, "batchRows": 1000, "gapAlert": 5})
    reseeded = pipeline_spec(source={"type": "synthetic", "synthetic": {"symbols": 3, "days": 1, "seed": 8}})
    assert pipeline_render.ingest_job_name("asx", scaled) == job["metadata"]["name"]
    assert pipeline_render.ingest_job_name("asx", reseeded) != job["metadata"]["name"]


def test_asx_csv_source_mounts_its_claim_read_only() -> None:
    spec = pipeline_spec(source={"type": "asx-csv", "asxCsv": {"path": "/data/asx", "claimName": "ticks",
                                                               "symbols": ["BHP", "CBA"]}})
    job = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["Job"]
    box = containers(job)[0]

    assert box["args"] == ["ingest", "asx", "/data/asx", "--no-progress", "--topics", "trades,quotes",
                           "--symbols", "BHP,CBA"]
    assert {"name": "input", "mountPath": "/data", "readOnly": True} in box["volumeMounts"]
    assert {"name": "input", "persistentVolumeClaim": {"claimName": "ticks", "readOnly": True}} in pod(job)["volumes"]


def test_asx_csv_source_runs_as_any_folder_source_when_given_folder() -> None:
    spec = pipeline_spec(source={"type": "asx-csv", "folder": {"path": "/data/asx", "claimName": "ticks"}})
    job = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["Job"]

    assert containers(job)[0]["args"] == ["ingest", "folder", "/data/asx", "--source", "asx-csv", "--no-progress",
                                          "--topics", "trades,quotes"]
    assert {"name": "input", "persistentVolumeClaim": {"claimName": "ticks", "readOnly": True}} in pod(job)["volumes"]


# A folder source defined and registered here and nowhere else. The operator's models take their
# enums and CEL rules from the registry when first imported (as the CRD generator does), so the
# source is registered in a fresh interpreter before `k2_operator` is imported.
_TOY_PIPELINE = """
import json, sys
from k2.sources import register

class Toy:
    name, command, columnar = "toy", ("ingest", "toy"), False
    continuous = sys.argv[2] == "continuous"
    description = "a toy venue"
    def discover(self, root, symbols=None, kinds=("trades", "quotes")): return []
    def reference_records(self, root, ingest_us, symbols=None): return iter(())
    def reader(self, tick_file, ingest_us): raise NotImplementedError

try:
    register(Toy())
except ValueError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit()
from pydantic import ValidationError
from k2_operator.models import IngestionPipelineSpec
from k2_operator.render import Owner, RenderContext, TableBinding, render_pipeline

spec = {"exchange": "crypto", "topics": {"kinds": ["trades", "reference"]}, "source": json.loads(sys.argv[1])}
try:
    model = IngestionPipelineSpec.model_validate(spec)
except ValidationError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps(render_pipeline(Owner(kind="IngestionPipeline", name="toy", namespace="k2"), model,
                                     binding=TableBinding(kinds=("trades",), namespace="market", catalog_secret="c"),
                                     ctx=RenderContext(image="k2:test"))))
"""


def _render_with_toy_source(source: dict[str, Any], run: str = "to-completion") -> Any:
    done = subprocess.run([sys.executable, "-c", _TOY_PIPELINE, json.dumps(source), run], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_a_registered_folder_source_runs_as_a_job_reading_its_claim() -> None:
    objects = _render_with_toy_source({"type": "toy", "folder": {"path": "/in/toy", "claimName": "toy-files",
                                                                 "mountPath": "/in", "symbols": ["BTC-USD"]}})
    job = by_kind(objects)["Job"]
    box = containers(job)[0]

    assert box["args"] == ["ingest", "folder", "/in/toy", "--source", "toy", "--no-progress", "--topics", "trades",
                           "--symbols", "BTC-USD"]
    params = _parse_with_the_real_cli(box["args"])
    assert (params["source"], str(params["path"]), params["symbols"]) == ("toy", "/in/toy", "BTC-USD")
    assert {"name": "input", "mountPath": "/in", "readOnly": True} in box["volumeMounts"]
    claim = {"name": "input", "persistentVolumeClaim": {"claimName": "toy-files", "readOnly": True}}
    assert claim in pod(job)["volumes"]


def test_a_continuous_folder_source_is_refused_at_registration() -> None:
    """`k2 ingest folder` reads the files its source finds once and exits, so a Deployment of it
    would re-read the folder on every restart: such a registration is refused before the operator
    (or its CRD enum) ever sees the source."""
    refused = _render_with_toy_source({"type": "toy", "folder": {"path": "/data/toy", "claimName": "toy-files"}},
                                      run="continuous")

    assert "'toy': a folder source is read to completion" in refused["error"]
    assert "cannot be continuous" in refused["error"]


def test_a_registered_folder_source_without_its_folder_is_refused() -> None:
    refused = _render_with_toy_source({"type": "toy"})

    assert "source.folder (path, optional claimName) is required" in refused["error"]


def test_query_service_keys_stay_in_their_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API reads its keys' digests from the mounted Secret; whatever keys the operator's own
    environment holds never reach a rendered object."""
    monkeypatch.setenv("K2_API_KEYS", "keys: [{id: operator, sha256: " + "ab" * 32 + "}]")
    spec = QueryServiceSpec.model_validate({"tables": [{"name": "market-trades"}],
                                            "auth": {"apiKeysSecret": {"name": "keys", "key": "k"}}})
    objects = render_query(API, spec, table_namespace="market", catalog_secret="cat", ctx=RenderContext())

    assert "ab" * 32 not in json.dumps(objects)
    data = by_kind(objects)["ConfigMap"]["data"]
    assert data["K2_API_KEYS_FILE"] == "/var/run/k2/api-keys-file/k" and "K2_API_KEYS" not in data


def test_query_service_children() -> None:
    spec = QueryServiceSpec.model_validate({
        "replicas": 3, "tables": [{"name": "market-trades"}], "rateLimit": "50/second", "serviceType": "NodePort",
        "keyConcurrency": 3, "maxBodyBytes": 65536, "queryMemoryMb": 256, "requestTimeoutSeconds": 10,
        "writeTimeoutSeconds": 20,
        "auth": {"apiKeysSecret": {"name": "keys", "key": "k"}},
        "ingress": {"host": "k2.example.com", "className": "nginx", "tlsSecret": "k2-tls"}})
    objects = by_kind(render_query(API, spec, table_namespace="market", catalog_secret="cat",
                                   ctx=RenderContext(service_monitor=True)))

    box = containers(objects["Deployment"])[0]
    assert box["args"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert box["livenessProbe"]["httpGet"]["path"] == "/health"
    assert box["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert objects["Deployment"]["spec"]["replicas"] == 3
    assert {"name": "api-keys-file", "mountPath": "/var/run/k2/api-keys-file", "readOnly": True} in box["volumeMounts"]
    assert {"name": "api-keys-file", "secret": {"secretName": "keys", "items": [{"key": "k", "path": "k"}]}} in pod(
        objects["Deployment"])["volumes"]
    assert objects["ConfigMap"]["data"]["K2_API_KEYS_FILE"] == "/var/run/k2/api-keys-file/k"
    assert objects["ConfigMap"]["data"]["K2_RATE_LIMIT"] == "50/second"
    limits = ("K2_KEY_CONCURRENCY", "K2_MAX_BODY_BYTES", "K2_QUERY_MEMORY_MB", "K2_REQUEST_TIMEOUT_SECONDS",
              "K2_WRITE_TIMEOUT_SECONDS")
    assert {k: objects["ConfigMap"]["data"][k] for k in limits} == {
        "K2_KEY_CONCURRENCY": "3", "K2_MAX_BODY_BYTES": "65536", "K2_QUERY_MEMORY_MB": "256",
        "K2_REQUEST_TIMEOUT_SECONDS": "10.0", "K2_WRITE_TIMEOUT_SECONDS": "20.0"}
    assert "K2_API_KEYS" not in objects["ConfigMap"]["data"]
    assert objects["Service"]["spec"]["type"] == "NodePort"
    assert objects["Service"]["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                                    "protocol": "TCP"}]
    ingress = objects["Ingress"]["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["k2.example.com"], "secretName": "k2-tls"}]
    assert ingress["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "api", "port": {"name": "http"}}
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"
    assert query_render.url(API, spec) == "https://k2.example.com"


def test_optional_children_only_when_asked_for() -> None:
    spec = QueryServiceSpec.model_validate({"tables": [{"name": "t"}]})
    kinds = {o["kind"] for o in render_query(API, spec, table_namespace="m", catalog_secret="c", ctx=CTX)}

    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    assert query_render.url(API, spec) == "http://api.k2.svc:80"


def test_table_definition_uses_the_shared_table_code() -> None:
    spec = IcebergTableSpec.model_validate({
        "name": "trades", "schema": {"fromSubject": "s"},
        "partitionBy": [{"column": "exchange_date"}, {"column": "symbol", "transform": "bucket[8]"}],
        "sortBy": ["symbol", "exchange_timestamp"], "properties": {"compression": "snappy", "extra": {"a.b": "c"}},
        "snapshotRetention": {"maxAgeHours": 2, "minSnapshotsToKeep": 3}})

    definition = table_definition(spec, schemas.iceberg_schema("trades"))

    assert isinstance(definition, tables.TableDefinition)
    assert definition.identifier == "market.trades"
    assert [f.name for f in definition.partition_spec().fields] == ["exchange_date", "symbol_bucket"]
    assert len(definition.sort_order().fields) == 2
    assert definition.properties["write.parquet.compression-codec"] == "snappy"
    assert definition.properties["history.expire.max-snapshot-age-ms"] == str(2 * 3600 * 1000)
    assert definition.properties["history.expire.min-snapshots-to-keep"] == "3"
    assert definition.properties["format-version"] == "2" and definition.properties["a.b"] == "c"


def test_compaction_schedule_is_a_maintenance_cron_job() -> None:
    spec = IcebergTableSpec.model_validate({"name": "quotes", "schema": {"fromSubject": "s"},
                                            "compactionSchedule": "15 3 * * *",
                                            "snapshotRetention": {"maxAgeHours": 48}})
    objects = by_kind(render_table(QUOTES, spec, ctx=CTX))

    cron = objects["CronJob"]
    assert cron["spec"]["schedule"] == "15 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert containers(cron)[0]["args"] == ["maintain", "--table", "quotes", "--retention-hours", "48"]
    assert objects["ConfigMap"]["data"]["K2_NAMESPACE"] == "market"
    assert render_table(QUOTES, spec.model_copy(update={"compaction_schedule": None}), ctx=CTX) == []


def _parse_with_the_real_cli(args: list[str]) -> dict[str, Any]:
    """Resolve `k2 <args>` with the actual Typer app, as the container would, without running it."""
    import typer

    from k2.cli import app

    command = typer.main.get_command(app)
    name, rest, ctx = "k2", list(args), None
    while hasattr(command, "resolve_command"):  # a group: walk down `k2 ingest asx …` level by level
        group_ctx = command.make_context(name, rest, parent=ctx, allow_interspersed_args=False)
        name, command, rest = command.resolve_command(group_ctx, [*getattr(group_ctx, "_protected_args", []),
                                                                  *group_ctx.args])
        ctx = group_ctx
    return command.make_context(name, rest, parent=ctx).params


@pytest.mark.parametrize("obj", [o for o in ALL if containers(o)], ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_rendered_commands_parse_with_the_k2_cli(obj: dict[str, Any]) -> None:
    for box in containers(obj):
        assert "command" not in box  # the entrypoint is `tini -- k2`
        assert _parse_with_the_real_cli(box["args"]) is not None


def test_asx_ingest_arguments_reach_the_cli_options() -> None:
    spec = pipeline_spec(source={"type": "asx-csv", "asxCsv": {"path": "/data/asx", "symbols": ["BHP"]}})
    job = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["Job"]

    params = _parse_with_the_real_cli(containers(job)[0]["args"])

    assert (str(params["path"]), params["symbols"], params["topics"], params["progress"]) == (
        "/data/asx", "BHP", "trades,quotes", False)


def test_feed_source_is_a_deployment_whose_liveness_is_feed_progress() -> None:
    objects = render_pipeline(LIVE, pipeline_spec(source=FEED), binding=BINDING, ctx=CTX)
    assert "Job" not in {o["kind"] for o in objects}
    feed = next(o for o in objects if o["metadata"]["name"] == "live-feed")
    box = containers(feed)[0]

    assert feed["kind"] == "Deployment" and feed["spec"]["replicas"] == 1
    assert feed["spec"]["strategy"] == {"type": "Recreate"}, "never two sessions of one feed at once"
    assert box["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert pod(feed)["terminationGracePeriodSeconds"] >= 30, "time to flush on SIGTERM"
    params = _parse_with_the_real_cli(box["args"])
    assert (params["url"], params["channels"], params["symbols"], params["protocol"]) == (
        "ws://feed.market:8765", "trades", "BHP,RIO", "k2")
    config = by_kind(objects)["ConfigMap"]["data"]
    assert Settings.model_validate({"feed_stale_seconds": config["K2_FEED_STALE_SECONDS"]}).feed_stale_seconds == 20


def test_consumers_get_their_commit_interval_and_compaction_settings() -> None:
    spec = pipeline_spec(consumer={"batchSeconds": 0.2, "compactIntervalSeconds": 120, "compactMinFiles": 8})
    config = by_kind(render_pipeline(ASX, spec, binding=BINDING, ctx=CTX))["ConfigMap"]["data"]
    wanted = ("K2_BATCH_SECONDS", "K2_COMPACT_INTERVAL_SECONDS", "K2_COMPACT_MIN_FILES")
    settings = Settings.model_validate({k[3:].lower(): v for k, v in config.items() if k in wanted})
    assert (settings.batch_seconds, settings.compact_interval_seconds, settings.compact_min_files) == (0.2, 120, 8)


SECRET_CTX = RenderContext(registry_url="https://user:pw@registry.example.com", registry_secret=("registry", "url"))


def test_a_secret_default_registry_is_read_by_secret_key_ref_and_never_lands_in_a_config_map() -> None:
    """The operator's own registry URL came from a Secret (chart: schemaRegistry.external.existingSecret)."""
    objects = [*render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=SECRET_CTX),
               *render_query(API, QueryServiceSpec.model_validate({"tables": [{"name": "t"}]}),
                             table_namespace="market", catalog_secret="k2-catalog", ctx=SECRET_CTX),
               *render_table(TRADES, IcebergTableSpec.model_validate(
                   {"name": "trades", "schema": {"fromSubject": "s"}, "compactionSchedule": "@daily"}), ctx=SECRET_CTX)]

    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert "user:pw" not in str(config_map["data"]), config_map["metadata"]["name"]
    consumer = containers(by_kind(render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=SECRET_CTX))
                          ["Deployment"])[0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in consumer["env"]}
    assert env["K2_REGISTRY_URL"] == {"name": "registry", "key": "url"}


def test_maintenance_never_gets_a_registry_url() -> None:
    table = by_kind(render_table(TRADES, IcebergTableSpec.model_validate(
        {"name": "trades", "schema": {"fromSubject": "s"}, "compactionSchedule": "@daily"}), ctx=CTX))

    assert "K2_REGISTRY_URL" not in table["ConfigMap"]["data"]


def test_the_api_reads_the_registry_of_the_pipeline_writing_its_tables() -> None:
    """Its live stream decodes the pipeline's Avro with writer schemas from that registry (without
    one the hub read no tick on a cluster)."""
    spec = QueryServiceSpec.model_validate({"tables": [{"name": "t"}]})

    def api(topics: StreamTopics | None, ctx: RenderContext) -> tuple[dict[str, str], dict[str, Any]]:
        objects = by_kind(render_query(API, spec, table_namespace="m", catalog_secret="c", ctx=ctx, topics=topics))
        box = containers(objects["Deployment"])[0]
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in box["env"]}
        return objects["ConfigMap"]["data"], env

    own_url = StreamTopics("live", "asx", SchemaRegistryRef.model_validate({"url": "http://registry.live:8080"}))
    data, env = api(own_url, SECRET_CTX)
    assert data["K2_REGISTRY_URL"] == "http://registry.live:8080" and "K2_REGISTRY_URL" not in env
    assert (data["K2_ASSET_CLASS"], data["K2_EXCHANGE"]) == ("live", "asx")

    own_secret = StreamTopics("live", "asx", SchemaRegistryRef.model_validate(
        {"secretRef": {"name": "live-registry", "key": "url"}}))
    data, env = api(own_secret, CTX)
    assert "K2_REGISTRY_URL" not in data and env["K2_REGISTRY_URL"] == {"name": "live-registry", "key": "url"}

    data, env = api(StreamTopics("live", "asx"), CTX)  # the pipeline names none: the operator's default
    assert data["K2_REGISTRY_URL"] == CTX.registry_url
    data, env = api(None, SECRET_CTX)
    assert "K2_REGISTRY_URL" not in data and env["K2_REGISTRY_URL"] == {"name": "registry", "key": "url"}


def test_a_rotated_secret_changes_the_pod_template() -> None:
    def template(versions: dict[str, str]) -> dict[str, Any]:
        ctx = RenderContext(secret_versions=versions)
        return by_kind(render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=ctx))["Deployment"]["spec"][
            "template"]["metadata"]["annotations"]

    assert common.referenced_secrets(render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX)) == [
        "k2-catalog"]
    before = template({"k2-catalog": "100"})
    assert template({"k2-catalog": "100"}) == before
    rotated = template({"k2-catalog": "101"})
    assert rotated["k2.io/secrets-hash"] != before["k2.io/secrets-hash"]
    assert rotated["k2.io/settings-hash"] == before["k2.io/settings-hash"]


def test_jobs_end_and_go_and_schedules_name_their_time_zone() -> None:
    job = by_kind(render_pipeline(ASX, pipeline_spec(), binding=BINDING, ctx=CTX))["Job"]
    cron = by_kind(render_table(QUOTES, IcebergTableSpec.model_validate(
        {"name": "quotes", "schema": {"fromSubject": "s"}, "compactionSchedule": "15 17 * * 1-5",
         "compactionTimeZone": "Australia/Sydney"}), ctx=CTX))["CronJob"]

    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert cron["spec"]["timeZone"] == "Australia/Sydney"
    maintenance = cron["spec"]["jobTemplate"]["spec"]
    assert maintenance["activeDeadlineSeconds"] > 0 and maintenance["ttlSecondsAfterFinished"] > 0


SHAPE = {"labels": {"team": "desk-a", "app.kubernetes.io/component": "hijack"}, "annotations": {"a/b": "c"},
         "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
             {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["market"]}]}]}}},
         "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                        "whenUnsatisfiable": "ScheduleAnyway"}],
         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "market", "effect": "NoSchedule"}],
         "nodeSelector": {"pool": "market"}, "priorityClassName": "k2-critical",
         "imagePullSecrets": [{"name": "regcred"}], "serviceAccountName": "k2-workloads"}


@pytest.mark.parametrize("workload", ["consumer", "ingest", "api", "maintenance"])
def test_every_workload_takes_the_pod_shaping_fields(workload: str) -> None:
    if workload in ("consumer", "ingest"):
        field = "consumer" if workload == "consumer" else "source"
        spec = pipeline_spec().model_dump(by_alias=True)
        spec[field]["pod"] = SHAPE
        objects = by_kind(render_pipeline(ASX, IngestionPipelineSpec.model_validate(spec), binding=BINDING, ctx=CTX))
        obj = objects["Deployment" if workload == "consumer" else "Job"]
    elif workload == "api":
        obj = by_kind(render_query(API, QueryServiceSpec.model_validate({"tables": [{"name": "t"}], "pod": SHAPE}),
                                   table_namespace="m", catalog_secret="c", ctx=CTX))["Deployment"]
    else:
        obj = by_kind(render_table(TRADES, IcebergTableSpec.model_validate(
            {"name": "trades", "schema": {"fromSubject": "s"}, "compactionSchedule": "@daily",
             "maintenancePod": SHAPE}), ctx=CTX))["CronJob"]
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    spec = template["spec"]

    for key in ("affinity", "topologySpreadConstraints", "tolerations", "nodeSelector", "priorityClassName",
                "serviceAccountName"):
        assert spec[key] == SHAPE[key], key
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["labels"]["team"] == "desk-a" and template["metadata"]["annotations"]["a/b"] == "c"
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] != "hijack", "K2's selector labels win"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False


def test_api_replicas_prefer_distinct_nodes_unless_told_otherwise() -> None:
    spec = QueryServiceSpec.model_validate({"tables": [{"name": "t"}]})
    api = pod(by_kind(render_query(API, spec, table_namespace="m", catalog_secret="c", ctx=CTX))["Deployment"])

    term = api["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "query"


def test_services_ingresses_and_service_monitors_take_labels_and_annotations() -> None:
    release = {"labels": {"release": "kube-prometheus-stack"}, "annotations": {"x/y": "z"}}
    spec = QueryServiceSpec.model_validate({
        "tables": [{"name": "t"}], "service": release, "serviceMonitor": release,
        "ingress": {"host": "k2.example.com", "annotations": {"cert-manager.io/cluster-issuer": "le"}}})
    objects = by_kind(render_query(API, spec, table_namespace="m", catalog_secret="c",
                                   ctx=RenderContext(service_monitor=True)))

    for kind in ("Service", "ServiceMonitor"):
        assert objects[kind]["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
        assert objects[kind]["metadata"]["annotations"] == {"x/y": "z"}, kind
    assert objects["Ingress"]["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "le"}
    consumer = pipeline_spec().model_dump(by_alias=True)
    consumer["consumer"]["serviceMonitor"] = release
    monitor = by_kind(render_pipeline(ASX, IngestionPipelineSpec.model_validate(consumer), binding=BINDING,
                                      ctx=RenderContext(service_monitor=True)))["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_a_feed_pod_restarts_only_for_what_the_feed_uses() -> None:
    """A restarted feed pod misses what the venue sends meanwhile: its template must not change
    with what only the consumers read (the catalog Secret, batching), and it gets no catalog env."""
    def deployments(spec: IngestionPipelineSpec, versions: dict[str, str]) -> dict[str, dict[str, Any]]:
        objects = render_pipeline(LIVE, spec, binding=BINDING, ctx=RenderContext(secret_versions=versions))
        return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] == "Deployment"}

    feed = {"type": "feed", "feed": {"url": "ws://venue:8765"}}
    before = deployments(pipeline_spec(source=feed), {"k2-catalog": "100"})
    rotated = deployments(pipeline_spec(source=feed), {"k2-catalog": "101"})
    rebatched = deployments(pipeline_spec(source=feed, consumer={"replicas": 3, "batchRows": 1000, "gapAlert": 5,
                                                                 "batchSeconds": 0.2}),
                            {"k2-catalog": "100"})

    assert rotated["live-consumer"] != before["live-consumer"] != rebatched["live-consumer"]
    assert rotated["live-feed"] == before["live-feed"] == rebatched["live-feed"]
    feed_env = before["live-feed"]["spec"]["containers"][0].get("env", [])
    assert not [e["name"] for e in feed_env if e["name"].startswith(("K2_CATALOG", "K2_S3", "K2_WAREHOUSE"))]


def test_a_file_ingest_gets_its_worker_count_and_the_feed_never_restarts_for_it() -> None:
    """`source.workers` reaches the ingest Job as K2_INGEST_WORKERS (0 where the Job has one core);
    the feed and the consumers, which never parse files, do not restart when it changes."""
    def ingest_env(workers: int | None) -> dict[str, str]:
        source = {"type": "synthetic", "synthetic": {"symbols": 3, "days": 1, "seed": 7}}
        if workers is not None:
            source["workers"] = workers
        objects = render_pipeline(ASX, pipeline_spec(source=source), binding=BINDING, ctx=CTX)
        config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        return {k: v for ref in containers(by_kind(objects)["Job"])[0]["envFrom"]
                for k, v in config_maps[ref["configMapRef"]["name"]].items()}

    def templates(workers: int) -> dict[str, dict[str, Any]]:
        objects = render_pipeline(LIVE, pipeline_spec(source={**FEED, "workers": workers}), binding=BINDING, ctx=CTX)
        return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] == "Deployment"}

    assert ingest_env(0)["K2_INGEST_WORKERS"] == "0"
    assert ingest_env(None)["K2_INGEST_WORKERS"] == str(Settings.model_fields["ingest_workers"].default)
    assert sorted(templates(0)) == ["live-consumer", "live-feed"]
    assert templates(0) == templates(3)
