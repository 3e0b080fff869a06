"""The images built on this machine (k2.stack.images) run what the chart runs.

Each infrastructure container of `helm template` with charts/k2/ci/kind-values.yaml is started with
`docker run` exactly as its pod would start it: the chart's command, args and env, its ConfigMaps
mounted, emptyDirs and volume claims as tmpfs, the pod's UID/GID, a read-only root filesystem where
the chart asks for one, every capability dropped, and its Services' DNS names as network aliases.
Kafka must then serve metadata, the registry its Confluent API (journalled in that Kafka),
PostgreSQL a SCRAM login to the release's database, versitygw a signed S3 call. The K2 image runs
`k2 --help` as UID 10001; Prometheus answers its query API; the other add-ons start as nobody.

Needs a Docker engine (started on demand as root by k2.stack.docker); skips with the reason where
there is none. Builds are cached (k2.stack.images), so a warm run only starts containers.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg2
import pytest
import yaml
from botocore.config import Config
from confluent_kafka.admin import AdminClient

from k2.stack import docker, helm, images

pytestmark = [pytest.mark.images, pytest.mark.timeout(5400, func_only=False)]

REPO = Path(__file__).resolve().parents[2]
KIND_VALUES = yaml.safe_load((REPO / "charts/k2/ci/kind-values.yaml").read_text())


def docker_cli(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="module")
def engine(docker_engine: None) -> None:
    docker.ensure_engine()  # a test elsewhere may have stopped the session's engine


def ensure(tag: str) -> str:
    """Build or load the image `tag` (each test builds only what it runs: cheap when cached)."""
    images.ensure(next(image for image in images.all_images() if image.tag == tag))
    return tag


@pytest.fixture(scope="module")
def chart() -> list[dict[str, Any]]:
    return helm.template(REPO / "charts/k2", values=[REPO / "charts/k2/ci/kind-values.yaml"])


@pytest.fixture(scope="module")
def network(engine: None) -> Iterator[str]:
    name = f"k2-images-test-{uuid.uuid4().hex[:8]}"
    docker_cli("network", "create", name)
    yield name
    docker_cli("network", "rm", name, check=False)


class Pods:
    """Starts chart containers as docker containers on one network; removes them at the end."""

    def __init__(self, chart: list[dict[str, Any]], network: str, tmp: Path) -> None:
        self.chart, self.network, self.tmp = chart, network, tmp
        self.started: list[str] = []

    def workload(self, component: str) -> dict[str, Any]:
        return next(o for o in self.chart if o["kind"] in ("StatefulSet", "Deployment", "Job")
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == component)

    def _object(self, kind: str, name: str) -> dict[str, Any]:
        return next(o for o in self.chart if o["kind"] == kind and o["metadata"]["name"] == name)

    def _env(self, box: dict[str, Any], pod_name: str) -> list[str]:
        out = []
        for var in box.get("env", []):
            if "value" in var:
                value = var["value"]
            elif "fieldRef" in var["valueFrom"]:
                assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                value = pod_name
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                value = self._object("Secret", ref["name"])["stringData"][ref["key"]]
            out += ["--env", f"{var['name']}={value}"]
        return out

    def _mounts(self, workload: dict[str, Any], box: dict[str, Any], name: str) -> list[str]:
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        owner = f"uid={spec['securityContext']['runAsUser']},gid={spec['securityContext']['fsGroup']}"
        out = []
        for mount in box.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if "configMap" in volume:
                folder = self.tmp / name / mount["name"]
                folder.mkdir(parents=True)
                for key, text in self._object("ConfigMap", volume["configMap"]["name"])["data"].items():
                    (folder / key).write_text(text)
                    (folder / key).chmod(0o644)
                folder.chmod(0o755)
                out += ["--volume", f"{folder}:{mount['mountPath']}:ro"]
            else:  # emptyDir or a volume claim: empty, and writable as fsGroup makes a fresh volume
                out += ["--tmpfs", f"{mount['mountPath']}:mode=0770,{owner}"]
        return out

    def _aliases(self, workload: dict[str, Any], pod_name: str) -> list[str]:
        namespace = workload["metadata"]["namespace"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        names = []
        for svc in (o for o in self.chart if o["kind"] == "Service"):
            if all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
                service = svc["metadata"]["name"]
                names += [service, f"{service}.{namespace}.svc"]
                if svc["spec"].get("clusterIP") == "None":
                    names.append(f"{pod_name}.{service}.{namespace}.svc")
        return [arg for alias in names for arg in ("--network-alias", alias)]

    def _run_args(self, component: str) -> list[str]:
        """`docker run` arguments that start `component`'s first container as pod `<name>-0`."""
        workload = self.workload(component)
        spec = workload["spec"]["template"]["spec"]
        box = spec["containers"][0]
        pod_name = f"{workload['metadata']['name']}-0"
        container = f"{self.network}-{component}"
        security = spec["securityContext"]
        args = ["--name", container, "--hostname", pod_name, "--network", self.network,
                "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
                "--group-add", str(security["fsGroup"]), "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges",
                *self._aliases(workload, pod_name), *self._env(box, pod_name),
                *self._mounts(workload, box, container)]
        if box["securityContext"].get("readOnlyRootFilesystem"):
            args.append("--read-only")
        command = [*box.get("command", []), *box.get("args", [])]
        assert box.get("command"), f"{component}: the chart must not rely on the image's entrypoint"
        return [*args, "--entrypoint", command[0], ensure(box["image"]), *command[1:]]

    def start(self, component: str, port: int) -> int:
        """Start `component` in the background; returns the host port its `port` is published on."""
        run_args = self._run_args(component)
        docker_cli("run", "--detach", "--publish", f"127.0.0.1::{port}", *run_args)
        container = f"{self.network}-{component}"
        self.started.append(container)
        mapped = docker_cli("port", container, f"{port}/tcp").stdout.splitlines()[0]
        return int(mapped.rsplit(":", 1)[1])

    def run_to_completion(self, component: str) -> subprocess.CompletedProcess:
        return docker_cli("run", "--rm", *self._run_args(component), timeout=300, check=False)

    def alive(self, component: str) -> bool:
        proc = docker_cli("inspect", "--format", "{{.State.Running}}", f"{self.network}-{component}", check=False)
        return proc.stdout.strip() == "true"

    def logs(self, component: str) -> str:
        proc = docker_cli("logs", "--tail", "60", f"{self.network}-{component}", check=False)
        return proc.stdout + proc.stderr

    def remove_all(self) -> None:
        for container in reversed(self.started):
            docker_cli("rm", "--force", container, check=False)


@pytest.fixture(scope="module")
def pods(chart: list[dict[str, Any]], network: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    started = Pods(chart, network, tmp_path_factory.mktemp("pods"))
    yield started
    started.remove_all()


def eventually(check: Callable[[], Any], *, timeout: float, what: str, logs: Callable[[], str],
               alive: Callable[[], bool] = lambda: True) -> Any:
    """check()'s first truthy result; a JVM's cold start on 2 busy cores is slow, not broken,
    but a container that exited has failed."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail(f"the container exited before {what}:\n{logs()}")
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - not serving yet
            last = exc
        time.sleep(2)
    pytest.fail(f"{what} within {timeout:.0f}s (last error: {last}):\n{logs()}")


@pytest.fixture(scope="module")
def kafka_port(pods: Pods) -> int:
    port = pods.start("kafka", 9092)
    eventually(lambda: 0 in AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
               .list_topics(timeout=3).brokers, timeout=300, what="Kafka serves metadata",
               logs=lambda: pods.logs("kafka"), alive=lambda: pods.alive("kafka"))
    return port


# --- tests -----------------------------------------------------------------------------------------
def test_every_image_runs_as_a_non_root_user(engine: None) -> None:
    for tag in (ensure(image.tag) for image in images.all_images()):
        user = json.loads(docker_cli("image", "inspect", "--format", "{{json .Config.User}}", tag).stdout)
        assert user and user.split(":")[0] not in ("0", "root"), f"{tag} runs as {user!r}"


def test_k2_image_runs_k2_as_uid_10001_on_a_read_only_root(engine: None) -> None:
    ensure(images.K2.tag)
    proc = docker_cli("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", images.K2.tag, "--help")
    uid = docker_cli("run", "--rm", "--entrypoint", "id", images.K2.tag, "-u").stdout.strip()

    assert "operator" in proc.stdout and "stream" in proc.stdout, proc.stdout
    assert uid == "10001"


def test_kafka_broker_serves_and_its_start_script_reruns_on_formatted_storage(pods: Pods, kafka_port: int) -> None:
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{kafka_port}", "log_level": 0})
    box = pods.workload("kafka")["spec"]["template"]["spec"]["containers"][0]
    # What a restarted pod runs before the broker: everything in the script but its final exec.
    steps = "\n".join(line for line in box["args"][0].splitlines() if not line.startswith("exec "))

    rerun = docker_cli("exec", f"{pods.network}-kafka", "/bin/sh", "-ec", steps, timeout=180, check=False)

    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert list(admin.list_topics(timeout=10).brokers) == [0]


def test_registry_serves_its_confluent_api_from_kafka(pods: Pods, kafka_port: int) -> None:
    port = pods.start("schema-registry", 8080)
    url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
    eventually(lambda: httpx.get(f"{url}/subjects", timeout=5).status_code == 200, timeout=420,
               what="the registry answers", logs=lambda: pods.logs("schema-registry"),
               alive=lambda: pods.alive("schema-registry"))
    schema = {"type": "record", "name": "T", "fields": [{"name": "x", "type": "long"}]}

    created = httpx.post(f"{url}/subjects/images-test-value/versions", json={"schema": json.dumps(schema)}, timeout=30)

    assert created.status_code == 200, created.text
    assert httpx.get(f"{url}/subjects", timeout=5).json() == ["images-test-value"]


def test_postgresql_initialises_the_release_database_and_accepts_scram_logins(pods: Pods) -> None:
    port = pods.start("postgresql", 5432)
    values = KIND_VALUES["postgresql"]

    def query() -> int:
        with psycopg2.connect(host="127.0.0.1", port=port, user="k2", password=values["password"], dbname="k2",
                              connect_timeout=3) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_database() = 'k2' AND current_user = 'k2'")
            return cur.fetchone()[0]

    assert eventually(query, timeout=120, what="PostgreSQL accepts k2", logs=lambda: pods.logs("postgresql"),
                      alive=lambda: pods.alive("postgresql"))
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=port, user="k2", password="wrong", dbname="k2", connect_timeout=3)


def test_versitygw_serves_signed_s3_requests(pods: Pods) -> None:
    port = pods.start("s3", 9000)
    auth = KIND_VALUES["s3"]["auth"]
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                      aws_access_key_id=auth["accessKey"], aws_secret_access_key=auth["secretKey"],
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                    retries={"total_max_attempts": 1}))

    eventually(lambda: s3.list_buckets() is not None, timeout=60, what="versitygw answers",
               logs=lambda: pods.logs("s3"), alive=lambda: pods.alive("s3"))
    s3.create_bucket(Bucket="images-test")
    s3.put_object(Bucket="images-test", Key="a", Body=b"k2")

    assert s3.get_object(Bucket="images-test", Key="a")["Body"].read() == b"k2"
    # The chart's post-install Job creates the warehouse bucket with the K2 image, idempotently.
    bucket = KIND_VALUES.get("s3", {}).get("bucket", "k2-warehouse")
    for _ in range(2):
        job = pods.run_to_completion("s3-bucket")
        assert job.returncode == 0 and f"bucket {bucket} ready" in job.stdout, job.stdout + job.stderr
    assert bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}


@pytest.mark.parametrize(("name", "args", "expect"), [
    ("traefik", ["version"], "v3.6.12"),
    ("prometheus-operator", ["--version"], "0.85.0"),
    ("prometheus-config-reloader", ["--version"], "0.85.0"),
    ("metrics-server", ["--version"], "v0.8.0"),
])
def test_addon_programs_start_as_nobody(engine: None, name: str, args: list[str], expect: str) -> None:
    image = next(i for i in images.ADDON_IMAGES if i.name == name)
    proc = docker_cli("run", "--rm", "--read-only", "--cap-drop", "ALL", ensure(image.tag), *args, check=False)

    assert expect in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_prometheus_answers_queries(network: str) -> None:
    image = next(i for i in images.ADDON_IMAGES if i.name == "prometheus")
    ensure(image.tag)
    container = f"{network}-prometheus"
    config = ("global: {scrape_interval: 1s}\n"
              "scrape_configs: [{job_name: self, static_configs: [{targets: ['localhost:9090']}]}]\n")
    docker_cli("run", "--detach", "--name", container, "--read-only", "--cap-drop", "ALL", "--network", network,
               "--tmpfs", "/prometheus:uid=65534,gid=65534", "--publish", "127.0.0.1::9090",
               "--entrypoint", "/bin/sh", image.tag, "-c",
               f"printf \"{config}\" > /prometheus/p.yml && exec /bin/prometheus --config.file=/prometheus/p.yml "
               "--storage.tsdb.path=/prometheus/data")
    try:
        port = int(docker_cli("port", container, "9090/tcp").stdout.splitlines()[0].rsplit(":", 1)[1])
        logs = lambda: docker_cli("logs", container, check=False).stderr[-3000:]  # noqa: E731
        result = eventually(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": 'up{job="self"}'},
                              timeout=5).json()["data"]["result"], timeout=120, what="Prometheus scrapes itself",
            logs=logs)
        assert result[0]["value"][1] == "1"
    finally:
        docker_cli("rm", "--force", container, check=False)
