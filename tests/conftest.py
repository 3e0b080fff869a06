"""Shared fixtures: the real local stack and the ASX sample.

Services are started once per session and only if they are not already serving: under
`make test` the stack is up before pytest starts and stays up; a bare `pytest` starts what the
selected tests need and stops what it started at the end.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import hypothesis
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from k2.settings import Settings
from k2.stack.base import Service

# Property tests check answers, not speed: Hypothesis's default 200 ms deadline per example fails
# them on a machine busy with the rest of the suite (a kind cluster, say), which says nothing.
hypothesis.settings.register_profile("k2", deadline=None)
hypothesis.settings.load_profile("k2")

REPO = Path(__file__).resolve().parents[1]
SYDNEY = ZoneInfo("Australia/Sydney")
ASX_DATA = Path(os.environ.get("K2_ASX_DATA", REPO.parent / "shared" / "data" / "asx-2014-03"))


def _kind_skip_reason() -> str | None:
    if os.environ.get("K2_KIND_TESTS", "1") == "0":
        return "K2_KIND_TESTS=0"
    from k2.stack.docker import engine_unavailable_reason

    return engine_unavailable_reason()


def _run_order(item: pytest.Item) -> int:
    """Tests needing the apiserver after the others, then those running built images, then the
    kind suite: `make test` compiles their programs meanwhile (scripts/test.sh), and the kind
    cluster (a live feed replaying in it), deleted at the session's end, would take CPU from every
    test after it. In the kind suite, the cluster's own checks come before K2 is deployed on it:
    they judge the platform built here, not how it copes beside K2's pods and live feed."""
    if "kind" in item.keywords:
        return 4 if "deployed" in getattr(item, "fixturenames", ()) else 3
    if "images" in item.keywords:
        return 2
    return int("kube" in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_run_order)
    reason = _kind_skip_reason() if any("kind" in item.keywords for item in items) else None
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "kind" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("K2_CONNECT_TESTS") != "1":  # minutes each: opt-in, out of `make test`
        skip = pytest.mark.skip(reason="the Iceberg Kafka Connect peer (a benchmark peer, minutes per test) "
                                "runs in make bench; K2_CONNECT_TESTS=1 runs it here")
        for item in items:
            if "connect_peer" in item.keywords:
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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def load_benchmark() -> Callable[[str], Any]:
    """Loads `benchmarks/<name>.py` as a module (they are scripts, not a package; each imports the
    others by name, so the folder is on the path while it loads)."""
    import importlib.util

    def load(name: str) -> Any:
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(BENCHMARKS))

    return load


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine (started on demand) for the image, docker and kind tests, or a skip with the
    reason. One the session started is stopped at its end, whichever test started it last: a test
    may stop and start it. One that answered before is someone else's and keeps running."""
    from k2.stack import docker

    if reason := docker.engine_unavailable_reason():
        pytest.skip(reason)
    with docker.engine_left_as_found():
        docker.ensure_engine()
        yield


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
def ticks_table(tmp_path: Path) -> Callable[..., Any]:
    """Makes `market.ticks` (exchange_date, sequence_number; partitioned by day) in a private
    SQLite catalog, with `properties` on top of the defaults."""
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.schema import Schema
    from pyiceberg.types import DateType, LongType, NestedField

    from k2 import tables

    def make(properties: dict[str, str] | None = None) -> Any:
        cat = SqlCatalog("k2", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{tmp_path}/warehouse")
        definition = tables.TableDefinition(
            "market", "ticks",
            Schema(NestedField(1, "exchange_date", DateType(), required=True),
                   NestedField(2, "sequence_number", LongType(), required=True)),
            partition_by=(("exchange_date", "identity"),), sort_by=("sequence_number",),
            properties=properties or {})
        return tables.ensure_table(cat, definition)

    return make


@pytest.fixture
def embedded_settings(tmp_path: Path, kafka, registry, unique: str) -> Settings:
    """Settings on the real Kafka + registry with a private embedded catalog and private topics."""
    return Settings(kafka_bootstrap=kafka.bootstrap, registry_url=registry.url, asset_class=f"t{unique}",
                    catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "warehouse"),
                    dlq_path=str(tmp_path / "dlq.jsonl"), batch_seconds=0.5)


@pytest.fixture
def production_settings(kafka, registry, postgres, s3, unique: str) -> Settings:
    """Settings as the chart deploys them: the Postgres catalog and the S3 warehouse, on a
    namespace, folder and topics of this test's own."""
    return Settings(kafka_bootstrap=kafka.bootstrap, registry_url=registry.url, asset_class=f"t{unique}",
                    namespace=f"t{unique}", catalog_uri=postgres.sqlalchemy_url,
                    warehouse=f"s3://{s3.bucket}/t{unique}", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                    s3_secret_key=s3.secret_key, s3_region=s3.region, batch_seconds=0.5)


@pytest.fixture(params=["embedded_settings", "production_settings"], ids=["sqlite-local", "postgres-s3"])
def catalog_settings(request: pytest.FixtureRequest) -> Settings:
    """A test using this runs on both catalog configurations: the embedded one (SQLite + local
    files) and the one the chart deploys (Postgres + S3)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def asx_root() -> Path:
    if not (ASX_DATA / "reference-data" / "company_info.csv").is_file():
        pytest.skip(f"ASX sample not found at {ASX_DATA} (set K2_ASX_DATA to its folder)")
    return ASX_DATA


def asx_records(root: Path, kinds: tuple[str, ...] = ("trades", "quotes")) -> dict[tuple, dict]:
    """What `k2 ingest asx` makes of an ASX-format folder, by (kind, symbol, epoch day, sequence
    number): the oracle feed and stream tests compare against."""
    from k2.sources import asx

    records = {}
    for tick_file in asx.discover(root, kinds=kinds):  # type: ignore[arg-type]
        builder = asx.RecordBuilder(tick_file, 0)
        with tick_file.path.open(newline="") as fh:
            for line in fh:
                record = builder.build(line)
                records[tick_file.kind, record["symbol"], record["exchange_date"], record["sequence_number"]] = record
    return records


@pytest.fixture
def file_records() -> Callable[..., dict[tuple, dict]]:
    return asx_records


def copy_asx_companies(src: Path, dst: Path, company_ids: tuple[str, ...]) -> Path:
    """An ASX-format folder at `dst` holding only these companies' trades and quotes (and the
    reference data), for tests that change or split the sample."""
    (dst / "reference-data").mkdir(parents=True)
    shutil.copy(src / "reference-data" / "company_info.csv", dst / "reference-data")
    for kind in ("trades", "quotes"):
        (dst / kind).mkdir()
        for cid in company_ids:
            shutil.copy(src / kind / f"{cid}.csv", dst / kind)
    return dst


@pytest.fixture
def asx_companies() -> Callable[[Path, Path, tuple[str, ...]], Path]:
    return copy_asx_companies


def _watermarks(consumer, partition, deadline: float) -> tuple[int, int]:
    """A partition's watermarks, asked again while its leader is being elected (a broker just
    restarted answers NOT_LEADER_FOR_PARTITION for a moment)."""
    from k2.faults import transient_dependency

    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=10)
        except Exception as exc:
            if transient_dependency(exc) != "kafka" or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def drain_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every message of `topic` from the beginning up to its current end (real consumer)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-drain-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        for p in metadata.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p), deadline)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        messages, remaining = [], dict(ends)
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


def produce_trades(settings: Settings, ticks: list[tuple[str, int]], encoder: Any = None, every: float = 0.0) -> None:
    """(symbol, sequence number) trades of one ASX day to the trades topic, keyed by symbol as
    K2's producers key them (the topic and subject are made if missing, unless an encoder made
    earlier is given: one registered before a registry outage, say). With `every`, one tick per
    `every` seconds, each delivered before the next, as a live feed comes."""
    from confluent_kafka import Producer

    from k2 import topics
    from k2.ingest.pipeline import register_schemas
    from k2.sources.asx import unscaled_bytes

    if encoder is None:
        topics.ensure_pipeline_topics(settings, ("trades",))
        encoder = register_schemas(settings, ("trades",))["trades"]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for symbol, seq in ticks:
        record = {"symbol": symbol, "exchange": "ASX", "exchange_timestamp": 1_394_400_000_000_000 + seq,
                  "exchange_date": 16139, "sequence_number": seq, "price": unscaled_bytes(36_700_000),
                  "volume": 100, "qualifiers": None, "venue": None, "buyer_id": None,
                  "ingest_timestamp": 1_394_400_000_000_000, "source_id": "test"}
        producer.produce(settings.topic("trades"), encoder.encode(record), symbol.encode())
        if every:
            producer.flush(30)
            time.sleep(every)
    producer.flush(30)


@pytest.fixture
def trades_producer() -> Callable[..., None]:
    return produce_trades


# --- the operator on the real control plane (tests/operator, tests/e2e) -------------------------------

CRD_DIR = REPO / "manifests" / "base" / "crds"
SAMPLES = REPO / "manifests" / "samples"
GROUP, VERSION = "k2.io", "v1alpha1"
PLURALS = {"IngestionPipeline": "ingestionpipelines", "IcebergTable": "icebergtables", "QueryService": "queryservices"}

# Fast loops for tests: the drift timer every few seconds, retries after one second, cleanup given
# up after three attempts. Set before the handlers are imported (timer intervals are bound then).
OPERATOR_ENV = {
    "K2_OPERATOR_DRIFT_INTERVAL": "3",
    "K2_OPERATOR_DRIFT_INITIAL_DELAY": "2",
    "K2_OPERATOR_RETRY_DELAY": "1",
    "K2_OPERATOR_CLEANUP_ATTEMPTS": "3",
    "K2_OPERATOR_METRICS_PORT": "0",
    "K2_OPERATOR_LIVENESS": "",
    "K2_OPERATOR_IMAGE": "ghcr.io/k2-lakehouse/k2:test",
    # One Lease per test session (operators of one session run one after another), short enough
    # that an operator stopped uncleanly blocks the next for seconds only.
    "K2_OPERATOR_LEASE_NAME": f"k2-operator-test-{uuid.uuid4().hex[:8]}",
    "K2_OPERATOR_LEASE_DURATION": "4",
}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def find_condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition["type"] == type_:
            return condition
    return {}


class Cluster:
    """Small helpers over the API for the tests (the operator has its own client)."""

    def __init__(self, api: client.ApiClient, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.batch = client.BatchV1Api(api)

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                              capture_output=True, text=True, timeout=60)

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[body["kind"]], body)

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, namespace: str, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name, patch)

    def delete(self, namespace: str, kind: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_condition(self, namespace: str, kind: str, name: str, type_: str = "Synced", status: str = "True",
                       reason: str | None = None, timeout: float = 60.0, generation: bool = True) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.get(namespace, kind, name)
            condition = find_condition(obj, type_)
            if not condition or condition["status"] != status or (reason and condition["reason"] != reason):
                return None
            if generation and obj["status"].get("observedGeneration") != obj["metadata"]["generation"]:
                return None
            return obj
        try:
            return wait_for(check, f"{kind}/{name} {type_}={status}{f' ({reason})' if reason else ''}", timeout)
        except AssertionError as exc:
            obj = self.get(namespace, kind, name)
            raise AssertionError(f"{exc}; status now: {json.dumps((obj or {}).get('status'), indent=1)}") from None

    def wait_gone(self, namespace: str, kind: str, name: str, timeout: float = 60.0) -> None:
        wait_for(lambda: self.get(namespace, kind, name) is None, f"{kind}/{name} to be deleted", timeout)

    def events(self, namespace: str, name: str, reason: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
        return [e for e in items if reason is None or e.reason == reason]

    def deployment(self, namespace: str, name: str) -> Any | None:
        try:
            return self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


# the kubelet this control plane lacks -------------------------------------------------------------
# No node runs pods here, so tests play the kubelet: a container's command is run as a local
# process with the container's environment, both read from the objects in the apiserver (ConfigMap
# via envFrom, Secrets via secretKeyRef or mounted), never re-typed.
def container_env(cluster: Cluster, namespace: str, container: Any) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.env_from or []:
        if source.config_map_ref:
            env.update(cluster.core.read_namespaced_config_map(source.config_map_ref.name, namespace).data or {})
    for var in container.env or []:
        if var.value is not None:
            env[var.name] = var.value
        elif var.value_from and var.value_from.secret_key_ref:
            ref = var.value_from.secret_key_ref
            data = cluster.core.read_namespaced_secret(ref.name, namespace).data or {}
            if ref.key in data:
                env[var.name] = base64.b64decode(data[ref.key]).decode()
    return env


def mount_secrets(cluster: Cluster, namespace: str, pod_spec: Any, env: dict[str, str], root: Path) -> dict[str, str]:
    """Secret volumes written under `root` as the kubelet would write them under their mountPath;
    settings that point into a mountPath are pointed at the copy."""
    secrets = {v.name: v.secret for v in pod_spec.volumes or [] if v.secret}
    (container,) = pod_spec.containers
    for mount in container.volume_mounts or []:
        source = secrets.get(mount.name)
        if source is None:
            continue
        folder = root / mount.name
        folder.mkdir(parents=True, exist_ok=True)
        data = cluster.core.read_namespaced_secret(source.secret_name, namespace).data or {}
        for item in source.items or [type("Item", (), {"key": k, "path": k})() for k in data]:
            (folder / item.path).write_bytes(base64.b64decode(data[item.key]))
        env = {k: v.replace(mount.mount_path, str(folder), 1) if v.startswith(mount.mount_path) else v
               for k, v in env.items()}
    return env


def start_container(cluster: Cluster, namespace: str, pod_spec: Any, log: Path) -> subprocess.Popen:
    """The pod's one container as a local process. Pods have a network each, these processes share
    the host's: the workloads' metrics server (a fixed port) is left off."""
    (container,) = pod_spec.containers
    argv = [*(container.command or ["k2"]), *(container.args or [])]
    base = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    env = mount_secrets(cluster, namespace, pod_spec, container_env(cluster, namespace, container),
                        log.parent / f"{log.stem}-secrets")
    return subprocess.Popen(argv, env={**base, **env, "K2_METRICS_PORT": "0"}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def mark_pods_ready(cluster: Cluster, namespace: str, selector: str) -> int:
    """What the kubelet reports once a pod's readiness probe passes: its Ready condition (the
    ReplicaSet and Deployment controllers then count it available). Returns the pods marked."""
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=selector).items
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for pod in pods:
        cluster.core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {"conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now}]}})
    return len(pods)


@pytest.fixture(scope="session")
def operator_env(kube: Path, kafka: Any, registry: Any) -> Iterator[dict[str, str]]:
    """The operator's environment: the local cluster, Kafka and registry, fast loops. The
    in-process operator reads it from os.environ; restored when the session ends."""
    env = {**OPERATOR_ENV, "KUBECONFIG": str(kube), "K2_KAFKA_BOOTSTRAP": kafka.bootstrap,
           "K2_REGISTRY_URL": registry.url}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    # kopf logs in through the kubernetes client, whose default kubeconfig path was fixed at import.
    from kubernetes.config import kube_config

    default_location, kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kube_config.KUBE_CONFIG_DEFAULT_LOCATION, str(kube)
    from k2_operator import config as operator_config

    operator_config.load.cache_clear()
    yield env
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = default_location
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    operator_config.load.cache_clear()


@pytest.fixture(scope="session")
def cluster(kube: Path, operator_env: dict[str, str]) -> Iterator[Cluster]:
    with config.new_client_from_config(config_file=str(kube)) as api:
        yield Cluster(api, kube)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> list[str]:
    """The generated CRDs, installed as a user would (kubectl apply --server-side)."""
    proc = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    assert proc.returncode == 0, proc.stderr
    ext = client.ApiextensionsV1Api(cluster.api)
    names = [f"{plural}.{GROUP}" for plural in PLURALS.values()]
    for name in names:
        wait_for(lambda n=name: any(c.type == "Established" and c.status == "True"
                                    for c in ext.read_custom_resource_definition(n).status.conditions or []),
                 f"CRD {name} established")
    return names


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k2-operator-catalog")


def catalog_secret_data(catalog_dir: Path) -> dict[str, str]:
    return {"catalog_uri": f"sqlite:///{catalog_dir}/catalog.db", "warehouse": str(catalog_dir / "warehouse")}


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key of the samples' QueryService: only its digest is in the namespace's Secret."""
    return "k2_" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, crds: list[str], catalog_dir: Path, api_key: str) -> Iterator[str]:
    """A fresh namespace with the Secrets the samples name (catalog, API keys)."""
    from k2.api.auth import Entitlement, document

    name = f"k2op-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    keys = document([Entitlement.of("tests", api_key, stream=True)])
    secrets = {"k2-catalog": catalog_secret_data(catalog_dir), "k2-api-keys": {"api_keys": keys}}
    for secret, data in secrets.items():
        cluster.core.create_namespaced_secret(name, client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))
    yield name
    cluster.core.delete_namespace(name)


@pytest.fixture(scope="module")
def asset_class() -> str:
    """A private asset class: the topics and subjects of this module are its own."""
    return f"t{uuid.uuid4().hex[:8]}"


def operator_args(namespace: str) -> list[str]:
    return ["run", "--standalone", "--namespace", namespace, "-m", "k2_operator.handlers"]


@pytest.fixture(scope="module")
def operator(namespace: str, operator_env: dict[str, str]) -> Iterator[Any]:
    from kopf.testing import KopfRunner

    with KopfRunner(operator_args(namespace), timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output


@pytest.fixture(scope="session")
def catalog(catalog_dir: Path) -> Any:
    """The Iceberg catalog the operator writes (the test's own connection to it)."""
    from k2 import tables
    from k2.settings import Settings

    data = catalog_secret_data(catalog_dir)
    return tables.catalog(Settings(catalog_uri=data["catalog_uri"], warehouse=data["warehouse"]))


@pytest.fixture(scope="session")
def admin(kafka: Any) -> Any:
    from k2.topics import admin_client

    return admin_client(kafka.bootstrap)


@pytest.fixture(scope="session")
def schema_registry(registry: Any) -> Any:
    from k2.schemas.registry import client as registry_client

    return registry_client(registry.url)


def load_samples(asset_class: str) -> list[dict[str, Any]]:
    """Every sample resource, moved to private asset classes (topic names and subjects follow):
    equities to `asset_class`, the synthetic sample's own to `asset_class` + "syn"."""
    private = {"equities": asset_class, "synthetic": f"{asset_class}syn"}
    docs = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        text = path.read_text()
        for original, moved in private.items():
            text = text.replace(f"market.{original}.", f"market.{moved}.")
        for doc in yaml.safe_load_all(text):
            if doc["kind"] == "IngestionPipeline":
                doc["spec"]["assetClass"] = private[doc["spec"].get("assetClass", "equities")]
            docs.append(doc)
    return docs


def topic_config(admin: Any, topic: str) -> dict[str, str]:
    from k2.topics import current_config

    return current_config(admin, topic)


def topic_partitions(admin: Any, topic: str) -> int | None:
    from k2.topics import describe_partitions

    return describe_partitions(admin, [topic]).get(topic)


class Helpers:
    """The module-level helpers above, as a fixture (test modules cannot import a conftest under
    --import-mode=importlib)."""

    PLURALS = PLURALS
    wait_for = staticmethod(wait_for)
    find_condition = staticmethod(find_condition)
    load_samples = staticmethod(load_samples)
    topic_config = staticmethod(topic_config)
    topic_partitions = staticmethod(topic_partitions)
    catalog_secret_data = staticmethod(catalog_secret_data)
    operator_args = staticmethod(operator_args)
    container_env = staticmethod(container_env)
    mount_secrets = staticmethod(mount_secrets)
    start_container = staticmethod(start_container)
    mark_pods_ready = staticmethod(mark_pods_ready)


@pytest.fixture(scope="session")
def k2op() -> type[Helpers]:
    return Helpers


# the oracle ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OracleTrade:
    symbol: str
    local: dt.datetime  # aware, Australia/Sydney
    sequence_number: int
    price: Decimal
    volume: int

    @property
    def ts_us(self) -> int:
        return _micros(self.local)


@dataclass(frozen=True)
class OracleQuote:
    symbol: str
    local: dt.datetime
    sequence_number: int
    bid: Decimal
    ask: Decimal
    bid_size: int
    ask_size: int


def exact(numerator: Fraction | Decimal | int, denominator: int) -> str:
    """numerator / denominator rounded half-to-even to 6 places, as the API prints it."""
    micro = round(Fraction(numerator) * 1_000_000 / denominator)  # round() on a Fraction is half-even
    return f"{Decimal(micro).scaleb(-6):.6f}"


class AsxOracle:
    """Expected figures straight from the CSV files, by a route independent of K2's code."""

    def __init__(self, root: Path) -> None:
        with (root / "reference-data" / "company_info.csv").open(newline="") as fh:
            symbols = {row["company_id"]: row["symbol"] for row in csv.DictReader(fh)}
        self.trades: dict[tuple[str, dt.date], list[OracleTrade]] = defaultdict(list)
        self.quotes: dict[str, list[OracleQuote]] = defaultdict(list)
        for path in sorted((root / "trades").glob("*.csv")):
            symbol = symbols[path.stem]
            for local, seq, row in self._rows(path):
                self.trades[symbol, local.date()].append(
                    OracleTrade(symbol, local, seq, Decimal(row[2]), int(Decimal(row[3]))))
        for path in sorted((root / "quotes").glob("*.csv")):
            symbol = symbols[path.stem]
            for local, seq, row in self._rows(path):
                self.quotes[symbol].append(OracleQuote(symbol, local, seq, Decimal(row[2]), Decimal(row[3]),
                                                       int(Decimal(row[4])), int(Decimal(row[5]))))
        for trades in self.trades.values():
            trades.sort(key=lambda t: (t.local, t.sequence_number))
        for quotes in self.quotes.values():
            quotes.sort(key=lambda q: (q.local, q.sequence_number))

    @staticmethod
    def _rows(path: Path) -> Iterator[tuple[dt.datetime, int, list[str]]]:
        sequence: dict[dt.date, int] = defaultdict(int)
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                local = dt.datetime.strptime(f"{row[0]} {row[1]}", "%m/%d/%Y %H:%M:%S.%f").replace(tzinfo=SYDNEY)
                sequence[local.date()] += 1
                yield local, sequence[local.date()], row

    def symbol_days(self) -> list[tuple[str, dt.date]]:
        return sorted(self.trades)

    def summary(self, symbol: str, day: dt.date) -> dict[str, object]:
        trades = self.trades[symbol, day]
        volume = sum(t.volume for t in trades)
        return {"symbol": symbol, "exchange": "ASX", "date": day.isoformat(),
                "open": f"{trades[0].price:.6f}", "high": f"{max(t.price for t in trades):.6f}",
                "low": f"{min(t.price for t in trades):.6f}", "close": f"{trades[-1].price:.6f}",
                "volume": volume, "trade_count": len(trades),
                "vwap": exact(sum(t.price * t.volume for t in trades), volume)}

    def bars(self, symbol: str, day: dt.date, minutes: int) -> list[dict[str, object]]:
        """Bars of `minutes` over one local day: OHLCV, VWAP and TWAP (see k2.query.bars)."""
        buckets: dict[dt.datetime, list[OracleTrade]] = defaultdict(list)
        for t in self.trades[symbol, day]:
            start = t.local.replace(minute=t.local.minute - t.local.minute % minutes, second=0, microsecond=0)
            buckets[start].append(t)
        bars = []
        for start, trades in sorted(buckets.items()):
            end = start + dt.timedelta(minutes=minutes)
            end_us = _micros(end)
            held = [(nxt.ts_us if nxt else end_us) - t.ts_us
                    for t, nxt in zip(trades, [*trades[1:], None], strict=True)]
            volume = sum(t.volume for t in trades)
            bars.append({
                "symbol": symbol, "bucket_start": _utc(start), "bucket_end": _utc(end),
                "open": f"{trades[0].price:.6f}", "high": f"{max(t.price for t in trades):.6f}",
                "low": f"{min(t.price for t in trades):.6f}", "close": f"{trades[-1].price:.6f}",
                "volume": volume, "trade_count": len(trades),
                "vwap": exact(sum(t.price * t.volume for t in trades), volume),
                "twap": exact(sum(t.price * h for t, h in zip(trades, held, strict=True)), sum(held)),
            })
        return bars

    def prevailing_quote(self, symbol: str, at: dt.datetime) -> OracleQuote | None:
        """The last quote at or before `at` (the highest sequence number among equal times)."""
        found = None
        for quote in self.quotes[symbol]:
            if quote.local > at:
                break
            found = quote
        return found


def _micros(instant: dt.datetime) -> int:
    return (instant - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def _utc(local: dt.datetime) -> str:
    return local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="session")
def asx_oracle(asx_root: Path) -> AsxOracle:
    return AsxOracle(asx_root)
