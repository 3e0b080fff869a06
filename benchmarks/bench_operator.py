"""Operator benchmark: apply → Synced latency per kind, 50 IcebergTables at once, operator memory.

Runs against the local stack (etcd + kube-apiserver + kube-controller-manager, Kafka, Schema
Registry; an embedded SQLite Iceberg catalog in a temporary folder), starting whatever is not
running and stopping what it started. The operator runs as its own process (`k2 operator
--namespace …`), exactly as `make operator` runs it, so its RSS is measured alone.

    .venv/bin/python benchmarks/bench_operator.py [--repeat 5] [--tables 50] > report.md

Prints a Markdown report. Latency is measured from the create call returning to the first
observation (polled every 25 ms) of `Synced=True` for the resource's current generation.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION = "k2.io", "v1alpha1"
PLURALS = {"IngestionPipeline": "ingestionpipelines", "IcebergTable": "icebergtables", "QueryService": "queryservices"}
POLL = 0.025


def ensure_stack() -> list[Any]:
    from k2.stack.kafka import Kafka
    from k2.stack.kube import kube_services
    from k2.stack.registry import SchemaRegistry

    started = []
    for service in [*kube_services(), Kafka(), SchemaRegistry()]:
        if service.status() != "ready":
            service.start()
            started.append(service)
    return started


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, kubeconfig: Path) -> None:
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.namespace = f"k2bench-{uuid.uuid4().hex[:6]}"

    def ready(self, kind: str, name: str) -> bool:
        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name)
        except ApiException:
            return False
        status = obj.get("status") or {}
        return status.get("observedGeneration") == obj["metadata"]["generation"] and any(
            # Synced, not Ready: Ready also needs running pods, which this control plane never has.
            c["type"] == "Synced" and c["status"] == "True" for c in status.get("conditions") or [])

    def apply_and_wait(self, body: dict[str, Any], timeout: float = 120.0) -> float:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[body["kind"]], body)
        started = time.perf_counter()
        while not self.ready(body["kind"], body["metadata"]["name"]):
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{body['kind']}/{body['metadata']['name']} not Synced after {timeout}s")
            time.sleep(POLL)
        return time.perf_counter() - started


def table(name: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IcebergTable", "metadata": {"name": name},
            "spec": {"namespace": ns, "name": name.replace("-", "_"), "schema": {"fields": [
                {"name": "symbol", "type": "string", "required": True}, {"name": "price", "type": "decimal(18,6)"},
                {"name": "at", "type": "timestamp"}]}, "partitionBy": [{"column": "symbol", "transform": "bucket[4]"}]}}


def pipeline(name: str, asset_class: str) -> dict[str, Any]:
    """An ASX pipeline; its asset class keeps its topics apart from every other's (the exchange is
    one of the registry's)."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IngestionPipeline", "metadata": {"name": name},
            "spec": {"exchange": "asx", "assetClass": asset_class, "topics": {"partitions": 3}}}


def query(name: str, table_name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QueryService", "metadata": {"name": name},
            "spec": {"replicas": 1, "tables": [{"name": table_name}]}}


def summarize(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"{statistics.median(ordered) * 1000:.0f} | {p95 * 1000:.0f} | {ordered[0] * 1000:.0f} | "
            f"{ordered[-1] * 1000:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="resources per kind for the latency figures")
    parser.add_argument("--tables", type=int, default=50, help="IcebergTables applied at once")
    args = parser.parse_args()

    started = ensure_stack()
    from k2.stack.kafka import Kafka
    from k2.stack.kube import kubeconfig_path
    from k2.stack.registry import SchemaRegistry

    kubeconfig = kubeconfig_path()
    bench = Bench(kubeconfig)
    subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "apply", "--server-side", "--force-conflicts",
                    "-f", str(REPO / "manifests/base/crds")], check=True, capture_output=True)
    subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "wait", "--for=condition=Established",
                    "crd", "--all", "--timeout=60s"], check=True, capture_output=True)
    bench.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=bench.namespace)))
    workdir = Path(tempfile.mkdtemp(prefix="k2-bench-operator-"))
    secret = {"catalog_uri": f"sqlite:///{workdir}/catalog.db", "warehouse": str(workdir / "warehouse")}
    bench.core.create_namespaced_secret(bench.namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="k2-catalog"),
        data={k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}))

    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "K2_KAFKA_BOOTSTRAP": Kafka().bootstrap,
           "K2_REGISTRY_URL": SchemaRegistry().url, "K2_OPERATOR_METRICS_PORT": "0", "K2_OPERATOR_LIVENESS": "",
           "K2_OPERATOR_RETRY_DELAY": "1", "K2_LOG_LEVEL": "WARNING"}
    log = open(workdir / "operator.log", "w")  # noqa: SIM115 - closed at the end
    operator = subprocess.Popen([str(Path(sys.executable).with_name("k2")), "operator", "--namespace",
                                 bench.namespace], env=env, stdout=log, stderr=subprocess.STDOUT)
    rows: list[str] = []
    try:
        t0 = time.perf_counter()
        bench.apply_and_wait(table("warmup", "bench"))
        startup = time.perf_counter() - t0
        rss_idle = rss_kib(operator.pid)

        asset_class = f"b{uuid.uuid4().hex[:6]}"
        latencies = {
            "IcebergTable": [bench.apply_and_wait(table(f"lat-{i}", "bench")) for i in range(args.repeat)],
            "IngestionPipeline": [bench.apply_and_wait(pipeline(f"p{i}x{asset_class[1:]}", f"{asset_class}p{i}"))
                                  for i in range(args.repeat)],
            "QueryService": [bench.apply_and_wait(query(f"q-{i}", "warmup")) for i in range(args.repeat)],
        }
        for kind, samples in latencies.items():
            rows.append(f"| {kind} | {len(samples)} | {summarize(samples)} |")

        names = [f"many-{i:03d}" for i in range(args.tables)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: bench.custom.create_namespaced_custom_object(
                GROUP, VERSION, bench.namespace, "icebergtables", table(n, "many")), names))
        applied = time.perf_counter() - t0
        pending = set(names)
        while pending:
            pending = {n for n in pending if not bench.ready("IcebergTable", n)}
            if time.perf_counter() - t0 > 600:
                raise TimeoutError(f"{len(pending)} tables not Synced after 600 s")
            time.sleep(0.1)
        all_ready = time.perf_counter() - t0
        rss_after, rss_peak = rss_kib(operator.pid), rss_kib(operator.pid, "VmHWM")
    finally:
        operator.terminate()
        operator.wait(30)
        log.close()
        bench.core.delete_namespace(bench.namespace)
        for service in reversed(started):
            service.stop()

    print("# Operator benchmark\n")
    print(f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, kopf operator as a separate "
          f"process; local etcd + kube-apiserver + kube-controller-manager, Kafka, Schema Registry, SQLite "
          f"Iceberg catalog.\n")
    print("## Apply → Synced latency (ms)\n")
    print("| kind | n | median | p95 | min | max |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nIcebergTable: create an Iceberg table (3 columns, bucket partition) in the catalog. "
          "IngestionPipeline: 3 topics + DLQ in Kafka, 3 subjects in the registry, settings ConfigMap. "
          "QueryService: settings ConfigMap, Deployment, Service, PodDisruptionBudget.\n")
    print(f"## {args.tables} IcebergTables applied at once\n")
    print("| step | seconds |\n|---|---|")
    print(f"| all {args.tables} created (8 client threads) | {applied:.2f} |")
    print(f"| all {args.tables} Synced | {all_ready:.2f} |")
    print(f"| throughput | {args.tables / all_ready:.1f} tables/s |\n")
    print("## Operator memory (RSS)\n")
    print("| point | MiB |\n|---|---|")
    print(f"| after start-up and the first table ({startup:.1f} s) | {rss_idle / 1024:.0f} |")
    print(f"| after {args.tables + 3 * args.repeat + 1} resources | {rss_after / 1024:.0f} |")
    print(f"| peak (VmHWM) | {rss_peak / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
